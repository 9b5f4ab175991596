"""The seccomp allowlist, evaluated instruction by instruction (no kernel).

A tiny classic-BPF interpreter runs the generated program on made-up
``seccomp_data``: every decision the filter makes is checked here, so a
miscounted jump fails a test instead of crashing a worker.  The end-to-end
effect on a real worker is in ``test_sandbox_policy.py``.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence

import pytest

from trio_mojo._sandbox import _seccomp
from trio_mojo._sandbox._seccomp import (
    ALLOWED,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    SYSCALLS,
    Instruction,
    build_filter,
)

X86_64 = 0xC000003E
PID = 4242
EPERM = RET_ERRNO | errno.EPERM


def run(
    program: Sequence[Instruction],
    nr: int,
    args: Sequence[int] = (),
    arch: int = X86_64,
) -> int:
    """Evaluate ``program`` on one system call; return the action."""
    padded = [*args, 0, 0, 0, 0, 0, 0][:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *padded)
    accumulator = 0
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            accumulator = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:  # ret k
            return k
        else:
            taken = {
                0x15: accumulator == k,
                0x35: accumulator >= k,
                0x45: bool(accumulator & k),
            }[code]
            pc += jt if taken else jf


PROGRAM = build_filter(PID)


def nr(name: str) -> int:
    return SYSCALLS[name]


def test_wrong_architecture_and_x32_calls_kill_the_process() -> None:
    assert run(PROGRAM, nr("read"), arch=0x40000003) == RET_KILL_PROCESS  # i386
    assert run(PROGRAM, 0x40000000 | nr("read")) == RET_KILL_PROCESS


@pytest.mark.parametrize("name", ALLOWED)
def test_every_allowlisted_call_is_allowed(name: str) -> None:
    assert run(PROGRAM, nr(name), (1, 2, 3)) == RET_ALLOW


@pytest.mark.parametrize(
    ("number", "what"),
    [
        (2, "open"),
        (257, "openat"),
        (41, "socket"),
        (42, "connect"),
        (49, "bind"),
        (57, "fork"),
        (59, "execve"),
        (101, "ptrace"),
        (272, "unshare"),
        (321, "bpf"),
        (425, "io_uring_setup"),
        (437, "openat2"),
        (999, "a call newer than the table"),
    ],
)
def test_calls_outside_the_allowlist_get_eperm(number: int, what: str) -> None:
    assert run(PROGRAM, number) == EPERM, what


def test_clone_only_for_threads() -> None:
    thread = 0x00010000 | 0x00000100 | 0x00000200 | 0x00000800  # THREAD|VM|FS|SIGHAND
    assert run(PROGRAM, nr("clone"), (thread,)) == RET_ALLOW
    assert run(PROGRAM, nr("clone"), (17,)) == EPERM  # SIGCHLD: a fork
    assert run(PROGRAM, nr("clone"), (thread | 0x10000000,)) == EPERM  # NEWUSER
    assert run(PROGRAM, nr("clone"), (thread | 0x00000080,)) == EPERM  # NEWTIME
    assert run(PROGRAM, nr("clone3")) == RET_ERRNO | errno.ENOSYS


def test_argument_checked_calls() -> None:
    assert run(PROGRAM, nr("socketpair"), (1,)) == RET_ALLOW  # AF_UNIX
    assert run(PROGRAM, nr("socketpair"), (2,)) == EPERM  # AF_INET
    assert run(PROGRAM, nr("ioctl"), (3, 0x5421)) == RET_ALLOW  # FIONBIO
    assert run(PROGRAM, nr("ioctl"), (3, 0x5412)) == EPERM  # TIOCSTI
    assert run(PROGRAM, nr("prctl"), (15,)) == RET_ALLOW  # PR_SET_NAME
    assert run(PROGRAM, nr("prctl"), (22,)) == EPERM  # PR_SET_SECCOMP
    assert run(PROGRAM, nr("kill"), (PID, 0)) == RET_ALLOW
    assert run(PROGRAM, nr("kill"), (1, 9)) == EPERM
    assert run(PROGRAM, nr("tgkill"), (PID, PID + 1, 10)) == RET_ALLOW
    assert run(PROGRAM, nr("tgkill"), (PID + 1, PID + 1, 10)) == EPERM
    assert run(PROGRAM, nr("tkill"), (PID,)) == EPERM
    for command in (0, 1, 2, 3, 4, 1030):  # dup, get/set fd flags and status flags
        assert run(PROGRAM, nr("fcntl"), (3, command)) == RET_ALLOW
    for command in (8, 10, 15, 1024):  # F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLEASE
        assert (
            run(PROGRAM, nr("fcntl"), (3, command)) == EPERM
        )  # O_ASYNC could signal others
    assert run(PROGRAM, nr("prlimit64"), (0, 7, 0, 0x7FFF0000)) == RET_ALLOW  # get
    assert run(PROGRAM, nr("prlimit64"), (0, 7, 0x7FFF0000, 0)) == EPERM  # set
    assert run(PROGRAM, nr("prlimit64"), (0, 7, 1 << 40, 0)) == EPERM  # high half set


def test_a_kill_default_makes_missing_entries_loud() -> None:
    strict = build_filter(PID, default=RET_KILL_PROCESS)
    assert run(strict, 257) == RET_KILL_PROCESS
    assert run(strict, nr("read")) == RET_ALLOW


def test_install_refuses_other_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_seccomp, "SUPPORTED", False)
    with pytest.raises(OSError, match="no syscall table"):
        _seccomp.install(PROGRAM)
