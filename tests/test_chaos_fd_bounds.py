"""Found by the chaos tests: queues must be bounded in fds, not only bytes.

DESIGN rule 5 says every queue is bounded in messages, bytes *and fds*.
A message of 16 bytes carries up to 253 fds, so a queue counted in messages
and bytes only lets a peer multiply what we hold: these tests show that it
cannot, with a raw-socket peer (a hostile worker's view of the parent).
(Before ``receive_queue_handles`` and ``send_queue_handles`` a reader that
was behind held 7,680 fds for 1 KiB, and a broker 3,700 fds for 4,000
unread replies.)

The fix: ``receive_queue_handles`` and ``send_queue_handles`` options of
:func:`open_channel`, counted like the byte bounds.  The reader stops reading while the receive queue holds more fds
than its bound (the rest wait in the kernel, charged to the sender), and
``send`` waits while the send queue does (an empty queue still takes any
one message).  The broker then stops reading requests while its replies'
fds pile up, and a worker that never reads blocks itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from _fds import open_fds
from _helpers import raw_pair

from trio_mojo import (
    FileAccess,
    FileBroker,
    Handle,
    Message,
    channel_pair,
    encode_message,
    open_channel,
)
from trio_mojo._workers._broker import MAX_REQUEST_SIZE, encode_request

REQUESTS = 4000
HELD_AT_MOST = 2048
"""Peer-caused fds a channel may hold: a generous bound for any sane default
(fds held by the queue + the decoder's 506 unclaimed + one read's 128)."""


async def _settle(progress: Callable[[], int]) -> None:
    """Wait until ``progress()`` stops changing (the broker uses threads)."""
    last, still = -1, 0
    with trio.move_on_after(10):
        while still < 5:
            await trio.sleep(0.05)
            now = progress()
            still = still + 1 if now == last else 0
            last = now


@pytest.fixture
def pipe_end() -> Iterator[int]:
    """An fd the peer passes many times (each arrives as a new fd of ours)."""
    read_end, write_end = os.pipe()
    try:
        yield write_end
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_a_peer_cannot_make_a_slow_reader_hold_unbounded_fds(
    pipe_end: int,
) -> None:
    before = len(open_fds())
    with raw_pair() as (endpoint, peer), trio.fail_after(10):
        async with open_channel(endpoint) as channel:
            for _ in range(60):
                # One sendmsg per message: 128 fds, the most a conforming
                # peer sends at once (each is a new fd on arrival).
                with trio.move_on_after(0.5):
                    await peer.send(
                        encode_message(b"x", num_handles=128), [pipe_end] * 128
                    )
            await trio.testing.wait_all_tasks_blocked()
            held = len(open_fds()) - before
            peer.close()
            async for message in channel:  # drain (and close) what it holds
                message.close()
    assert held <= HELD_AT_MOST, f"a reader that is behind holds {held} peer fds"


async def test_send_waits_when_the_queue_holds_too_many_fds(pipe_end: int) -> None:
    before = len(open_fds())
    with raw_pair() as (endpoint, _peer), trio.CancelScope() as abort:
        async with open_channel(endpoint) as channel:
            with trio.move_on_after(2):
                for _ in range(40):  # the peer reads nothing
                    handles = [Handle.dup(pipe_end) for _ in range(128)]
                    await channel.send(Message(b"x", handles))
            held = len(open_fds()) - before
            abort.cancel()  # leave without flushing
    assert held <= HELD_AT_MOST, f"the send queue holds {held} fds"


async def test_a_worker_that_never_reads_broker_replies_cannot_make_the_parent_hoard_fds(
    tmp_path: Path,
) -> None:
    (tmp_path / "file.txt").write_bytes(b"content")
    broker = FileBroker([FileAccess.read_only(tmp_path)])
    request = encode_message(encode_request(tmp_path / "file.txt", "r"))
    parent_end, worker_end = channel_pair()
    worker = socket.socket(fileno=worker_end.detach())  # the hostile worker's end
    worker.setblocking(False)
    before = len(open_fds())
    with worker, trio.fail_after(30), trio.CancelScope() as abort:
        # The broker channel exactly as open_worker opens it.
        async with (
            open_channel(
                parent_end,
                max_handles_per_message=0,
                max_queued_handles=0,
                max_message_size=MAX_REQUEST_SIZE,
                flush_timeout=1.0,
            ) as channel,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(broker.serve, channel)
            with trio.move_on_after(5):  # a fixed parent stops reading: fine
                for _ in range(REQUESTS):
                    while True:
                        try:
                            worker.send(request)
                            break
                        except BlockingIOError:
                            await trio.sleep(0.01)
                    await trio.lowlevel.checkpoint()
            await _settle(lambda: broker.served + broker.refused)
            held = len(open_fds()) - before
            abort.cancel()  # leave without flushing
    assert held <= HELD_AT_MOST, f"the parent holds {held} fds for the worker"
