"""Namespaces: new user, network, IPC, UTS, mount and PID namespaces for the worker.

Theory of operation
-------------------

``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS |
CLONE_NEWNS | CLONE_NEWPID)`` gives the worker namespaces of its own:

* **network**: only a loopback interface, and it is down.  No route
  anywhere, no abstract unix socket of the host;
* **IPC**: no System V IPC objects or POSIX message queues of the host;
* **UTS**: its own host name, :data:`HOSTNAME` (the host's is not visible);
* **mount**: its own mount table, where ``_rootfs`` replaces the root by an
  empty one;
* **PID**: the *children* of the caller are in a new PID namespace and see
  no process outside it (``_pidns`` forks them); a process that was forked
  into a new PID namespace already (a zygote's worker) leaves this one out;
* **user**: needed to create the others without privilege.  The mapping is
  the identity of the process's own uid and gid only, written after
  ``setgroups`` is denied, as the kernel requires.  Under a root parent the
  process has already dropped to an unprivileged uid (``_credentials``), so
  that uid is what it is outside too.

The process must be single-threaded (``unshare(CLONE_NEWUSER)`` fails with
``EINVAL`` otherwise) and must be able to write its own
``/proc/self/*_map``: a process that has just changed its uid is not
dumpable and its ``/proc`` files belong to root, so :func:`unshare` makes
it dumpable for the few system calls that write the maps and restores the
flag at once.  The parent checks the result from outside: the inodes of
``/proc/<pid>/ns/*`` must differ from its own (:func:`differing_namespaces`).
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

from . import _credentials, _libc

__all__ = ["HOSTNAME", "NAMESPACES", "differing_namespaces", "unshare"]

_CLONE_NEWNS: Final = 0x00020000
_CLONE_NEWUTS: Final = 0x04000000
_CLONE_NEWIPC: Final = 0x08000000
_CLONE_NEWUSER: Final = 0x10000000
_CLONE_NEWPID: Final = 0x20000000
_CLONE_NEWNET: Final = 0x40000000
_FLAGS: Final = (
    _CLONE_NEWUSER
    | _CLONE_NEWNET
    | _CLONE_NEWIPC
    | _CLONE_NEWUTS
    | _CLONE_NEWNS
    | _CLONE_NEWPID
)

NAMESPACES: Final = ("user", "net", "ipc", "uts", "mnt", "pid")
"""The ``/proc/<pid>/ns`` entries in which a worker differs from its parent."""

HOSTNAME: Final = "trio-mojo-worker"
"""The host name a worker sees in its own UTS namespace."""


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def unshare(*, pid: bool = True) -> None:
    """Enter new user/net/ipc/uts/mount/PID namespaces, keeping uid and gid.

    The PID namespace applies to the children forked after this call.
    ``pid=False`` leaves it out, for a process that was forked into a PID
    namespace of its own already (``_pidns.NamespaceForker``).

    Raises:
        OSError: the kernel refused (``EPERM``: unprivileged user namespaces
            disabled or a seccomp filter; ``EINVAL``: more than one thread).
    """
    uid, gid = os.getuid(), os.getgid()
    dumpable = _credentials.is_dumpable()
    _credentials.set_dumpable(True)
    try:
        _libc.call("unshare", _FLAGS if pid else _FLAGS & ~_CLONE_NEWPID)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    finally:
        _credentials.set_dumpable(dumpable)
    name = HOSTNAME.encode()
    _libc.call("sethostname", name, ctypes.c_size_t(len(name)))


def differing_namespaces(pid: int) -> list[str]:
    """The names in :data:`NAMESPACES` in which ``pid`` differs from us.

    Raises:
        OSError: ``/proc/<pid>/ns`` cannot be read (the process is gone).
    """
    return [
        name
        for name in NAMESPACES
        if os.stat(f"/proc/{pid}/ns/{name}").st_ino
        != os.stat(f"/proc/self/ns/{name}").st_ino
    ]
