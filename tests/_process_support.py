"""Helpers for the tests that start real child processes.

Shared by ``test_spawn``, ``test_worker``, ``test_broker`` and
``test_sandbox_policy``: deliberately inheritable fds in the parent, and
checks that a child was reaped and that no child process is left over.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = [
    "assert_reaped",
    "children",
    "inheritable_fds",
]


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
