"""Shared by the chaos tests: seeds, and the check that everything finished.

Every chaos run draws its random choices from ``random.Random(seed)``; the
seed is in the test id (``[seed=N]``) and in every failure message, and
``TRIO_MOJO_CHAOS_SEED=N`` runs exactly that seed.  ``nothing_left_behind``
wraps a run and checks, after it, that every task it started has finished
and every child process it started has been reaped; the autouse fixture in
``conftest.py`` checks the fds.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import trio
from _process_support import children
from _pytest.mark import ParameterSet

from trio_mojo import Channel, Handle, Message
from trio_mojo._handles import close_all

__all__ = [
    "PEER",
    "SourcePipes",
    "chaos_seeds",
    "nothing_left_behind",
    "peer_command",
    "same_file",
    "send_owned",
    "source_pipes",
]

PEER = Path(__file__).with_name("_chaos_peer.py")
"""The child the cross-process chaos tests talk to (see its docstring)."""


def chaos_seeds(default: int, slow: int) -> list[ParameterSet]:
    """Seeds to parametrize over: ``default`` runs, plus ``slow`` marked slow.

    ``TRIO_MOJO_CHAOS_SEED=N`` replaces them all with the one seed ``N``.
    """
    chosen = os.environ.get("TRIO_MOJO_CHAOS_SEED")
    if chosen is not None:
        return [pytest.param(int(chosen), id=f"seed={chosen}")]
    return [pytest.param(seed, id=f"seed={seed}") for seed in range(default)] + [
        pytest.param(seed, id=f"seed={seed}", marks=pytest.mark.slow)
        for seed in range(default, default + slow)
    ]


def peer_command(*args: str) -> list[str]:
    """The argv that runs ``_chaos_peer.py`` with ``args`` in this interpreter."""
    return [sys.executable, str(PEER), *args]


def _all_tasks() -> set[trio.lowlevel.Task]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    found: set[trio.lowlevel.Task] = set()
    pending = [root]
    while pending:
        task = pending.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


def assert_no_children(seed: int) -> None:
    """No child process of ours is left, running or as a zombie."""
    left = children()
    assert not left, f"seed={seed}: child processes left behind: {left}"
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@contextlib.asynccontextmanager
async def nothing_left_behind(seed: int) -> AsyncIterator[None]:
    """After the block: every task it started finished, every child reaped."""
    before = _all_tasks()
    yield
    # Tasks that ended are gone from their nurseries; anything new is alive.
    left = _all_tasks() - before
    assert not left, f"seed={seed}: tasks still running: {[t.name for t in left]}"
    assert_no_children(seed)


async def send_owned(channel: Channel, payload: bytes, handles: list[Handle]) -> None:
    """Send ``payload`` with ``handles``; if it is not sent, close them.

    ``send`` is cancel-atomic: a cancelled send leaves the handles with the
    caller; after a channel failure the channel has closed them already
    (closing again does nothing).
    """
    try:
        await channel.send(Message(payload, handles))
    except BaseException:
        close_all(handles)
        raise


def same_file(fd: int, other: int) -> bool:
    """Whether two fds name the same file (device and inode)."""
    a, b = os.fstat(fd), os.fstat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and stat.S_IFMT(
        a.st_mode
    ) == stat.S_IFMT(b.st_mode)


class SourcePipes:
    """A few pipes whose read ends messages carry as dups.

    ``handles([0, 2])`` makes dups of sources 0 and 2 (the caller gives
    them to ``send``); ``matches(received, [0, 2])`` checks that fds that
    came back name those sources, in that order.  Use it through
    :func:`source_pipes`, which closes the pipes.
    """

    def __init__(self, pipes: list[tuple[int, int]]) -> None:
        self._pipes = pipes

    def handles(self, indices: Sequence[int]) -> list[Handle]:
        return [Handle.dup(self._pipes[i][0]) for i in indices]

    def matches(self, handles: Sequence[Handle], indices: Sequence[int]) -> bool:
        return len(handles) == len(indices) and all(
            same_file(handle.fileno(), self._pipes[i][0])
            for handle, i in zip(handles, indices, strict=True)
        )


@contextlib.contextmanager
def source_pipes(count: int) -> Iterator[SourcePipes]:
    """``count`` source pipes, closed on exit."""
    pipes: list[tuple[int, int]] = []
    try:
        pipes.extend(os.pipe() for _ in range(count))
        yield SourcePipes(pipes)
    finally:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)
