"""What fds this process has open: shared by conftest's leak check and the tests."""

from __future__ import annotations

import os

__all__ = ["fd_is_open", "open_fds"]


def fd_is_open(fd: int) -> bool:
    """True if ``fd`` is open in this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> set[int]:
    """Return the fds open in this process.

    ``os.listdir`` reads ``/proc/self/fd`` through a directory fd of its own, and
    that fd *is* in the listing (it was open while the directory was read); it is
    closed by the time the list is returned, so dropping the numbers that are no
    longer open removes it.  Its number changes whenever the lowest free fd
    changes, so without this every leak would also report a phantom fd.
    """
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if fd_is_open(fd)}
