"""Lifecycle and the error model: flush, abort, aclose, failures, statistics.

What Chromium's ``ShutDownStress`` and ``PeerShutdownDuringRead`` check,
plus the structured-concurrency rules of DESIGN.md (rule 4): leaving the
block normally flushes, leaving by error or cancellation aborts promptly,
every fd is closed, and a failure reaches the user exactly once, as a
single exception with its cause chained, never as an ``ExceptionGroup``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing
from _helpers import (
    FILLER,
    WatchedPipe,
    fill_until_queued,
    open_pair,
    pipe_tagged,
    raw_pair,
    watched_pipe,
)

from trio_mojo import (
    ChannelError,
    DisconnectedError,
    FlushTimeoutError,
    MalformedMessageError,
    Message,
    channel_pair,
    encode_message,
    open_channel,
)


@pytest.fixture
def pipe() -> Iterator[WatchedPipe]:
    with watched_pipe() as pipe:
        yield pipe


# ----------------------------------------------------------------------
# Leaving the block normally: flush


async def test_leaving_normally_flushes_every_queued_message() -> None:
    a, b = channel_pair()
    received: list[bytes] = []
    with a, b:
        async with open_channel(b, receive_queue_messages=1) as receiver:
            start_reading = trio.Event()

            async def consume() -> None:
                await start_reading.wait()
                received.extend([m.payload async for m in receiver])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                async with open_channel(a) as sender:
                    sent = await fill_until_queued(sender)
                    for i in range(100):
                        await sender.send(Message(i.to_bytes(2, "little")))
                    assert sender.statistics().send_queue_messages == 101
                    start_reading.set()
                # The block is left: everything was written before it closed.
                assert sender.statistics().send_queue_messages == 0
                assert sender.statistics().messages_sent == sent + 100
    assert received == [FILLER] * sent + [i.to_bytes(2, "little") for i in range(100)]


async def test_flush_timeout_when_the_peer_never_reads(
    autojump_clock: trio.testing.MockClock, pipe: WatchedPipe
) -> None:
    w = pipe.write_end
    with raw_pair() as (endpoint, peer):
        start = 0.0

        async def session() -> None:
            nonlocal start
            async with open_channel(endpoint, flush_timeout=5) as channel:
                await fill_until_queued(channel)
                await channel.send(Message(b"with fd", (w,)))
                start = trio.current_time()

        with pytest.raises(FlushTimeoutError, match="gave up flushing after 5") as info:
            await session()
        assert trio.current_time() - start == pytest.approx(5)
        assert isinstance(info.value, trio.TooSlowError)
        assert info.value.__cause__ is not None
        # Dropped: the queued message's fd was closed, the socket too.
        assert pipe.all_writers_closed()
        assert await peer.at_eof()


async def test_flush_that_loses_messages_raises(
    pipe: WatchedPipe,
) -> None:
    # The peer vanishes while the flush is under way: aclose must not pretend
    # the queued messages were delivered.
    w = pipe.write_end
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await fill_until_queued(channel)
            await channel.send(Message(b"with fd", (w,)))

            async def close() -> None:
                with pytest.raises(DisconnectedError):
                    await channel.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close)
                await trio.testing.wait_all_tasks_blocked()
                assert channel.statistics().send_queue_messages > 0
                peer.close()
        # aclose() raised it, so leaving the block raised nothing more.
        assert pipe.all_writers_closed()


# ----------------------------------------------------------------------
# Leaving by an exception or a cancellation: abort


async def test_leaving_by_exception_aborts_at_once(
    autojump_clock: trio.testing.MockClock, pipe: WatchedPipe
) -> None:
    w = pipe.write_end
    with raw_pair() as (endpoint, peer), trio.fail_after(60):
        start = 0.0

        async def session() -> None:
            nonlocal start
            async with open_channel(endpoint, flush_timeout=None) as channel:
                await fill_until_queued(channel)
                await channel.send(Message(b"with fd", (w,)))
                start = trio.current_time()
                raise KeyError("the body's own error")

        with pytest.raises(KeyError, match="the body's own error"):
            await session()
        assert trio.current_time() == start  # no flush, no wait at all
        assert pipe.all_writers_closed()
        assert await peer.at_eof()


async def test_cancellation_from_outside_aborts_at_once(
    autojump_clock: trio.testing.MockClock, pipe: WatchedPipe
) -> None:
    w = pipe.write_end
    with raw_pair() as (endpoint, peer), trio.fail_after(60):
        with trio.CancelScope() as scope:
            async with open_channel(endpoint, flush_timeout=None) as channel:
                await fill_until_queued(channel)
                await channel.send(Message(b"with fd", (w,)))
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert pipe.all_writers_closed()
        assert await peer.at_eof()


async def test_abort_closes_every_fd_the_channel_holds() -> None:
    # Received but never delivered, unclaimed, and queued outgoing fds: all
    # closed when the block is left by an error.
    with (
        watched_pipe() as undelivered,
        watched_pipe() as unclaimed,
        watched_pipe() as outgoing,
        raw_pair() as (endpoint, peer),
    ):

        async def session() -> None:
            async with open_channel(endpoint, strict_handles=False) as channel:
                # Undelivered: a complete message with its fd.
                claims_one = encode_message(b"1", num_handles=1)
                await peer.send(claims_one, [undelivered.write_end.fileno()])
                # Unclaimed: a message whose second fd has not arrived.
                claims_two = encode_message(b"2", num_handles=2)
                await peer.send(claims_two, [unclaimed.write_end.fileno()])
                await trio.testing.wait_all_tasks_blocked()
                stats = channel.statistics()
                assert stats.receive_queue_messages == 1
                assert stats.unclaimed_handles == 1
                # Queued outgoing: behind a full socket.
                await fill_until_queued(channel)
                await channel.send(Message(b"3", (outgoing.write_end,)))
                raise KeyError

        with pytest.raises(KeyError):
            await session()
        undelivered.write_end.close()  # the copies the peer sent are gone too
        unclaimed.write_end.close()
        assert undelivered.all_writers_closed()
        assert unclaimed.all_writers_closed()
        assert outgoing.all_writers_closed()


# ----------------------------------------------------------------------
# aclose()


async def test_aclose_is_idempotent_and_closes_the_api() -> None:
    async with open_pair() as (left, right):
        await left.send(Message(b"last"))
        await left.aclose()
        await left.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await left.receive()
        with pipe_tagged(1) as pipes:
            with pytest.raises(trio.ClosedResourceError):
                await left.send(Message(b"late", pipes))
            # send() took ownership, and a closed channel closes what it gets.
            assert pipes[0].closed
        assert (await right.receive()).payload == b"last"
        with pytest.raises(trio.EndOfChannel):
            await right.receive()


async def test_aclose_when_already_cancelled_still_closes(
    pipe: WatchedPipe,
) -> None:
    w = pipe.write_end
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint, flush_timeout=None) as channel:
            await fill_until_queued(channel)
            await channel.send(Message(b"with fd", (w,)))
            with trio.CancelScope() as scope:
                scope.cancel()
                await channel.aclose()
            assert scope.cancelled_caught
            assert pipe.all_writers_closed()
            assert await peer.at_eof()
            await channel.aclose()  # and again: a no-op


async def test_aclose_cancelled_while_flushing_still_closes(
    pipe: WatchedPipe,
) -> None:
    w = pipe.write_end
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint, flush_timeout=None) as channel:
            await fill_until_queued(channel)
            await channel.send(Message(b"with fd", (w,)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.aclose)
                await trio.testing.wait_all_tasks_blocked()
                assert not pipe.all_writers_closed()  # still flushing
                nursery.cancel_scope.cancel()
            assert pipe.all_writers_closed()
            assert await peer.at_eof()


async def test_writes_racing_shutdown() -> None:
    # ShutDownStress: 500 writes, then aclose() while another task keeps
    # writing 1000 more.  Nothing crashes; every send either returned (and
    # its message is delivered, in order) or raised ClosedResourceError (and
    # its fds were closed); nothing partial reaches the peer.
    a, b = channel_pair()
    accepted: list[int] = []
    refused: list[int] = []
    with a, b, pipe_tagged(1500 // 50) as pipes:
        async with open_channel(b) as receiver:
            async with open_channel(a, send_queue_messages=64) as sender:

                async def write(start: int, stop: int) -> None:
                    for i in range(start, stop):
                        handles = (pipes[i // 50],) if i % 50 == 0 else ()
                        try:
                            await sender.send(Message(i.to_bytes(2, "little"), handles))
                        except trio.ClosedResourceError:
                            assert all(h.closed for h in handles)
                            refused.append(i)
                        else:
                            accepted.append(i)

                await write(0, 500)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write, 500, 1500)
                    nursery.start_soon(sender.aclose)
            got = []
            async for message in receiver:
                with message:
                    got.append(int.from_bytes(message.payload, "little"))
                    assert len(message.handles) == (1 if got[-1] % 50 == 0 else 0)
    assert got == accepted
    assert sorted(accepted + refused) == list(range(1500))
    assert accepted[:500] == list(range(500))
    assert refused  # the race really happened
    assert all(h.closed for h in pipes)


# ----------------------------------------------------------------------
# The error model


async def test_peer_vanishing_delivers_what_it_sent_before_failing() -> None:
    # PeerShutdownDuringRead with a backlog: the peer sends three messages
    # and dies without reading ours; our queued writes fail in the writer
    # task, yet all three messages are delivered before DisconnectedError.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await fill_until_queued(channel)
            for i in range(3):
                await peer.send(encode_message(bytes([i])))
            peer.close()
            await trio.testing.wait_all_tasks_blocked()
            for i in range(3):
                assert (await channel.receive()).payload == bytes([i])
            with pytest.raises(DisconnectedError, match="reset"):
                await channel.receive()
        # The writer's failure (EPIPE) is the same news: not raised again.


async def test_write_failure_seen_by_send_covers_the_read_side() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await fill_until_queued(channel)
            peer.close()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(DisconnectedError, match="sendmsg"):
                await channel.send(Message(b"too late"))
            # receive() still raises the read side's own failure if asked.
            with pytest.raises(DisconnectedError, match="recvmsg"):
                await channel.receive()


async def test_read_failure_unseen_after_send_saw_one_is_not_raised() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await fill_until_queued(channel)
            peer.close()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(DisconnectedError, match="sendmsg"):
                await channel.send(Message(b"too late"))


async def test_unseen_failure_is_raised_when_the_block_is_left() -> None:
    with raw_pair() as (endpoint, peer):

        async def session() -> None:
            async with open_channel(endpoint):
                await peer.send(b"\x10\x00\x00\x00\x10\x00\x09\x00" + bytes(8))
                assert await peer.at_eof()  # the channel failed; nobody asked

        with pytest.raises(MalformedMessageError, match="message_type=9") as info:
            await session()
        assert type(info.value) is MalformedMessageError  # not an ExceptionGroup
        assert isinstance(info.value.__cause__, MalformedMessageError)


async def test_unseen_write_failure_is_raised_when_the_block_is_left() -> None:
    with raw_pair() as (endpoint, peer):

        async def session() -> None:
            async with open_channel(endpoint) as channel:
                await fill_until_queued(channel)
                peer.close()
                await trio.testing.wait_all_tasks_blocked()

        with pytest.raises(DisconnectedError) as info:
            await session()
        assert type(info.value) is DisconnectedError
        assert isinstance(info.value.__cause__, OSError)


def internal_chain(error: BaseException) -> list[BaseException]:
    """``error``'s implicit context chain (``__context__``), innermost last."""
    chain = []
    seen = error.__context__
    while seen is not None:
        chain.append(seen)
        seen = seen.__context__
    return chain


async def test_errors_users_see_carry_no_internal_context() -> None:
    # Whatever receive()/send() raise is raised outside any internal
    # ``except`` block, so no trio.WouldBlock or EndOfChannel from the
    # machinery is chained onto it (the cause, when there is one, is the
    # explicit __cause__).
    async with open_pair() as (left, right):
        await left.aclose()
        with pytest.raises(trio.EndOfChannel) as ended:
            await right.receive()
        assert internal_chain(ended.value) == []
        await right.aclose()
        with pytest.raises(trio.ClosedResourceError) as closed:
            await right.receive()
        assert internal_chain(closed.value) == []
        with pytest.raises(trio.ClosedResourceError) as refused:
            await right.send(Message(b"late"))
        assert internal_chain(refused.value) == []
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            waiting = trio.CancelScope()
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    with waiting, pytest.raises(MalformedMessageError) as bad:
                        await channel.receive()  # waiting on the socket
                    assert internal_chain(bad.value) == []
                    assert isinstance(bad.value.__cause__, MalformedMessageError)

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                await peer.send(b"\x03\x00\x00\x00\x00\x00\x00\x00")
            with pytest.raises(MalformedMessageError) as again:
                await channel.receive()
            assert internal_chain(again.value) == []
            with pytest.raises(MalformedMessageError) as on_send:
                await channel.send(Message(b"x"))
            assert internal_chain(on_send.value) == []
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await fill_until_queued(channel)
            peer.close()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(DisconnectedError) as vanished:
                await channel.send(Message(b"too late"))
            assert internal_chain(vanished.value) == []
            with pytest.raises(DisconnectedError) as reset:
                await channel.receive()
            assert internal_chain(reset.value) == []


async def test_failure_seen_once_is_not_raised_again_on_exit() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await peer.send(b"\x03\x00\x00\x00\x00\x00\x00\x00")
            with pytest.raises(MalformedMessageError):
                await channel.receive()
        # Left without an exception: the user already had it.


async def test_body_exception_wins_over_a_channel_failure() -> None:
    with raw_pair() as (endpoint, peer):

        async def session() -> None:
            async with open_channel(endpoint):
                await peer.send(b"\x03\x00\x00\x00\x00\x00\x00\x00")
                assert await peer.at_eof()
                raise KeyError("the body's")

        with pytest.raises(KeyError, match="the body's"):
            await session()


async def test_internal_bug_in_the_reader_is_one_chained_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug inside the reader task (here: the decoder raising something it
    # never should) reaches receive() as one ChannelError, cause chained.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await peer.send(encode_message(b"fine"))
            assert (await channel.receive()).payload == b"fine"

            def broken(data: bytes, *limits: int) -> None:
                raise ZeroDivisionError("decoder bug")

            # (The reader task feeds receive_data; a receive() that reads on
            # its own task feeds receive_plain, then receive_batch.)
            monkeypatch.setattr(channel._decoder, "receive_data", broken)
            monkeypatch.setattr(channel._decoder, "receive_plain", broken)
            monkeypatch.setattr(channel._decoder, "receive_batch", broken)
            await peer.send(encode_message(b"boom"))
            with pytest.raises(ChannelError, match="reading failed") as info:
                await channel.receive()
            assert type(info.value) is ChannelError
            assert isinstance(info.value.__cause__, ZeroDivisionError)


async def test_internal_bug_in_the_writer_is_one_chained_exception(
    monkeypatch: pytest.MonkeyPatch, pipe: WatchedPipe
) -> None:
    w = pipe.write_end
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await fill_until_queued(channel)
            await channel.send(Message(b"with fd", (w,)))

            def broken() -> None:
                raise ZeroDivisionError("planner bug")

            monkeypatch.setattr(channel._encoder, "plan", broken)
            while not peer.nothing_pending():  # room: the writer task wakes up
                if not await peer.sock.recv(1 << 20):
                    break  # the end of the stream: the writer failed already
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ChannelError, match="writing failed") as info:
                await channel.send(Message(b"next"))
            assert type(info.value) is ChannelError
            assert isinstance(info.value.__cause__, ZeroDivisionError)
            assert pipe.all_writers_closed()  # the queued message was dropped
            # Not a disconnect: the socket was shut down for writing, so the
            # peer reads the end of the stream instead of waiting.
            assert await peer.sock.recv(1 << 20) == b""


# ----------------------------------------------------------------------
# statistics()


async def test_statistics_count_messages_bytes_and_handles() -> None:
    with pipe_tagged(5) as pipes:
        async with open_pair() as (left, right):
            stats = left.statistics()
            assert stats == type(stats)(*[0] * 12)
            await left.send(Message(b"abc"))
            await left.send(Message(b"", pipes[:2]))
            await left.send(Message(b"x" * 100, pipes[2:]))
            await right.send(Message(b"back"))
            for _ in range(3):
                with await right.receive():
                    pass
            assert (await left.receive()).payload == b"back"
            sent = left.statistics()
            assert (sent.messages_sent, sent.bytes_sent, sent.handles_sent) == (
                3,
                3 * 16 + 3 + 100,
                5,
            )
            assert (sent.messages_received, sent.bytes_received) == (1, 20)
            got = right.statistics()
            assert (got.messages_received, got.bytes_received) == (3, 3 * 16 + 103)
            assert got.handles_received == 5
            assert (got.messages_sent, got.bytes_sent, got.handles_sent) == (1, 20, 0)
            for s in (sent, got):
                assert s.send_queue_messages == s.send_queue_bytes == 0
                assert s.receive_queue_messages == s.receive_queue_bytes == 0
                assert s.read_buffer_bytes == s.unclaimed_handles == 0


async def test_statistics_queue_depths() -> None:
    async with open_pair(receive_queue_messages=3) as (left, right):
        for i in range(3):
            await left.send(Message(b"q" * (i + 1)))
        await trio.testing.wait_all_tasks_blocked()
        stats = right.statistics()
        assert (stats.receive_queue_messages, stats.receive_queue_bytes) == (3, 6)
        await right.receive()
        stats = right.statistics()
        assert (stats.receive_queue_messages, stats.receive_queue_bytes) == (2, 5)
        await fill_until_queued(left)
        stats = left.statistics()
        full = 16 + len(FILLER)
        # Whole queued messages, the first perhaps partly written already.
        assert stats.send_queue_messages >= 1
        assert (stats.send_queue_messages - 1) * full < stats.send_queue_bytes
        assert stats.send_queue_bytes <= stats.send_queue_messages * full
        # Drain, so that neither side closes with unread data (a reset).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.aclose)
            async for _ in right:
                pass


async def test_body_error_during_an_outer_cancellation_is_not_swallowed() -> None:
    # The body raises while an enclosing deadline cancels the block: the
    # channel's tasks see the cancellation too, and their Cancelled must not
    # replace the body's error.
    left, right = channel_pair()

    async def body() -> None:
        with trio.move_on_after(0.05):
            async with open_channel(left) as channel:
                try:
                    await channel.receive()
                finally:
                    raise KeyError("cleanup failed")

    try:
        with pytest.raises(KeyError, match="cleanup failed"):
            await body()
    finally:
        right.close()
