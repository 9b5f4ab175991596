"""Who owns a sent fd while it waits in the send queue, on every path.

``send`` moves each fd out of the caller's :class:`Handle` (which reads as
closed at once) into the send queue, as a bare number that no ``Handle``
owns.  A number has no ``__del__`` and no "closed" flag: these tests check
that every path closes each one exactly once (a second ``close`` of a
number is an ``EBADF``, or worse closes a file that reused the number), or
puts it back into the caller's own handle when ``send`` is cancelled.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from _fds import fd_is_open
from _helpers import RawPeer, pipe_tagged, raw_pair, read_tags

from trio_mojo import DisconnectedError, Endpoint, Handle, Message, open_channel


class _AbortError(Exception):
    """Raised in a channel's block: the channel aborts."""


@pytest.fixture
def null_fd() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def _handles(null_fd: int, count: int) -> tuple[list[Handle], list[int]]:
    handles = [Handle.dup(null_fd) for _ in range(count)]
    return handles, [h.fileno() for h in handles]


async def _assert_closed_once(numbers: list[int], null_fd: int) -> None:
    """Every fd of ``numbers`` is closed, and nothing closes it again.

    New fds take the freed numbers; if anything still held one of the old
    numbers and closed it later (the writer task, a garbage-collected
    object), the new file would be closed under us.
    """
    assert not any(map(fd_is_open, numbers))
    reused: list[int] = []
    try:
        while not set(numbers) <= set(reused):
            reused.append(os.dup(null_fd))
            assert len(reused) <= len(numbers) + 64, "the freed numbers are not free"
        gc.collect()
        await trio.testing.wait_all_tasks_blocked()
        assert all(map(fd_is_open, reused))
    finally:
        for fd in reused:
            os.close(fd)


async def test_fds_queued_behind_a_partial_write_are_closed_once_on_abort(
    null_fd: int,
) -> None:
    numbers: list[int] = []

    async def queue_then_abort(endpoint: Endpoint) -> None:
        async with open_channel(endpoint) as channel:
            # 4 MiB that the peer never reads: the kernel takes part of it,
            # the rest and everything after it stays queued.
            await channel.send(Message(bytes(4 << 20)))
            for round_ in range(2):
                for index in range(4):
                    handles, fds = _handles(null_fd, 3)
                    numbers.extend(fds)
                    await channel.send(Message(b"%d" % index, handles))
                    assert all(h.closed for h in handles)  # taken at once
                if round_ == 0:
                    # The writer moves these into its encoder; the next ones
                    # stay in the outbox, packed into one entry.
                    await trio.testing.wait_all_tasks_blocked()
            stats = channel.statistics()
            assert (stats.send_queue_messages, stats.send_queue_handles) == (9, 24)
            assert stats.handles_sent == 0
            assert all(map(fd_is_open, numbers))  # the queue's, still open
            raise _AbortError  # abort: no flush, every queued fd closed

    with (
        raw_pair() as (endpoint, _peer),
        trio.fail_after(10),
        pytest.raises(_AbortError),
    ):
        await queue_then_abort(endpoint)
    await _assert_closed_once(numbers, null_fd)


async def test_a_send_waiting_for_room_closes_its_fds_once_when_writing_fails(
    null_fd: int,
) -> None:
    failed: list[BaseException] = []

    async def send_then_lose_the_peer(endpoint: Endpoint, peer: RawPeer) -> None:
        async with open_channel(endpoint, send_queue_messages=1) as channel:
            await channel.send(Message(bytes(4 << 20)))  # part stays queued
            assert channel.statistics().send_queue_messages == 1
            handles, numbers = _handles(null_fd, 2)

            async def blocked_send() -> None:
                try:
                    await channel.send(Message(b"waits", handles))
                except DisconnectedError as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked_send)
                await trio.testing.wait_all_tasks_blocked()
                # send() took the fds, then waited for room.
                assert all(h.closed for h in handles)
                assert all(map(fd_is_open, numbers))
                peer.close()  # the writer fails (EPIPE), send() wakes
            # Refused: the fds went back into the caller's handles and were
            # closed through them.
            assert all(h.closed for h in handles)
            await _assert_closed_once(numbers, null_fd)

    with raw_pair() as (endpoint, peer), trio.fail_after(10):
        await send_then_lose_the_peer(endpoint, peer)
    assert len(failed) == 1  # (seen by send(): not raised again on exit)


async def test_a_send_cancelled_while_the_queue_holds_too_many_fds_keeps_them(
    null_fd: int,
) -> None:
    with raw_pair() as (endpoint, peer), trio.fail_after(10):
        async with (
            trio.open_nursery() as nursery,
            open_channel(endpoint, send_queue_handles=4) as channel,
        ):
            await channel.send(Message(bytes(4 << 20)))  # part stays queued
            queued, queued_numbers = _handles(null_fd, 4)
            await channel.send(Message(b"four fds", queued))
            assert channel.statistics().send_queue_handles == 4
            with pipe_tagged(2) as pipes:
                numbers = [h.fileno() for h in pipes]
                with trio.move_on_after(0.05) as scope:
                    await channel.send(Message(b"two more", pipes))  # waits
                assert scope.cancelled_caught
                # The same fds, in the same Handle objects, still working.
                assert [h.fileno() for h in pipes] == numbers
                assert read_tags(pipes) == [0, 1]
                stats = channel.statistics()
                assert (stats.send_queue_messages, stats.send_queue_handles) == (2, 4)
            nursery.start_soon(peer.at_eof)  # reads all until the channel closes
        assert channel.statistics().handles_sent == 4
    await _assert_closed_once(queued_numbers, null_fd)
