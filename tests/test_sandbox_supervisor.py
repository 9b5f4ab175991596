"""The processes around a worker: its supervisor, its init or its reaper.

Nothing a worker starts may outlive it, and the helpers that run outside
its filters keep nothing they do not need (``trio_mojo._sandbox._pidns``).
The hostile targets are ``trio_mojo._hostile``'s; the helpers are checked
in ``/proc``, where they cannot pretend.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
from _process_support import (
    assert_reaped,
    pidfds_from_a_parent,
    proc_status,
    wait_confined,
    wait_exited,
)
from _redteam_support import DEGRADED_BASIC, PROBE, STRICT, ask

from trio_mojo import (
    Handle,
    SandboxPolicy,
    SandboxUnavailableError,
    WorkerError,
    Zygote,
    open_worker,
    open_zygote,
)
from trio_mojo._handles import close_all
from trio_mojo._sandbox._verify import verify_report

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="measured with a root parent (the uid drop needs one)"
)


def _children(pid: int) -> set[int]:
    return {
        int(child)
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    }


def _limits(pid: int) -> str:
    return Path(f"/proc/{pid}/limits").read_text()


# ----------------------------------------------------------------------
# Helpers keep nothing


async def test_the_init_and_the_supervisor_give_up_what_they_do_not_need() -> None:
    """The init of a spawned worker's PID namespace was forked inside the
    worker's user namespace and kept a full capability set there, no
    seccomp, and the parent's limits (20,000 fds)."""
    async with open_worker(PROBE, sandbox=STRICT) as worker:
        supervisor = worker._process.pid
        (init,) = _children(supervisor) - {worker.pid}
        for helper in (init, supervisor):
            await wait_confined(helper)
        # The same ids as the worker: the supervisor dropped to them first.
        assert proc_status(init)["Uid"] == proc_status(worker.pid)["Uid"]
    assert_reaped(supervisor)


# ----------------------------------------------------------------------
# A reaper, where there is no PID namespace


@contextlib.asynccontextmanager
async def _orphans_of(
    policy: SandboxPolicy, zygote: Zygote | None = None
) -> AsyncIterator[int]:
    """A worker of ``policy`` that left orphans behind, for the block's
    duration; yields its supervisor's pid.  Once the worker's block is
    over (whichever way), every orphan must have exited."""
    pidfds: list[Handle] = []
    try:
        async with open_worker(PROBE, sandbox=policy, zygote=zygote) as worker:
            left = await ask(worker, "leave_orphans", count=3, seconds=60)
            assert left["error"] is None, left
            pidfds += [Handle(os.pidfd_open(pid)) for pid in left["pids"]]
            supervisor = worker._process.pid
            # Their parents exited: the reaper adopted them, not the host's init.
            assert _children(supervisor) == {worker.pid, *left["pids"]}
            yield supervisor
        assert_reaped(supervisor)
    finally:
        with trio.CancelScope(shield=True):
            for pidfd in pidfds:
                await wait_exited(pidfd)
        close_all(pidfds)


async def test_orphans_of_a_worker_die_when_it_exits() -> None:
    async with _orphans_of(DEGRADED_BASIC) as supervisor:
        status = proc_status(supervisor)
        assert status["NSpid"].split() == [str(supervisor)]  # no PID namespace


async def test_orphans_of_a_forked_worker_die_when_it_exits() -> None:
    # A zygote forks it without a PID namespace: what it forked is its reaper.
    async with (
        open_zygote(preload=[PROBE.partition(":")[0]]) as zygote,
        _orphans_of(DEGRADED_BASIC, zygote) as supervisor,
    ):
        assert proc_status(supervisor)["PPid"] == str(zygote.pid)


class _BlockFailedError(Exception):
    pass


async def test_orphans_of_a_worker_die_when_the_block_fails() -> None:
    async def fail() -> None:
        async with _orphans_of(DEGRADED_BASIC):
            raise _BlockFailedError

    with pytest.raises(_BlockFailedError):
        await fail()


async def test_a_reaped_worker_s_own_exit_status_reaches_the_parent() -> None:
    supervisors = []

    async def killed() -> None:
        async with open_worker(PROBE, sandbox=DEGRADED_BASIC) as worker:
            supervisors.append(worker._process.pid)
            await wait_confined(supervisors[0])
            os.kill(worker.pid, signal.SIGTERM)
            with trio.fail_after(10):
                await worker.channel.receive()

    with pytest.raises(WorkerError) as info:
        await killed()
    assert info.value.returncode == -signal.SIGTERM
    assert_reaped(supervisors[0])


async def test_a_reaped_worker_forks_no_more_than_its_process_limit() -> None:
    # With a uid of its own, RLIMIT_NPROC counts this worker's tree alone,
    # without a user namespace: set, and checked by the parent.
    async with open_worker(PROBE, sandbox=DEGRADED_BASIC) as worker:
        assert "Max processes             64                   64" in _limits(
            worker.pid
        )
        left = await ask(worker, "leave_orphans", count=100, seconds=60)
    assert left["error"] == "EAGAIN"
    # The reaper, the worker, their helpers' slots and the orphans: 64 tasks.
    assert 50 <= len(left["pids"]) <= 64 - 2


ORPHANS_OF_A_KILLED_PARENT = r"""
import json, trio, trio_mojo, attrs

async def main():
    policy = attrs.evolve(
        trio_mojo.SandboxPolicy.basic(),
        seccomp="off", namespaces="off", rootfs="off",
    )
    async with trio_mojo.open_worker(
        "trio_mojo._hostile:probe", sandbox=policy
    ) as worker:
        request = {"probe": "leave_orphans", "args": {"count": 2, "seconds": 60}}
        await worker.channel.send(trio_mojo.Message(json.dumps(request).encode()))
        with await worker.channel.receive() as reply:
            orphans = json.loads(reply.payload)["pids"]
        print(worker._process.pid, worker.pid, *orphans, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_a_reaper_kills_the_worker_s_tree_when_its_parent_dies() -> None:
    async with pidfds_from_a_parent(ORPHANS_OF_A_KILLED_PARENT) as pidfds:
        assert len(pidfds) == 4  # the reaper, the worker, two orphans
        for pidfd in pidfds:
            await wait_exited(pidfd)


# ----------------------------------------------------------------------
# The ids the parent expects


async def test_the_parent_checks_the_exact_ids_it_expects() -> None:
    async with open_worker(PROBE, sandbox=STRICT) as worker:
        report = worker.sandbox_report
        supervisor = worker._process.pid
        verify_report(worker.pid, STRICT, report, identity_pid=supervisor)
        # The ids of another process of the range, or a fixed uid: refused.
        for policy, identity_pid in (
            (STRICT, supervisor + 1),
            (attrs.evolve(STRICT, worker_uid=65534), supervisor),
        ):
            with pytest.raises(SandboxUnavailableError, match="shows Uid") as info:
                verify_report(worker.pid, policy, report, identity_pid=identity_pid)
            assert info.value.layer == "credentials"
        reply = await ask(worker, "pass_an_fd")
    assert json.dumps(reply) == '{"outcome": "ALLOWED"}'
