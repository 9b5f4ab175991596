"""Chaos with the fds themselves: a receiver out of fds; every kind of fd.

* A receiving process whose ``RLIMIT_NOFILE`` is too small for what it is
  sent: the kernel installs what it can and truncates the rest
  (``MSG_CTRUNC``).  The receiver must fail with a clear
  :class:`MalformedMessageError`, keep nothing of the message, and deliver
  what was read before it; with Chromium's tolerance of truncation the
  missing fds are still caught (``strict_handles``).
* Fds of every kind (pipe ends, a socket, a directory, ``/dev/null``, a
  memfd, an epoll instance, an eventfd) arrive as owned, close-on-exec
  :class:`Handle` s that still work, between two channels in this process
  and there and back through a child.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio
from _chaos_support import nothing_left_behind, peer_command, source_pipes
from _helpers import open_pair

from trio_mojo import (
    Channel,
    ChannelError,
    Handle,
    Message,
    open_channel,
    open_process_with_channel,
)

LIMIT = 32
"""The child's RLIMIT_NOFILE: room for its own fds and a few more."""


@pytest.mark.parametrize(
    ("chromium", "reason"),
    [
        pytest.param(False, "control data truncated (MSG_CTRUNC)", id="strict"),
        pytest.param(True, "file descriptors are missing", id="chromium-tolerant"),
    ],
)
async def test_a_receiver_out_of_fds_fails_clearly_and_keeps_nothing(
    chromium: bool, reason: str
) -> None:
    argv = peer_command("nofile", str(LIMIT), *(["chromium"] if chromium else []))
    async with nothing_left_behind(0):
        with source_pipes(1) as sources, trio.fail_after(30):
            async with open_process_with_channel(argv, stdout=subprocess.PIPE) as child:
                assert child.process.stdout is not None
                async with open_channel(child.endpoint) as channel:
                    with await channel.receive() as ready:
                        assert ready.payload == b"ready"
                    for _ in range(3):  # these fit
                        await channel.send(Message(b"two", sources.handles([0, 0])))
                    # 100 fds in one sendmsg: the kernel can install ~20 of them.
                    await channel.send(Message(b"too many", sources.handles([0] * 100)))
                    with pytest.raises((trio.EndOfChannel, ChannelError)):
                        await channel.receive()  # the child cut us off
                output = await child.process.stdout.receive_some(1 << 16)
            assert child.returncode == 0
    result = json.loads(output)
    # Messages read before the truncated read are delivered; those in the
    # same read (the writer may coalesce them) are lost with it.
    assert result["received"] in ([], [2], [2, 2], [2, 2, 2]), result
    assert result["error"] == "MalformedMessageError", result
    assert reason in result["message"], result
    assert result["after"] == result["before"], "the child kept fds of the message"


# ----------------------------------------------------------------------
# Every kind of fd


FdCheck = Callable[[int], None]
"""Checks that a received fd works as the kind it is (raises if not)."""


@contextlib.contextmanager
def every_kind_of_fd(directory: Path) -> Iterator[dict[str, tuple[int, FdCheck]]]:
    """``{kind: (fd to send, check of a received copy)}``; closes them all."""
    kept: list[int] = []

    def keep(fd: int) -> int:
        kept.append(fd)
        return fd

    (directory / "marker").write_bytes(b"")
    pipe_in_r, pipe_in_w = (keep(fd) for fd in os.pipe())  # we send the read end
    pipe_out_r, pipe_out_w = (keep(fd) for fd in os.pipe())  # we send the write end
    left, right = socket.socketpair()
    sock_sent, sock_kept = keep(left.detach()), keep(right.detach())
    memfd = keep(os.memfd_create("chaos", os.MFD_CLOEXEC))
    os.write(memfd, b"memfd content")
    eventfd = keep(os.eventfd(0, os.EFD_CLOEXEC))
    epoll = select.epoll()
    watched = keep(os.eventfd(1, os.EFD_CLOEXEC))  # readable from the start
    epoll.register(watched, select.EPOLLIN)
    epoll_fd = keep(os.dup(epoll.fileno()))
    epoll.close()

    def pipe_read_end(fd: int) -> None:
        os.write(pipe_in_w, b"p")
        assert os.read(fd, 1) == b"p"

    def pipe_write_end(fd: int) -> None:
        os.write(fd, b"q")
        assert os.read(pipe_out_r, 1) == b"q"

    def unix_socket(fd: int) -> None:
        os.write(fd, b"s")
        assert os.read(sock_kept, 1) == b"s"

    def directory_fd(fd: int) -> None:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
        assert "marker" in os.listdir(fd)

    def dev_null(fd: int) -> None:
        assert os.write(fd, b"x") == 1
        assert os.fstat(fd).st_rdev == os.makedev(1, 3)

    def memfd_fd(fd: int) -> None:
        assert os.pread(fd, 64, 0) == b"memfd content"

    def eventfd_fd(fd: int) -> None:
        os.eventfd_write(fd, 7)
        assert os.eventfd_read(eventfd) == 7

    def epoll_instance(fd: int) -> None:
        with select.epoll.fromfd(os.dup(fd)) as copy:
            assert copy.poll(0) == [(watched, select.EPOLLIN)]

    try:
        kinds: dict[str, tuple[int, FdCheck]] = {
            "pipe read end": (pipe_in_r, pipe_read_end),
            "pipe write end": (pipe_out_w, pipe_write_end),
            "unix socket": (sock_sent, unix_socket),
            "directory": (
                keep(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)),
                directory_fd,
            ),
            "/dev/null": (
                keep(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)),
                dev_null,
            ),
            "memfd": (memfd, memfd_fd),
            "eventfd": (eventfd, eventfd_fd),
            "epoll": (epoll_fd, epoll_instance),
        }
        yield kinds
    finally:
        for fd in kept:
            os.close(fd)


@contextlib.asynccontextmanager
async def _in_process() -> AsyncIterator[tuple[Channel, Channel]]:
    async with open_pair() as (left, right):
        yield left, right


@contextlib.asynccontextmanager
async def _through_a_child() -> AsyncIterator[tuple[Channel, Channel]]:
    """Both ends are ours: what we send comes back from an echoing child."""
    async with (
        open_process_with_channel(peer_command("echo")) as child,
        open_channel(child.endpoint) as channel,
    ):
        yield channel, channel


@pytest.mark.parametrize("route", ["in-process", "through-a-child"])
async def test_every_kind_of_fd_arrives_owned_close_on_exec_and_working(
    route: str, tmp_path: Path
) -> None:
    opened = _in_process() if route == "in-process" else _through_a_child()
    async with nothing_left_behind(0):
        with every_kind_of_fd(tmp_path) as kinds, trio.fail_after(20):
            async with opened as (sender, receiver):
                handles = [Handle.dup(fd) for fd, _ in kinds.values()]
                await sender.send(Message(b"every kind", handles))
                with await receiver.receive() as message:
                    assert message.payload == b"every kind"
                    assert len(message.handles) == len(kinds)
                    for (kind, (_, check)), handle in zip(
                        kinds.items(), message.handles, strict=True
                    ):
                        assert isinstance(handle, Handle), kind
                        assert not handle.closed, kind
                        flags = fcntl.fcntl(handle.fileno(), fcntl.F_GETFD)
                        assert flags & fcntl.FD_CLOEXEC, f"{kind} is not close-on-exec"
                        check(handle.fileno())
                assert all(handle.closed for handle in message.handles)
