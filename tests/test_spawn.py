"""Passing an endpoint to a child Chromium's way, and getting it back.

``recover_endpoint`` is tested in this process with hand-made argv lists and
real sockets.  ``open_process_with_channel`` is tested with a plain child
that is *not* a trio_mojo program: a ``python -I -c`` script that uses only
the stdlib ``socket``/``struct``/``array`` modules (plus ``os``/``sys``),
parses ``--mojo-platform-channel-handle=N`` and speaks the Mojo wire format
on fd N by hand.
"""

from __future__ import annotations

import ast
import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from _process_support import assert_reaped, children, inheritable_fds, pipe_with

from trio_mojo import (
    CHANNEL_SWITCH,
    Message,
    channel_pair,
    open_channel,
    open_process_with_channel,
    recover_endpoint,
)
from trio_mojo._workers._spawn import start_with_endpoints

# A child that knows nothing of trio_mojo.  It reads one framed message with
# its fds, replies with a framed message that describes what it saw (as a
# Python literal) and carries a pipe of its own, then waits for end of
# stream.  Every check is made by the parent on the reply.
PLAIN_CHILD = r"""
import array, os, socket, struct, sys

SWITCH = "--mojo-platform-channel-handle="
HEADER = struct.Struct("<IHHH6x")  # num_bytes, num_header_bytes, type, num_handles
NORMAL = 1

values = [arg[len(SWITCH):] for arg in sys.argv if arg.startswith(SWITCH)]
if len(values) != 1 or not values[0].isdigit():
    sys.exit("bad switch in %r" % (sys.argv,))
fd = int(values[0])
nonblocking = not os.get_blocking(fd)
sock = socket.socket(fileno=fd)
sock.setblocking(True)

def receive_exactly(size):
    data, fds = b"", []
    while len(data) < size:
        chunk, ancdata, flags, _ = sock.recvmsg(
            size - len(data), socket.CMSG_SPACE(64 * 4), socket.MSG_CMSG_CLOEXEC)
        if flags & socket.MSG_CTRUNC:
            sys.exit("control data truncated")
        for level, kind, cdata in ancdata:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                fds.extend(got)
        if not chunk:
            sys.exit("end of stream inside a message")
        data += chunk
    return data, fds

header, fds = receive_exactly(HEADER.size)
num_bytes, num_header_bytes, message_type, num_handles = HEADER.unpack(header)
payload, more = receive_exactly(num_bytes - HEADER.size)
fds += more
received = [os.read(f, 100) for f in fds]
for f in fds:
    os.close(f)

def is_open(n):
    try:
        os.fstat(n)
    except OSError:
        return False
    return True

reply = repr({
    "header": (num_bytes, num_header_bytes, message_type, num_handles),
    "padding": header[10:],
    "payload": payload,
    "received": received,
    "fd_table": sorted(n for n in map(int, os.listdir("/proc/self/fd")) if is_open(n)),
    "channel_fd": fd,
    "nonblocking": nonblocking,
    "stdin": os.readlink("/proc/self/fd/0"),
    "argv": sys.argv[1:],
}).encode()
r, w = os.pipe()
os.write(w, b"a pipe from the plain child")
os.close(w)
sock.sendmsg(
    [HEADER.pack(HEADER.size + len(reply), HEADER.size, NORMAL, 1), reply],
    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
os.close(r)
if sock.recv(1) != b"":
    sys.exit("expected end of stream")
"""

# Ignores SIGTERM, says so on stdout, then sleeps: only SIGKILL ends it.
STUBBORN_CHILD = r"""
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stdout.write("ready\n")
sys.stdout.flush()
time.sleep(60)
"""

SLEEPER = "import time; time.sleep(60)"


def _socket_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            fds.add(int(name))
    return fds


# ----------------------------------------------------------------------
# recover_endpoint


def _switch(value: object) -> list[str]:
    return ["prog", "--other", f"{CHANNEL_SWITCH}={value}"]


def test_recover_endpoint_adopts_a_connected_socket() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        fd = theirs.detach()
        os.set_inheritable(fd, True)  # as the child inherits it
        os.set_blocking(fd, True)
        endpoint = recover_endpoint(_switch(fd))
        with endpoint:
            assert endpoint.fileno() == fd
            assert not os.get_inheritable(fd)  # close-on-exec again
            assert not os.get_blocking(fd)
            ours.sendall(b"x")  # it is the peer of `ours`
            assert os.read(fd, 1) == b"x"
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


def test_recover_endpoint_reads_sys_argv_and_custom_switches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = socket.socketpair()
    with a, b:
        monkeypatch.setattr(sys, "argv", ["prog", f"{CHANNEL_SWITCH}={a.fileno()}"])
        endpoint = recover_endpoint()
        assert endpoint.fileno() == a.fileno()
        endpoint.detach()
        other = recover_endpoint(
            [f"--my-handle={b.fileno()}", f"{CHANNEL_SWITCH}=7"], switch="--my-handle"
        )
        assert other.fileno() == b.fileno()
        other.detach()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["prog"],
        ["prog", CHANNEL_SWITCH, "5"],  # Chromium's switches take "=value"
        ["prog", f"{CHANNEL_SWITCH}-extra=5"],
        ["prog", f"-{CHANNEL_SWITCH}=5"],
    ],
)
def test_recover_endpoint_without_the_switch(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="was not given a channel"):
        recover_endpoint(argv)


def test_recover_endpoint_with_the_switch_twice() -> None:
    a, b = socket.socketpair()
    with a, b:
        argv = [f"{CHANNEL_SWITCH}={a.fileno()}", f"{CHANNEL_SWITCH}={b.fileno()}"]
        with pytest.raises(ValueError, match="given 2 times"):
            recover_endpoint(argv)
        os.fstat(a.fileno())  # neither was adopted (nor closed)
        os.fstat(b.fileno())


@pytest.mark.parametrize(
    "value", ["", "abc", "-3", "+3", " 3", "3 ", "0x3", "3.0", "1e3", "\u0663"]
)
def test_recover_endpoint_with_a_non_numeric_value(value: str) -> None:
    with pytest.raises(ValueError, match="expected a decimal fd number"):
        recover_endpoint(_switch(value))


@pytest.mark.parametrize("value", ["0", "1", "2", "00"])
def test_recover_endpoint_below_3(value: str) -> None:
    with pytest.raises(ValueError, match="must be >= 3"):
        recover_endpoint(_switch(value))


@pytest.mark.parametrize("value", [str(2**31), str(2**64), "9" * 30])
def test_recover_endpoint_with_an_impossible_fd(value: str) -> None:
    with pytest.raises(ValueError, match="not a possible fd number"):
        recover_endpoint(_switch(value))


def test_recover_endpoint_with_a_closed_fd() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        recover_endpoint(_switch(read_end))
    assert info.value.errno == errno.EBADF


def _refused(fd: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        recover_endpoint(_switch(fd))
    os.fstat(fd)  # still open: a refused fd stays the caller's


def test_recover_endpoint_refuses_a_pipe_and_a_file(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    regular = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        _refused(read_end, "is not a socket")
        _refused(regular, "is not a socket")
    finally:
        for fd in (read_end, write_end, regular):
            os.close(fd)


def test_recover_endpoint_refuses_other_kinds_of_socket() -> None:
    inet = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    datagram_a, datagram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with inet, datagram_a, datagram_b:
        _refused(inet.fileno(), "not an AF_UNIX socket")
        _refused(datagram_a.fileno(), "not a SOCK_STREAM socket")


def test_recover_endpoint_refuses_an_unconnected_socket(tmp_path: Path) -> None:
    fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with fresh, listening:
        listening.bind(str(tmp_path / "sock"))
        listening.listen()
        _refused(fresh.fileno(), "not a connected socket")
        _refused(listening.fileno(), "not a connected socket")


# ----------------------------------------------------------------------
# open_process_with_channel with a plain child


async def test_plain_child_exchanges_framed_messages_with_fds(tmp_path: Path) -> None:
    argv = [sys.executable, "-I", "-c", PLAIN_CHILD, "extra-arg"]
    with inheritable_fds(tmp_path):
        sockets_before = _socket_fds()
        async with open_process_with_channel(argv) as child:
            # The parent kept only its own end: the remote end is closed.
            assert _socket_fds() - sockets_before == {child.endpoint.fileno()}
            async with open_channel(child.endpoint) as channel:
                await channel.send(
                    Message(b"hello, plain child", (pipe_with(b"from the parent"),))
                )
                reply = await channel.receive()
            with reply:
                info: dict[str, Any] = ast.literal_eval(reply.payload.decode())
                assert len(reply.handles) == 1
                (handle,) = reply.handles
                assert not os.get_inheritable(handle.fileno())  # MSG_CMSG_CLOEXEC
                assert os.read(handle.fileno(), 100) == b"a pipe from the plain child"
    assert child.returncode == 0  # it saw a clean end of stream and exited
    assert_reaped(child.pid)

    payload_size = len(b"hello, plain child")
    assert info["header"] == (16 + payload_size, 16, 1, 1)
    assert info["padding"] == bytes(6)
    assert info["payload"] == b"hello, plain child"
    assert info["received"] == [b"from the parent"]
    channel_fd = info["channel_fd"]
    assert channel_fd >= 3
    # Exactly stdio and the channel, although the parent held inheritable fds.
    assert info["fd_table"] == [0, 1, 2, channel_fd]
    assert info["nonblocking"] is True  # Chromium children rely on O_NONBLOCK
    assert info["stdin"] == "/dev/null"
    assert info["argv"] == ["extra-arg", f"{CHANNEL_SWITCH}={channel_fd}"]


async def test_a_failed_start_closes_both_ends() -> None:
    sockets_before = _socket_fds()
    with pytest.raises(FileNotFoundError):
        async with open_process_with_channel(["/nonexistent/trio-mojo-child"]):
            pytest.fail("the block must not run")  # pragma: no cover
    assert _socket_fds() == sockets_before


async def test_managed_options_are_refused() -> None:
    local, remote = channel_pair()
    with local, pytest.raises(ValueError, match="'pass_fds' is managed"):
        await start_with_endpoints(
            [sys.executable, "-c", "pass"], {CHANNEL_SWITCH: remote}, pass_fds=(5,)
        )
    assert remote.closed  # closed although nothing was started


async def test_leaving_normally_terminates_a_child_that_does_not_exit() -> None:
    start = trio.current_time()
    async with open_process_with_channel(
        [sys.executable, "-I", "-c", SLEEPER], grace_period=0.2
    ) as child:
        pass
    assert child.returncode == -signal.SIGTERM
    assert 0.2 <= trio.current_time() - start < 5
    assert_reaped(child.pid)


async def test_a_child_that_ignores_sigterm_is_killed() -> None:
    async with open_process_with_channel(
        [sys.executable, "-I", "-c", STUBBORN_CHILD],
        stdout=subprocess.PIPE,
        grace_period=0.2,
    ) as child:
        assert child.process.stdout is not None
        assert await child.process.stdout.receive_some() == b"ready\n"
    assert child.returncode == -signal.SIGKILL
    assert_reaped(child.pid)


async def test_leaving_by_an_exception_kills_the_child_at_once() -> None:
    start = trio.current_time()
    with pytest.raises(KeyError, match="boom"):
        async with open_process_with_channel(
            [sys.executable, "-I", "-c", SLEEPER], grace_period=30
        ) as child:
            raise KeyError("boom")
    assert child.returncode == -signal.SIGKILL
    assert trio.current_time() - start < 5  # did not wait out the grace period
    assert_reaped(child.pid)


async def test_cancelling_the_block_reaps_the_child() -> None:
    before = children()
    with trio.move_on_after(30) as scope:
        async with open_process_with_channel(
            [sys.executable, "-I", "-c", SLEEPER], grace_period=30
        ) as child:
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert child.returncode == -signal.SIGKILL
    assert_reaped(child.pid)
    assert children() == before
