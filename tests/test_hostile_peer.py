"""A hostile peer on a raw socket: every way to break the protocol.

Each attack must end the same way: ``receive()`` raises
:class:`MalformedMessageError` (after the good messages that came first),
``send()`` refuses too, the peer is cut off at once (it reads the end of the
stream), every fd the peer passed is closed (a pipe whose write ends the
peer passed sees EOF once the block is left), and nothing leaks (the
autouse fixture checks ``/proc/self/fd``).
"""

from __future__ import annotations

import socket
import struct
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from _helpers import RawPeer, WatchedPipe, raw_pair, watched_pipe

from trio_mojo import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ChannelError,
    DisconnectedError,
    Framing,
    HandlePolicy,
    MalformedMessageError,
    Message,
    encode_message,
    open_channel,
)

Attack = Callable[[RawPeer, int, bytes], Awaitable[None]]
"""Sends the hostile bytes.  Gets the peer, an fd it may pass (any number of
times), and a prefix to put in front of its first write."""

BEFORE = encode_message(b"before")


def header(num_bytes: int, field4: int, mtype: int, num_handles: int = 0) -> bytes:
    """A 16-byte Mojo Header with arbitrary fields (field4: num_header_bytes)."""
    return struct.pack("<IHHH6x", num_bytes, field4, mtype, num_handles)


def legacy_header(num_bytes: int, num_handles: int = 0) -> bytes:
    return struct.pack("<IHH", num_bytes, num_handles, 0)


def ipcz_header(size: int, num_bytes: int, num_handles: int = 0) -> bytes:
    return struct.pack("<HHIq", size, num_handles, num_bytes, 0)


@pytest.fixture
def pipe() -> Iterator[WatchedPipe]:
    """A pipe whose write end the peer passes (any number of times)."""
    with watched_pipe() as pipe:
        yield pipe


async def assert_cut_off(
    attack: Attack,
    fd: int,
    *,
    match: str,
    error: type[ChannelError] = MalformedMessageError,
    before_in_same_write: bool = True,
    **options: Any,
) -> None:
    """Run ``attack`` against a fresh channel and check how the channel ends.

    With ``before_in_same_write`` a good message travels in the same
    ``sendmsg`` as the start of the attack and must still be delivered
    first; otherwise it is delivered before the attack starts.
    """
    before = encode_message(b"before", framing=options.get("framing", Framing.MOJO))
    with raw_pair() as (endpoint, peer), trio.fail_after(10):
        async with (
            open_channel(endpoint, **options) as channel,
            trio.open_nursery() as nursery,
        ):
            if before_in_same_write:
                nursery.start_soon(attack, peer, fd, before)
            else:
                await peer.send(before)
                assert (await channel.receive()).payload == b"before"
                nursery.start_soon(attack, peer, fd, b"")
            if before_in_same_write:
                assert (await channel.receive()).payload == b"before"
            with pytest.raises(error, match=match) as info:
                await channel.receive()
            assert info.value.__cause__ is not None
            with pytest.raises(error):
                await channel.receive()
            if error is MalformedMessageError:
                with pytest.raises(error):
                    await channel.send(Message(b"after"))
                # Cut off now, not when the block is left.
                assert await peer.at_eof()
        # Leaving the block raised nothing: the failure was already seen.


def sends(data: bytes, nfds: int = 0) -> Attack:
    """An attack that is one ``sendmsg`` of ``data`` with ``nfds`` fds."""

    async def attack(peer: RawPeer, fd: int, prefix: bytes) -> None:
        await peer.send(prefix + data, [fd] * nfds)

    return attack


def assert_fds_closed(pipe: WatchedPipe) -> None:
    """Every copy of the write end the peer passed was closed."""
    pipe.write_end.close()  # our own
    assert pipe.all_writers_closed(), "a write end the peer passed is still open"


# ----------------------------------------------------------------------
# Malformed headers

MALFORMED_HEADERS = {
    **{
        f"num_bytes={n}": (legacy_header(n), f"num_bytes={n} is below 8")
        for n in range(8)
    },
    "num_bytes-above-max": (header(4097, 16, 1) + b"x" * 8, "exceeds max_message_size"),
    "legacy-num_bytes-above-max": (legacy_header(4097), "exceeds max_message_size"),
    "num_header_bytes=0": (header(32, 0, 1), "num_header_bytes=0"),
    "num_header_bytes=15": (header(32, 15, 1), "num_header_bytes=15"),
    "num_header_bytes>num_bytes": (header(20, 24, 1), "num_header_bytes=24"),
    "num_handles=254": (header(16, 16, 1, 254), "num_handles=254 exceeds"),
    "num_handles=65535": (header(16, 16, 1, 65535), "num_handles=65535 exceeds"),
    "legacy-num_handles=254": (legacy_header(8, 254), "num_handles=254 exceeds"),
    "type=5": (header(16, 16, 5), "unknown message_type=5"),
    "type=0xffff": (header(16, 16, 0xFFFF), "unknown message_type=65535"),
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
async def test_malformed_header(case: str, pipe: WatchedPipe) -> None:
    data, match = MALFORMED_HEADERS[case]
    await assert_cut_off(
        sends(data), pipe.write_end.fileno(), match=match, max_message_size=4096
    )


IPCZ_MALFORMED = {
    "size=0": (ipcz_header(0, 16), "size=0"),
    "size=7": (ipcz_header(7, 16), "size=7"),
    "num_bytes<size": (ipcz_header(16, 15), "num_bytes=15"),
    "num_handles=254": (ipcz_header(16, 16, 254), "num_handles=254 exceeds"),
    "num_bytes-above-max": (ipcz_header(16, 4097), "exceeds max_message_size"),
}


@pytest.mark.parametrize("case", list(IPCZ_MALFORMED))
async def test_malformed_ipcz_header(case: str, pipe: WatchedPipe) -> None:
    data, match = IPCZ_MALFORMED[case]
    await assert_cut_off(
        sends(data),
        pipe.write_end.fileno(),
        match=match,
        framing=Framing.IPCZ,
        max_message_size=4096,
    )


async def test_huge_declared_size_fails_before_any_allocation(
    pipe: WatchedPipe,
) -> None:
    # num_bytes = 0xFFFFFFFF with a 256 MiB limit: rejected from the first 8
    # bytes, without buffering or allocating anything like the claimed size.
    tracemalloc.start()
    try:
        await assert_cut_off(
            sends(header(0xFFFFFFFF, 16, 1) + b"x" * 100),
            pipe.write_end.fileno(),
            match="num_bytes=4294967295 exceeds max_message_size=268435456",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("declared", "sent"), [(200 << 20, 1000), (DEFAULT_MAX_MESSAGE_SIZE, 1)]
)
async def test_declared_size_below_the_limit_is_not_preallocated(
    declared: int, sent: int
) -> None:
    # A header announcing 200 MiB or the largest size allowed, followed by
    # a trickle: the channel buffers only what arrived, then the peer
    # vanishes mid-message.
    with raw_pair() as (endpoint, peer):
        tracemalloc.start()
        try:
            async with open_channel(endpoint) as channel:
                await peer.send(header(declared, 16, 1) + b"x" * sent)
                await trio.testing.wait_all_tasks_blocked()
                assert channel.statistics().read_buffer_bytes == 16 + sent
                peer.sock.shutdown(socket.SHUT_WR)
                with pytest.raises(DisconnectedError, match="end of stream inside"):
                    await channel.receive()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


# ----------------------------------------------------------------------
# File-descriptor attacks


async def test_truncated_control_data_msg_ctrunc(pipe: WatchedPipe) -> None:
    # 200 fds in one sendmsg: more than the 128 a conforming peer sends and
    # our control buffer holds; the kernel truncates and closes the rest.
    await assert_cut_off(
        sends(encode_message(b"x", num_handles=200), nfds=200),
        pipe.write_end.fileno(),
        match="MSG_CTRUNC",
        before_in_same_write=False,  # that read's bytes are lost with it
    )
    assert_fds_closed(pipe)


async def test_bytes_that_promise_fds_never_sent(pipe: WatchedPipe) -> None:
    await assert_cut_off(
        sends(encode_message(b"payload", num_handles=2)),
        pipe.write_end.fileno(),
        match="num_handles=2, received=0",
    )


async def test_bytes_that_promise_more_fds_than_sent(pipe: WatchedPipe) -> None:
    await assert_cut_off(
        sends(encode_message(b"payload", num_handles=3), nfds=2),
        pipe.write_end.fileno(),
        match="num_handles=3, received=2",
    )
    assert_fds_closed(pipe)


async def test_promised_fds_missing_at_end_of_stream_non_strict(
    pipe: WatchedPipe,
) -> None:
    # Chromium's mode waits for missing fds; at EOF they never can come.
    async def attack(peer: RawPeer, fd: int, prefix: bytes) -> None:
        await peer.send(prefix + encode_message(b"payload", num_handles=1))
        peer.sock.shutdown(socket.SHUT_WR)

    await assert_cut_off(
        attack,
        pipe.write_end.fileno(),
        match="file descriptors are missing",
        strict_handles=False,
    )


async def test_unclaimed_fds_at_end_of_stream(pipe: WatchedPipe) -> None:
    async def attack(peer: RawPeer, fd: int) -> None:
        await peer.send(encode_message(b"claims none"), [fd, fd])
        peer.sock.shutdown(socket.SHUT_WR)

    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await attack(peer, pipe.write_end.fileno())
            assert (await channel.receive()).payload == b"claims none"
            with pytest.raises(MalformedMessageError, match="2 file descriptor"):
                await channel.receive()
    assert_fds_closed(pipe)


async def test_surplus_fds_beyond_the_queued_handles_cap(
    pipe: WatchedPipe,
) -> None:
    # fds riding on messages that declare none pile up unclaimed; holding
    # more than max_queued_handles (2 x 253) of them fails the channel once
    # the messages that came with them were delivered.
    async def attack(peer: RawPeer, fd: int) -> None:
        for _ in range(4):  # 4 x 128 = 512 > 506
            await peer.send(encode_message(b"claims none"), [fd] * 128)

    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack, peer, pipe.write_end.fileno())
                for _ in range(4):
                    assert (await channel.receive()).payload == b"claims none"
                with pytest.raises(MalformedMessageError, match="max_queued_handles"):
                    await channel.receive()
            assert channel.statistics().unclaimed_handles == 0
    assert_fds_closed(pipe)


async def test_fds_sent_without_bytes_never_arrive(pipe: WatchedPipe) -> None:
    # A zero-byte sendmsg with SCM_RIGHTS: Linux drops the fds (returns 0),
    # so they can never be attributed to the next message, which arrives
    # clean.  Nothing is leaked on either side.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            assert await peer.send(b"", [pipe.write_end.fileno()] * 10) == 0
            await peer.send(encode_message(b"declares none"))
            message = await channel.receive()
            assert (message.payload, message.handles) == (b"declares none", ())
            assert channel.statistics().unclaimed_handles == 0
            peer.sock.shutdown(socket.SHUT_WR)
            with pytest.raises(trio.EndOfChannel):
                await channel.receive()
    assert_fds_closed(pipe)


@pytest.mark.parametrize("declared", [0, 1])
async def test_fds_on_a_reject_handles_channel(
    declared: int, pipe: WatchedPipe
) -> None:
    # RejectHandles, receiving side: an arriving fd fails the channel at
    # once, whether or not a header claims it, and no message is delivered.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint, handle_policy=HandlePolicy.REJECT) as ch:
            await peer.send(
                encode_message(b"fd", num_handles=declared), [pipe.write_end.fileno()]
            )
            with pytest.raises(MalformedMessageError, match="REJECT"):
                await ch.receive()
            assert ch.statistics().messages_received == 0
            assert await peer.at_eof()
    assert_fds_closed(pipe)


async def test_declared_handles_on_a_reject_handles_channel(
    pipe: WatchedPipe,
) -> None:
    await assert_cut_off(
        sends(encode_message(b"x", num_handles=1)),
        pipe.write_end.fileno(),
        match="handle_policy is REJECT",
        handle_policy=HandlePolicy.REJECT,
    )


async def test_flood_of_fds(pipe: WatchedPipe) -> None:
    # The peer sends fds as fast as it can, one byte and 128 fds per write,
    # never completing a header.  The channel fails at the queued-handles
    # cap, cuts the peer off (its next write fails), and holds nothing.
    writes = 0

    async def flood(peer: RawPeer, fd: int) -> None:
        nonlocal writes
        try:
            while True:
                await peer.send(b"\x00", [fd] * 128)
                writes += 1
        except (BrokenPipeError, ConnectionResetError):
            pass

    with raw_pair() as (endpoint, peer), trio.fail_after(10):
        async with open_channel(endpoint) as channel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood, peer, pipe.write_end.fileno())
                with pytest.raises(MalformedMessageError, match="max_queued_handles"):
                    await channel.receive()
            # The flood ended because the channel shut the socket down.
            assert writes >= 4
            assert channel.statistics().unclaimed_handles == 0
    assert_fds_closed(pipe)


async def test_foreign_control_message(pipe: WatchedPipe) -> None:
    # Only SCM_RIGHTS may arrive.  SO_PASSCRED on our socket makes the kernel
    # add SCM_CREDENTIALS to every read: the fds next to them are closed.
    with raw_pair() as (endpoint, peer):
        probe = socket.socket(fileno=endpoint.fileno())
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        probe.detach()
        async with open_channel(endpoint) as channel:
            await peer.send(
                encode_message(b"x", num_handles=1), [pipe.write_end.fileno()]
            )
            with pytest.raises(MalformedMessageError, match="unexpected control"):
                await channel.receive()
            assert await peer.at_eof()
    assert_fds_closed(pipe)


# ----------------------------------------------------------------------
# A peer that vanishes is disconnected, not malformed


@pytest.mark.parametrize("partial", [1, 7, 8, 15, 16, 20])
async def test_end_of_stream_inside_a_message(partial: int, pipe: WatchedPipe) -> None:
    # Conformance 12: EOF mid-message is DisconnectedError and the partial
    # message is never delivered.
    async def attack(peer: RawPeer, fd: int, prefix: bytes) -> None:
        await peer.send(prefix + encode_message(b"x" * 10)[:partial])
        peer.sock.shutdown(socket.SHUT_WR)

    await assert_cut_off(
        attack,
        pipe.write_end.fileno(),
        match="end of stream inside",
        error=DisconnectedError,
    )


async def test_connection_reset(pipe: WatchedPipe) -> None:
    # The peer closes while our data sits unread in its buffer: ECONNRESET.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            await channel.send(Message(b"never read"))
            await peer.send(BEFORE)
            assert (await channel.receive()).payload == b"before"
            peer.close()
            with pytest.raises(DisconnectedError, match="reset") as info:
                await channel.receive()
            assert isinstance(info.value.__cause__, ConnectionResetError)
