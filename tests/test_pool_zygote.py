"""open_worker_pool(..., zygote=...): where a pool's workers come from.

By default a pool starts a zygote and forks every worker from it (the first
ones, the replacements of crashed ones and the recycled ones); ``zygote=z``
uses a zygote of the caller's, ``zygote=False`` starts an interpreter per
worker.  Checked on ``strict()`` workers: the parent of each worker, the
zygote's counters, a dead zygote (the pool fails once, it does not
respawn in a loop), and no process left behind.  The parent-death test of
``test_pool`` runs both ways.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import trio
from _process_support import adopting_orphans, children, wait_until, wait_until_gone

from trio_mojo import (
    Message,
    Process,
    SandboxPolicy,
    WorkerError,
    WorkerPool,
    Zygote,
    open_worker_pool,
    open_zygote,
)

TARGETS = "trio_mojo._examples_pool"
STRICT = SandboxPolicy.strict()


def _parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid in /proc/{pid}/status")


def _forked_from(pool: WorkerPool) -> set[int]:
    """The parents of the pool's workers (a recycled one that just exited
    does not count)."""
    parents = set()
    for worker in pool.workers:
        with contextlib.suppress(FileNotFoundError):
            parents.add(_parent_of(worker.pid))
    return parents


async def test_every_worker_of_a_pool_is_forked_from_its_zygote() -> None:
    async with open_worker_pool(
        f"{TARGETS}:faulty", workers=2, max_in_flight=1, max_requests=3, sandbox=STRICT
    ) as pool:
        zygote = pool.zygote
        assert zygote is not None
        assert zygote.preloaded == (TARGETS,)
        assert zygote.sandbox is STRICT
        assert _forked_from(pool) == {zygote.pid}
        assert {w.sandbox_report.policy for w in pool.workers} == {"strict"}
        # A crash: the replacement is forked too.
        with pytest.raises(WorkerError, match="died before answering"):
            await pool.run(Message(b"crash 3"))
        await wait_until(lambda: len(pool.workers) == 2)
        assert _forked_from(pool) == {zygote.pid}
        # Recycling (max_requests=3): fresh workers, forked as well.
        for i in range(6):
            assert (await pool.run(Message(b"%d" % i))).payload == b"%d" % i
        await wait_until(lambda: len(pool.workers) == 2)
        assert _forked_from(pool) == {zygote.pid}
    stats = pool.statistics()
    assert stats.workers_replaced == 1
    assert stats.workers_recycled >= 2
    assert zygote.forked == stats.workers_started
    assert zygote.returncode == 0
    assert children() == {}


async def test_zygote_false_starts_an_interpreter_per_worker() -> None:
    async with open_worker_pool(
        f"{TARGETS}:upper", workers=2, sandbox=STRICT, zygote=False
    ) as pool:
        assert pool.zygote is None
        assert all(isinstance(w._process, Process) for w in pool.workers)
        # Below a supervisor this process started: no zygote in between.
        supervisors = {_parent_of(worker.pid) for worker in pool.workers}
        assert {_parent_of(pid) for pid in supervisors} == {os.getpid()}
        assert (await pool.run(Message(b"spawned"))).payload == b"SPAWNED"
    assert children() == {}


async def test_a_zygote_of_the_callers_serves_the_pool_and_outlives_it() -> None:
    async with open_zygote(preload=[TARGETS], sandbox=STRICT) as zygote:
        for _ in range(2):
            async with open_worker_pool(
                f"{TARGETS}:upper", workers=2, zygote=zygote
            ) as pool:
                assert pool.zygote is zygote
                assert _forked_from(pool) == {zygote.pid}
                assert (await pool.run(Message(b"x"))).payload == b"X"
        assert zygote.forked == 4
        assert zygote.running_workers == 0
        with pytest.raises(ValueError, match="open_zygote"):
            async with open_worker_pool(
                f"{TARGETS}:upper", zygote=zygote, python="/usr/bin/python3"
            ):
                raise AssertionError("not reached")
    with pytest.raises(TypeError, match="zygote must be"):
        async with open_worker_pool(f"{TARGETS}:upper", zygote="yes"):  # type: ignore[arg-type]
            raise AssertionError("not reached")
    assert children() == {}


async def test_a_dead_zygote_fails_the_pool_once_instead_of_respawning() -> None:
    started = time.monotonic()
    zygotes: list[Zygote] = []
    workers: list[int] = []

    async def kill_the_zygote_under_the_pool() -> None:
        async with open_worker_pool(
            f"{TARGETS}:upper", workers=3, sandbox=STRICT
        ) as pool:
            assert pool.zygote is not None
            zygotes.append(pool.zygote)
            workers.extend(w.pid for w in pool.workers)
            os.kill(pool.zygote.pid, signal.SIGKILL)
            # Its workers die with it; callers see their requests fail.
            with trio.fail_after(10):
                while True:
                    try:
                        await pool.run(Message(b"still there?"))
                    except (WorkerError, trio.ClosedResourceError):
                        break
                    await trio.sleep(0.01)
            await trio.sleep_forever()  # until the pool's failure cancels us

    with adopting_orphans():  # the dead zygote's children come to us, not pid 1
        with pytest.raises(WorkerError, match="zygote") as caught:
            await kill_the_zygote_under_the_pool()
        assert wait_until_gone(workers) == []
    (zygote,) = zygotes
    assert f"the zygote (pid {zygote.pid})" in str(caught.value)
    assert zygote.forked == 3  # not one replacement more
    assert time.monotonic() - started < 20
    assert children() == {}
