"""Seccomp: a system-call allowlist for workers, as classic BPF (x86_64, aarch64).

Theory of operation
-------------------

The filter is a classic BPF program the kernel runs at every system call.
It allows what a Trio worker needs once its imports are done (measured with
strace: the event loop, the channel's ``recvmsg``/``sendmsg``, threads for
``trio.to_thread``, memory, time, signals to itself) and answers every
other call with ``EPERM``.

**One policy, written in names.**  :data:`ALLOWED` (whatever the arguments)
and :data:`CHECKED` (only with the arguments below) name system calls; an
:class:`~trio_mojo._sandbox._syscalls.Architecture` (``_syscalls``: the
one table of numbers, transcribed from the kernel's) gives that
architecture's numbers and the policy's names it never had: the unified
table has no ``poll``, ``select``, ``epoll_wait``, ``dup2`` or
``readlink`` (glibc uses ``ppoll``, ``pselect6``, ``epoll_pwait``,
``dup3`` and ``readlinkat`` there), nor ``open``,
``fork`` and the other old calls, which the policy refuses anyway.
:func:`build_filter` looks every name up and raises for a name that has no
number and is not declared absent.  Any other architecture has no table:
:data:`SUPPORTED` is false, :func:`build_filter` and :func:`install` raise
``OSError``, and a policy that requires seccomp is refused before spawning.

The program, in order:

1. the architecture must be the table's (``AUDIT_ARCH_X86_64`` or
   ``AUDIT_ARCH_AARCH64``), and on x86_64 the call number below the x32
   bit; otherwise the process is killed (an i386 ``int 0x80`` call or an
   AArch32 one would otherwise slip past a filter that checks numbers);
2. the calls of :data:`CHECKED` jump to their argument rule:

   * ``clone`` only for a thread (``CLONE_THREAD`` set, no ``CLONE_NEW*``
     flag; the flags are argument 0 on both architectures: x86_64's
     ``clone(flags, stack, parent_tid, child_tid, tls)`` and arm64's
     ``CLONE_BACKWARDS`` order ``clone(flags, stack, parent_tid, tls,
     child_tid)``); ``clone3`` gets ``ENOSYS`` so that glibc falls back
     to ``clone``, whose flags a filter can read;
   * ``socketpair`` only for ``AF_UNIX`` with type ``SOCK_STREAM`` or
     ``SOCK_SEQPACKET`` (``SOCK_NONBLOCK``/``SOCK_CLOEXEC`` masked off):
     never a datagram socket;
   * ``sendto`` only with a NULL destination (both 32-bit halves of the
     pointer are checked), and no ``MSG_OOB`` in the flags of ``sendto``,
     ``recvfrom``, ``sendmmsg``, ``recvmmsg`` (argument 3), ``sendmsg``
     and ``recvmsg`` (argument 2): unix-socket out-of-band data is a
     kernel path with a history of use-after-free bugs, and nothing here
     needs it;
   * ``ioctl`` only ``FIONBIO``/``FIOCLEX``/``FIONCLEX``/``FIONREAD``/
     ``TCGETS``; ``fcntl`` only to dup and get/set fd and status flags
     (no ``F_SETOWN``/``F_SETSIG``, which would let ``O_ASYNC`` signal
     another process); ``prctl`` only ``PR_SET_NAME``/``PR_GET_NAME``;
   * ``kill``/``tgkill`` only to the worker itself; ``sched_getaffinity``,
     ``sched_getparam``, ``sched_getscheduler`` and ``prlimit64`` only for
     pid 0 or the worker itself, and ``prlimit64`` only to read: no probing
     which pids exist;
   * ``clock_gettime``, ``clock_getres``, ``clock_nanosleep`` only for the
     static clocks (:data:`STATIC_CLOCKS`) and the worker's own CPU clocks
     (below);
3. the calls of :data:`ALLOWED`; everything else, including ``open*``,
   ``socket``, ``connect``, ``execve``, ``fork``, ``ptrace``, ``unshare``,
   ``getcwd``, ``bpf``, ``io_uring_*`` and every call newer than the
   table, returns ``EPERM``.

**Why** ``sendmsg``/``sendmmsg`` **with a** ``msg_name`` **reach nothing.**
A filter cannot read the ``msghdr`` behind the pointer, so those calls are
not checked; instead the worker has no socket that honours a destination.
It cannot make one (``socket`` is refused, ``socketpair`` makes only
stream and seqpacket pairs), and besides its stdio (``/dev/null``, the
stderr pipe, the parent's stdout only with ``open_worker(stdout=None)``) it
holds only the unix stream sockets it was given (its channels) and the
pairs it made.  In ``net/unix/af_unix.c``,
``unix_stream_sendmsg`` fails any message with a name (``EISCONN`` when
connected, ``EOPNOTSUPP`` otherwise) and ``unix_seqpacket_sendmsg`` sets
``msg_namelen = 0`` and sends to the connected peer.  Verified on this
machine (Linux 6.18): ``sendmsg`` and ``sendto`` with the path of a bound
datagram socket give ``EISCONN`` on a stream pair and deliver to the pair's
other end on a seqpacket pair; the datagram socket receives nothing.  A
parent that *sends* its worker a datagram socket gives it a socket that
``sendmsg`` can address: do not.

**CPU clock ids.**  The kernel encodes a CPU clock as
``MAKE_PROCESS_CPUCLOCK(pid, clock) = (~pid << 3) | clock`` (32 bits,
negative; pid 0 means the caller), with bit 2 set for a per-thread clock
(``MAKE_THREAD_CPUCLOCK``) and ``clock`` 3 meaning a clock fd (a PTP
device) rather than a CPU clock.  The filter allows a process clock only
for pid 0 or the worker's own pid, a per-thread clock for any thread id
(the kernel's ``pid_for_clock`` only resolves threads of the caller's own
thread group: another process's thread gives ``EINVAL`` with or without
the filter, and a worker thread's clock, as ``pthread_getcpuclockid``
makes it, needs that thread's id), never a clock fd.
``clock_gettime`` is normally served by the vDSO without a system call,
but not for CPU clocks, and anyone may make the call itself.

**The worker's pid** is baked into the program when it is built
(``build_filter(own_pid)``), as Chromium does.  It must be the pid as the
worker sees it (``os.getpid()`` in the worker): in a PID namespace the
kernel resolves the pids of ``kill``, ``sched_*``, ``prlimit64`` and CPU
clocks in the caller's namespace, and any valid pid works, 1 included.

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
from collections.abc import Callable, Sequence
from typing import Final

from ._syscalls import AARCH64, ARCHITECTURES, HOST, X86_64, Architecture

__all__ = [
    "AARCH64",
    "ALLOWED",
    "ARCHITECTURES",
    "CHECKED",
    "CPUCLOCK_SCHED",
    "HOST",
    "RET_ALLOW",
    "RET_ERRNO",
    "RET_KILL_PROCESS",
    "STATIC_CLOCKS",
    "SUPPORTED",
    "X86_64",
    "Architecture",
    "CompiledFilter",
    "Instruction",
    "build_filter",
    "cpu_clock",
    "install",
]

# struct seccomp_data: nr (s32) @0, arch (u32) @4, ip (u64) @8, args[6] (u64) @16.
_NR: Final = 0
_ARCH: Final = 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index


def _arg_high(index: int) -> int:
    return 20 + 8 * index


RET_KILL_PROCESS: Final = 0x80000000
RET_ALLOW: Final = 0x7FFF0000
RET_ERRNO: Final = 0x00050000

# Classic BPF opcodes.
_LD_W_ABS: Final = 0x20
_ALU_AND_K: Final = 0x54
_JEQ_K: Final = 0x15
_JGE_K: Final = 0x35
_JSET_K: Final = 0x45
_RET_K: Final = 0x06

# ----------------------------------------------------------------------
# The policy, in names

ALLOWED: Final = (
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "membarrier",
    # threads
    "futex", "set_robust_list", "rseq", "set_tid_address", "gettid", "exit",
    "exit_group", "sched_yield",
    # signals (sending one is checked: kill, tgkill)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "restart_syscall",
    # fds already held
    "read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close",
    "close_range", "dup", "dup2", "dup3", "fstat", "newfstatat", "statx",
    "readlink", "readlinkat", "fsync", "fdatasync", "ftruncate",
    # the event loop
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "poll", "ppoll", "select", "pselect6", "eventfd2", "pipe2",
    # sockets already held (sending and receiving are checked)
    "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt",
    # identity, randomness, time
    "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
    "getresgid", "uname", "getrandom", "gettimeofday", "nanosleep", "getrusage",
    "times",
)  # fmt: skip
"""Calls allowed whatever their arguments (where the architecture has them)."""

CHECKED: Final = {
    "clone": "clone",
    "clone3": "clone3",
    "socketpair": "socketpair",
    "sendto": "sendto",
    "recvfrom": "no_oob_arg3",
    "sendmmsg": "no_oob_arg3",
    "recvmmsg": "no_oob_arg3",
    "sendmsg": "no_oob_arg2",
    "recvmsg": "no_oob_arg2",
    "ioctl": "ioctl",
    "fcntl": "fcntl",
    "prctl": "prctl",
    "kill": "own_pid_arg0",
    "tgkill": "own_pid_arg0",
    "sched_getaffinity": "self_arg0",
    "sched_getparam": "self_arg0",
    "sched_getscheduler": "self_arg0",
    "prlimit64": "prlimit64",
    "clock_gettime": "clock",
    "clock_getres": "clock",
    "clock_nanosleep": "clock",
}
"""Calls allowed only with the arguments their rule (the value) accepts."""

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
_SOCK_STREAM: Final = 1
_SOCK_SEQPACKET: Final = 5
_SOCK_TYPE_FLAGS: Final = 0o4000 | 0o2000000  # SOCK_NONBLOCK | SOCK_CLOEXEC
_MSG_OOB: Final = 1
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

STATIC_CLOCKS: Final = (0, 1, 2, 3, 4, 5, 6, 7, 11)
"""REALTIME, MONOTONIC, PROCESS_CPUTIME_ID, THREAD_CPUTIME_ID, MONOTONIC_RAW,
REALTIME_COARSE, MONOTONIC_COARSE, BOOTTIME, TAI.  Not the ``*_ALARM`` clocks
(8, 9: a sleep on them can wake the machine)."""

CPUCLOCK_SCHED: Final = 2
_CPUCLOCK_NEGATIVE: Final = 0x80000000
_CPUCLOCK_PERTHREAD: Final = 4
_CPUCLOCK_CLOCK_MASK: Final = 3
_CLOCKFD: Final = 3
_CPUCLOCK_PID_MASK: Final = 0xFFFFFFF8
_PID_MAX_LIMIT: Final = 1 << 22
"""The kernel's ceiling for ``/proc/sys/kernel/pid_max``."""


def cpu_clock(pid: int, clock: int = CPUCLOCK_SCHED, *, thread: bool = False) -> int:
    """The kernel's ``MAKE_PROCESS_CPUCLOCK(pid, clock)`` (``thread``:
    ``MAKE_THREAD_CPUCLOCK``) as a signed 32-bit ``clockid_t``; pid 0 is the
    caller."""
    value = ((~pid << 3) | clock | (_CPUCLOCK_PERTHREAD if thread else 0)) & 0xFFFFFFFF
    return value - (1 << 32) if value & _CPUCLOCK_NEGATIVE else value


SUPPORTED: Final = HOST is not None
"""Whether this machine's architecture has a syscall table here."""


def _host() -> Architecture:
    if HOST is None:
        raise OSError(f"seccomp: no syscall table for {platform.machine()}")
    return HOST


# ----------------------------------------------------------------------
# The program

Instruction = tuple[int, int, int, int]


class _Assembler:
    """Classic BPF with labels: jumps name their targets, offsets are computed."""

    def __init__(self) -> None:
        self._code: list[tuple[int, str | None, str | None, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"BPF label {name!r} defined twice")
        self._labels[name] = len(self._code)

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, None, None, offset))

    def mask(self, bits: int) -> None:
        """``A &= bits``."""
        self._code.append((_ALU_AND_K, None, None, bits))

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
    own_pid: int,
    *,
    default: int = RET_ERRNO | errno.EPERM,
    arch: Architecture | None = None,
) -> list[Instruction]:
    """The allowlist program for a worker whose pid is ``own_pid``.

    ``own_pid`` is the pid the worker sees (``os.getpid()`` in it, 1 in a
    new PID namespace).  ``default`` is the action for calls not allowed
    (``RET_KILL_PROCESS`` makes a missing entry crash loudly with
    ``SIGSYS``, for tests).  ``arch`` defaults to this machine's.

    Raises:
        OSError: this machine's architecture has no table (and no ``arch``).
        ValueError: ``own_pid`` is not a valid pid.
    """
    if arch is None:
        arch = _host()
    if type(own_pid) is not int or not 0 < own_pid < _PID_MAX_LIMIT:
        raise ValueError(f"seccomp: {own_pid!r} is not a pid")
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jump(_JEQ_K, arch.audit_arch, None, "kill")
    asm.load(_NR)
    if arch.x32_bit is not None:
        asm.jump(_JGE_K, arch.x32_bit, "kill")
    for name, rule in CHECKED.items():
        number = arch.number(name)
        if number is not None:
            asm.jump(_JEQ_K, number, rule)
    for name in ALLOWED:
        number = arch.number(name)
        if number is not None:
            asm.jump(_JEQ_K, number, "allow")
    asm.ret(default)
    for rule in dict.fromkeys(CHECKED.values()):
        asm.label(rule)
        _RULES[rule](asm, arch, own_pid)
    asm.label("allow")
    asm.ret(RET_ALLOW)
    asm.label("deny")
    asm.ret(RET_ERRNO | errno.EPERM)
    asm.label("kill")
    asm.ret(RET_KILL_PROCESS)
    return asm.assemble()


# Argument rules: each ends in a jump or return to allow, deny or another rule.


def _clone(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    asm.load(_arg_low(arch.clone_flags_arg))  # legacy clone reads 32 bits only
    asm.jump(_JSET_K, _CLONE_NEW_ANY, "deny")
    asm.jump(_JSET_K, _CLONE_THREAD, "allow", "deny")


def _clone3(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    asm.ret(RET_ERRNO | errno.ENOSYS)


def _socketpair(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    asm.load(_arg_low(0))
    asm.jump(_JEQ_K, _AF_UNIX, None, "deny")
    asm.load(_arg_low(1))
    asm.mask(~_SOCK_TYPE_FLAGS & 0xFFFFFFFF)
    asm.jump(_JEQ_K, _SOCK_STREAM, "allow")
    asm.jump(_JEQ_K, _SOCK_SEQPACKET, "allow", "deny")


def _sendto(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    # sendto(fd, buf, len, flags, dest_addr, addrlen)
    asm.load(_arg_low(3))
    asm.jump(_JSET_K, _MSG_OOB, "deny")
    _null_pointer(asm, 4)


def _no_oob(index: int) -> Callable[[_Assembler, Architecture, int], None]:
    def rule(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
        asm.load(_arg_low(index))
        asm.jump(_JSET_K, _MSG_OOB, "deny", "allow")

    return rule


def _ioctl(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    _one_of(asm, _arg_low(1), _IOCTLS)


def _fcntl(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    _one_of(asm, _arg_low(1), _FCNTLS)


def _prctl(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    _one_of(asm, _arg_low(0), _PRCTLS)


def _own_pid(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    # kill(pid, sig), tgkill(tgid, tid, sig): not 0 (the process group), not -1
    _one_of(asm, _arg_low(0), (own_pid,))


def _self(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    _one_of(asm, _arg_low(0), (0, own_pid))


def _prlimit64(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    # prlimit64(pid, resource, new_limit, old_limit): ourselves, read only
    asm.load(_arg_low(0))
    asm.jump(_JEQ_K, 0, "prlimit64_self")
    asm.jump(_JEQ_K, own_pid, None, "deny")
    asm.label("prlimit64_self")
    _null_pointer(asm, 2)


def _clock(asm: _Assembler, arch: Architecture, own_pid: int) -> None:
    # clock_gettime(id, tp), clock_getres(id, tp), clock_nanosleep(id, ...)
    asm.load(_arg_low(0))
    for clock in STATIC_CLOCKS:
        asm.jump(_JEQ_K, clock, "allow")
    asm.jump(_JSET_K, _CPUCLOCK_NEGATIVE, None, "deny")
    asm.jump(_JSET_K, _CPUCLOCK_PERTHREAD, "cpu_clock")  # the kernel checks the tid
    asm.mask(_CPUCLOCK_PID_MASK)
    asm.jump(_JEQ_K, cpu_clock(0) & _CPUCLOCK_PID_MASK, "cpu_clock")
    asm.jump(_JEQ_K, cpu_clock(own_pid) & _CPUCLOCK_PID_MASK, "cpu_clock", "deny")
    asm.label("cpu_clock")
    asm.load(_arg_low(0))
    asm.mask(_CPUCLOCK_CLOCK_MASK)
    asm.jump(_JEQ_K, _CLOCKFD, "deny", "allow")


def _one_of(asm: _Assembler, offset: int, values: Sequence[int]) -> None:
    asm.load(offset)
    for value in values:
        asm.jump(_JEQ_K, value, "allow")
    asm.ret(RET_ERRNO | errno.EPERM)


def _null_pointer(asm: _Assembler, index: int) -> None:
    """Allow if argument ``index`` is NULL (both halves), else deny."""
    asm.load(_arg_low(index))
    asm.jump(_JEQ_K, 0, None, "deny")
    asm.load(_arg_high(index))
    asm.jump(_JEQ_K, 0, "allow", "deny")


_RULES: Final[dict[str, Callable[[_Assembler, Architecture, int], None]]] = {
    "clone": _clone,
    "clone3": _clone3,
    "socketpair": _socketpair,
    "sendto": _sendto,
    "no_oob_arg2": _no_oob(2),
    "no_oob_arg3": _no_oob(3),
    "ioctl": _ioctl,
    "fcntl": _fcntl,
    "prctl": _prctl,
    "own_pid_arg0": _own_pid,
    "self_arg0": _self,
    "prlimit64": _prlimit64,
    "clock": _clock,
}

# ----------------------------------------------------------------------
# Loading


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


_SECCOMP_SET_MODE_FILTER: Final = 1
_SECCOMP_FILTER_FLAG_TSYNC: Final = 1
_LIBC: Final = ctypes.CDLL(None, use_errno=True)


class CompiledFilter:
    """A program as the kernel loads it (a ``struct sock_fprog``), built once.

    A process that forks workers (a zygote) builds it before forking, so
    that each worker only has to load it: building the structure from the
    program costs about as much as loading it.
    """

    def __init__(self, program: Sequence[Instruction]) -> None:
        self._filters = (_SockFilter * len(program))(
            *(_SockFilter(*insn) for insn in program)
        )
        self.fprog: Final = _SockFprog(len(program), self._filters)


def install(program: Sequence[Instruction] | CompiledFilter) -> None:
    """Install ``program`` (built for this machine) for every thread, irreversibly.

    Raises:
        OSError: no table for this architecture, ``PR_SET_NO_NEW_PRIVS``
            missing (``EACCES``), or a thread could not be synchronised.
    """
    number = _host().numbers["seccomp"]
    compiled = (
        program if isinstance(program, CompiledFilter) else CompiledFilter(program)
    )
    result = _LIBC.syscall(
        number,
        _SECCOMP_SET_MODE_FILTER,
        _SECCOMP_FILTER_FLAG_TSYNC,
        ctypes.byref(compiled.fprog),
    )
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER): {errno.errorcode.get(err, err)}")
    if result > 0:
        raise OSError(f"seccomp: thread {result} could not be synchronised (TSYNC)")
