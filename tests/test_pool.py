"""open_worker_pool: real worker processes running ``trio_mojo._examples_pool``.

Every pool starts real ``python -I`` workers (about 0.15 s each), so the
pools here are small.  The autouse fixture of ``conftest.py`` checks that
no fd is left in this process; :func:`children` and :func:`assert_reaped`
that no process is.  ``gated`` lets a test hold a worker on a request
until it writes to a pipe, so queue depths are exact, not timing-dependent.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from _fds import open_fds
from _process_support import (
    adopting_orphans,
    assert_reaped,
    children,
    wait_until,
    wait_until_gone,
)
from _zygote_support import interpreter

from trio_mojo import (
    MAX_ATTACHED_HANDLES,
    Handle,
    Message,
    SandboxPolicy,
    WorkerError,
    WorkerPool,
    WorkerTargetError,
    open_worker_pool,
)
from trio_mojo._workers._pool import HELD_REPLY_HANDLES

BASIC = SandboxPolicy.basic()
TARGETS = "trio_mojo._examples_pool"


@contextmanager
def gate() -> Iterator[tuple[Handle, int]]:
    """A pipe: the read end for a ``gated`` request, the write end to open it."""
    read_end, write_end = os.pipe()
    try:
        yield Handle(read_end), write_end
    finally:
        os.close(write_end)


def _readable_pipe(data: bytes) -> Handle:
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return Handle(read_end)


def _pids(pool: WorkerPool) -> set[int]:
    return {worker.pid for worker in pool.workers}


# ----------------------------------------------------------------------
# Requests and replies


async def test_run_carries_fds_both_ways() -> None:
    async with open_worker_pool(f"{TARGETS}:echo", workers=1, sandbox=BASIC) as pool:
        reply = await pool.run(Message(b"ping", [_readable_pipe(b"through the pool")]))
        with reply:
            assert reply.payload == b"ping"
            (handle,) = reply.handles
            assert os.read(handle.fileno(), 100) == b"through the pool"
        (worker,) = pool.workers
    assert_reaped(worker.pid)
    assert children() == {}


async def test_strict_sandbox_pool_answers() -> None:
    async with open_worker_pool(
        f"{TARGETS}:upper", workers=1, sandbox=SandboxPolicy.strict()
    ) as pool:
        reply = await pool.run(Message(b"strict"))
        assert reply.payload == b"STRICT"
        assert pool.workers[0].sandbox_report.policy == "strict"


async def test_many_concurrent_callers_each_get_their_reply() -> None:
    replies: dict[int, bytes] = {}

    async def call(pool: WorkerPool, i: int) -> None:
        reply = await pool.run(Message(b"%d" % i))
        replies[i] = reply.payload

    async with open_worker_pool(f"{TARGETS}:whoami", workers=2, sandbox=BASIC) as pool:
        pids = _pids(pool)
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(call, pool, i)
        stats = pool.statistics()
    assert len(replies) == 200
    served_by = {payload.split()[0] for payload in replies.values()}
    assert len(pids) == len(served_by) == 2  # both workers took requests
    assert stats.answered == 200
    assert stats.in_flight == stats.queued == stats.failed == 0


async def test_run_rejects_what_is_not_a_message_and_a_closed_pool() -> None:
    async with open_worker_pool(f"{TARGETS}:upper", workers=1, sandbox=BASIC) as pool:
        with pytest.raises(TypeError, match=r"takes a trio_mojo\.Message"):
            await pool.run(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(trio.ClosedResourceError, match="closed"):
        await pool.run(Message(b"late", [_readable_pipe(b"x")]))  # handle closed


async def test_a_message_the_channel_refuses_fails_only_that_request() -> None:
    async with open_worker_pool(
        f"{TARGETS}:upper", workers=1, sandbox=BASIC, max_message_size=1024
    ) as pool:
        with pytest.raises(ValueError, match="1024"):
            await pool.run(Message(b"x" * 2000, [_readable_pipe(b"x")]))
        reply = await pool.run(Message(b"fine"))
        assert reply.payload == b"FINE"
        assert pool.statistics().workers_replaced == 0


async def test_bad_arguments_are_refused_before_any_process() -> None:
    for options in ({"workers": 0}, {"max_in_flight": 0}, {"queue_size": -1}):
        with pytest.raises(ValueError, match="positive int"):
            async with open_worker_pool(f"{TARGETS}:upper", **options):  # type: ignore[arg-type]
                raise AssertionError("not reached")
    with pytest.raises(ValueError, match="request_timeout"):
        async with open_worker_pool(f"{TARGETS}:upper", request_timeout=0):
            raise AssertionError("not reached")
    assert children() == {}


# ----------------------------------------------------------------------
# map


async def test_map_keeps_order_when_a_later_request_finishes_first() -> None:
    with gate() as (gate_end, opener):
        messages = [Message(b"0", [gate_end])] + [
            Message(b"%d" % i) for i in range(1, 30)
        ]
        async with open_worker_pool(
            f"{TARGETS}:gated", workers=2, max_in_flight=1, sandbox=BASIC
        ) as pool:
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def consume() -> None:
                    async for reply in pool.map(messages, window=10):
                        got.append(reply.payload)
                        reply.close()

                nursery.start_soon(consume)
                # The second worker answers the rest of the window while the
                # first waits; nothing beyond the window is sent.
                await wait_until(lambda: pool.statistics().answered == 9)
                await trio.sleep(0.1)
                assert pool.statistics().answered == 9
                assert got == []
                os.write(opener, b"!")
    assert got == [b"%d" % i for i in range(30)]


async def test_map_takes_an_async_iterable() -> None:
    async def messages() -> AsyncIterator[Message]:
        for i in range(50):
            await trio.lowlevel.checkpoint()
            yield Message(b"m%d" % i)

    async with open_worker_pool(f"{TARGETS}:upper", workers=2, sandbox=BASIC) as pool:
        got = [reply.payload async for reply in pool.map(messages())]
    assert got == [b"M%d" % i for i in range(50)]


async def test_map_raises_a_source_error_after_the_replies_before_it() -> None:
    def messages() -> Iterator[Message]:
        for i in range(5):
            yield Message(b"%d" % i)
        raise LookupError("the source broke")

    async with open_worker_pool(f"{TARGETS}:upper", workers=1, sandbox=BASIC) as pool:
        replies = pool.map(messages())
        got = [(await replies.__anext__()).payload for _ in range(5)]
        assert got == [b"0", b"1", b"2", b"3", b"4"]
        with pytest.raises(LookupError, match="the source broke"):
            await replies.__anext__()
        with pytest.raises(StopAsyncIteration):
            await replies.__anext__()
        bad = pool.map([Message(b"ok"), "not a message"])  # type: ignore[list-item]
        assert (await bad.__anext__()).payload == b"OK"
        with pytest.raises(TypeError, match="item 1 of the messages is str"):
            await bad.__anext__()


async def test_map_goes_on_past_a_failed_request() -> None:
    async with open_worker_pool(
        f"{TARGETS}:faulty", workers=1, max_in_flight=1, sandbox=BASIC
    ) as pool:
        replies = pool.map([Message(b"a"), Message(b"crash 5"), Message(b"b")])
        assert (await replies.__anext__()).payload == b"a"
        with pytest.raises(WorkerError, match="died before answering this request"):
            await replies.__anext__()
        assert (await replies.__anext__()).payload == b"b"
        with pytest.raises(StopAsyncIteration):
            await replies.__anext__()


async def test_stopping_a_map_early_cancels_what_it_sent_ahead() -> None:
    taken = 0

    def messages() -> Iterator[Message]:
        nonlocal taken
        for i in range(10_000):
            taken += 1
            yield Message(b"%d" % i, [_readable_pipe(b"x")])

    async with open_worker_pool(
        f"{TARGETS}:upper", workers=2, max_in_flight=4, sandbox=BASIC
    ) as pool:
        async with pool.map(messages(), window=10) as replies:
            async for reply in replies:
                reply.close()
                if reply.payload == b"3":
                    break
        assert taken <= 4 + 10
        # Dropped without closing: cancelled when collected.
        async for reply in pool.map(messages(), window=10):
            reply.close()
            break
        await wait_until(lambda: pool.statistics().in_flight == 0)
        assert (await pool.run(Message(b"after"))).payload == b"AFTER"
    # Every handle of every message taken was sent or closed: conftest checks.


async def test_a_map_waiting_in_another_task_ends_when_the_pool_closes() -> None:
    outcome: list[BaseException] = []

    async def consume(pool: WorkerPool, gate_end: Handle) -> None:
        replies = pool.map([Message(b"held", [gate_end]), Message(b"next")])
        try:
            await replies.__anext__()
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    async def open_soon(opener: int) -> None:
        await trio.sleep(0.3)
        assert len(outcome) == 1  # woken as soon as the block was left
        os.write(opener, b"!")

    with gate() as (gate_end, opener), trio.fail_after(30):
        async with (
            trio.open_nursery() as outer,
            open_worker_pool(f"{TARGETS}:gated", workers=1, sandbox=BASIC) as pool,
        ):
            outer.start_soon(consume, pool, gate_end)
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(open_soon, opener)
            # Leaving the block cancelled the map's requests and woke its
            # consumer; the held request was still answered (and discarded)
            # before the worker was closed.
    assert len(outcome) == 1
    assert "closed while waiting" in str(outcome[0])


# ----------------------------------------------------------------------
# Cancellation


async def test_cancelling_requests_keeps_the_workers_other_work() -> None:
    outcome: dict[str, bytes] = {}

    async def call(pool: WorkerPool, name: str, message: Message) -> None:
        reply = await pool.run(message)
        with reply:
            outcome[name] = reply.payload

    with gate() as (gate_end, opener):
        async with open_worker_pool(
            f"{TARGETS}:gated", workers=1, max_in_flight=4, sandbox=BASIC
        ) as pool:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, pool, "held", Message(b"held", [gate_end]))
                await trio.testing.wait_all_tasks_blocked()
                async with trio.open_nursery() as doomed:
                    # Sent to the worker behind "held"; its reply carries an fd.
                    sent = Message(b"sent", [_readable_pipe(b"y")])
                    doomed.start_soon(call, pool, "sent", sent)
                    await trio.testing.wait_all_tasks_blocked()
                    # The worker holds enough: these two wait in the pool's queue.
                    nursery.start_soon(call, pool, "after", Message(b"after"))
                    await trio.testing.wait_all_tasks_blocked()
                    queued = Message(b"queued", [_readable_pipe(b"z")])
                    doomed.start_soon(call, pool, "queued", queued)
                    await trio.testing.wait_all_tasks_blocked()
                    stats = pool.statistics()
                    assert (stats.in_flight, stats.queued) == (2, 2)
                    doomed.cancel_scope.cancel()
                assert pool.statistics().queued == 1  # "queued" was dropped at once
                os.write(opener, b"!")
            # "held", the discarded "sent", "after"; "queued" never reached it.
            stats = pool.statistics()
            assert (stats.answered, stats.failed, stats.workers_replaced) == (3, 0, 0)
    assert outcome == {"held": b"held", "after": b"after"}


# ----------------------------------------------------------------------
# Back-pressure


async def test_the_queue_bound_holds_and_run_waits() -> None:
    done = 0

    async def call(pool: WorkerPool, message: Message) -> None:
        nonlocal done
        (await pool.run(message)).close()
        done += 1

    with gate() as (gate_end, opener):
        async with open_worker_pool(
            f"{TARGETS}:gated", workers=1, max_in_flight=2, queue_size=3, sandbox=BASIC
        ) as pool:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, pool, Message(b"held", [gate_end]))
                await trio.testing.wait_all_tasks_blocked()
                for i in range(10):
                    nursery.start_soon(call, pool, Message(b"%d" % i))
                await trio.testing.wait_all_tasks_blocked()
                stats = pool.statistics()
                assert stats.in_flight == 2
                assert stats.queued == 3
                assert stats.waiting_callers == 6
                assert done == 0
                os.write(opener, b"!")
            assert done == 11
            assert pool.statistics().answered == 11


# ----------------------------------------------------------------------
# Faults


async def test_a_crashed_worker_is_replaced_and_its_request_fails() -> None:
    async with open_worker_pool(
        f"{TARGETS}:faulty", workers=2, max_in_flight=1, sandbox=BASIC
    ) as pool:
        before = _pids(pool)
        async with trio.open_nursery() as nursery:
            # The other worker keeps answering while one dies.
            for i in range(20):
                nursery.start_soon(pool.run, Message(b"ok %d" % i))
            with pytest.raises(WorkerError) as caught:
                await pool.run(Message(b"crash 7"))
        error = caught.value
        found = re.search(
            r"worker pid (\d+) died before answering this request", str(error)
        )
        assert found is not None, str(error)
        dead = int(found.group(1))
        assert dead in before
        assert error.returncode == 7
        assert "(exit status 7)" in str(error)
        assert "faulty: crashing as asked" in error.stderr_tail
        await wait_until(lambda: len(pool.workers) == 2)
        assert dead not in _pids(pool)
        assert_reaped(dead)
        stats = pool.statistics()
        assert (stats.workers_started, stats.workers_replaced, stats.failed) == (
            3,
            1,
            1,
        )
        assert (await pool.run(Message(b"still"))).payload == b"still"


async def test_requests_sent_behind_a_crash_fail_and_queued_ones_are_served() -> None:
    async with open_worker_pool(
        f"{TARGETS}:faulty", workers=1, max_in_flight=3, queue_size=8, sandbox=BASIC
    ) as pool:
        payloads = [b"crash 3", b"a", b"b", b"c", b"d", b"e"]
        outcomes: list[bytes | str] = []
        replies = pool.map([Message(p) for p in payloads])
        for _ in payloads:
            try:
                outcomes.append((await replies.__anext__()).payload)
            except WorkerError as exc:
                outcomes.append(str(exc).split(" (")[0])
    # The three sent together failed; the rest waited in the queue and were
    # served by the replacement.
    assert [o for o in outcomes if isinstance(o, str)] == [outcomes[0]] * 3
    assert "died before answering this request" in str(outcomes[0])
    assert outcomes[3:] == [b"c", b"d", b"e"]


async def test_a_hung_worker_is_killed_after_request_timeout() -> None:
    async with open_worker_pool(
        f"{TARGETS}:faulty", workers=1, request_timeout=1.0, sandbox=BASIC
    ) as pool:
        (hung,) = _pids(pool)
        with pytest.raises(WorkerError, match=r"sent no reply within 1 s") as caught:
            await pool.run(Message(b"hang"))
        assert caught.value.returncode == -signal.SIGKILL
        assert (await pool.run(Message(b"next"))).payload == b"next"
        assert hung not in _pids(pool)
    assert_reaped(hung)


async def test_a_flooding_worker_is_killed_and_replaced() -> None:
    async with open_worker_pool(f"{TARGETS}:faulty", workers=1, sandbox=BASIC) as pool:
        (flooder,) = _pids(pool)
        assert (await pool.run(Message(b"flood"))).payload == b"flood"
        await wait_until(lambda: pool.statistics().workers_replaced == 1)
        assert (await pool.run(Message(b"calm"))).payload == b"calm"
        assert flooder not in _pids(pool)
    assert_reaped(flooder)


async def test_a_target_that_cannot_start_fails_the_pool_once(tmp_path: Path) -> None:
    # A target the workers fail to import (the messages: test_targets.py).
    started = time.monotonic()
    with pytest.raises(WorkerTargetError, match="raised RuntimeError") as caught:
        async with open_worker_pool(
            "zygote_broken_preload:main",
            workers=3,
            sandbox=BASIC,
            zygote=False,
            python=interpreter(tmp_path),
        ):
            raise AssertionError("not reached")
    assert "Traceback" in caught.value.stderr_tail
    assert time.monotonic() - started < 20
    assert children() == {}


async def test_a_target_that_does_not_serve_fails_the_pool() -> None:
    with pytest.raises(WorkerError, match="before it answered any request"):
        async with open_worker_pool(
            f"{TARGETS}:never_serves", workers=1, sandbox=BASIC
        ):
            await trio.sleep_forever()
    assert children() == {}


async def test_a_worker_cannot_make_the_parent_hold_fds_past_the_bounds() -> None:
    # Hostile: each reply carries 100 fds; the consumer takes one reply and
    # stops.  The pool stops reading from the worker once the replies nobody
    # took hold more than HELD_REPLY_HANDLES fds, so what this process holds
    # is that bound and one reply, plus what the channel itself may queue
    # (one message here, and fds ahead of their message), not window x 100.
    # fds in flight count against the sender's RLIMIT_NOFILE (ETOOMANYREFS):
    # a high one lets the attack go on as long as this test needs.
    roomy = attrs.evolve(BASIC, max_open_files=8192)
    async with open_worker_pool(
        f"{TARGETS}:fd_hoarder", workers=1, sandbox=roomy, receive_queue_messages=1
    ) as pool:
        before = len(open_fds())
        async with pool.map([Message(b"100") for _ in range(40)], window=40) as replies:
            (await replies.__anext__()).close()
            await trio.sleep(1.0)
            held = len(open_fds()) - before
    channel_bound = 100 + 2 * MAX_ATTACHED_HANDLES
    assert held <= HELD_REPLY_HANDLES + 100 + channel_bound < 40 * 100, held


# ----------------------------------------------------------------------
# Recycling


async def test_workers_are_recycled_after_max_requests() -> None:
    async with open_worker_pool(
        f"{TARGETS}:whoami", workers=1, max_requests=3, sandbox=BASIC
    ) as pool:
        answers = []
        host_pids: set[int] = set()
        for _ in range(7):
            answers.append((await pool.run(Message(b"?"))).payload.split())
            host_pids |= _pids(pool)
        stats = pool.statistics()
    ids = [identity for identity, _ in answers]
    assert [int(n) for _, n in answers] == [0, 1, 2, 0, 1, 2, 0]
    assert ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5] != ids[6]
    assert (stats.workers_recycled, stats.failed, stats.workers_started) == (2, 0, 3)
    assert len(host_pids) == 3
    for pid in host_pids:
        assert_reaped(pid)


async def test_recycling_under_load_fails_no_request() -> None:
    async with open_worker_pool(
        f"{TARGETS}:whoami", workers=2, max_requests=5, sandbox=BASIC
    ) as pool:
        got = [
            reply.payload async for reply in pool.map(Message(b"?") for _ in range(40))
        ]
        stats = pool.statistics()
    assert len(got) == 40
    assert len({payload.split()[0] for payload in got}) >= 8
    assert stats.failed == 0


async def test_a_recycled_worker_that_dies_is_not_replaced_twice() -> None:
    async with open_worker_pool(
        f"{TARGETS}:faulty", workers=1, max_requests=2, sandbox=BASIC
    ) as pool:
        replies = pool.map([Message(b"a"), Message(b"crash 4")])
        assert (await replies.__anext__()).payload == b"a"
        with pytest.raises(WorkerError, match="died before answering this request"):
            await replies.__anext__()
        assert (await pool.run(Message(b"b"))).payload == b"b"
    stats = pool.statistics()
    assert (stats.workers_started, stats.workers_recycled) == (2, 1)


async def test_a_worker_that_floods_before_any_request_fails_the_pool() -> None:
    with pytest.raises(
        WorkerError, match=r"nobody asked for .* before it answered any"
    ):
        async with open_worker_pool(
            f"{TARGETS}:flood_at_once", workers=1, sandbox=BASIC
        ):
            await trio.sleep_forever()
    assert children() == {}


# ----------------------------------------------------------------------
# Leaving the block


async def test_normal_exit_answers_what_was_accepted() -> None:
    answered: list[bytes] = []

    async def call(pool: WorkerPool, message: Message) -> None:
        answered.append((await pool.run(message)).payload)

    async def open_soon(opener: int) -> None:
        await trio.sleep(0.2)
        os.write(opener, b"!")

    with gate() as (gate_end, opener):
        async with trio.open_nursery() as outer:
            async with open_worker_pool(
                f"{TARGETS}:gated", workers=1, sandbox=BASIC
            ) as pool:
                outer.start_soon(call, pool, Message(b"0", [gate_end]))
                await trio.testing.wait_all_tasks_blocked()
                for i in range(1, 4):
                    outer.start_soon(call, pool, Message(b"%d" % i))
                await trio.testing.wait_all_tasks_blocked()
                outer.start_soon(open_soon, opener)
            # Left while four requests were held: all were answered first.
            assert sorted(answered) == [b"0", b"1", b"2", b"3"]
            assert pool.statistics().workers == 0


async def test_normal_exit_drains_a_queue_behind_full_workers() -> None:
    answered: list[bytes] = []

    async def call(pool: WorkerPool, message: Message) -> None:
        answered.append((await pool.run(message)).payload)

    async def open_one_by_one(*openers: int) -> None:
        for opener in openers:
            await trio.sleep(0.2)
            os.write(opener, b"!")

    with gate() as (gate_a, opener_a), gate() as (gate_b, opener_b):
        with trio.fail_after(30):
            async with trio.open_nursery() as outer:
                async with open_worker_pool(
                    f"{TARGETS}:gated",
                    workers=2,
                    max_in_flight=2,
                    queue_size=4,
                    sandbox=BASIC,
                ) as pool:
                    for held in (gate_a, gate_b):
                        outer.start_soon(call, pool, Message(b"held", [held]))
                        await trio.testing.wait_all_tasks_blocked()
                    for i in range(6):
                        outer.start_soon(call, pool, Message(b"%d" % i))
                    await trio.testing.wait_all_tasks_blocked()
                    stats = pool.statistics()
                    assert (stats.in_flight, stats.queued) == (4, 4)
                    outer.start_soon(open_one_by_one, opener_a, opener_b)
                # Both workers were full and requests were queued when the
                # block was left: every one was answered, then the workers
                # were closed.
                assert len(answered) == 8
                assert pool.statistics().workers == 0


async def test_error_exit_kills_the_workers_and_fails_waiting_requests() -> None:
    failures: list[BaseException] = []

    async def call(pool: WorkerPool, message: Message) -> None:
        try:
            await pool.run(message)
        except trio.ClosedResourceError as exc:
            failures.append(exc)

    pids: set[int] = set()

    async def fail_inside(outer: trio.Nursery, gate_end: Handle) -> None:
        async with open_worker_pool(
            f"{TARGETS}:gated", workers=1, sandbox=BASIC
        ) as pool:
            outer.start_soon(call, pool, Message(b"held", [gate_end]))
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(call, pool, Message(b"behind"))
            await trio.testing.wait_all_tasks_blocked()
            pids.update(_pids(pool))
            raise RuntimeError("the body failed")

    with gate() as (gate_end, _opener):
        async with trio.open_nursery() as outer:
            with pytest.raises(RuntimeError, match="the body failed"):
                await fail_inside(outer, gate_end)
    assert len(failures) == 2
    (pid,) = pids
    assert_reaped(pid)
    assert children() == {}


async def test_cancelling_the_block_leaves_no_process() -> None:
    with trio.CancelScope() as scope:
        async with open_worker_pool(
            f"{TARGETS}:faulty", workers=2, sandbox=BASIC
        ) as pool:
            pids = _pids(pool)
            scope.deadline = trio.current_time() + 0.3
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.run, Message(b"hang"))
                nursery.start_soon(pool.run, Message(b"hang"))
    assert scope.cancelled_caught
    for pid in pids:
        assert_reaped(pid)
    assert children() == {}


_PARENT = """
import sys, trio, trio_mojo
async def main():
    async with trio_mojo.open_worker_pool(
        "trio_mojo._examples_pool:upper", workers=2,
        sandbox=trio_mojo.SandboxPolicy.basic(), zygote={zygote},
    ) as pool:
        zygote = [pool.zygote.pid] if pool.zygote is not None else []
        print(" ".join(str(pid) for pid in zygote + [w.pid for w in pool.workers]))
        sys.stdout.flush()
        await trio.sleep_forever()
trio.run(main)
"""


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "spawned"])
def test_killing_the_parent_kills_its_workers(zygote: bool) -> None:
    # As a subreaper, this process inherits the orphans and can reap them.
    with adopting_orphans():
        parent = subprocess.Popen(
            [sys.executable, "-c", _PARENT.format(zygote=zygote)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert parent.stdout is not None
        with parent.stdout:
            line = parent.stdout.readline()
        pids = [int(pid) for pid in line.split()]
        assert len(pids) == 2 + zygote, line
        parent.kill()
        parent.wait()
        # PR_SET_PDEATHSIG down the chain (parent -> zygote -> worker and
        # its namespace's init, or parent -> supervisor -> worker and init):
        # every worker dies with its parent, and no zombie is left.
        assert wait_until_gone(pids) == []
    assert children() == {}


def _pool_example() -> str:
    """The first code block of the "Worker pools" section of docs/workers.rst."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "workers.rst").read_text()
    section = text[text.index("Worker pools\n------------") :]
    block = section[section.index(".. code-block:: python\n") :].split("\n")[2:]
    lines = []
    for line in block:
        if line and not line.startswith("   "):
            break
        lines.append(line[3:])
    return "\n".join(lines)


def test_the_documented_pool_example_runs() -> None:
    example = _pool_example()
    assert "open_worker_pool" in example
    result = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["b'HELLO'", "b'ONE'", "b'TWO'", "b'THREE'"]
