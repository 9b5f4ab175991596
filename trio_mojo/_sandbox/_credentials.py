"""Credentials: the worker runs as an unprivileged user and holds no capability.

Theory of operation
-------------------

A root parent's worker starts as root, and a user namespace alone does not
change that: its creator keeps kernel uid 0 outside (owner access to every
root-owned file) and gets a full capability set inside.  So the layer works
in two phases around the namespaces (sandbox_security.md A4, A9):

1. :func:`drop_identity`, while still root: no supplementary groups, then
   ``setresgid`` and ``setresuid`` to the policy's unprivileged ids: by
   default ids of the worker's own, ``worker_id_base`` plus the host pid
   of the dropping process (:func:`own_host_pid`; see
   ``SandboxPolicy.worker_ids``), so that no other worker shares the
   kernel's per-uid counts with it.  The kernel then clears the
   effective, permitted and ambient sets (no ``SECBIT_KEEP_CAPS``), the
   dumpable flag and the parent-death signal (the caller re-arms it).  The
   bounding set is dropped first, while ``CAP_SETPCAP`` is still held, in
   case no user namespace follows.
2. The user namespace, created by the now unprivileged process, maps only
   that uid and gid; inside it the process briefly holds capabilities
   valid in its own namespaces only (to mount its empty root).
3. :func:`drop_capabilities`: the ambient set cleared, every bounding
   capability dropped (``PR_CAPBSET_DROP`` until ``EINVAL``: the kernel's
   last capability), then ``capset`` with empty effective, permitted and
   inheritable sets; and, for a root parent's worker,
   :func:`set_dumpable` ``(False)`` so that no process of that uid can
   ptrace it or read its ``/proc`` entries.

A non-root parent's worker keeps the parent's uid (it cannot take another)
and only drops capabilities; it stays dumpable, so the parent, which has
the same uid, can still inspect it in ``/proc``.

The parent checks the result from outside, in ``/proc/<pid>/status``:
``Uid``, ``Gid``, ``Groups``, ``CapEff``, ``CapPrm``, ``CapInh``,
``CapBnd`` and ``CapAmb``; a non-dumpable process's ``/proc`` files belong
to root whatever its uid.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Final

from . import _libc

__all__ = [
    "drop_bounding_set",
    "drop_capabilities",
    "drop_identity",
    "effective_capabilities",
    "is_dumpable",
    "own_host_pid",
    "set_dumpable",
]

_PR_GET_DUMPABLE: Final = 3
_PR_SET_DUMPABLE: Final = 4
_PR_CAPBSET_READ: Final = 23
_PR_CAPBSET_DROP: Final = 24
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
_MAX_CAPABILITIES: Final = 64
"""Above any capability number a kernel knows (41 on Linux 6.18)."""


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def drop_identity(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary group (run as root).

    Raises:
        OSError: a call failed (no ``CAP_SETUID``/``CAP_SETGID``).
    """
    drop_bounding_set()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def own_host_pid() -> int:
    """This process's pid as ``/proc`` shows it: its host pid, also inside a
    PID namespace of its own (``getpid()`` says 2 there), as long as
    ``/proc`` is the parent's (before the empty root).

    Raises:
        OSError: ``/proc`` is not mounted.
    """
    return int(os.readlink("/proc/self"))


def drop_bounding_set() -> None:
    """Drop every capability still in the bounding set (needs ``CAP_SETPCAP``
    if there is one)."""
    for capability in range(_MAX_CAPABILITIES):
        try:
            if _libc.prctl(_PR_CAPBSET_READ, capability):
                _libc.prctl(_PR_CAPBSET_DROP, capability)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # past the kernel's last capability
                return
            raise


def drop_capabilities() -> None:
    """Empty the ambient, bounding, effective, permitted and inheritable sets.

    Raises:
        OSError: a call failed.
    """
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    drop_bounding_set()
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # two 32-bit halves, all zero
    _libc.call("capset", ctypes.byref(header), data)


def effective_capabilities() -> int:
    """This process's effective capability set, as a bit mask (``capget``)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _libc.call("capget", ctypes.byref(header), data)
    low: int = data[0].effective
    high: int = data[1].effective
    return low | high << 32


def is_dumpable() -> bool:
    """Whether this process is dumpable (ptrace-able by its own uid)."""
    return _libc.prctl(_PR_GET_DUMPABLE) == 1


def set_dumpable(dumpable: bool) -> None:
    """Set ``PR_SET_DUMPABLE``."""
    _libc.prctl(_PR_SET_DUMPABLE, int(dumpable))
