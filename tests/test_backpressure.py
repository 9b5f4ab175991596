"""Backpressure: a slow consumer bounds memory and every queue end to end.

DESIGN.md rule 5: every queue is bounded in messages and bytes; a slow
consumer stops the reader, the kernel buffer fills, and the producer's
``send`` waits.  The consumer here is as slow as it can be: before each
``receive`` it waits until every other task is blocked, so the producer has
always pushed as far as the bounds let it.
"""

from __future__ import annotations

import tracemalloc

import trio
import trio.testing
from _helpers import open_pair

from trio_mojo import Channel, ChannelStatistics, Message

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
