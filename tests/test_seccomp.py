"""The seccomp allowlist: every decision in a BPF interpreter, then real workers.

A tiny classic-BPF interpreter runs the generated program on made-up
``seccomp_data`` for both architectures with a table (x86_64, aarch64):
every call number from 0 to 600, the argument-checked calls with allowed
and refused arguments, a foreign architecture and x32.  A miscounted jump
or a wrong number fails here instead of crashing a worker.  The number
tables are compared with the kernel headers installed on this machine.

Then real workers: a hostile target under ``strict()`` tries each call the
filter restricts by argument and gets ``EPERM``, while the same attempts
succeed without a sandbox; and a worker whose filter kills on any call it
does not allow runs a realistic workload, so a missing allow shows up as
``SIGSYS``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest

from trio_mojo import (
    FileAccess,
    Handle,
    Message,
    SandboxPolicy,
    WorkerError,
    open_worker,
)
from trio_mojo._examples import SYSCALL_ATTEMPTS
from trio_mojo._sandbox import _seccomp
from trio_mojo._sandbox._seccomp import (
    AARCH64,
    ALLOWED,
    ARCHITECTURES,
    CHECKED,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    STATIC_CLOCKS,
    X86_64,
    Architecture,
    Instruction,
    build_filter,
    cpu_clock,
)
from trio_mojo._sandbox._syscalls import RAW_CALLS

PID = 4242
EPERM = RET_ERRNO | errno.EPERM
ENOSYS = RET_ERRNO | errno.ENOSYS
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028
X32_SYSCALL_BIT = 0x40000000


def run(
    program: Sequence[Instruction],
    nr: int,
    args: Sequence[int] = (),
    arch: int = X86_64.audit_arch,
) -> int:
    """Evaluate ``program`` on one system call; return the action.

    Arguments are 64-bit registers: a negative one is sign-extended, as a
    C ``int`` argument is.
    """
    padded = [arg & (1 << 64) - 1 for arg in (*args, 0, 0, 0, 0, 0, 0)][:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *padded)
    accumulator = 0
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            accumulator = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:  # and #k
            accumulator &= k
        elif code == 0x06:  # ret #k
            return k
        else:
            taken = {
                0x15: accumulator == k,
                0x35: accumulator >= k,
                0x45: bool(accumulator & k),
            }[code]
            pc += jt if taken else jf


class Decide:
    """One architecture's program, asked by call name."""

    def __init__(self, arch: Architecture, own_pid: int = PID) -> None:
        self.arch = arch
        self.program = build_filter(own_pid, arch=arch)

    def __call__(self, name: str, *args: int) -> int:
        return run(self.program, self.arch.numbers[name], args, self.arch.audit_arch)


@pytest.fixture(params=list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def decide(request: pytest.FixtureRequest) -> Decide:
    arch: Architecture = request.param
    return Decide(arch)


# ----------------------------------------------------------------------
# The policy and its tables

ZERO_ARGUMENTS = {
    "clone": EPERM,  # flags 0: no CLONE_THREAD, a fork
    "clone3": ENOSYS,
    "socketpair": EPERM,  # family 0
    "sendto": RET_ALLOW,  # no flags, no destination
    "recvfrom": RET_ALLOW,
    "sendmsg": RET_ALLOW,
    "recvmsg": RET_ALLOW,
    "sendmmsg": RET_ALLOW,
    "recvmmsg": RET_ALLOW,
    "getsockopt": EPERM,  # level 0
    "ioctl": EPERM,  # request 0
    "fcntl": RET_ALLOW,  # F_DUPFD
    "prctl": EPERM,  # option 0
    "kill": EPERM,  # pid 0: the process group
    "tgkill": EPERM,
    "sched_getaffinity": RET_ALLOW,  # pid 0: the caller
    "sched_getparam": RET_ALLOW,
    "sched_getscheduler": RET_ALLOW,
    "prlimit64": RET_ALLOW,  # pid 0, no new limit
    "clock_gettime": RET_ALLOW,  # CLOCK_REALTIME
    "clock_getres": RET_ALLOW,
    "clock_nanosleep": RET_ALLOW,
}
"""The decision for each argument-checked call when every argument is 0."""

REFUSED = {
    # name: (x86_64, aarch64); None where the architecture has no such call
    "open": (2, None),
    "openat": (257, 56),
    "openat2": (437, 437),
    "socket": (41, 198),
    "connect": (42, 203),
    "bind": (49, 200),
    "accept4": (288, 242),
    "fork": (57, None),
    "execve": (59, 221),
    "ptrace": (101, 117),
    "unshare": (272, 97),
    "bpf": (321, 280),
    "io_uring_setup": (425, 425),
    "getcwd": (79, 17),
    "tkill": (200, 130),
    "setitimer": (38, 103),
    "sched_setaffinity": (203, 122),
    "clock_settime": (227, 112),
    "seccomp": (317, 277),
    "setsockopt": (54, 208),
}
"""Calls the filter refuses whatever their arguments, with their numbers."""


def refused(arch: Architecture, name: str) -> int | None:
    return REFUSED[name][0 if arch is X86_64 else 1]


def test_checked_calls_are_the_ones_this_test_knows() -> None:
    assert set(CHECKED) == set(ZERO_ARGUMENTS)
    assert not set(CHECKED) & set(ALLOWED)


@pytest.mark.parametrize("arch", list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def test_each_table_has_exactly_the_policys_names(arch: Architecture) -> None:
    policy = set(ALLOWED) | set(CHECKED)
    assert arch.absent <= set(ALLOWED)
    # The policy's calls, and the raw calls trio_mojo makes with syscall(2).
    assert set(arch.numbers) == (policy - arch.absent) | RAW_CALLS
    assert len(set(arch.numbers.values())) == len(arch.numbers)  # no shared number


def test_aarch64_lacks_the_calls_the_unified_table_dropped() -> None:
    assert AARCH64.absent == {"poll", "select", "epoll_wait", "dup2", "readlink"}
    assert X86_64.absent == frozenset()
    assert AARCH64.number("poll") is None
    with pytest.raises(ValueError, match="no aarch64 number for 'open'"):
        AARCH64.number("open")


@pytest.mark.parametrize("arch", list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def test_every_number_from_0_to_600(arch: Architecture) -> None:
    program = build_filter(PID, arch=arch)
    names = {number: name for name, number in arch.numbers.items()}
    for nr in range(601):
        name = names.get(nr)
        if name in ALLOWED:
            expected = RET_ALLOW
        else:
            expected = ZERO_ARGUMENTS.get(name or "", EPERM)
        assert run(program, nr, (), arch.audit_arch) == expected, (nr, name)
        tagged = run(program, nr | X32_SYSCALL_BIT, (), arch.audit_arch)
        if arch.x32_bit is not None:  # x86_64: an x32 call kills
            assert tagged == RET_KILL_PROCESS, nr
        else:
            assert tagged == EPERM, nr


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_calls_get_eperm(decide: Decide, name: str) -> None:
    number = refused(decide.arch, name)
    if number is None:
        assert name not in decide.arch.numbers
        return
    assert run(decide.program, number, (1, 2, 3), decide.arch.audit_arch) == EPERM


def test_a_foreign_architecture_is_killed(decide: Decide) -> None:
    for foreign in (AUDIT_ARCH_I386, AUDIT_ARCH_ARM, X86_64.audit_arch, 0):
        if foreign != decide.arch.audit_arch:
            for nr in (0, 3, 63, 1000):
                assert run(decide.program, nr, (), foreign) == RET_KILL_PROCESS
    assert X86_64.audit_arch == 0xC000003E
    assert AARCH64.audit_arch == 0xC00000B7


def test_every_allowlisted_call_is_allowed_with_any_arguments(decide: Decide) -> None:
    for name in ALLOWED:
        if name not in decide.arch.absent:
            assert decide(name, 1, 2, 3, 4, 5, 6) == RET_ALLOW, name
            assert decide(name, -1, -1, -1, -1, -1, -1) == RET_ALLOW, name


# ----------------------------------------------------------------------
# Argument rules, on both architectures

CLONE_THREAD_FLAGS = 0x00010000 | 0x00000100 | 0x00000200 | 0x00000800  # glibc's


def test_clone_only_for_threads(decide: Decide) -> None:
    assert decide("clone", CLONE_THREAD_FLAGS) == RET_ALLOW
    assert decide("clone", CLONE_THREAD_FLAGS | 0x00100000 | 0x00200000) == RET_ALLOW
    assert decide("clone", 17) == EPERM  # SIGCHLD: a fork
    for new in (0x80, 0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000):
        assert decide("clone", CLONE_THREAD_FLAGS | new) == EPERM, hex(new)
    for new in (0x20000000, 0x40000000):  # NEWPID, NEWNET
        assert decide("clone", CLONE_THREAD_FLAGS | new) == EPERM, hex(new)
    assert decide("clone", 0, CLONE_THREAD_FLAGS) == EPERM  # flags are argument 0
    assert decide("clone3", CLONE_THREAD_FLAGS) == ENOSYS


AF_UNIX, AF_INET, AF_NETLINK = 1, 2, 16
STREAM, DGRAM, RAW, SEQPACKET = 1, 2, 3, 5
NONBLOCK, CLOEXEC = 0o4000, 0o2000000


def test_socketpair_only_unix_stream_and_seqpacket(decide: Decide) -> None:
    for kind in (STREAM, SEQPACKET):
        for flags in (0, NONBLOCK, CLOEXEC, NONBLOCK | CLOEXEC):
            assert decide("socketpair", AF_UNIX, kind | flags, 0) == RET_ALLOW
    for kind in (DGRAM, RAW, 0, 4, 6, 10):
        for flags in (0, NONBLOCK | CLOEXEC):
            assert decide("socketpair", AF_UNIX, kind | flags, 0) == EPERM, kind
    assert decide("socketpair", AF_UNIX, STREAM | 0x100) == EPERM  # other type bits
    for family in (0, AF_INET, AF_NETLINK, 10):
        assert decide("socketpair", family, STREAM) == EPERM, family
    assert decide("socketpair", AF_UNIX | 1 << 32, STREAM) == RET_ALLOW  # int argument


MSG_OOB, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_CMSG_CLOEXEC = 1, 0x40, 0x4000, 0x40000000
HARMLESS_FLAGS = (0, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)


def test_sendto_only_without_a_destination(decide: Decide) -> None:
    buffer = 0x7FFF0000
    for flags in HARMLESS_FLAGS:
        assert decide("sendto", 3, buffer, 1, flags, 0, 0) == RET_ALLOW
        assert decide("sendto", 3, buffer, 1, flags, 0, 110) == RET_ALLOW  # len ignored
        assert decide("sendto", 3, buffer, 1, flags, 0x7FFF1000, 110) == EPERM
        assert decide("sendto", 3, buffer, 1, flags, 1 << 32, 110) == EPERM  # high half
        assert decide("sendto", 3, buffer, 1, flags, 0x7FFF << 32 | 8, 110) == EPERM


@pytest.mark.parametrize(
    ("call", "flags_arg"),
    [
        ("sendto", 3),
        ("recvfrom", 3),
        ("sendmsg", 2),
        ("recvmsg", 2),
        ("sendmmsg", 3),
        ("recvmmsg", 3),
    ],
)
def test_msg_oob_is_refused_in_every_send_and_receive(
    decide: Decide, call: str, flags_arg: int
) -> None:
    def with_flags(flags: int) -> list[int]:
        args = [3, 0x7FFF0000, 1, 0, 0, 0]  # fd, a pointer, 1, ...
        args[flags_arg] = flags
        return args

    for flags in HARMLESS_FLAGS:
        assert decide(call, *with_flags(flags)) == RET_ALLOW
        assert decide(call, *with_flags(flags | MSG_OOB)) == EPERM
    # The bit is looked for in the flags argument, not elsewhere.
    assert decide(call, *with_flags(MSG_OOB | 1 << 32)) == EPERM
    assert decide(call, MSG_OOB, *with_flags(0)[1:]) == RET_ALLOW  # fd 1


def test_ioctl_fcntl_prctl_only_harmless_requests(decide: Decide) -> None:
    for request in (0x5421, 0x5451, 0x5450, 0x541B, 0x5401):
        assert decide("ioctl", 3, request) == RET_ALLOW
    for request in (0x5412, 0x541C, 0x5437, 0x4B3A):  # TIOCSTI, TIOCLINUX, ...
        assert decide("ioctl", 3, request) == EPERM
    for command in (0, 1, 2, 3, 4, 1030):  # dup, get/set fd flags and status flags
        assert decide("fcntl", 3, command) == RET_ALLOW
    for command in (8, 10, 15, 1024, 5, 6, 7):  # F_SETOWN, F_SETSIG, leases, locks
        assert decide("fcntl", 3, command) == EPERM  # O_ASYNC could signal others
    assert decide("prctl", 15) == RET_ALLOW  # PR_SET_NAME
    assert decide("prctl", 16) == RET_ALLOW  # PR_GET_NAME
    for option in (22, 38, 4, 1, 59):  # SET_SECCOMP, NO_NEW_PRIVS, DUMPABLE, ...
        assert decide("prctl", option) == EPERM


def test_getsockopt_only_reads_a_few_socket_options(decide: Decide) -> None:
    sol_socket, ipproto_tcp = 1, 6
    # SO_TYPE, SO_ERROR, SO_PEERCRED, SO_PROTOCOL, SO_DOMAIN
    for option in (3, 4, 17, 38, 39):
        assert decide("getsockopt", 3, sol_socket, option) == RET_ALLOW
        # Both are C ints: the kernel ignores the upper halves of the registers.
        assert decide("getsockopt", 3, sol_socket | 1 << 32, option | 1 << 32) == (
            RET_ALLOW
        )
        assert decide("getsockopt", 3, ipproto_tcp, option) == EPERM
    # SO_PEERPIDFD (a pidfd of the parent), SO_PEERSEC, SO_PEERGROUPS,
    # SO_ATTACH_FILTER, SO_SNDBUF, SO_RCVBUF, SO_PEEK_OFF
    for option in (77, 31, 59, 26, 7, 8, 42):
        assert decide("getsockopt", 3, sol_socket, option) == EPERM
    assert _seccomp.SOCKET_OPTIONS_READ == {
        "SO_TYPE": socket.SO_TYPE,
        "SO_ERROR": socket.SO_ERROR,
        "SO_PEERCRED": socket.SO_PEERCRED,
        "SO_PROTOCOL": socket.SO_PROTOCOL,
        "SO_DOMAIN": socket.SO_DOMAIN,
    }


def test_signals_only_to_the_worker_itself(decide: Decide) -> None:
    assert decide("kill", PID, 0) == RET_ALLOW
    assert decide("kill", PID, signal.SIGKILL) == RET_ALLOW
    for pid in (1, PID + 1, 0, -1, -PID):
        assert decide("kill", pid, 9) == EPERM, pid
    assert decide("tgkill", PID, PID + 1, 10) == RET_ALLOW
    assert decide("tgkill", PID + 1, PID + 1, 10) == EPERM


def test_scheduler_queries_only_about_the_worker(decide: Decide) -> None:
    for call in ("sched_getaffinity", "sched_getparam", "sched_getscheduler"):
        assert decide(call, 0, 128, 0x7FFF0000) == RET_ALLOW
        assert decide(call, PID, 128, 0x7FFF0000) == RET_ALLOW
        for pid in (1, PID + 1, PID - 1, -1, 1 << 22):
            assert decide(call, pid, 128, 0x7FFF0000) == EPERM, (call, pid)


def test_prlimit64_only_reads_the_worker_limits(decide: Decide) -> None:
    old = 0x7FFF0000
    assert decide("prlimit64", 0, 7, 0, old) == RET_ALLOW
    assert decide("prlimit64", PID, 7, 0, old) == RET_ALLOW
    assert decide("prlimit64", 1, 7, 0, old) == EPERM  # another process
    assert decide("prlimit64", PID + 1, 7, 0, old) == EPERM
    assert decide("prlimit64", 0, 7, old, 0) == EPERM  # a new limit
    assert decide("prlimit64", PID, 7, 1 << 40, 0) == EPERM  # high half set


def test_clocks_only_static_ones_and_the_worker_own(decide: Decide) -> None:
    calls = ("clock_gettime", "clock_getres", "clock_nanosleep")
    for call in calls:
        for clock in STATIC_CLOCKS:
            assert decide(call, clock) == RET_ALLOW, (call, clock)
        for clock in (8, 9, 10, 12, 15, 16, 100, 0x7FFFFFFF):  # alarm, unknown
            assert decide(call, clock) == EPERM, (call, clock)
        for which in (0, 1, 2):  # PROF, VIRT, SCHED
            for pid in (0, PID):
                assert decide(call, cpu_clock(pid, which)) == RET_ALLOW, (pid, which)
            for pid in (1, 2, PID + 1, PID - 1, 1 << 21):
                assert decide(call, cpu_clock(pid, which)) == EPERM, (pid, which)
            # Per-thread clocks: the kernel only resolves the caller's threads.
            for tid in (0, PID, PID + 1, 1):
                clock = cpu_clock(tid, which, thread=True)
                assert decide(call, clock) == RET_ALLOW, (tid, which)
        for pid in (0, PID, 1):  # which 3: a clock fd (FD_TO_CLOCKID), never
            assert decide(call, cpu_clock(pid, 3)) == EPERM
            assert decide(call, cpu_clock(pid, 3, thread=True)) == EPERM


def test_cpu_clock_encodes_the_kernel_macro() -> None:
    # MAKE_PROCESS_CPUCLOCK(0, CPUCLOCK_SCHED) and MAKE_THREAD_CPUCLOCK(0, ...)
    assert cpu_clock(0) == -6
    assert cpu_clock(0, thread=True) == -2
    assert cpu_clock(1, 0) == -16
    # glibc's pthread_getcpuclockid for the main thread (tid == pid).
    main = threading.main_thread().ident
    assert main is not None
    assert time.pthread_getcpuclockid(main) == cpu_clock(os.getpid(), thread=True)


@pytest.mark.parametrize("own_pid", [1, 2, 3, 300, 4242, (1 << 22) - 1])
def test_any_pid_the_worker_may_have(own_pid: int) -> None:
    # In a PID namespace the worker is 1 or 2: pid 1 must not be special.
    for arch in ARCHITECTURES.values():
        decide = Decide(arch, own_pid)
        other = own_pid + 1
        assert decide("kill", own_pid, 0) == RET_ALLOW
        assert decide("kill", other, 0) == EPERM
        assert decide("sched_getaffinity", own_pid) == RET_ALLOW
        assert decide("sched_getaffinity", other) == EPERM
        assert decide("prlimit64", own_pid, 7, 0, 0) == RET_ALLOW
        assert decide("prlimit64", other, 7, 0, 0) == EPERM
        assert decide("clock_gettime", cpu_clock(own_pid)) == RET_ALLOW
        assert decide("clock_gettime", cpu_clock(other)) == EPERM
        assert decide("clock_gettime", cpu_clock(own_pid - 1)) == (
            RET_ALLOW if own_pid == 1 else EPERM  # own_pid - 1 == 0: the caller
        )


@pytest.mark.parametrize("bad", [0, -1, 1 << 22, True, 2.0])
def test_a_bad_pid_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="is not a pid"):
        build_filter(bad)


def test_a_kill_default_makes_missing_entries_loud(decide: Decide) -> None:
    strict = build_filter(PID, default=RET_KILL_PROCESS, arch=decide.arch)
    audit = decide.arch.audit_arch
    assert run(strict, refused(decide.arch, "openat") or 0, (), audit) == (
        RET_KILL_PROCESS
    )
    assert run(strict, decide.arch.numbers["read"], (), audit) == RET_ALLOW
    # Refusals by argument stay EPERM: the caller handles those.
    assert run(strict, decide.arch.numbers["getpid"], (), audit) == RET_ALLOW
    socketpair = decide.arch.numbers["socketpair"]
    assert run(strict, socketpair, (AF_UNIX, DGRAM), audit) == EPERM


# ----------------------------------------------------------------------
# The number tables against the kernel headers on this machine


def _header_numbers(path: Path) -> dict[str, int]:
    """``__NR_name`` values from a kernel uapi header, aliases resolved."""
    defines = dict(
        re.findall(r"^#define\s+(__NR\w+)\s+(\w+)", path.read_text(), re.MULTILINE)
    )
    numbers = {}
    for macro, value in defines.items():
        resolved = value
        while resolved in defines:
            resolved = defines[resolved]
        if macro.startswith("__NR_") and resolved.isdigit():
            numbers[macro.removeprefix("__NR_")] = int(resolved)
    return numbers


HEADERS = {
    "x86_64": (
        Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        Path("/usr/include/asm/unistd_64.h"),
    ),
    # The unified table: the numbers of aarch64 (and every newer architecture).
    "aarch64": (Path("/usr/include/asm-generic/unistd.h"),),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def test_numbers_match_the_kernel_headers(arch: Architecture) -> None:
    found = [path for path in HEADERS[arch.machine] if path.exists()]
    if not found:
        pytest.skip(f"no kernel uapi header here: {HEADERS[arch.machine]}")
    headers = _header_numbers(found[0])
    assert {name: headers.get(name) for name in arch.numbers} == dict(arch.numbers)
    assert not arch.absent & set(headers)
    assert {name: headers.get(name) for name in REFUSED} == {
        name: refused(arch, name) for name in REFUSED
    }


# ----------------------------------------------------------------------
# Other architectures


def test_another_architecture_is_refused_before_spawning() -> None:
    # As on riscv64: no table, so SUPPORTED is false from the import on.
    script = (
        "import platform\n"
        "platform.machine = lambda: 'riscv64'\n"
        "from trio_mojo import SandboxPolicy, SandboxUnavailableError\n"
        "from trio_mojo._sandbox import _seccomp\n"
        "assert not _seccomp.SUPPORTED and _seccomp.HOST is None\n"
        "for call in (lambda: _seccomp.build_filter(5), lambda: _seccomp.install([])):\n"
        "    try:\n"
        "        call()\n"
        "    except OSError as exc:\n"
        "        print('OSError:', exc)\n"
        "try:\n"
        "    SandboxPolicy.strict().check()\n"
        "except SandboxUnavailableError as exc:\n"
        "    print('refused:', exc.layer, exc.reason)\n"
        "SandboxPolicy.basic().check()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    assert lines[0] == lines[1] == "OSError: seccomp: no syscall table for riscv64"
    # The first required layer that needs this architecture's numbers.
    assert lines[2].startswith(
        "refused: landlock landlock_create_ruleset: no system-call table for "
        "riscv64 in this release"
    )
    assert len(lines) == 3


def test_install_needs_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_seccomp, "HOST", None)
    with pytest.raises(OSError, match="no syscall table"):
        _seccomp.install(build_filter(PID, arch=X86_64))
    with pytest.raises(OSError, match="no syscall table"):
        build_filter(PID)


# ----------------------------------------------------------------------
# Real workers

needs_seccomp = pytest.mark.skipif(
    not _seccomp.SUPPORTED, reason="no seccomp table for this architecture"
)

SANDBOXED = {
    "socketpair_dgram": "EPERM",
    "socketpair_stream": "ALLOWED",
    "socketpair_seqpacket": "ALLOWED",
    "sendto_address": "EPERM",
    "sendto_channel_address": "EPERM",
    "sendmsg_name_stream": "EISCONN",  # the kernel: a stream socket takes no name
    "sendmsg_name_seqpacket": "ALLOWED",  # the kernel drops the name: to the peer
    "oob_channel": "EPERM",
    "oob_sendto": "EPERM",
    "oob_sendmsg": "EPERM",
    "oob_sendmmsg": "EPERM",
    "oob_recvfrom": "EPERM",
    "oob_recvmsg": "EPERM",
    "oob_recvmmsg": "EPERM",
    "getcwd": "EPERM",
    "clock_gettime_other_process": "EPERM",
    "clock_getres_other_process": "EPERM",
    "clock_nanosleep_other_process": "EPERM",
    "clock_foreign_thread": "EINVAL",  # the kernel: not a thread of ours
    "clock_own_process": "ALLOWED",
    "clock_own_thread": "ALLOWED",
    "clock_other_own_thread": "ALLOWED",
    "clock_static": "ALLOWED",
    "trio_thread": "ALLOWED",
    "sched_getaffinity_other": "EPERM",
    "sched_getparam_other": "EPERM",
    "sched_getscheduler_other": "EPERM",
    "sched_self": "ALLOWED",
    "prlimit_other": "EPERM",
    "prlimit_self": "ALLOWED",
    "runtime": "ALLOWED",
}
"""What a worker under ``strict()`` measures (seccomp refuses with EPERM)."""

UNSANDBOXED = {
    **dict.fromkeys(SANDBOXED, "ALLOWED"),
    "sendto_channel_address": "EISCONN",
    "sendmsg_name_stream": "EISCONN",
    "clock_foreign_thread": "EINVAL",
}
"""The same attempts without a sandbox: each refused one really works there."""


class Listener:
    """A bound ``AF_UNIX`` datagram socket: what a worker must not reach."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "dgram")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def received(self) -> list[bytes]:
        found = []
        while True:
            try:
                found.append(self.sock.recv(256))
            except BlockingIOError:
                return found


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    bound = Listener(tmp_path)
    with bound.sock:
        yield bound


async def ask(
    worker_channel: Any, listener: Listener, attempts: Sequence[str] | None = None
) -> dict[str, str]:
    """Send one request (with a datagram socket) and return the reply."""
    request: dict[str, Any] = {"pid": os.getpid(), "listener": listener.path}
    if attempts is not None:
        request["attempts"] = list(attempts)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await worker_channel.send(
        Message(json.dumps(request).encode(), (Handle(dgram.detach()),))
    )
    with await worker_channel.receive() as reply:
        results: dict[str, str] = json.loads(reply.payload)
    return results


def test_the_expectations_name_every_attempt() -> None:
    assert set(SANDBOXED) == set(SYSCALL_ATTEMPTS)


@needs_seccomp
async def test_a_strict_worker_gets_eperm_for_restricted_arguments(
    listener: Listener,
) -> None:
    async with open_worker(
        "trio_mojo._examples:attempt_syscall_escapes", sandbox=SandboxPolicy.strict()
    ) as worker:
        assert worker.sandbox_report.layers["seccomp"] == "applied"
        results = await ask(worker.channel, listener)
        # The channel still works after the attempts on it.
        again = await ask(worker.channel, listener, ["socketpair_stream"])
    assert results == SANDBOXED
    assert again == {"socketpair_stream": "ALLOWED"}
    assert listener.received() == []


@needs_seccomp
async def test_without_a_sandbox_each_attempt_really_works(listener: Listener) -> None:
    unsandboxed = SandboxPolicy.none(i_understand_this_is_unsandboxed=True)
    async with open_worker(
        "trio_mojo._examples:attempt_syscall_escapes", sandbox=unsandboxed
    ) as worker:
        results = await ask(worker.channel, listener)
    assert results == UNSANDBOXED
    assert sorted(listener.received()) == [b"sendto_address", b"socketpair_dgram"]


@pytest.fixture
def kill_on_anything_else(tmp_path: Path) -> Path:
    """An interpreter for ``open_worker(python=...)`` whose workers' filter
    kills (``SIGSYS``) on any call it does not allow, instead of ``EPERM``."""
    wrapper = tmp_path / "python-seccomp-kill"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import runpy, sys\n"
        "from trio_mojo._sandbox import _seccomp\n"
        "build = _seccomp.build_filter\n"
        "_seccomp.build_filter = lambda pid, **options: build(\n"
        "    pid, **options, default=_seccomp.RET_KILL_PROCESS\n"
        ")\n"
        "flags, module = sys.argv[1:3], sys.argv[3]\n"
        "assert flags == ['-I', '-m'], sys.argv\n"
        "sys.argv = [module, *sys.argv[4:]]\n"
        "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
    )
    wrapper.chmod(0o700)
    return wrapper


@asynccontextmanager
async def killing_worker(
    python: Path,
    target: str,
    sandbox: SandboxPolicy | None = None,
    **options: Any,
) -> AsyncIterator[Any]:
    policy = SandboxPolicy.strict() if sandbox is None else sandbox
    async with open_worker(target, sandbox=policy, python=python, **options) as worker:
        assert worker.sandbox_report.layers["seccomp"] == "applied"
        yield worker


@needs_seccomp
async def test_the_kill_mode_really_kills(
    kill_on_anything_else: Path, listener: Listener
) -> None:
    with pytest.raises(WorkerError) as caught:
        async with killing_worker(
            kill_on_anything_else, "trio_mojo._examples:attempt_syscall_escapes"
        ) as worker:
            await ask(worker.channel, listener, ["getcwd"])
    assert caught.value.returncode == -signal.SIGSYS


@needs_seccomp
async def test_a_realistic_worker_makes_no_call_outside_the_allowlist(
    kill_on_anything_else: Path, listener: Listener, tmp_path: Path
) -> None:
    # Under KILL_PROCESS any call the filter does not allow is SIGSYS: the
    # worker dies and open_worker raises WorkerError.
    allowed = [name for name, result in SANDBOXED.items() if result != "EPERM"]
    async with killing_worker(
        kill_on_anything_else, "trio_mojo._examples:attempt_syscall_escapes"
    ) as worker:
        results = await ask(worker.channel, listener, allowed)
        again = await ask(worker.channel, listener, allowed)
    assert results == again == {name: SANDBOXED[name] for name in allowed}

    (tmp_path / "data.txt").write_bytes(b"brokered bytes")
    async with killing_worker(
        kill_on_anything_else,
        "trio_mojo._examples:broker_reader",
        file_access=[FileAccess.read_only(tmp_path)],
    ) as worker:
        await worker.channel.send(Message(f"r {tmp_path / 'data.txt'}".encode()))
        assert (await worker.channel.receive()).payload == b"ok brokered bytes"

    # describe_self reads /proc/self/fd: keep the host's root for it.
    with_proc = attrs.evolve(
        SandboxPolicy.strict(), name="strict-with-proc", rootfs="off"
    )
    async with killing_worker(
        kill_on_anything_else, "trio_mojo._examples:describe_self", with_proc
    ) as worker:
        read_end, write_end = os.pipe()
        os.write(write_end, b"through the filter")
        os.close(write_end)
        await worker.channel.send(Message(b"", (Handle(read_end),)))
        with await worker.channel.receive() as reply:
            described = json.loads(reply.payload)
    assert described["received"] == ["through the filter"]
