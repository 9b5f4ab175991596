"""System-call numbers, per architecture, from the kernel's own tables.

Theory of operation
-------------------

Two kinds of code need a system call's *number*: the seccomp policy
(``_seccomp``), which names the calls it allows or checks, and the raw
calls trio_mojo makes itself through ``syscall(2)`` because glibc has no
wrapper (``pivot_root``, ``seccomp``, ``landlock_*``, ``openat2``; ``bpf``
and ``io_uring_setup`` only in the escape catalogue, :data:`RAW_CALLS`).
Both read this one table.  Each :class:`Architecture` holds the lines of
the kernel's table for the calls named here (x86_64:
``arch/x86/entry/syscalls/syscall_64.tbl``; aarch64: the unified
``scripts/syscall.tbl``, which ``arch/arm64/tools/syscall_64.tbl`` links
to, the same numbers as ``include/uapi/asm-generic/unistd.h``), and the
policy's names it never had.  The tests compare every number with the
kernel headers installed on the machine.  Any other architecture has no
table: :data:`HOST` is ``None`` and :func:`number` raises ``ENOSYS``, so a
layer that needs a raw call is reported unavailable there, never applied
half-way.
"""

from __future__ import annotations

import errno
import platform
from collections.abc import Mapping
from typing import Final

import attrs

__all__ = [
    "AARCH64",
    "ARCHITECTURES",
    "HOST",
    "RAW_CALLS",
    "X86_64",
    "Architecture",
    "NoNumberError",
    "number",
]

RAW_CALLS: Final = frozenset(
    {
        "pivot_root",
        "seccomp",
        "bpf",
        "io_uring_setup",
        "openat2",
        "landlock_create_ruleset",
        "landlock_restrict_self",
    }
)
"""Calls made with ``syscall(2)`` (numbered here; the policy refuses all but
``seccomp``'s own installation, which happens before the filter exists)."""

# Per-architecture numbers

_X86_64_TABLE: Final = """
0    common  read
1    common  write
3    common  close
5    common  fstat
7    common  poll
8    common  lseek
9    common  mmap
10   common  mprotect
11   common  munmap
12   common  brk
13   64      rt_sigaction
14   common  rt_sigprocmask
15   64      rt_sigreturn
16   64      ioctl
17   common  pread64
18   common  pwrite64
19   64      readv
20   64      writev
23   common  select
24   common  sched_yield
25   common  mremap
28   common  madvise
32   common  dup
33   common  dup2
35   common  nanosleep
39   common  getpid
44   common  sendto
45   64      recvfrom
46   64      sendmsg
47   64      recvmsg
48   common  shutdown
51   common  getsockname
52   common  getpeername
53   common  socketpair
55   64      getsockopt
56   common  clone
60   common  exit
62   common  kill
63   common  uname
72   common  fcntl
74   common  fsync
75   common  fdatasync
77   common  ftruncate
89   common  readlink
96   common  gettimeofday
98   common  getrusage
100  common  times
102  common  getuid
104  common  getgid
107  common  geteuid
108  common  getegid
110  common  getppid
118  common  getresuid
120  common  getresgid
131  64      sigaltstack
143  common  sched_getparam
145  common  sched_getscheduler
155  common  pivot_root
157  common  prctl
186  common  gettid
202  common  futex
204  common  sched_getaffinity
218  common  set_tid_address
219  common  restart_syscall
228  common  clock_gettime
229  common  clock_getres
230  common  clock_nanosleep
231  common  exit_group
232  common  epoll_wait
233  common  epoll_ctl
234  common  tgkill
262  common  newfstatat
267  common  readlinkat
270  common  pselect6
271  common  ppoll
273  64      set_robust_list
281  common  epoll_pwait
290  common  eventfd2
291  common  epoll_create1
292  common  dup3
293  common  pipe2
299  64      recvmmsg
302  common  prlimit64
307  64      sendmmsg
317  common  seccomp
318  common  getrandom
321  common  bpf
324  common  membarrier
332  common  statx
334  common  rseq
425  common  io_uring_setup
435  common  clone3
436  common  close_range
437  common  openat2
441  common  epoll_pwait2
444  common  landlock_create_ruleset
446  common  landlock_restrict_self
"""
"""x86_64: the lines of ``arch/x86/entry/syscalls/syscall_64.tbl`` (number,
ABI, name; entry point left out) for the calls named here."""

_AARCH64_TABLE: Final = """
19   common  eventfd2
20   common  epoll_create1
21   common  epoll_ctl
22   common  epoll_pwait
23   common  dup
24   common  dup3
25   64      fcntl
29   common  ioctl
41   common  pivot_root
46   64      ftruncate
57   common  close
59   common  pipe2
62   64      lseek
63   common  read
64   common  write
65   common  readv
66   common  writev
67   common  pread64
68   common  pwrite64
72   64      pselect6
73   64      ppoll
78   common  readlinkat
79   64      newfstatat
80   64      fstat
82   common  fsync
83   common  fdatasync
93   common  exit
94   common  exit_group
96   common  set_tid_address
98   64      futex
99   common  set_robust_list
101  64      nanosleep
113  64      clock_gettime
114  64      clock_getres
115  64      clock_nanosleep
120  common  sched_getscheduler
121  common  sched_getparam
123  common  sched_getaffinity
124  common  sched_yield
128  common  restart_syscall
129  common  kill
131  common  tgkill
132  common  sigaltstack
134  common  rt_sigaction
135  common  rt_sigprocmask
139  common  rt_sigreturn
148  common  getresuid
150  common  getresgid
153  common  times
160  common  uname
165  common  getrusage
167  common  prctl
169  64      gettimeofday
172  common  getpid
173  common  getppid
174  common  getuid
175  common  geteuid
176  common  getgid
177  common  getegid
178  common  gettid
199  common  socketpair
204  common  getsockname
205  common  getpeername
206  common  sendto
207  common  recvfrom
209  common  getsockopt
210  common  shutdown
211  common  sendmsg
212  common  recvmsg
214  common  brk
215  common  munmap
216  common  mremap
220  common  clone
222  64      mmap
226  common  mprotect
233  common  madvise
243  64      recvmmsg
261  common  prlimit64
269  common  sendmmsg
277  common  seccomp
278  common  getrandom
280  common  bpf
283  common  membarrier
291  common  statx
293  common  rseq
425  common  io_uring_setup
435  common  clone3
436  common  close_range
437  common  openat2
441  common  epoll_pwait2
444  common  landlock_create_ruleset
446  common  landlock_restrict_self
"""
"""aarch64: the lines of the kernel's unified ``scripts/syscall.tbl`` (number,
ABI, name) for the calls named here; arm64 takes the ``common`` and ``64``
rows (``arch/arm64/kernel/Makefile.syscalls``)."""


def _parse_table(text: str) -> dict[str, int]:
    numbers = {}
    for line in text.split("\n"):
        if line:
            number, _abi, name = line.split()
            numbers[name] = int(number)
    return numbers


@attrs.frozen(kw_only=True)
class Architecture:
    """One architecture's side of the policy.

    Attributes:
        machine: ``platform.machine()`` on it.
        audit_arch: the ``AUDIT_ARCH_*`` value the kernel puts in
            ``seccomp_data.arch`` for its native calls.
        numbers: system-call numbers by name (the calls the policy names,
            and ``seccomp`` for :func:`install`).
        absent: names of the policy this architecture does not have.
        x32_bit: a bit that marks calls of another ABI sharing the
            architecture tag (x86_64's x32), killed; ``None`` if none.
        clone_flags_arg: the argument that holds ``clone``'s flags.
    """

    machine: str
    audit_arch: int
    numbers: Mapping[str, int]
    absent: frozenset[str] = frozenset()
    x32_bit: int | None = None
    clone_flags_arg: int = 0

    def number(self, name: str) -> int | None:
        """``name``'s number, or ``None`` for a call this architecture lacks.

        Raises:
            ValueError: ``name`` has no number and is not declared absent.
        """
        if name in self.absent:
            return None
        try:
            return self.numbers[name]
        except KeyError:
            raise ValueError(
                f"seccomp: no {self.machine} number for {name!r}"
            ) from None


X86_64: Final = Architecture(
    machine="x86_64",
    audit_arch=0xC000003E,  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
    numbers=_parse_table(_X86_64_TABLE),
    x32_bit=0x40000000,  # __X32_SYSCALL_BIT
)
AARCH64: Final = Architecture(
    machine="aarch64",
    audit_arch=0xC00000B7,  # EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
    numbers=_parse_table(_AARCH64_TABLE),
    absent=frozenset({"poll", "select", "epoll_wait", "dup2", "readlink"}),
)
ARCHITECTURES: Final = {arch.machine: arch for arch in (X86_64, AARCH64)}
"""The architectures with a table, by ``platform.machine()``."""

HOST: Final = ARCHITECTURES.get(platform.machine())
"""This machine's architecture, or ``None`` if it has no table here."""


class NoNumberError(OSError):
    """This release has no number for a system call on this architecture
    (``errno`` is ``ENOSYS``, as if the kernel lacked it)."""


def number(name: str) -> int:
    """This machine's number for system call ``name``.

    Raises:
        NoNumberError: this architecture has no table in this release, or
            the table lacks ``name``.
    """
    if HOST is None:
        raise NoNumberError(
            errno.ENOSYS,
            f"{name}: no system-call table for {platform.machine()} in this release",
        )
    found = HOST.numbers.get(name)
    if found is None:
        raise NoNumberError(
            errno.ENOSYS, f"{name}: no {HOST.machine} number in this release"
        )
    return found
