"""Large messages: the bulk paths of the writer and the reader.

A message larger than what one read brings is collected as it arrives,
never allocated at its announced size (a peer that announces far more than
it sends: ``test_hostile_peer.py``); the writer resumes partial writes when
the socket is writable again.  Each edge here: a trickle, an end of stream
or a cancellation in the middle of a large message, the order of large and
small messages queued while the writer is busy, and senders parked on a
full queue.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing
from _helpers import RawPeer, open_pair, pipe_tagged, raw_pair, read_tags

from trio_mojo import (
    DisconnectedError,
    Message,
    encode_message,
    open_channel,
)

KIB = 1024
HEADER = struct.Struct("<IHHH6x")


def header(num_bytes: int) -> bytes:
    """The 16-byte header of a NORMAL message of ``num_bytes`` (header included)."""
    return HEADER.pack(num_bytes, 16, 1, 0)


def body(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


async def test_a_large_message_trickled_byte_by_byte() -> None:
    # The first 100 KiB in one write, the last 2,000 bytes one at a time,
    # then a small message: both arrive whole, and the buffer grows only
    # with the bytes that arrived.
    payload = body(100 * KIB + 2000)
    wire = encode_message(payload)
    head = len(wire) - 2000
    with raw_pair() as (endpoint, peer), trio.fail_after(20):
        async with open_channel(endpoint) as channel:
            await peer.send_all(wire[:head])
            await trio.testing.wait_all_tasks_blocked()
            assert channel.statistics().read_buffer_bytes == head
            for i in range(head, len(wire)):
                await peer.send(wire[i : i + 1])
                if i % 500 == 0:
                    await trio.testing.wait_all_tasks_blocked()
                    assert channel.statistics().read_buffer_bytes == i + 1
            await peer.send(encode_message(b"after"))
            message = await channel.receive()
            assert message.payload == payload
            assert type(message.payload) is bytes
            assert (await channel.receive()).payload == b"after"


async def test_end_of_stream_while_a_large_message_arrives() -> None:
    # The reader skips parsing while a large message's bytes come in; the
    # end of the stream in the middle of one must still be seen at once
    # (not read again and again).
    with raw_pair() as (endpoint, peer), trio.fail_after(10):
        async with open_channel(endpoint) as channel:
            await peer.send_all(header(1024 * KIB) + body(300 * KIB))
            await trio.testing.wait_all_tasks_blocked()
            peer.sock.shutdown(socket.SHUT_WR)
            with pytest.raises(DisconnectedError, match="end of stream inside"):
                await channel.receive()


async def test_a_receive_cancelled_in_the_middle_of_a_large_message() -> None:
    # receive() is cancelled while half of a large message has arrived;
    # nothing is lost: the next receive() returns it whole once the rest
    # comes, and the message after it too.
    payload = body(1024 * KIB)
    wire = encode_message(payload)
    half = len(wire) // 2
    with raw_pair() as (endpoint, peer), trio.fail_after(20):
        async with open_channel(endpoint) as channel:
            with trio.CancelScope() as scope:

                async def feed_half() -> None:
                    await peer.send_all(wire[:half])
                    await trio.testing.wait_all_tasks_blocked()
                    assert channel.statistics().read_buffer_bytes == half
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(feed_half)
                    await channel.receive()
                    pytest.fail("receive() returned half a message")  # pragma: no cover
            assert scope.cancelled_caught
            await peer.send_all(wire[half:] + encode_message(b"next"))
            message = await channel.receive()
            assert message.payload == payload
            assert (await channel.receive()).payload == b"next"


async def read_messages(peer: RawPeer, count: int) -> list[bytes]:
    """Read ``count`` whole messages from a raw peer; return their payloads."""
    payloads = []
    for _ in range(count):
        (num_bytes,) = struct.unpack("<I", await peer.recv_exactly(4))
        rest = await peer.recv_exactly(num_bytes - 4)
        payloads.append(rest[12:])
    return payloads


async def test_large_and_small_messages_queued_while_the_writer_is_busy() -> None:
    # The first large message fills the socket and the writer waits for
    # writability; a small message is queued for it, then large ones: none
    # may overtake another, whichever queue each waits in.
    sizes = [512 * KIB, 10, 300 * KIB, 20, 30, 400 * KIB, 600 * KIB, 40]
    payloads = [body(size)[::-1] + bytes([i]) for i, size in enumerate(sizes)]
    with raw_pair() as (endpoint, peer), trio.fail_after(20):
        async with open_channel(endpoint) as channel:
            for payload in payloads:
                await channel.send(Message(payload))
            assert channel.statistics().send_queue_messages == len(payloads)
            assert await read_messages(peer, len(payloads)) == payloads


async def test_a_burst_of_mixed_sizes_with_fds_arrives_whole_and_in_order() -> None:
    # The rest of a burst is packed into shared entries: small frames copied
    # into one buffer, larger payloads as buffers of their own, fds riding
    # with each entry's first byte.  A consumer that pauses makes the writer
    # resume entries in the middle of a payload; every message must still
    # arrive whole, in order, with exactly its own fds.
    sizes = [10, 2 * KIB, 16 * KIB, 5, 100 * KIB, 1 * KIB + 1, 40 * KIB, 0, 64 * KIB]
    plan = [(i, sizes[i % len(sizes)], i % 3) for i in range(120)]
    async with open_pair() as (left, right):
        with pipe_tagged(sum(n for _, _, n in plan)) as tagged, trio.fail_after(30):
            received: list[tuple[bytes, list[int]]] = []

            async def consume() -> None:
                for index in range(len(plan)):
                    with await right.receive() as message:
                        received.append((message.payload, read_tags(message.handles)))
                    if index % 10 == 0:
                        await trio.sleep(0.002)  # the socket fills meanwhile

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                used = 0
                for index, size, nfds in plan:
                    handles = tagged[used : used + nfds]
                    used += nfds
                    await left.send(Message(body(size) + bytes([index]), handles))
                    assert all(h.closed for h in handles)  # taken by send
        assert len(received) == len(plan)
        used = 0
        for (index, size, nfds), (payload, tags) in zip(plan, received, strict=True):
            assert payload == body(size) + bytes([index])
            assert tags == [(used + k) % 256 for k in range(nfds)]
            used += nfds


@pytest.mark.parametrize("queue_kib", [64, 1024])
async def test_senders_parked_on_a_full_queue_all_get_through(queue_kib: int) -> None:
    # Producers of different sizes wait on a full send queue; parked senders
    # are woken only once what the least of them wants fits, yet every
    # message arrives, in each producer's order, and the queue never passes
    # its bound in bytes (beyond one message accepted into an empty queue).
    limit = queue_kib * KIB
    sizes = {"small": 100, "medium": 20 * KIB, "large": 200 * KIB}
    count = 40
    peak = 0
    async with open_pair(send_queue_bytes=limit) as (left, right):

        async def produce(name: str, size: int) -> None:
            nonlocal peak
            for i in range(count):
                await left.send(Message(name.encode() + b":" + body(size) + bytes([i])))
                stats = left.statistics()
                peak = max(peak, stats.send_queue_bytes)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for name, size in sizes.items():
                    nursery.start_soon(produce, name, size)
                seen = dict.fromkeys(sizes, 0)
                for _ in range(count * len(sizes)):
                    message = await right.receive()
                    tag, _, rest = message.payload.partition(b":")
                    key = tag.decode()
                    assert rest == body(sizes[key]) + bytes([seen[key]])
                    seen[key] += 1
                    if seen[key] % 8 == 0:
                        await trio.sleep(0.001)  # a slow consumer now and then
        assert seen == dict.fromkeys(sizes, count)
    assert peak <= max(limit, sizes["large"] + 16 + 1 + len(b"large:"))
