"""``Channel.send_eof()``: a half-close with Trio's ``send_eof`` semantics.

The sending side flushes what is queued and then shuts the socket down for
writing: the peer's ``receive`` ends with ``EndOfChannel`` after the last
message, while this side goes on receiving.  Idempotent; ``send`` refuses
from the moment it is called; cancelling it only stops the waiting.
"""

from __future__ import annotations

import functools
import sys
import textwrap

import pytest
import trio
import trio.testing
from _helpers import fill_until_queued, open_pair, pipe_tagged, raw_pair

from trio_mojo import (
    DisconnectedError,
    Endpoint,
    Message,
    channel_pair,
    encode_message,
    open_channel,
)


async def test_the_peer_sees_every_message_then_end_of_channel() -> None:
    async with open_pair() as (left, right):
        for i in range(3):
            await left.send(Message(bytes([i])))
        await left.send_eof()
        assert [m.payload async for m in right] == [b"\x00", b"\x01", b"\x02"]
        with pytest.raises(trio.EndOfChannel):  # and it stays ended
            await right.receive()
        # The other direction is untouched.
        await right.send(Message(b"reply"))
        assert (await left.receive()).payload == b"reply"
        await right.send_eof()
        with pytest.raises(trio.EndOfChannel):
            await left.receive()


async def test_send_after_send_eof_is_refused_and_handles_are_closed() -> None:
    async with open_pair() as (left, right):
        await left.send_eof()
        with pipe_tagged(1) as pipes:
            with pytest.raises(trio.ClosedResourceError, match="send_eof"):
                await left.send(Message(b"late", pipes))
            assert pipes[0].closed  # send() owned it from the call
        with pytest.raises(trio.EndOfChannel):
            await right.receive()


async def test_send_eof_is_idempotent() -> None:
    async with open_pair() as (left, right):
        await left.send(Message(b"one"))
        await left.send_eof()
        await left.send_eof()
        assert (await right.receive()).payload == b"one"
        with pytest.raises(trio.EndOfChannel):
            await right.receive()
        await left.send_eof()
    assert left.statistics().messages_sent == 1


async def test_send_eof_waits_until_the_queue_is_written() -> None:
    async with open_pair(receive_queue_messages=1) as (left, right):
        queued = await fill_until_queued(left)
        done = trio.Event()

        async def half_close() -> None:
            await left.send_eof()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(half_close)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # the kernel's buffers are full
            assert left.statistics().send_queue_messages > 0
            received = 0
            async for _ in right:
                received += 1
            assert done.is_set()
        assert received == queued
        assert left.statistics().send_queue_messages == 0


async def test_cancelled_send_eof_still_ends_the_stream_after_the_queue() -> None:
    async with open_pair(receive_queue_messages=1) as (left, right):
        queued = await fill_until_queued(left)
        with trio.move_on_after(0.05) as scope:
            await left.send_eof()
        assert scope.cancelled_caught
        with pytest.raises(trio.ClosedResourceError, match="send_eof"):
            await left.send(Message(b"after"))
        received = 0
        async for _ in right:
            received += 1
        assert received == queued  # nothing lost, and the end came after
        await left.send_eof()  # returns at once now


async def test_aclose_after_send_eof_and_send_eof_after_aclose() -> None:
    async with open_pair() as (left, right):
        await left.send(Message(b"x"))
        await left.send_eof()
        await left.aclose()  # flushes nothing more, raises nothing
        assert (await right.receive()).payload == b"x"
        with pytest.raises(trio.EndOfChannel):
            await right.receive()
        with pytest.raises(trio.ClosedResourceError, match="closed"):
            await left.send_eof()


async def test_send_eof_raises_a_failure_that_lost_queued_messages() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await fill_until_queued(channel)
            peer.close()
            with pytest.raises(DisconnectedError):
                await channel.send_eof()


async def test_the_raw_peer_reads_a_clean_end_of_stream_and_can_still_write() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await channel.send(Message(b"last"))
            await channel.send_eof()
            wire = encode_message(b"last")
            assert await peer.recv_exactly(len(wire)) == wire
            assert await peer.at_eof()
            await peer.send(encode_message(b"still heard"))
            assert (await channel.receive()).payload == b"still heard"


CHILD_COUNTS_UNTIL_EOF = textwrap.dedent(
    """
    import sys, trio, trio_mojo

    async def main(fd):
        endpoint = trio_mojo.Endpoint.from_fd(fd)
        async with trio_mojo.open_channel(endpoint) as channel:
            count = total = 0
            async for message in channel:  # until the parent's send_eof()
                count += 1
                total += len(message.payload)
            await channel.send(trio_mojo.Message(f"{count} {total}".encode()))

    trio.run(main, int(sys.argv[1]))
    """
)


async def spawn(nursery: trio.Nursery, script: str, endpoint: Endpoint) -> None:
    fd = endpoint.fileno()
    await nursery.start(
        functools.partial(
            trio.run_process,
            [sys.executable, "-c", script, str(fd)],
            pass_fds=[fd],
            capture_stderr=True,
        )
    )
    endpoint.close()  # the child has its copy now


async def test_a_child_process_reads_until_our_send_eof_then_replies() -> None:
    ours, theirs = channel_pair()
    with ours, theirs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await spawn(nursery, CHILD_COUNTS_UNTIL_EOF, theirs)
            async with open_channel(ours) as channel:
                for size in range(200):
                    await channel.send(Message(b"r" * size))
                await channel.send_eof()  # "no more requests"
                reply = await channel.receive()  # ... and still read the answer
                assert reply.payload == f"200 {sum(range(200))}".encode()
                with pytest.raises(trio.EndOfChannel):
                    await channel.receive()
