"""Helpers for the tests that start real child processes.

Shared by the spawn, worker, broker, sandbox, zygote and pool tests:
deliberately inheritable fds in the parent, checks that a child was reaped
and that no child process is left over, a pipe holding some bytes, a
parent process to kill, ``/proc/<pid>/status``, a worker block that must
fail, adopting orphans, and the exceptions a traceback shows.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from trio_mojo import Handle, Message, Worker
from trio_mojo._handles import close_all

__all__ = [
    "adopting_orphans",
    "alive",
    "assert_reaped",
    "children",
    "echo_a_pipe",
    "inheritable_fds",
    "pidfds_from_a_parent",
    "pipe_with",
    "proc_status",
    "shown_chain",
    "wait_exited",
    "wait_until",
    "wait_until_gone",
    "worker_block_error",
]

E = TypeVar("E", bound=BaseException)


async def echo_a_pipe(worker: Worker) -> None:
    """Send an echo worker a message with a pipe; check what comes back: the
    payload, and an fd (close-on-exec) that reads what the pipe held."""
    await worker.channel.send(Message(b"ping", (pipe_with(b"parent's pipe"),)))
    reply = await worker.channel.receive()
    with reply:
        assert reply.payload == b"ping"
        (handle,) = reply.handles
        assert not os.get_inheritable(handle.fileno())
        assert os.read(handle.fileno(), 100) == b"parent's pipe"


def pipe_with(data: bytes) -> Handle:
    """The read end of a pipe that holds ``data`` (its write end is closed)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    return Handle(read_end)


@contextlib.asynccontextmanager
async def pidfds_from_a_parent(script: str) -> AsyncIterator[list[Handle]]:
    """Run ``script`` as a parent process; yield pidfds of the pids of its
    first line, opened while the parent lived (so a pid reused since names
    nothing here).

    The parent is ``SIGKILL``ed (and reaped) before the block runs: what
    the block then checks is what that leaves behind (see
    :func:`wait_exited`).
    """
    parent = await trio.lowlevel.open_process(
        [sys.executable, "-I", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    pidfds: list[Handle] = []
    try:
        assert parent.stdout is not None
        with trio.fail_after(30):
            line = await parent.stdout.receive_some()
        pidfds += [Handle(os.pidfd_open(int(pid))) for pid in line.split()]
    finally:
        parent.kill()
        await parent.wait()
        if parent.stdout is not None:
            await parent.stdout.aclose()
    try:
        yield pidfds
    finally:
        close_all(pidfds)


async def wait_exited(pidfd: Handle) -> None:
    """Wait (at most 10 s) until the process of ``pidfd`` has exited."""
    with trio.fail_after(10):  # readable once the process has exited
        await trio.lowlevel.wait_readable(pidfd.fileno())
    trio.lowlevel.notify_closing(pidfd.fileno())


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as ``{field: value}``.

    Raises:
        FileNotFoundError: no such process (any more).
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


async def worker_block_error(
    expected: type[E],
    open_block: Callable[[], AbstractAsyncContextManager[Worker]],
    body: Callable[[Worker], Awaitable[object]],
) -> tuple[Worker, E]:
    """Run ``body`` in the block ``open_block()`` opens; it must raise
    ``expected``.  Returns the worker and the error."""
    started: list[Worker] = []

    async def run() -> None:
        async with open_block() as worker:
            started.append(worker)
            await body(worker)

    with pytest.raises(expected) as info:
        await run()
    (worker,) = started
    return worker, info.value


def shown_chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception its traceback shows: the causes, and
    the contexts that are not suppressed (``raise ... from None``).

    Checks the printed traceback too: it names no other exception type.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    printed = "".join(traceback.format_exception(error))
    shown = {type(exc).__name__ for exc in chain}
    for name in ("WouldBlock", "EndOfChannel", "TooSlowError", "Cancelled"):
        assert name in shown or name not in printed, printed
    return chain


@contextlib.contextmanager
def inheritable_fds(directory: Path) -> Iterator[dict[int, str]]:
    """Open fds a careless parent might leak, each marked inheritable.

    A pipe, a regular file, an ``AF_UNIX`` socket pair and a copy of the
    pipe's read end at fd 200 (well above the others, so a child that
    closes only a small range would keep it).  Yields ``{fd: link target}``.
    """
    fds: list[int] = []
    try:
        read_end, write_end = os.pipe()
        fds += [read_end, write_end]
        fds.append(os.open(directory / "inheritable.txt", os.O_RDWR | os.O_CREAT))
        left, right = socket.socketpair()
        fds += [left.detach(), right.detach()]
        fds.append(os.dup2(read_end, 200))
        for fd in fds:
            os.set_inheritable(fd, True)
        yield {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds}
    finally:
        for fd in fds:
            os.close(fd)


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` from ``/proc/<pid>/stat``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain anything.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def children() -> dict[int, str]:
    """Every process whose parent is this one: ``{pid: state}`` (Z: zombie)."""
    me = os.getpid()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None and fields[1] == me:
            found[int(name)] = fields[0]
    return found


def assert_reaped(pid: int) -> None:
    """``pid`` was our child and has been reaped: no zombie left behind."""
    assert _stat_fields(pid) is None, f"/proc/{pid} still exists: {_stat_fields(pid)}"
    with pytest.raises(ChildProcessError):  # ECHILD: nothing left to wait for
        os.waitpid(pid, os.WNOHANG)


_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def alive(pid: int) -> bool:
    """True while ``pid`` is a process that has not exited (zombies count as gone)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


@contextlib.contextmanager
def adopting_orphans(timeout: float = 10.0) -> Iterator[None]:
    """Make this process the subreaper of its descendants for the block.

    Processes orphaned below it (a killed parent's zygote, workers and
    inits) are reparented here rather than to pid 1, which may never reap
    them.  Leaving the block reaps them until no child is left (or
    ``timeout`` passed): call it once the processes the block watched are
    dead.
    """
    _set_subreaper(True)
    try:
        yield
        deadline = time.monotonic() + timeout
        while children() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
            time.sleep(0.02)
    finally:
        _set_subreaper(False)


def wait_until_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` is alive (reaping orphans meanwhile);
    return those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
        time.sleep(0.02)
    return [pid for pid in pids if alive(pid)]


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (for a state no event reports) for up to 10 s."""
    for _ in range(500):
        if predicate():
            return
        await trio.sleep(0.02)
    raise AssertionError("the condition did not come true in 10 s")
