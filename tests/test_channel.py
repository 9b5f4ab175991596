"""The channel as a transport: framing on a real socket, fds, order, volume.

Ports of Chromium's ``channel_unittest.cc`` (``mojo_spec.md`` section 7.1)
and the channel-level items of the conformance plan (section 7.4), over real
``socketpair`` s, with raw-socket peers where the exact bytes matter.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio
import trio.testing
from _helpers import fill_until_queued, open_pair, pipe_tagged, raw_pair, read_tags

from trio_mojo import (
    Channel,
    DisconnectedError,
    Framing,
    Handle,
    HandlePolicy,
    Message,
    MessageType,
    channel_pair,
    encode_message,
    open_channel,
)

EXAMPLE_A = bytes.fromhex("10 00 00 00 10 00 01 00 00 00 00 00 00 00 00 00")
EXAMPLE_B = bytes.fromhex(
    "15 00 00 00 10 00 01 00 00 00 00 00 00 00 00 00 68 65 6c 6c 6f"
)
EXAMPLE_C = bytes.fromhex(
    "18 00 00 00 10 00 01 00 02 00 00 00 00 00 00 00 01 02 03 04 05 06 07 08"
)
EXAMPLE_D = bytes.fromhex("0d 00 00 00 00 00 00 00 68 65 6c 6c 6f")


def ipcz_message(data: bytes, header_size: int, num_handles: int = 0) -> bytes:
    """An ipcz message with a ``header_size``-byte header (extra bytes 0xEE)."""
    header = struct.pack("<HHI", header_size, num_handles, header_size + len(data))
    return header + b"\xee" * (header_size - 8) + data


# ----------------------------------------------------------------------
# Basics


async def test_round_trip_and_clean_end_of_channel() -> None:
    async with open_pair() as (left, right):
        await left.send(Message(b"hello"))
        message = await right.receive()
        assert message.payload == b"hello"
        assert message.handles == ()
        assert message.type is MessageType.NORMAL
        await left.aclose()
        with pytest.raises(trio.EndOfChannel):
            await right.receive()
        with pytest.raises(trio.EndOfChannel):  # and it stays ended
            await right.receive()


async def test_async_iteration_stops_at_end_of_channel() -> None:
    async with open_pair() as (left, right):
        for i in range(5):
            await left.send(Message(bytes([i])))
        await left.aclose()
        assert [m.payload async for m in right] == [bytes([i]) for i in range(5)]


@pytest.mark.parametrize("size", [100, 100_000])  # copied next to the header, or not
async def test_a_queued_payload_is_a_snapshot(size: int) -> None:
    async with open_pair(receive_queue_messages=1) as (left, right):
        filled = await fill_until_queued(left)
        payload = bytearray(b"b" * size)
        await left.send(Message(payload))  # a snapshot is taken here
        assert left.statistics().send_queue_messages >= 2  # it waits in the queue
        payload[:6] = b"AFTER!"
        for _ in range(filled):
            await right.receive()
        assert (await right.receive()).payload == b"b" * size


# ----------------------------------------------------------------------
# The bytes on the wire (worked examples of mojo_spec.md section 2.9)


async def test_channel_writes_the_worked_examples_byte_for_byte() -> None:
    with raw_pair() as (endpoint, peer), pipe_tagged(3) as pipes:
        async with open_channel(endpoint) as channel:
            await channel.send(Message())
            assert await peer.recv_exactly(len(EXAMPLE_A)) == EXAMPLE_A
            await channel.send(Message(b"hello"))
            assert await peer.recv_exactly(len(EXAMPLE_B)) == EXAMPLE_B
            await channel.send(Message(bytes(range(1, 9)), pipes[:2]))
            data, fds = await peer.recv_with_fds(len(EXAMPLE_C))
            assert data == EXAMPLE_C
            assert read_tags(fds) == [0, 1]
            for fd in fds:
                fd.close()
            await channel.send(Message(b"hello", (), MessageType.NORMAL_LEGACY))
            assert await peer.recv_exactly(len(EXAMPLE_D)) == EXAMPLE_D
            await channel.send(Message(b"hello", pipes[2:], MessageType.NORMAL_LEGACY))
            data, fds = await peer.recv_with_fds(len(EXAMPLE_D))
            assert data == bytes.fromhex("0d 00 00 00 01 00 00 00 68 65 6c 6c 6f")
            assert read_tags(fds) == [2]
            fds[0].close()
        # The channel took ownership of the sent handles and closed them.
        assert all(h.closed for h in pipes)


async def test_ipcz_channel_writes_a_16_byte_header() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint, framing=Framing.IPCZ) as channel:
            await channel.send(Message(b"hello"))
            wire = await peer.recv_exactly(21)
            size, num_handles, num_bytes = struct.unpack_from("<HHI", wire)
            assert (size, num_handles, num_bytes) == (16, 0, 21)
            assert wire[16:] == b"hello"
            with pytest.raises(ValueError, match="IPCZ carries only NORMAL"):
                await channel.send(Message(b"", (), MessageType.NORMAL_LEGACY))


# ----------------------------------------------------------------------
# Ports of channel_unittest.cc


async def test_message_size_test_every_size_0_to_16383() -> None:
    # MessageSizeTest: every payload size up to 4 pages - 1 arrives intact
    # (partial reads, several messages per read, buffer growth).  Each size
    # gets its own fill byte so a framing slip cannot go unnoticed.
    sizes = range(4 * 4096)
    fill = [bytes([n % 251]) for n in range(251)]

    async with open_pair() as (left, right):

        async def sender() -> None:
            for n in sizes:
                await left.send(Message(fill[n % 251] * n))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            for n in sizes:
                payload = (await right.receive()).payload
                assert len(payload) == n
                assert payload == fill[n % 251] * n
        stats = right.statistics()
        assert stats.messages_received == len(sizes)
        assert stats.bytes_received == sum(sizes) + 16 * len(sizes)


async def test_peer_stress_test_3x1024_each_way_then_a_marker() -> None:
    # PeerStressTest: both ends REJECT handles, each sends 3 x 1024 empty
    # messages from three concurrent tasks, then a one-byte "!" marker; each
    # end must count exactly 3072 messages before the marker, and shutting
    # down must raise nothing on either side.
    async def side(channel: Channel, counted: list[int]) -> None:
        async def burst() -> None:
            for _ in range(1024):
                await channel.send(Message())

        async def count() -> None:
            n = 0
            async for message in channel:
                if message.payload == b"!":
                    break
                assert message.payload == b""
                n += 1
            counted.append(n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(count)
            async with trio.open_nursery() as senders:
                for _ in range(3):
                    senders.start_soon(burst)
            await channel.send(Message(b"!"))

    counts: list[int] = []
    with trio.fail_after(20):
        async with (
            open_pair(handle_policy=HandlePolicy.REJECT) as (left, right),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(side, left, counts)
            nursery.start_soon(side, right, counts)
    assert counts == [3072, 3072]


async def test_peer_shutdown_during_read_delivers_everything_first() -> None:
    # PeerShutdownDuringRead: the client writes, the server replies while the
    # client writes a second message and goes away.  Both client messages
    # reach the server before any error, even though the server's own write
    # to the departed client fails first.
    a, b = channel_pair()
    with a, b:
        async with open_channel(a) as server:
            async with open_channel(b) as client:
                await client.send(Message(b"first"))
                assert (await server.receive()).payload == b"first"
                await client.send(Message(b"second"))
            # The client is gone (it flushed "second" and closed).  The
            # server's write fails, yet "second" is still delivered.
            with pytest.raises(DisconnectedError):
                await server.send(Message(b"reply"))
            assert (await server.receive()).payload == b"second"
            with pytest.raises(trio.EndOfChannel):
                await server.receive()


async def test_reject_handles_refuses_to_send_fds_and_keeps_them_the_callers() -> None:
    # RejectHandles, sending side: nothing is queued, the caller keeps the fd.
    async with open_pair(handle_policy=HandlePolicy.REJECT) as (left, right):
        with pipe_tagged(1) as pipes:
            with pytest.raises(ValueError, match="REJECT"):
                await left.send(Message(b"fd", pipes))
            assert not pipes[0].closed
        await left.send(Message(b"after"))
        assert (await right.receive()).payload == b"after"
        assert left.statistics().messages_sent == 1


@pytest.mark.parametrize("header_size", [8, 16, 28])
async def test_ipcz_header_compatibility(header_size: int) -> None:
    # IpczHeaderCompatibilityTest: older (8), current (16) and newer (28)
    # headers are skipped by their declared size; the data is exactly what
    # follows the header.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint, framing=Framing.IPCZ) as channel:
            await peer.send(ipcz_message(b"a" * 100, header_size))
            message = await channel.receive()
            assert message.payload == b"a" * 100
            assert message.type is MessageType.NORMAL
            peer.sock.shutdown(trio.socket.SHUT_WR)
            with pytest.raises(trio.EndOfChannel):
                await channel.receive()


async def test_ipcz_short_final_message_is_delivered() -> None:
    # Example H with no data: an 8-byte message Chromium would strand below
    # its 16-byte parse threshold; ours parses from 8 bytes on.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint, framing=Framing.IPCZ) as channel:
            await peer.send(ipcz_message(b"", 8))
            assert (await channel.receive()).payload == b""


# ----------------------------------------------------------------------
# File descriptors


@pytest.mark.parametrize("count", [1, 127, 128, 129, 200, 253])
async def test_many_fds_in_one_message_arrive_intact_and_in_order(count: int) -> None:
    # More than 128 fds need several sendmsg calls, each with data bytes.
    with pipe_tagged(count) as pipes:
        inodes = [os.fstat(h.fileno()).st_ino for h in pipes]
        async with open_pair() as (left, right):
            await left.send(Message(b"fds", pipes))
            with await right.receive() as message:
                assert message.payload == b"fds"
                assert len(message.handles) == count
                assert [os.fstat(h.fileno()).st_ino for h in message.handles] == inodes
                assert read_tags(message.handles) == [i % 256 for i in range(count)]
            assert left.statistics().handles_sent == count
            assert right.statistics().handles_received == count
        assert all(h.closed for h in pipes)


async def test_more_than_253_fds_is_refused_before_queueing() -> None:
    async with open_pair() as (left, right):
        with pipe_tagged(254) as pipes:
            with pytest.raises(ValueError, match="at most 253 handles"):
                await left.send(Message(b"", pipes))
            assert not any(h.closed for h in pipes)
        await left.send(Message(b"next"))
        assert (await right.receive()).payload == b"next"


async def test_received_fds_are_close_on_exec() -> None:
    with pipe_tagged(3) as pipes:
        for pipe in pipes:
            os.set_inheritable(pipe.fileno(), True)  # the sender's copies are
        async with open_pair() as (left, right):
            await left.send(Message(b"", pipes))
            with await right.receive() as message:
                assert [os.get_inheritable(h.fileno()) for h in message.handles] == [
                    False
                ] * 3


async def test_invalid_handles_are_refused_before_queueing() -> None:
    async with open_pair() as (left, right):
        with pipe_tagged(2) as pipes:
            closed = Handle(os.dup(pipes[0].fileno()))
            closed.close()
            with pytest.raises(ValueError, match="closed handle"):
                await left.send(Message(b"", (pipes[0], closed)))
            with pytest.raises(ValueError, match="appears twice"):
                await left.send(Message(b"", (pipes[1], pipes[1])))
            with pytest.raises(TypeError, match="Handle objects"):
                await left.send(Message(b"", (pipes[0].fileno(),)))  # type: ignore[arg-type]
            assert not any(h.closed for h in pipes)
        with pytest.raises(TypeError, match=r"trio_mojo\.Message"):
            await left.send(b"bytes")  # type: ignore[arg-type]
        for reserved in (MessageType.UPGRADE_OFFER, MessageType.UPGRADE_REJECT):
            with pytest.raises(ValueError, match="reserved for the channel"):
                await left.send(Message(b"", (), reserved))
        await left.send(Message(b"ok"))
        assert (await right.receive()).payload == b"ok"
        assert left.statistics().messages_sent == 1


async def test_message_over_max_message_size_is_refused() -> None:
    async with open_pair(max_message_size=1024) as (left, right):
        await left.send(Message(b"x" * (1024 - 16)))  # exactly at the limit
        with pipe_tagged(1) as pipes:
            with pytest.raises(ValueError, match="max_message_size"):
                await left.send(Message(b"x" * (1024 - 15), pipes))
            assert not pipes[0].closed
        assert len((await right.receive()).payload) == 1024 - 16


# ----------------------------------------------------------------------
# Conformance plan (mojo_spec.md section 7.4), channel-level items


async def test_conformance_2_one_byte_at_a_time() -> None:
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            for i, byte in enumerate(EXAMPLE_B[:-1]):
                await peer.send(bytes([byte]))
                await trio.testing.wait_all_tasks_blocked()
                stats = channel.statistics()
                assert stats.receive_queue_messages == 0
                assert stats.read_buffer_bytes == i + 1
            await peer.send(EXAMPLE_B[-1:])
            assert (await channel.receive()).payload == b"hello"
            assert channel.statistics().read_buffer_bytes == 0


async def test_conformance_3_four_messages_in_one_write() -> None:
    with raw_pair() as (endpoint, peer), pipe_tagged(2) as pipes:
        async with open_channel(endpoint) as channel:
            wire = EXAMPLE_A + EXAMPLE_B + EXAMPLE_C + EXAMPLE_D
            await peer.send(wire, [h.fileno() for h in pipes])
            got = [await channel.receive() for _ in range(4)]
            assert [m.payload for m in got] == [
                b"",
                b"hello",
                bytes(range(1, 9)),
                b"hello",
            ]
            assert [len(m.handles) for m in got] == [0, 0, 2, 0]
            assert got[3].type is MessageType.NORMAL_LEGACY
            with got[2] as c:
                assert read_tags(c.handles) == [0, 1]


async def test_conformance_5_smallest_legacy_message_and_legacy_fds() -> None:
    # num_bytes = 8 with the legacy header: a valid, empty message.  And
    # Example D with one fd: legacy headers count handles in bytes 4-5.
    with raw_pair() as (endpoint, peer), pipe_tagged(1, first=7) as pipes:
        async with open_channel(endpoint) as channel:
            await peer.send(bytes.fromhex("08 00 00 00 00 00 00 00"))
            empty = await channel.receive()
            assert (empty.payload, empty.type) == (b"", MessageType.NORMAL_LEGACY)
            legacy_with_fd = bytes.fromhex("0d 00 00 00 01 00 00 00 68 65 6c 6c 6f")
            await peer.send(legacy_with_fd, [pipes[0].fileno()])
            with await channel.receive() as message:
                assert message.payload == b"hello"
                assert message.type is MessageType.NORMAL_LEGACY
                assert read_tags(message.handles) == [7]


async def test_conformance_6_extra_header_is_skipped() -> None:
    # num_header_bytes = 24: Chromium's read path skips the 8 extra bytes.
    with raw_pair() as (endpoint, peer):
        async with open_channel(endpoint) as channel:
            header = struct.pack("<IHHH6x", 24 + 3, 24, 1, 0)
            await peer.send(header + b"\xee" * 8 + b"abc")
            assert (await channel.receive()).payload == b"abc"


async def test_conformance_9_fds_arriving_after_their_message_non_strict() -> None:
    # With strict_handles=False (Chromium's behaviour) a complete message
    # waits for fds that arrive with a later write; later messages wait too.
    with raw_pair() as (endpoint, peer), pipe_tagged(2) as pipes:
        async with open_channel(endpoint, strict_handles=False) as channel:
            claims_two = encode_message(b"two", num_handles=2)
            await peer.send(claims_two + encode_message(b"later"))
            await trio.testing.wait_all_tasks_blocked()
            stats = channel.statistics()
            assert stats.receive_queue_messages == 0  # held back
            assert stats.read_buffer_bytes == len(claims_two) + 21
            await peer.send(encode_message(b"third"), [h.fileno() for h in pipes])
            with await channel.receive() as message:
                assert message.payload == b"two"
                assert read_tags(message.handles) == [0, 1]
            assert (await channel.receive()).payload == b"later"
            assert (await channel.receive()).payload == b"third"


async def test_conformance_10_surplus_fds_go_to_the_next_claiming_message() -> None:
    # Chromium's documented quirk: fds are a FIFO, not tied to messages.
    with raw_pair() as (endpoint, peer), pipe_tagged(1) as pipes:
        async with open_channel(endpoint) as channel:
            await peer.send(encode_message(b"none"), [pipes[0].fileno()])
            await peer.send(encode_message(b"one", num_handles=1))
            first = await channel.receive()
            assert (first.payload, first.handles) == (b"none", ())
            with await channel.receive() as second:
                assert second.payload == b"one"
                assert read_tags(second.handles) == [0]


async def test_conformance_15_backlog_after_eagain_arrives_once_in_order() -> None:
    # Fill the socket while the receiver is not reading, queue 1000 messages
    # (every tenth with an fd), then drain: all in order, fds attached once.
    count = 1000
    with pipe_tagged(count // 10) as pipes:
        async with open_pair(receive_queue_messages=1) as (left, right):
            filler = b"f" * 65536
            # The receiver's queue holds one message: everything else stays in
            # the kernel, then in the sender's queue.
            fillers = 0
            while left.statistics().send_queue_messages == 0:
                await left.send(Message(filler))
                fillers += 1
                await trio.testing.wait_all_tasks_blocked()
            backlog = left.statistics().send_queue_messages
            for i in range(count):
                handles = (pipes[i // 10],) if i % 10 == 0 else ()
                await left.send(Message(i.to_bytes(4, "little"), handles))
            await trio.testing.wait_all_tasks_blocked()
            assert left.statistics().send_queue_messages == backlog + count
            for _ in range(fillers):
                assert (await right.receive()).payload == filler
            tags = []
            for i in range(count):
                with await right.receive() as message:
                    assert message.payload == i.to_bytes(4, "little")
                    assert len(message.handles) == (1 if i % 10 == 0 else 0)
                    tags += read_tags(message.handles)
            assert tags == list(range(count // 10))
            assert right.statistics().handles_received == count // 10
            assert left.statistics().send_queue_messages == 0


async def test_conformance_17_one_mebibyte_message_with_fair_reading() -> None:
    # A 1 MiB message arrives intact, and while it is read the reader yields
    # to other tasks at least every 256 KiB (Mojo's kMaxBatchReadCapacity),
    # even when the whole message is already waiting in the kernel.
    payload = bytes(range(256)) * 4096
    wire = encode_message(payload)
    with raw_pair() as (endpoint, peer):
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * len(wire))
        if peer.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * len(wire):
            pytest.skip("cannot make a socket buffer that holds 1 MiB")
        await peer.send_all(wire)  # all of it sits in the kernel now
        observed: set[int] = set()
        async with open_channel(endpoint) as channel:

            async def watch() -> None:
                while True:
                    observed.add(channel.statistics().bytes_received)
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                message = await channel.receive()
                nursery.cancel_scope.cancel()
    assert message.payload == payload
    # Other tasks ran between the 256 KiB batches of this one message.  The
    # reader takes four batches to reach 1 MiB; the watcher runs once per
    # scheduler batch, before or after the reader, so it sees at least two
    # of the four intermediate counts (none if the reader never yielded).
    assert len({n for n in observed if 0 < n < len(wire)}) >= 2


async def test_conformance_20_concurrent_senders_never_interleave() -> None:
    tasks, per_task = 8, 200
    sizes = [1, 100, 5000, 70000]  # small, inline, large (payload not copied)

    async with open_pair(send_queue_messages=16) as (left, right):

        async def sender(task: int) -> None:
            for i in range(per_task):
                size = sizes[(task + i) % len(sizes)]
                await left.send(Message(bytes([task]) * size))

        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                nursery.start_soon(sender, task)
            seen = [0] * tasks
            for _ in range(tasks * per_task):
                payload = (await right.receive()).payload
                task = payload[0]
                assert payload == bytes([task]) * sizes[(task + seen[task]) % 4]
                seen[task] += 1
            assert seen == [per_task] * tasks
