"""Seccomp: a system-call allowlist for workers, as classic BPF (ctypes, x86_64).

Theory of operation
-------------------

The filter is a classic BPF program the kernel runs at every system call.
It allows what a Trio worker needs once its imports are done (measured with
strace: the event loop, the channel's ``recvmsg``/``sendmsg``, threads for
``trio.to_thread``, memory, time, signals to itself) and answers every
other call with ``EPERM``.  In order:

1. the architecture must be x86_64 and the call number below the x32 bit,
   otherwise the process is killed (an ``int 0x80`` i386 call would
   otherwise slip past a filter that checks numbers only);
2. a few calls are allowed only with safe arguments: ``clone`` only for a
   thread (``CLONE_THREAD`` set, no ``CLONE_NEW*`` flag); ``clone3`` gets
   ``ENOSYS`` so that glibc falls back to ``clone``, whose flags a filter
   can read; ``socketpair`` only for ``AF_UNIX``; ``ioctl`` only
   ``FIONBIO``/``FIOCLEX``/``FIONCLEX``/``FIONREAD``/``TCGETS``; ``fcntl``
   only to dup and get/set fd and status flags (no ``F_SETOWN``/``F_SETSIG``,
   which would let ``O_ASYNC`` signal another process); ``prctl``
   only ``PR_SET_NAME``/``PR_GET_NAME``; ``kill``/``tgkill`` only to the
   worker itself (its pid is baked in); ``prlimit64`` only to read;
3. the rest of the allowlist by number; everything else, including
   ``open*``, ``socket``, ``connect``, ``execve``, ``fork``, ``ptrace``,
   ``unshare``, ``bpf``, ``io_uring_*`` and every call newer than this
   table, returns ``EPERM``.

The program is written with labels (:class:`_Assembler`) so that no jump
offset is counted by hand, and installed with ``seccomp(SET_MODE_FILTER,
TSYNC)`` so that every thread is filtered (a positive return names a thread
that could not be synchronised: a failure).  ``PR_SET_NO_NEW_PRIVS`` must
already be set.  Path-based ``newfstatat``/``statx``/``readlink`` stay
allowed: they leak metadata, not contents, and Landlock cannot stop them
either (documented limit).
"""

from __future__ import annotations

import ctypes
import errno
import platform
from collections.abc import Sequence
from typing import Final

__all__ = ["SUPPORTED", "build_filter", "install"]

SUPPORTED: Final = platform.machine() == "x86_64"
"""Whether this machine's architecture has a syscall table here."""

# struct seccomp_data: nr (s32) @0, arch (u32) @4, ip (u64) @8, args[6] (u64) @16.
_NR: Final = 0
_ARCH: Final = 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index


def _arg_high(index: int) -> int:
    return 20 + 8 * index


_AUDIT_ARCH_X86_64: Final = 0xC000003E
_X32_SYSCALL_BIT: Final = 0x40000000

RET_KILL_PROCESS: Final = 0x80000000
RET_ALLOW: Final = 0x7FFF0000
RET_ERRNO: Final = 0x00050000

# Classic BPF opcodes.
_LD_W_ABS: Final = 0x20
_JEQ_K: Final = 0x15
_JGE_K: Final = 0x35
_JSET_K: Final = 0x45
_RET_K: Final = 0x06

SYSCALLS: Final = {
    "read": 0, "write": 1, "close": 3, "fstat": 5, "poll": 7, "lseek": 8, "mmap": 9,
    "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18, "readv": 19,
    "writev": 20, "select": 23, "sched_yield": 24, "mremap": 25, "madvise": 28, "dup": 32,
    "dup2": 33, "nanosleep": 35, "getpid": 39, "sendto": 44, "recvfrom": 45, "sendmsg": 46,
    "recvmsg": 47, "shutdown": 48, "getsockname": 51, "getpeername": 52, "socketpair": 53,
    "setsockopt": 54, "getsockopt": 55, "clone": 56, "exit": 60, "kill": 62, "uname": 63,
    "fcntl": 72, "fsync": 74, "fdatasync": 75, "ftruncate": 77, "getcwd": 79,
    "readlink": 89, "gettimeofday": 96, "getrusage": 98, "times": 100, "getuid": 102,
    "getgid": 104, "geteuid": 107, "getegid": 108, "getppid": 110, "getresuid": 118,
    "getresgid": 120, "sigaltstack": 131, "sched_getparam": 143, "sched_getscheduler": 145,
    "prctl": 157, "gettid": 186, "tkill": 200, "futex": 202, "sched_getaffinity": 204,
    "set_tid_address": 218, "restart_syscall": 219, "clock_gettime": 228,
    "clock_getres": 229, "clock_nanosleep": 230, "exit_group": 231, "epoll_wait": 232,
    "epoll_ctl": 233, "tgkill": 234, "newfstatat": 262, "readlinkat": 267, "pselect6": 270,
    "ppoll": 271, "set_robust_list": 273, "epoll_pwait": 281, "eventfd2": 290,
    "epoll_create1": 291, "dup3": 292, "pipe2": 293, "recvmmsg": 299, "prlimit64": 302,
    "sendmmsg": 307, "getrandom": 318, "membarrier": 324, "statx": 332, "rseq": 334,
    "clone3": 435, "close_range": 436, "epoll_pwait2": 441,
}  # fmt: skip
"""x86_64 numbers of the calls the filter names (from ``asm/unistd_64.h``)."""

_CHECKED: Final = ("clone", "clone3", "socketpair", "ioctl", "prctl", "fcntl", "kill",
                   "tgkill", "prlimit64")  # fmt: skip
ALLOWED: Final = tuple(
    name for name in SYSCALLS if name not in _CHECKED and name != "tkill"
)
"""Calls allowed whatever their arguments."""

_CLONE_THREAD: Final = 0x00010000
_CLONE_NEW_ANY: Final = (
    0x00000080
    | 0x00020000
    | 0x02000000
    | 0x04000000
    | 0x08000000
    | 0x10000000
    | 0x20000000
    | 0x40000000
)  # NEWTIME NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET
_AF_UNIX: Final = 1
_IOCTLS: Final = (
    0x5421,
    0x5451,
    0x5450,
    0x541B,
    0x5401,
)  # FIONBIO FIOCLEX FIONCLEX FIONREAD TCGETS
_PRCTLS: Final = (15, 16)  # PR_SET_NAME, PR_GET_NAME
_FCNTLS: Final = (0, 1, 2, 3, 4, 1030)
"""F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC.  Not F_SETOWN /
F_SETSIG / F_SETOWN_EX: with O_ASYNC they would make the kernel signal any
process for us; not leases or locks."""

Instruction = tuple[int, int, int, int]


class _Assembler:
    """Classic BPF with labels: jumps name their targets, offsets are computed."""

    def __init__(self) -> None:
        self._code: list[tuple[int, str | None, str | None, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, None, None, offset))

    def jump(self, op: int, k: int, true: str | None, false: str | None = None) -> None:
        """Jump to ``true`` if the test holds, else to ``false`` (None: next)."""
        self._code.append((op, true, false, k))

    def ret(self, value: int) -> None:
        self._code.append((_RET_K, None, None, value))

    def assemble(self) -> list[Instruction]:
        program = []
        for index, (op, true, false, k) in enumerate(self._code):
            program.append(
                (op, self._offset(index, true), self._offset(index, false), k)
            )
        return program

    def _offset(self, index: int, label: str | None) -> int:
        if label is None:
            return 0
        distance = self._labels[label] - index - 1
        if not 0 <= distance <= 255:
            raise ValueError(f"BPF jump to {label!r} out of range ({distance})")
        return distance


def build_filter(
    own_pid: int, *, default: int = RET_ERRNO | errno.EPERM
) -> list[Instruction]:
    """The allowlist program for a worker whose pid is ``own_pid``.

    ``default`` is the action for calls not allowed (``RET_KILL_PROCESS``
    makes a missing entry crash loudly with ``SIGSYS``, for tests).
    """
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jump(_JEQ_K, _AUDIT_ARCH_X86_64, None, "kill")
    asm.load(_NR)
    asm.jump(_JGE_K, _X32_SYSCALL_BIT, "kill")
    for name in (
        "clone",
        "clone3",
        "socketpair",
        "ioctl",
        "prctl",
        "fcntl",
        "prlimit64",
    ):
        asm.jump(_JEQ_K, SYSCALLS[name], name)
    asm.jump(_JEQ_K, SYSCALLS["kill"], "signal")
    asm.jump(_JEQ_K, SYSCALLS["tgkill"], "signal")
    for name in ALLOWED:
        asm.jump(_JEQ_K, SYSCALLS[name], "allow")
    asm.ret(default)

    asm.label("clone")
    asm.load(_arg_low(0))
    asm.jump(_JSET_K, _CLONE_NEW_ANY, "deny")
    asm.jump(_JSET_K, _CLONE_THREAD, "allow", "deny")
    asm.label("clone3")
    asm.ret(RET_ERRNO | errno.ENOSYS)
    asm.label("socketpair")
    asm.load(_arg_low(0))
    asm.jump(_JEQ_K, _AF_UNIX, "allow", "deny")
    asm.label("ioctl")
    _one_of(asm, _arg_low(1), _IOCTLS)
    asm.label("prctl")
    _one_of(asm, _arg_low(0), _PRCTLS)
    asm.label("fcntl")
    _one_of(asm, _arg_low(1), _FCNTLS)
    asm.label("signal")  # kill(pid, sig) / tgkill(tgid, tid, sig): only ourselves
    _one_of(asm, _arg_low(0), (own_pid,))
    asm.label("prlimit64")  # prlimit64(pid, resource, new, old): read only
    asm.load(_arg_low(2))
    asm.jump(_JEQ_K, 0, None, "deny")
    asm.load(_arg_high(2))
    asm.jump(_JEQ_K, 0, "allow", "deny")

    asm.label("allow")
    asm.ret(RET_ALLOW)
    asm.label("deny")
    asm.ret(RET_ERRNO | errno.EPERM)
    asm.label("kill")
    asm.ret(RET_KILL_PROCESS)
    return asm.assemble()


def _one_of(asm: _Assembler, offset: int, values: Sequence[int]) -> None:
    asm.load(offset)
    for value in values:
        asm.jump(_JEQ_K, value, "allow")
    asm.ret(RET_ERRNO | errno.EPERM)


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


_SYS_SECCOMP: Final = 317
_SECCOMP_SET_MODE_FILTER: Final = 1
_SECCOMP_FILTER_FLAG_TSYNC: Final = 1


def install(program: Sequence[Instruction]) -> None:
    """Install ``program`` for every thread of this process, irreversibly.

    Raises:
        OSError: not x86_64, ``PR_SET_NO_NEW_PRIVS`` missing (``EACCES``), or
            a thread could not be synchronised.
    """
    if not SUPPORTED:
        raise OSError(f"seccomp: no syscall table for {platform.machine()}")
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    prog = _SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(
        _SYS_SECCOMP,
        _SECCOMP_SET_MODE_FILTER,
        _SECCOMP_FILTER_FLAG_TSYNC,
        ctypes.byref(prog),
    )
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER): {errno.errorcode.get(err, err)}")
    if result > 0:
        raise OSError(f"seccomp: thread {result} could not be synchronised (TSYNC)")
