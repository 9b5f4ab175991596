"""Cancellation at every await point of ``send()`` and ``receive()``.

``send()`` awaits in two places: the cancellation check on entry and the
wait for room in a full send queue.  ``receive()`` awaits on entry and while
no message has arrived.  A cancelled call must leave nothing behind: no
partial message on the wire (the next message still decodes), no message
lost or duplicated, no fd leaked; and a cancelled ``send`` leaves the caller
owning its handles.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _helpers import FILLER, fill_until_queued, open_pair, pipe_tagged, read_tags

from trio_mojo import Message

BIG = b"B" * 65536


async def test_send_cancelled_on_entry() -> None:
    async with open_pair() as (left, right):
        with pipe_tagged(2) as pipes:
            with trio.CancelScope() as scope:
                scope.cancel()
                await left.send(Message(b"cancelled", pipes))
            assert scope.cancelled_caught
            assert not any(h.closed for h in pipes)  # still the caller's
            assert read_tags(pipes) == [0, 1]
        await left.send(Message(b"next"))
        assert (await right.receive()).payload == b"next"
        assert left.statistics().messages_sent == 1
        assert right.statistics().handles_received == 0


async def test_send_cancelled_while_waiting_for_room() -> None:
    async with open_pair(send_queue_messages=2, receive_queue_messages=1) as (
        left,
        right,
    ):
        fillers = await fill_until_queued(left)
        await left.send(Message(b"queued"))  # the queue is now full (2)
        assert left.statistics().send_queue_messages == 2
        with pipe_tagged(3) as pipes:
            async with trio.open_nursery() as nursery:
                cancelled = trio.CancelScope()

                async def blocked_send() -> None:
                    with cancelled:
                        await left.send(Message(b"cancelled", pipes))
                        pytest.fail("send() did not wait for room")

                nursery.start_soon(blocked_send)
                await trio.testing.wait_all_tasks_blocked()
                assert left.statistics().send_queue_messages == 2
                cancelled.cancel()
            assert cancelled.cancelled_caught
            assert not any(h.closed for h in pipes)  # still the caller's
            assert read_tags(pipes) == [0, 1, 2]
        assert left.statistics().send_queue_messages == 2
        payloads = []

        async def collect() -> None:
            payloads.extend(
                [(await right.receive()).payload for _ in range(fillers + 2)]
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            await left.send(Message(b"next"))
        # The peer gets everything but the cancelled message, intact.
        assert payloads == [FILLER] * fillers + [b"queued", b"next"]
        assert right.statistics().handles_received == 0


async def test_receive_cancelled_on_entry_loses_nothing() -> None:
    async with open_pair() as (left, right):
        await left.send(Message(b"waiting"))
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await right.receive()
        assert scope.cancelled_caught
        assert (await right.receive()).payload == b"waiting"


async def test_receive_cancelled_while_waiting_loses_nothing() -> None:
    async with open_pair() as (left, right):
        scope = trio.CancelScope()

        async def waiting_receive() -> None:
            with scope:
                await right.receive()
                pytest.fail("received a message nobody sent")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting_receive)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        assert scope.cancelled_caught
        with pipe_tagged(1) as pipes:
            await left.send(Message(b"after", pipes))
        with await right.receive() as message:
            assert message.payload == b"after"
            assert read_tags(message.handles) == [0]


async def test_many_cancellations_interleaved_with_traffic() -> None:
    # Every third send and receive is cancelled at one of its await points
    # (on entry, or while waiting); the stream stays intact and in order.
    count = 600
    async with open_pair(send_queue_messages=4, receive_queue_messages=4) as (
        left,
        right,
    ):
        delivered: list[int] = []
        kept = 0

        async def produce() -> None:
            nonlocal kept
            for i in range(count):
                with pipe_tagged(1, first=i) as pipes, trio.CancelScope() as scope:
                    if i % 3 == 0:
                        scope.cancel()  # cancelled on entry
                    elif i % 3 == 1:  # cancelled while waiting, if it waits
                        scope.deadline = trio.current_time() + 0.001
                    await left.send(Message(i.to_bytes(2, "little") + BIG[:i], pipes))
                    kept += 1
                    # Sent: the channel owns the handle now (it may still be
                    # queued); it is not ours to close.
                    pipes.clear()
                # Cancelled: still ours, and the with-block closes it.
            await left.send(Message(b"end"))

        async def consume() -> None:
            i = 0
            while True:
                with trio.CancelScope() as scope:
                    if i % 3 == 0:
                        scope.cancel()
                    elif i % 3 == 1:  # cancelled while waiting, if it waits
                        scope.deadline = trio.current_time() + 0.001
                    message = await right.receive()
                    with message:
                        if message.payload == b"end":
                            return
                        n = int.from_bytes(message.payload[:2], "little")
                        assert message.payload[2:] == BIG[:n]
                        assert len(message.handles) == 1
                        assert read_tags(message.handles) == [n % 256]
                        delivered.append(n)
                i += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(consume)
        assert delivered == sorted(delivered)
        assert len(delivered) == kept
        assert not any(n % 3 == 0 for n in delivered)
        assert left.statistics().messages_sent == kept + 1
