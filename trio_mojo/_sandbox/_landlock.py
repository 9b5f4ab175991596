"""Landlock: take away every file-system right, TCP and scoped IPC (ctypes).

Theory of operation
-------------------

Landlock is an unprivileged Linux security module.  A process builds a
*ruleset* that names the access rights it wants to restrict ("handled"),
adds rules that allow some of them beneath some paths, and restricts itself
and its future children to it, irreversibly.  A worker that gets its files
from the broker needs no rule at all, so we handle every right the kernel
knows and allow none:

* file system (every ABI): no open, read, write, exec, create, remove,
  rename, truncate or device ioctl of anything by path.  Fds the worker
  already holds or receives keep working: Landlock checks at open time;
* TCP (ABI >= 4): no bind, no connect;
* scopes (ABI >= 6): no connecting to abstract unix sockets, and no signals
  to processes outside the domain (such as the parent).

Not covered (documented limits of Landlock): creating sockets, UDP, and
path-based ``stat``.  Seccomp is the layer for those.

The ABI is probed with ``landlock_create_ruleset(NULL, 0, VERSION)``; the
handled masks are narrowed to what the ABI knows, as the kernel
documentation prescribes.  Below ABI 8 ``landlock_restrict_self`` confines
only the calling thread, so the caller must be single-threaded:
``_apply.lock_down`` checks that once, on entry, while ``/proc`` is still
reachable (the empty root takes it away), and starts no thread until the
end.  Success is judged by return values, never by a stale ``errno``; the
ruleset fd is always closed.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

from . import _libc

__all__ = ["abi_version", "restrict_self"]

_CREATE_RULESET_VERSION: Final = 1

_FS_RIGHTS_BY_ABI: Final = {
    1: (1 << 13) - 1,
    2: (1 << 14) - 1,
    3: (1 << 15) - 1,
    4: (1 << 15) - 1,
}
"""REFER arrives with ABI 2, TRUNCATE with 3, IOCTL_DEV with 5 (the kernel
refuses a right it does not know with EINVAL)."""
_FS_ALL: Final = (1 << 16) - 1  # ABI >= 5 (IOCTL_DEV)
_NET_BIND_AND_CONNECT_TCP: Final = 0b11  # ABI >= 4
_SCOPE_ABSTRACT_UNIX_AND_SIGNAL: Final = 0b11  # ABI >= 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


def abi_version() -> int:
    """The kernel's Landlock ABI version.

    Raises:
        OSError: Landlock is unavailable (``ENOSYS``: not built in;
            ``EOPNOTSUPP``: disabled at boot).
    """
    return _libc.syscall(
        "landlock_create_ruleset", None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION
    )


def restrict_self() -> int:
    """Deny this process every right Landlock handles; returns the ABI used.

    Needs ``PR_SET_NO_NEW_PRIVS`` (or ``CAP_SYS_ADMIN``) first, and a
    single-threaded process (below ABI 8 other threads stay unconfined).

    Raises:
        OSError: Landlock is unavailable, or a syscall failed.
    """
    abi = abi_version()
    attr = _RulesetAttr(
        handled_access_fs=_FS_RIGHTS_BY_ABI.get(abi, _FS_ALL),
        handled_access_net=_NET_BIND_AND_CONNECT_TCP if abi >= 4 else 0,
        scoped=_SCOPE_ABSTRACT_UNIX_AND_SIGNAL if abi >= 6 else 0,
    )
    size = ctypes.sizeof(attr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = _libc.syscall(
        "landlock_create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size), 0
    )
    try:
        _libc.syscall("landlock_restrict_self", ruleset, 0)
    finally:
        os.close(ruleset)
    return abi
