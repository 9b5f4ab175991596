"""A randomized stress of a channel pair, with a hang detector.

Read lending hands the socket between the reader task and ``receive()``
callers; the prototypes of it lost wake-ups twice (lending while a receiver
was already parked; an inline read feeding the decoder while a large body
was arriving).  This drives both directions of a pair with bursts and
pauses, several concurrent receivers, receives cancelled at random, small
and large messages, fds, and small queue bounds, and checks:

* every message arrives exactly once, with its payload and its fds intact;
* each receiver sees each producer's messages in order;
* nothing hangs: a watchdog fails the test (with the channels' state) if no
  message moves for a while although some are outstanding;
* no fd leaks (the autouse fixture).

The default session runs a few seeds briefly; ``nox -s slow`` runs many,
longer.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
import trio
from _helpers import open_pair

from trio_mojo import Channel, Handle, Message

_TAG = struct.Struct("<IIIH")  # producer, sequence, payload size, fds


class Pipes:
    """Fds to attach: dups of pipe read ends; the pipe tells which it was."""

    def __init__(self, count: int) -> None:
        self.read_ends: list[int] = []
        for index in range(count):
            r, w = os.pipe()
            os.write(w, bytes([index]))
            os.close(w)
            self.read_ends.append(r)

    def handles(self, count: int, first: int) -> tuple[Handle, ...]:
        ends = self.read_ends
        return tuple(Handle.dup(ends[(first + i) % len(ends)]) for i in range(count))

    def check(self, handles: tuple[Handle, ...], first: int) -> None:
        """Each handle is the dup it should be (same pipe, by inode)."""
        ends = self.read_ends
        for i, handle in enumerate(handles):
            expected = os.fstat(ends[(first + i) % len(ends)]).st_ino
            assert os.fstat(handle.fileno()).st_ino == expected

    def close(self) -> None:
        for fd in self.read_ends:
            os.close(fd)


def payload_for(producer: int, sequence: int, size: int, fds: int) -> bytes:
    tag = _TAG.pack(producer, sequence, size, fds)
    body = bytes([(producer * 31 + sequence) % 251]) * max(0, size - len(tag))
    return (tag + body)[: max(size, len(tag))]


class Ledger:
    """What was sent and what arrived, across every task of one direction."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.seen: set[tuple[int, int]] = set()
        self.progress = 0  # bumps on every send and receive


async def produce(
    channel: Channel,
    ledger: Ledger,
    pipes: Pipes,
    producer: int,
    count: int,
    rng: random.Random,
) -> None:
    for sequence in range(count):
        roll = rng.random()
        if roll < 0.03:
            size = rng.randrange(64 * 1024, 600 * 1024)  # a large body
        elif roll < 0.15:
            size = rng.randrange(1024, 20_000)
        else:
            size = rng.randrange(14, 200)
        fds = 0
        if rng.random() < 0.2:
            fds = rng.choice((1, 1, 2, 3, 8, 130, 253))
        message = Message(
            payload_for(producer, sequence, size, fds),
            pipes.handles(fds, first=sequence),
        )
        await channel.send(message)
        ledger.sent += 1
        ledger.progress += 1
        if rng.random() < 0.05:  # a pause between bursts
            await trio.sleep(rng.random() * 0.003)


async def consume(
    channel: Channel, ledger: Ledger, pipes: Pipes, rng: random.Random
) -> None:
    last: dict[int, int] = {}
    while True:
        if rng.random() < 0.1:
            # A receive cancelled at a random moment loses nothing.
            with trio.move_on_after(rng.random() * 0.0005):
                try:
                    message = await channel.receive()
                except trio.EndOfChannel:
                    return
                check(message, ledger, pipes, last)
            continue
        try:
            message = await channel.receive()
        except trio.EndOfChannel:
            return
        check(message, ledger, pipes, last)
        if rng.random() < 0.02:  # a slow consumer now and then
            await trio.sleep(rng.random() * 0.002)


def check(message: Message, ledger: Ledger, pipes: Pipes, last: dict[int, int]) -> None:
    with message:
        producer, sequence, size, fds = _TAG.unpack_from(message.payload)
        assert message.payload == payload_for(producer, sequence, size, fds)
        assert len(message.handles) == fds
        pipes.check(message.handles, first=sequence)
    assert (producer, sequence) not in ledger.seen, "delivered twice"
    ledger.seen.add((producer, sequence))
    assert sequence > last.get(producer, -1), "out of order for this receiver"
    last[producer] = sequence
    ledger.received += 1
    ledger.progress += 1


async def watchdog(
    ledgers: list[Ledger], channels: tuple[Channel, Channel], stall: float
) -> None:
    """Fail, with the channels' state, if nothing moves for ``stall`` seconds."""
    before = [ledger.progress for ledger in ledgers]
    while True:
        await trio.sleep(stall)
        now = [ledger.progress for ledger in ledgers]
        outstanding = any(ledger.sent > ledger.received for ledger in ledgers)
        if now == before and outstanding:
            states = [
                (c.statistics(), c._lent, c._borrowed, c._reads_done) for c in channels
            ]
            pytest.fail(f"no progress for {stall} s: {states}")
        before = now


async def run_stress(seed: int, messages: int) -> None:
    rng = random.Random(seed)
    options = {
        "receive_queue_messages": rng.choice((1, 3, 64, 4096)),
        "receive_queue_bytes": rng.choice((64 * 1024, 1024 * 1024)),
        "receive_queue_handles": rng.choice((253, 506)),
        "send_queue_messages": rng.choice((2, 16, 4096)),
        "send_queue_bytes": rng.choice((128 * 1024, 8 * 1024 * 1024)),
    }
    pipes = Pipes(7)
    try:
        with trio.fail_after(120):
            async with open_pair(**options) as (left, right):
                ledgers = [Ledger(), Ledger()]
                async with trio.open_nursery() as watchdogs:
                    watchdogs.start_soon(watchdog, ledgers, (left, right), 5.0)
                    async with trio.open_nursery() as nursery:
                        for sender, receiver, ledger, producers, receivers in (
                            (left, right, ledgers[0], 2, 3),
                            (right, left, ledgers[1], 1, 1),
                        ):
                            nursery.start_soon(
                                run_direction,
                                sender,
                                receiver,
                                ledger,
                                pipes,
                                producers,
                                receivers,
                                messages,
                                random.Random(rng.random()),
                            )
                    watchdogs.cancel_scope.cancel()
                for ledger in ledgers:
                    assert ledger.received == ledger.sent
                    assert len(ledger.seen) == ledger.sent
    finally:
        pipes.close()


async def run_direction(
    sender: Channel,
    receiver: Channel,
    ledger: Ledger,
    pipes: Pipes,
    producers: int,
    receivers: int,
    messages: int,
    rng: random.Random,
) -> None:
    async with trio.open_nursery() as nursery:
        for index in range(receivers):
            nursery.start_soon(consume, receiver, ledger, pipes, random.Random(index))
        async with trio.open_nursery() as sending:
            for producer in range(producers):
                sending.start_soon(
                    produce,
                    sender,
                    ledger,
                    pipes,
                    producer,
                    messages // producers,
                    random.Random(rng.random()),
                )
        await sender.send_eof()  # the receivers stop at the end of this stream


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_randomized_channel_pair_stress(seed: int) -> None:
    await run_stress(seed, messages=600)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140))
async def test_randomized_channel_pair_stress_long(seed: int) -> None:
    await run_stress(seed, messages=6000)
