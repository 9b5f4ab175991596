"""Backpressure: a slow consumer bounds memory and every queue end to end.

DESIGN.md rule 5: every queue is bounded in messages and bytes; a slow
consumer stops the reader, the kernel buffer fills, and the producer's
``send`` waits.  The consumer here is as slow as it can be: before each
``receive`` it waits until every other task is blocked, so the producer has
always pushed as far as the bounds let it.
"""

from __future__ import annotations

import contextlib
import os
import tracemalloc

import pytest
import trio
import trio.testing
from _helpers import FILLER, RawPeer, open_pair, raw_pair

from trio_mojo import (
    MAX_ATTACHED_HANDLES,
    MAX_SENDMSG_HANDLES,
    Channel,
    ChannelStatistics,
    Handle,
    Message,
    encode_message,
    open_channel,
)

KIB = 1024


class Peaks:
    """The largest queue depths seen in a channel's statistics."""

    def __init__(self) -> None:
        self.send_messages = self.send_bytes = 0
        self.receive_messages = self.receive_bytes = 0

    def see(self, stats: ChannelStatistics) -> None:
        self.send_messages = max(self.send_messages, stats.send_queue_messages)
        self.send_bytes = max(self.send_bytes, stats.send_queue_bytes)
        self.receive_messages = max(self.receive_messages, stats.receive_queue_messages)
        self.receive_bytes = max(self.receive_bytes, stats.receive_queue_bytes)


async def run_slow_consumer(
    producer: Channel, consumer: Channel, payload: bytes, count: int
) -> tuple[Peaks, Peaks, int]:
    """Send ``count`` x ``payload`` as fast as possible, receive as slowly."""
    sent_peaks, received_peaks = Peaks(), Peaks()
    producer_waited = 0

    async def produce() -> None:
        for _ in range(count):
            await producer.send(Message(payload))
            sent_peaks.see(producer.statistics())

    async def consume() -> None:
        nonlocal producer_waited
        for _ in range(count):
            await trio.testing.wait_all_tasks_blocked()
            received_peaks.see(consumer.statistics())
            if producer.statistics().messages_sent < count:
                producer_waited += 1
            message = await consumer.receive()
            assert len(message.payload) == len(payload)
            received_peaks.see(consumer.statistics())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(consume)
    return sent_peaks, received_peaks, producer_waited


async def test_slow_consumer_keeps_memory_and_queues_bounded() -> None:
    payload = b"p" * (64 * KIB)
    count = 800  # 50 MiB in all
    bound = 256 * KIB
    tracemalloc.start()
    try:
        async with open_pair(
            send_queue_bytes=bound,
            receive_queue_bytes=bound,
        ) as (producer, consumer):
            sent, received, waited = await run_slow_consumer(
                producer, consumer, payload, count
            )
            assert consumer.statistics().messages_received == count
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = count * len(payload)
    # Bounded: the queues (plus one message over each bound, plus one
    # 256 KiB read and the kernel's buffers) is all that is ever held.
    assert peak < 8 * 1024 * KIB < total / 6
    assert sent.send_bytes <= bound + len(payload) + 16
    assert received.receive_bytes <= bound + len(payload)
    assert waited >= count // 2  # the producer really was held back


async def test_slow_consumer_bounds_queue_lengths_in_messages() -> None:
    # Small messages: here the message-count bounds are the binding ones.
    # (1 MB in all: far more than the kernel's buffers, which hold every
    # byte of a smaller stream once the writer batches messages.)
    limit = 16
    count = 5000
    async with open_pair(send_queue_messages=limit, receive_queue_messages=limit) as (
        producer,
        consumer,
    ):
        sent, received, waited = await run_slow_consumer(
            producer, consumer, b"t" * 200, count
        )
        assert consumer.statistics().messages_received == count
    assert 1 <= sent.send_messages <= limit
    assert 1 <= received.receive_messages <= limit
    assert received.receive_messages == limit  # the reader stopped at the bound
    # The producer really was held back.  Fewer than half of the sends wait:
    # batched tiny messages pack the kernel's buffer more densely.
    assert waited >= count // 4


# ----------------------------------------------------------------------
# Fds: a peer cannot make us hold more than receive_queue_handles (+ one read)


def fds_open() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("bound", [2 * MAX_ATTACHED_HANDLES, 300])
async def test_a_flood_of_fd_laden_messages_stops_at_the_handle_bound(
    bound: int,
) -> None:
    # A raw peer sends well-formed empty messages with 253 fds each (128
    # with the first byte, 125 with the rest, as the rules allow) as fast
    # as the kernel takes them, and nobody receives.  The receive queue's
    # byte and message bounds are far away (16 B per message), so only the
    # fd bound stops the reader: the process never holds more than
    # receive_queue_handles fds plus what one recvmsg brings (128).
    message = encode_message(b"", num_handles=MAX_ATTACHED_HANDLES)
    r, w = os.pipe()
    sent = 0
    peak = 0
    baseline = fds_open()

    async def flood(peer: RawPeer) -> None:
        nonlocal sent
        with contextlib.suppress(OSError):  # cut off when the test ends
            while True:
                await peer.send(message[:1], [w] * MAX_SENDMSG_HANDLES)
                await peer.send(message[1:], [w] * (MAX_ATTACHED_HANDLES - 128))
                sent += 1

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, fds_open() - baseline)
            await trio.sleep(0.001)

    async def until_the_peer_waits() -> None:
        while True:
            before = sent
            await trio.sleep(0.1)
            if sent == before:
                return

    try:
        with raw_pair() as (endpoint, peer), trio.fail_after(20):
            async with (
                open_channel(endpoint, receive_queue_handles=bound) as channel,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(watch)
                nursery.start_soon(flood, peer)
                await until_the_peer_waits()
                stats = channel.statistics()
                held = stats.receive_queue_handles + stats.unclaimed_handles
                assert bound - MAX_ATTACHED_HANDLES < held <= bound + 128
                assert fds_open() - baseline <= bound + 128
                assert sent > 2 * stats.receive_queue_messages  # the peer waits
                # A consumer that receives makes progress, under the bound.
                for _ in range(30):
                    with await channel.receive() as received:
                        assert len(received.handles) == MAX_ATTACHED_HANDLES
                await until_the_peer_waits()
                assert channel.statistics().messages_received >= 30
                assert peak <= bound + 128
                nursery.cancel_scope.cancel()
    finally:
        os.close(r)
        os.close(w)


async def test_send_waits_once_the_queued_fds_reach_their_bound() -> None:
    # A producer of fd-laden messages faster than the peer reads must not
    # run its own process out of fds: send() waits at send_queue_handles
    # (the full run of the bench hit EMFILE without it: 4,096 queued
    # messages of 8 fds are more than RLIMIT_NOFILE here).
    bound = 64
    r, w = os.pipe()
    sent = 0
    try:
        with raw_pair() as (endpoint, peer), trio.fail_after(20):
            async with open_channel(endpoint, send_queue_handles=bound) as channel:
                baseline = fds_open()

                async def produce() -> None:
                    nonlocal sent
                    while True:
                        handles = [Handle.dup(w) for _ in range(8)]
                        try:
                            await channel.send(Message(FILLER, handles))
                        except BaseException:
                            for handle in handles:  # cancelled: still ours
                                handle.close()
                            raise
                        sent += 1

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(produce)
                    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                    stats = channel.statistics()
                    assert bound - 8 < stats.send_queue_handles <= bound
                    # The queued fds, plus the 8 of the send() that waits.
                    assert fds_open() - baseline <= bound + 8
                    nursery.cancel_scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(peer.at_eof)  # drain; fds are dropped
                    await channel.aclose()  # flushes, then half-closes
    finally:
        os.close(r)
        os.close(w)
    assert sent > 0
