"""Control messages: upgrade offers are declined, stray answers ignored.

Chromium's ``ChannelPosix`` answers ``UPGRADE_OFFER`` with
``UPGRADE_REJECT`` (worked example E) and closes the offer's fds; stray
``UPGRADE_ACCEPT`` / ``UPGRADE_REJECT`` are dropped (conformance item 14).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing
from _helpers import WatchedPipe, raw_pair, watched_pipe

from trio_mojo import Message, MessageType, encode_message, open_channel

EXAMPLE_E = bytes.fromhex("10 00 00 00 10 00 04 00 00 00 00 00 00 00 00 00")
EXAMPLE_F = bytes.fromhex(
    "18 00 00 00 10 00 02 00 02 00 00 00 00 00 00 00 01 00 00 00 04 00 00 00"
)


@pytest.fixture
def pipe() -> Iterator[WatchedPipe]:
    with watched_pipe() as pipe:
        yield pipe


async def test_upgrade_offer_is_rejected_and_its_fds_closed(
    pipe: WatchedPipe,
) -> None:
    w = pipe.write_end.fileno()
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            # Example F: version 1, 4 pages, two fds (here: the pipe's write end twice).
            await peer.send(EXAMPLE_F, [w, w])
            assert await peer.recv_exactly(16) == EXAMPLE_E
            # Both fds the offer carried are closed: only our own is left.
            pipe.write_end.close()
            assert pipe.all_writers_closed()
            # The channel carries on normally, both ways.
            await peer.send(encode_message(b"after"))
            assert (await channel.receive()).payload == b"after"
            await channel.send(Message(b"reply"))
            assert await peer.recv_exactly(21) == encode_message(b"reply")
            # Statistics count wire messages, control messages included.
            stats = channel.statistics()
            assert (stats.messages_received, stats.bytes_received) == (2, 24 + 21)
            assert (stats.messages_sent, stats.bytes_sent) == (2, 16 + 21)


@pytest.mark.parametrize(
    "mtype", [MessageType.UPGRADE_ACCEPT, MessageType.UPGRADE_REJECT]
)
async def test_stray_upgrade_answers_are_ignored(
    mtype: MessageType, pipe: WatchedPipe
) -> None:
    w = pipe.write_end.fileno()
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await peer.send(encode_message(b"", type=mtype))
            await peer.send(encode_message(b"\x01", num_handles=1, type=mtype), [w])
            await peer.send(encode_message(b"next"))
            message = await channel.receive()
            assert (message.payload, message.handles) == (b"next", ())
            # Nothing was written back, and the stray fd was closed.
            await trio.testing.wait_all_tasks_blocked()
            assert peer.nothing_pending()
            pipe.write_end.close()
            assert pipe.all_writers_closed()


async def test_offer_flood_from_a_peer_that_never_reads_stays_bounded() -> None:
    # Each offer queues a reply; a peer that floods offers and reads nothing
    # must not grow our send queue beyond its bound: the channel stops
    # reading instead, and every offer still gets exactly one reply.
    offers = 20000
    limit = 8
    with raw_pair() as (endpoint, peer):
        async with (
            open_channel(
                endpoint, send_queue_messages=limit, flush_timeout=None
            ) as channel,
            trio.open_nursery() as nursery,
        ):
            offer = encode_message(b"", type=MessageType.UPGRADE_OFFER)
            nursery.start_soon(peer.send_all, offer * offers)
            await trio.testing.wait_all_tasks_blocked()
            stats = channel.statistics()
            assert 0 < stats.send_queue_messages <= limit
            assert stats.bytes_received < offers * 16  # it stopped reading
            replies = await peer.recv_exactly(offers * 16)
            assert replies == EXAMPLE_E * offers
            await trio.testing.wait_all_tasks_blocked()
            assert channel.statistics().send_queue_messages == 0
