"""A receive() that reads on its own task: what one read can bring it.

The request/response path (a borrower's read that is exactly one plain
message without fds) and everything that leaves it for the full parse,
with the statistics exact afterwards.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing
from _helpers import raw_pair

from trio_mojo import (
    Channel,
    Message,
    MessageType,
    encode_message,
    open_channel,
)


async def _borrowing(
    channel: Channel, nursery: trio.Nursery, into: list[object]
) -> None:
    """Start one receive() and wait until it reads on its own task."""

    async def receive() -> None:
        try:
            message = await channel.receive()
        except trio.EndOfChannel as exc:
            into.append(type(exc))
            return
        into.append((message.payload, message.type, len(message.handles)))
        message.close()

    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(receive)
    await trio.testing.wait_all_tasks_blocked()
    assert channel._borrowed


def _borrowed(channel: Channel) -> bool:
    return channel._borrowed


PLAIN = encode_message(b"ping")
CASES: dict[str, tuple[list[bytes], int, list[object]]] = {
    "one plain": ([PLAIN], 0, [(b"ping", MessageType.NORMAL, 0)]),
    "two in one read": (
        [PLAIN + encode_message(b"pong")],
        0,
        [(b"ping", MessageType.NORMAL, 0), (b"pong", MessageType.NORMAL, 0)],
    ),
    "a partial frame": (
        [PLAIN[:10], PLAIN[10:]],
        0,
        [(b"ping", MessageType.NORMAL, 0)],
    ),
    "a frame with an fd": (
        [encode_message(b"fd", num_handles=1)],
        1,
        [(b"fd", MessageType.NORMAL, 1)],
    ),
    "a legacy frame": (
        [encode_message(b"old", type=MessageType.NORMAL_LEGACY)],
        0,
        [(b"old", MessageType.NORMAL_LEGACY, 0)],
    ),
    "a control message first": (
        [encode_message(b"", type=MessageType.UPGRADE_OFFER) + PLAIN],
        0,
        [(b"ping", MessageType.NORMAL, 0)],
    ),
    "the end of the stream": ([], 0, [trio.EndOfChannel]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_borrowing_receive_gets_whatever_one_read_brings(case: str) -> None:
    writes, nfds, expected = CASES[case]
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            got: list[object] = []
            async with trio.open_nursery() as nursery:
                await _borrowing(channel, nursery, got)
                for data in writes:
                    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
                    try:
                        await peer.send(data, fds)
                    finally:
                        for fd in fds:
                            os.close(fd)
                    await trio.testing.wait_all_tasks_blocked()
                if not writes:
                    peer.stdlib.shutdown(socket.SHUT_WR)  # the end of the stream
            while len(got) < len(expected):
                message = await channel.receive()
                got.append((message.payload, message.type, len(message.handles)))
            assert got == expected
            stats = channel.statistics()
            messages = [e for e in expected if isinstance(e, tuple)]
            assert stats.messages_received == len(messages) + (
                case == "a control message first"
            )
            assert stats.bytes_received == sum(len(data) for data in writes)
            assert stats.handles_received == nfds


async def test_request_response_with_a_raw_peer_stays_exact() -> None:
    # More round trips than _YIELD_EVERY: the inline send's yield comes too.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            for i in range(150):
                request = str(i).encode()
                await channel.send(Message(request))
                wire = await peer.recv_exactly(16 + len(request))
                assert wire == encode_message(request)
                await peer.send(encode_message(request[::-1]))
                assert (await channel.receive()).payload == request[::-1]
            stats = channel.statistics()
            assert stats.messages_sent == stats.messages_received == 150
            assert stats.bytes_sent == stats.bytes_received
            assert channel._borrows > 0  # it did read on its own task


async def test_an_inline_send_that_meets_a_full_socket_is_queued_whole() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await trio.testing.wait_all_tasks_blocked()
            filled = 0
            try:
                while True:  # fill the kernel buffer behind the channel's back
                    filled += channel._sock.send(b"\0" * 65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            await channel.send(Message(b"after"))  # inline: EAGAIN, so queued
            assert channel.statistics().send_queue_messages == 1
            assert await peer.recv_exactly(filled) == b"\0" * filled
            assert await peer.recv_exactly(21) == encode_message(b"after")
            assert channel.statistics().messages_sent == 1


async def test_a_borrowing_receive_cancelled_while_it_waits_loses_nothing() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            scope = trio.CancelScope()

            async def waiting_receive() -> None:
                with scope:
                    await channel.receive()
                    pytest.fail("received a message nobody sent")

            async with trio.open_nursery() as nursery:
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(waiting_receive)
                await trio.testing.wait_all_tasks_blocked()
                assert channel._borrowed  # waiting on the socket itself
                scope.cancel()
            assert scope.cancelled_caught
            assert not _borrowed(channel)
            await peer.send(PLAIN)
            assert (await channel.receive()).payload == b"ping"
            assert channel.statistics().messages_received == 1


async def test_a_borrowing_receive_cancelled_before_it_reads_loses_nothing(
    mock_clock: trio.testing.MockClock,
) -> None:
    # (The clock stands still: the read side stays lent.)
    half = encode_message(b"h" * (32 * 1024 - 16))
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            got: list[object] = []
            async with trio.open_nursery() as nursery:
                await _borrowing(channel, nursery, got)
                await peer.send(half + half)  # the whole 64 KiB one read asks for
            assert len(got) == 1
            assert (await channel.receive()).payload == b"h" * (32 * 1024 - 16)
            # That read filled its buffer: the next borrower reads before it
            # waits, after a checkpoint, where this one is cancelled.
            assert channel._lent
            assert not channel._wait_first
            await peer.send(PLAIN)
            with trio.CancelScope() as scope:
                scope.cancel()
                await channel.receive()
            assert scope.cancelled_caught
            assert not channel._borrowed
            assert (await channel.receive()).payload == b"ping"
            assert channel.statistics().messages_received == 3
