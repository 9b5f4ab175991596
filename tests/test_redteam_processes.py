"""Red team: the processes around a worker, and what outlives it.

The init of a worker's PID namespace runs outside seccomp and Landlock:
the worker must not be able to stop, kill or trace it.  ``basic()``
applies a layer "when the machine allows it": on a kernel without seccomp
and user namespaces (or in a container that filters them out) it runs
with both missing; the tests get there by turning them off.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Final

import attrs
import pytest
import trio
from _redteam_support import PROBE, STRICT, ask, finding, require

from trio_mojo import SandboxPolicy, open_worker

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="measured with a root parent (the uid drop needs one)"
)

DEGRADED_BASIC: Final = attrs.evolve(
    SandboxPolicy.basic(),
    name="basic, no seccomp or namespaces",
    seccomp="off",
    namespaces="off",
    rootfs="off",
)


def _children(pid: int) -> list[int]:
    return [
        int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ]


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    raise LookupError(name)


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (STRICT, dict.fromkeys(("SIGTERM", "SIGKILL", "SIGSTOP", "ptrace"), "EPERM")),
        # Without seccomp and Landlock the signals are delivered, and an init
        # ignores every one that comes from inside its namespace; ptrace
        # fails because the init kept capabilities the worker dropped.
        (
            attrs.evolve(
                STRICT, name="no seccomp or landlock", seccomp="off", landlock="off"
            ),
            {
                "SIGTERM": "ALLOWED",
                "SIGKILL": "ALLOWED",
                "SIGSTOP": "ALLOWED",
                "ptrace": "EPERM",
            },
        ),
    ],
    ids=["strict", "no-seccomp-no-landlock"],
)
async def test_a_worker_cannot_stop_kill_or_trace_its_init(
    policy: SandboxPolicy, expected: dict[str, str]
) -> None:
    async with open_worker(PROBE, sandbox=policy) as worker:
        supervisor = int(_status_field(worker.pid, "PPid"))
        (init,) = set(_children(supervisor)) - {worker.pid}
        outcome = await ask(worker, "attack_init")
        await trio.sleep(0.2)  # a signal, if it worked, has acted by now
        state = _state(init)
        children = _children(supervisor)
    assert outcome == {**expected, "getppid": "0"}
    assert state == "S", f"the init is {state}"
    assert init in children


async def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie, after up to 1 s to die."""
    with trio.move_on_after(1.0):
        while True:
            try:
                if _state(pid) == "Z":
                    return False
            except FileNotFoundError:
                return False
            await trio.sleep(0.05)
    return True


@finding(
    "without seccomp and a PID namespace (basic() on a machine that has neither) "
    "a worker forks, and its child, in a session of its own, outlives the "
    "open_worker block and the parent: nothing kills what the worker started "
    "(no PID namespace, no subreaper, no cgroup), and RLIMIT_NPROC is not set"
)
async def test_no_process_outlives_the_block_under_a_degraded_basic_policy() -> None:
    async with open_worker(PROBE, sandbox=DEGRADED_BASIC) as worker:
        require(worker.sandbox_report.layers["seccomp"] == "off", "seccomp is applied")
        child = await ask(worker, "leave_a_process", seconds=30)
    pid = child["pid"]
    require(pid is not None, f"no fork: {child}")
    try:
        survived = await _running(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not survived, f"the worker's child {pid} outlived the block"
