"""Chaos: cancellation at random awaits on both sides; both sides closing at once.

Also a worker with a file broker cancelled at a random moment of its life.

Each run is seeded (the seed is in the test id; ``TRIO_MOJO_CHAOS_SEED=N``
replays one); the scheduler's own order is not, so a seed fixes the plan,
not every interleaving.  What must hold whatever the interleaving:

* ``send`` is cancel-atomic and ``receive`` loses nothing: the receiver gets
  exactly the messages whose ``send`` returned, in order, with their fds;
* closing, aborting or both at once ends with a documented outcome only
  (nothing, :class:`DisconnectedError`, :class:`FlushTimeoutError`), never
  hangs, and leaves no fd, task or process behind.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from _chaos_support import (
    SourcePipes,
    chaos_seeds,
    nothing_left_behind,
    send_owned,
    source_pipes,
)
from _helpers import open_pair

from trio_mojo import (
    Channel,
    DisconnectedError,
    FileAccess,
    FlushTimeoutError,
    Message,
    SandboxPolicy,
    channel_pair,
    open_channel,
    open_worker,
)
from trio_mojo._handles import close_all

SOURCES = 3


def _payload(index: int, size: int) -> bytes:
    return index.to_bytes(4, "little") + bytes([index % 251]) * size


def _index(payload: bytes) -> int:
    return int.from_bytes(payload[:4], "little")


def _message_plan(rng: random.Random, count: int) -> list[tuple[int, list[int]]]:
    """Per message: payload size and the source pipes its fds dup."""
    plan = []
    for _ in range(count):
        size = rng.choice((0, 10, 1000, 70_000, 300_000)) if rng.random() < 0.3 else 8
        fds = rng.choice((0, 0, 1, 2, 130)) if rng.random() < 0.98 else 253
        plan.append((size, [rng.randrange(SOURCES) for _ in range(fds)]))
    return plan


def _arm(scope: trio.CancelScope, rng: random.Random, nursery: trio.Nursery) -> None:
    """Cancel ``scope`` at a random await of what it wraps, or never."""
    roll = rng.random()
    if roll < 0.15:
        scope.cancel()  # on entry
    elif roll < 0.3:
        scope.deadline = trio.current_time() + rng.uniform(0, 0.002)
    elif roll < 0.45:
        ticks = rng.randrange(1, 20)

        async def cancel_after_ticks() -> None:
            for _ in range(ticks):
                await trio.lowlevel.checkpoint()
            scope.cancel()

        nursery.start_soon(cancel_after_ticks)


@pytest.mark.parametrize("seed", chaos_seeds(default=3, slow=40))
async def test_cancellation_at_random_awaits_on_both_sides(seed: int) -> None:
    rng = random.Random(seed)
    plan = _message_plan(rng, 300)
    options = {
        "send_queue_messages": rng.choice((1, 2, 8, 4096)),
        "send_queue_bytes": rng.choice((1, 65536, 8 << 20)),
        "receive_queue_messages": rng.choice((1, 2, 8, 4096)),
        "receive_queue_bytes": rng.choice((1, 65536, 8 << 20)),
    }
    sender_rng = random.Random(f"{seed}-send")
    receiver_rng = random.Random(f"{seed}-receive")
    returned: list[int] = []  # indexes whose send() returned
    delivered: list[int] = []

    async def produce(
        left: Channel, sources: SourcePipes, helpers: trio.Nursery
    ) -> None:
        for index, (size, fds) in enumerate(plan):
            handles = sources.handles(fds)
            with trio.CancelScope() as scope:
                _arm(scope, sender_rng, helpers)
                await left.send(Message(_payload(index, size), handles))
                returned.append(index)
                handles = []  # the channel owns them now
            close_all(handles)  # cancelled: they are still ours
        await left.send(Message(b"end"))

    async def consume(
        right: Channel, sources: SourcePipes, helpers: trio.Nursery
    ) -> None:
        while True:
            with trio.CancelScope() as scope:
                _arm(scope, receiver_rng, helpers)
                with await right.receive() as message:
                    if message.payload == b"end":
                        return
                    index = _index(message.payload)
                    size, fds = plan[index]
                    assert message.payload == _payload(index, size), f"seed={seed}"
                    assert sources.matches(message.handles, fds), f"seed={seed}: fds"
                    delivered.append(index)

    with source_pipes(SOURCES) as sources:
        async with nothing_left_behind(seed):
            with trio.fail_after(60):
                async with (
                    open_pair(**options) as (left, right),
                    trio.open_nursery() as helpers,
                ):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(produce, left, sources, helpers)
                        nursery.start_soon(consume, right, sources, helpers)
                    assert left.statistics().messages_sent == len(returned) + 1
    assert delivered == returned, f"seed={seed}: delivered != sent"


@pytest.mark.parametrize("seed", chaos_seeds(default=3, slow=40))
async def test_traffic_both_ways_cancelled_at_a_random_moment(seed: int) -> None:
    rng = random.Random(seed)
    plans = (_message_plan(rng, 2000), _message_plan(rng, 2000))
    deadline = rng.uniform(0, 0.3)

    async def talk(
        channel: Channel, plan: list[tuple[int, list[int]]], sources: SourcePipes
    ) -> None:
        async def send_all() -> None:
            for index, (size, fds) in enumerate(plan):
                await send_owned(channel, _payload(index, size), sources.handles(fds))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            async for message in channel:
                message.close()

    with source_pipes(SOURCES) as sources:
        async with nothing_left_behind(seed):
            with trio.move_on_after(deadline) as scope:
                # A small send queue: it is not bounded in fds (see
                # test_chaos_fd_bounds.py) and 4096 queued messages with
                # up to 253 fds each would exhaust RLIMIT_NOFILE.
                async with (
                    open_pair(send_queue_messages=64) as (left, right),
                    trio.open_nursery() as n,
                ):
                    n.start_soon(talk, left, plans[0], sources)
                    n.start_soon(talk, right, plans[1], sources)
            assert scope.cancelled_caught, f"seed={seed}: 2 x 2000 messages in time?"


CLOSINGS = ("exit", "abort")
DOCUMENTED_ENDS = (DisconnectedError, FlushTimeoutError)


@pytest.mark.parametrize("seed", chaos_seeds(default=4, slow=60))
async def test_both_sides_close_at_once(seed: int) -> None:
    rng = random.Random(seed)
    plans = [_message_plan(rng, rng.randrange(0, 200)) for _ in range(2)]
    # Each side reads part of what the other sends, then both leave at once.
    reads = [rng.randrange(len(plans[1]) + 1), rng.randrange(len(plans[0]) + 1)]
    closings = [rng.choice(CLOSINGS), rng.choice(CLOSINGS)]
    done_reading = [trio.Event(), trio.Event()]
    go = trio.Event()
    outcomes: dict[int, str] = {}
    ends = channel_pair()

    async def side(me: int, sources: SourcePipes) -> None:
        async def send_all(channel: Channel) -> None:
            for index, (size, fds) in enumerate(plans[me]):
                await send_owned(channel, _payload(index, size), sources.handles(fds))

        try:
            with trio.CancelScope() as abort:
                async with open_channel(
                    ends[me], flush_timeout=0.5, receive_queue_bytes=256 * 1024
                ) as channel:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(send_all, channel)
                        for expected in range(reads[me]):
                            with await channel.receive() as message:
                                assert _index(message.payload) == expected, seed
                        done_reading[me].set()
                        await go.wait()  # both leave in the same scheduler pass
                        nursery.cancel_scope.cancel()
                    if closings[me] == "abort":
                        abort.cancel()
                        await trio.lowlevel.checkpoint()
            outcomes[me] = closings[me]
        except DOCUMENTED_ENDS as exc:
            outcomes[me] = f"{closings[me]}: {type(exc).__name__}"

    async def release() -> None:
        for event in done_reading:
            await event.wait()
        go.set()

    with source_pipes(SOURCES) as sources:
        async with nothing_left_behind(seed):
            with trio.fail_after(30), ends[0], ends[1]:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(side, 0, sources)
                    nursery.start_soon(side, 1, sources)
                    nursery.start_soon(release)
    assert set(outcomes) == {0, 1}, f"seed={seed}: {outcomes}"


@pytest.mark.parametrize("seed", chaos_seeds(default=2, slow=10))
async def test_worker_cancelled_at_a_random_moment_of_its_life(
    seed: int, tmp_path: Path
) -> None:
    # From its start (spawn, sandbox report, broker channel) to its traffic.
    delay = random.Random(seed).uniform(0, 0.6)
    (tmp_path / "file.txt").write_bytes(b"content")
    request = Message(f"r {tmp_path}/file.txt".encode())
    async with nothing_left_behind(seed):
        with trio.move_on_after(delay):
            async with open_worker(
                "trio_mojo._examples:broker_reader",
                sandbox=SandboxPolicy.basic(),
                file_access=FileAccess.read_only(tmp_path),
            ) as worker:
                while True:
                    await worker.channel.send(request)
                    with await worker.channel.receive() as reply:
                        assert reply.payload == b"ok content", f"seed={seed}"
