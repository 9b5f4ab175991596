"""Namespaces: move the worker into new user, network, IPC, UTS and mount namespaces.

Theory of operation
-------------------

``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS |
CLONE_NEWNS)`` gives the worker namespaces of its own:

* **network**: only a loopback interface, and it is down.  No route
  anywhere, no abstract unix socket of the host;
* **IPC**: no System V IPC objects or POSIX message queues of the host;
* **UTS**: its own host name;
* **mount**: its own mount table (a base for later file-system layers);
* **user**: needed to create the others without privilege, and the mapping
  is the identity of the worker's own uid and gid only (``setgroups`` is
  denied first, as the kernel requires).

The worker must be single-threaded (``unshare(CLONE_NEWUSER)`` fails with
``EINVAL`` otherwise) and must still be able to write ``/proc/self/*_map``,
so this comes after the imports and before Landlock.  The parent checks the
result from outside: the inodes of ``/proc/<pid>/ns/*`` must differ from its
own (:func:`differing_namespaces`).  Python 3.11 has no ``os.unshare``, so
this is ctypes; success is judged by the return value.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = ["NAMESPACES", "differing_namespaces", "unshare"]

_CLONE_NEWNS: Final = 0x00020000
_CLONE_NEWUTS: Final = 0x04000000
_CLONE_NEWIPC: Final = 0x08000000
_CLONE_NEWUSER: Final = 0x10000000
_CLONE_NEWNET: Final = 0x40000000
_FLAGS: Final = (
    _CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS | _CLONE_NEWNS
)

NAMESPACES: Final = ("user", "net", "ipc", "uts", "mnt")
"""The ``/proc/<pid>/ns`` entries :func:`unshare` replaces."""


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def unshare() -> None:
    """Enter new user/net/ipc/uts/mount namespaces, keeping uid and gid.

    Raises:
        OSError: the process has more than one thread, or the kernel refused
            (``EPERM``: unprivileged user namespaces disabled; ``EINVAL``).
    """
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise OSError(
            f"namespaces need a single-threaded process (found {threads} threads)"
        )
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_FLAGS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(USER|NET|IPC|UTS|NS): {os.strerror(err)}")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def differing_namespaces(pid: int) -> list[str]:
    """The names in :data:`NAMESPACES` in which ``pid`` differs from us."""
    return [
        name
        for name in NAMESPACES
        if os.stat(f"/proc/{pid}/ns/{name}").st_ino
        != os.stat(f"/proc/self/ns/{name}").st_ino
    ]
