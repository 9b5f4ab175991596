"""The libc functions and raw system calls the sandbox layers make (ctypes).

Theory of operation
-------------------

Python 3.11 has no ``os.unshare``, ``mount``, ``pivot_root``, ``capset`` or
``prctl``, so the layers call them through ctypes, on one
``ctypes.CDLL(None, use_errno=True)`` (the C library the interpreter already
uses; loading it by path can lose ``errno``, CPython gh-52008).

Success is judged by the return value only: ``errno`` is read after a
failure and never trusted on its own (a stale ``errno`` left by an earlier
call made the PyPI ``landlock`` package report false failures).  Every
failure becomes an :class:`OSError` whose message names the call, which is
what a sandbox report shows.

System calls glibc has no wrapper for are made with ``syscall(2)``; their
numbers differ between architectures and come from ``_syscalls``.
A name missing for this machine raises :class:`OSError` (``ENOSYS``), so a
layer that needs it is reported unavailable, never applied half-way.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

from . import _syscalls

__all__ = ["call", "prctl", "syscall", "syscall_number"]

_LIBC: Final = ctypes.CDLL(None, use_errno=True)


def syscall_number(name: str) -> int:
    """This machine's number for system call ``name`` (see ``_syscalls``).

    Raises:
        OSError: ``ENOSYS``, no number for it on this architecture here.
    """
    return _syscalls.number(name)


def _checked(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def call(name: str, *args: object) -> int:
    """Call the libc function ``name``; its result, or OSError if it returned -1."""
    function = getattr(_LIBC, name)
    result: int = function(*args)
    return _checked(result, f"{name}()")


def syscall(name: str, *args: object) -> int:
    """Make the raw system call ``name``; its result, or OSError on failure."""
    result: int = _LIBC.syscall(syscall_number(name), *args)
    return _checked(result, f"{name}()")


_PRCTL: Final = _LIBC["prctl"]  # its own function object: typed once, called often
_PRCTL.argtypes = (ctypes.c_int, *[ctypes.c_ulong] * 4)
_PRCTL.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    """``prctl(option, arg2, arg3, 0, 0)``; its result, or OSError on failure."""
    result: int = _PRCTL(option, arg2, arg3, 0, 0)
    return _checked(result, f"prctl({option})")
