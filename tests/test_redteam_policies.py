"""Red team: policies weaker than ``strict()``, as a machine may force them.

``basic()`` applies a layer "when the machine allows it".  On a kernel
without seccomp and user namespaces (or in a container that filters them
out) it runs with both missing; the tests get there by turning them off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Final

import attrs
import pytest
from _redteam_support import PROBE, ask, finding, require

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


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie, after up to 1 s to die."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        if stat[stat.rindex(")") + 2] == "Z" or time.monotonic() > deadline:
            return stat[stat.rindex(")") + 2] != "Z"
        time.sleep(0.05)


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
        survived = _running(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not survived, f"the worker's child {pid} outlived the block"
