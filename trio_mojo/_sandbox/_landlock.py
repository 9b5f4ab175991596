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
only the calling thread, so :func:`restrict_self` refuses to run in a
process with more than one thread (the worker bootstrap applies it before
Trio starts any).  Success is judged by return values, never by a stale
``errno``; the ruleset fd is always closed.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = ["abi_version", "restrict_self"]

_SYS_CREATE_RULESET: Final = 444  # asm-generic numbers: x86_64 and aarch64
_SYS_RESTRICT_SELF: Final = 446
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


def _syscall(number: int, *args: object) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result: int = libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version.

    Raises:
        OSError: Landlock is unavailable (``ENOSYS``: not built in;
            ``EOPNOTSUPP``: disabled at boot).
    """
    return _syscall(
        _SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION
    )


def restrict_self() -> int:
    """Deny this process every right Landlock handles; returns the ABI used.

    Needs ``PR_SET_NO_NEW_PRIVS`` (or ``CAP_SYS_ADMIN``) first.

    Raises:
        OSError: Landlock is unavailable, the process has more than one
            thread, or a syscall failed.
    """
    abi = abi_version()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise OSError(
            f"landlock needs a single-threaded process (found {threads} threads)"
        )
    attr = _RulesetAttr(
        handled_access_fs=_FS_RIGHTS_BY_ABI.get(abi, _FS_ALL),
        handled_access_net=_NET_BIND_AND_CONNECT_TCP if abi >= 4 else 0,
        scoped=_SCOPE_ABSTRACT_UNIX_AND_SIGNAL if abi >= 6 else 0,
    )
    size = ctypes.sizeof(attr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = _syscall(
        _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0
    )
    try:
        _syscall(_SYS_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return abi
