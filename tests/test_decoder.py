"""MessageDecoder (``_decoder.py``): parsing, chunking, fd matching, validation."""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from _core_support import (
    EXAMPLE_IDS,
    EXAMPLES,
    MOJO_EXAMPLES,
    FdFactory,
    WireExample,
    drain,
)
from _fds import fd_is_open
from hypothesis import given
from hypothesis import strategies as st

from trio_mojo import (
    END_OF_STREAM,
    NEED_DATA,
    ChannelError,
    DisconnectedError,
    Framing,
    Handle,
    HandlePolicy,
    MalformedMessageError,
    Message,
    MessageDecoder,
    MessageType,
    encode_message,
)
from trio_mojo._core._decoder import MAX_BUFFERED_WHILE_WAITING
from trio_mojo._handles import close_all

LEGACY = struct.Struct("<IHH")  # num_bytes, num_handles, type
NORMAL = struct.Struct("<IHHH6x")  # num_bytes, num_header_bytes, type, num_handles
IPCZ = struct.Struct("<HHIq")  # size, num_handles, num_bytes, timestamp
MiB = 1024 * 1024


@pytest.fixture
def fds() -> Iterator[FdFactory]:
    with FdFactory() as factory:
        yield factory


def normal(
    payload: bytes = b"",
    *,
    num_handles: int = 0,
    mtype: int = 1,
    header_bytes: int = 16,
    num_bytes: int | None = None,
) -> bytes:
    """A 16-byte Header (with any field values) followed by ``payload``."""
    if num_bytes is None:
        num_bytes = 16 + len(payload)
    return NORMAL.pack(num_bytes, header_bytes, mtype, num_handles) + payload


def legacy(
    payload: bytes = b"", *, num_handles: int = 0, num_bytes: int | None = None
) -> bytes:
    if num_bytes is None:
        num_bytes = 8 + len(payload)
    return LEGACY.pack(num_bytes, num_handles, 0) + payload


def ipcz(
    data: bytes = b"",
    *,
    size: int = 16,
    num_handles: int = 0,
    num_bytes: int | None = None,
) -> bytes:
    """An IpczHeader of ``size`` bytes (fields beyond 16 are filler) + data."""
    if num_bytes is None:
        num_bytes = size + len(data)
    header = IPCZ.pack(size, num_handles, num_bytes, 0x0123456789)
    header = (header + bytes(range(0x80, 0x80 + 64)))[: max(size, 8)]
    return header + data


def expect_message(
    event: object, payload: bytes, mtype: MessageType, handles: Sequence[Handle] = ()
) -> Message:
    assert isinstance(event, Message), event
    assert event.payload == payload
    assert type(event.payload) is bytes
    assert event.type is mtype
    assert len(event.handles) == len(handles)
    assert all(got is sent for got, sent in zip(event.handles, handles, strict=True))
    return event


# ---------------------------------------------------------------------------
# Worked examples, whole and in pieces


@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_decode_worked_example(example: WireExample, fds: FdFactory) -> None:
    decoder = MessageDecoder(framing=example.framing)
    handles = fds.make(example.num_handles)
    decoder.receive_handles(handles)
    decoder.receive_data(example.wire)
    message = expect_message(
        decoder.next_message(), example.payload, example.type, handles
    )
    assert decoder.next_message() is NEED_DATA
    assert decoder.buffered_bytes == 0
    assert decoder.queued_handles == 0
    decoder.receive_eof()
    assert decoder.next_message() is END_OF_STREAM
    assert all(not h.closed for h in message.handles)  # now the caller's
    message.close()


@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_worked_example_one_byte_at_a_time(
    example: WireExample, fds: FdFactory
) -> None:
    decoder = MessageDecoder(framing=example.framing)
    handles = fds.make(example.num_handles)
    decoder.receive_handles(handles)
    for index in range(len(example.wire) - 1):
        decoder.receive_data(example.wire[index : index + 1])
        assert decoder.next_message() is NEED_DATA, index
        assert decoder.buffered_bytes == index + 1
    decoder.receive_data(example.wire[-1:])
    expect_message(decoder.next_message(), example.payload, example.type, handles)
    assert decoder.next_message() is NEED_DATA
    decoder.receive_eof()
    assert decoder.next_message() is END_OF_STREAM


@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_worked_example_split_at_every_offset(
    example: WireExample, fds: FdFactory
) -> None:
    for offset in range(len(example.wire) + 1):
        decoder = MessageDecoder(framing=example.framing)
        handles = fds.make(example.num_handles)
        decoder.receive_handles(handles)
        decoder.receive_data(example.wire[:offset])
        first, marker = drain(decoder)
        assert marker is NEED_DATA
        decoder.receive_data(example.wire[offset:])
        second, marker = drain(decoder)
        assert marker is NEED_DATA
        assert len(first) + len(second) == 1, offset
        assert len(first) == (offset == len(example.wire))
        expect_message((first + second)[0], example.payload, example.type, handles)
        decoder.receive_eof()
        assert decoder.next_message() is END_OF_STREAM


def test_example_b_one_byte_at_a_time_delivers_after_byte_21() -> None:
    (b,) = (e for e in EXAMPLES if e.name.startswith("B-"))
    decoder = MessageDecoder()
    deliveries: list[tuple[int, bytes]] = []
    for index, byte in enumerate(b.wire, start=1):
        decoder.receive_data(bytes([byte]))
        messages, _ = drain(decoder)
        deliveries.extend((index, m.payload) for m in messages)
    assert deliveries == [(21, b"hello")]


def test_many_messages_in_one_chunk_with_their_fds_queued_first(
    fds: FdFactory,
) -> None:
    decoder = MessageDecoder()
    handles = {e.name: fds.make(e.num_handles) for e in MOJO_EXAMPLES}
    for example in MOJO_EXAMPLES:
        decoder.receive_handles(handles[example.name])
    assert decoder.queued_handles == 5
    decoder.receive_data(b"".join(e.wire for e in MOJO_EXAMPLES))
    messages, marker = drain(decoder)
    assert marker is NEED_DATA
    assert len(messages) == len(MOJO_EXAMPLES)
    for message, example in zip(messages, MOJO_EXAMPLES, strict=True):
        expect_message(message, example.payload, example.type, handles[example.name])
    assert decoder.queued_handles == 0
    assert decoder.buffered_bytes == 0


def test_spec_plan_abcd_in_one_read(fds: FdFactory) -> None:
    # mojo_spec.md 7.4 item 3: A+B+C+D concatenated, C's fds queued first.
    a, b, c, d = (next(e for e in EXAMPLES if e.name[0] == k) for k in "ABCD")
    fd_a, fd_b = fds.make(2)
    decoder = MessageDecoder()
    decoder.receive_handles([fd_a, fd_b])
    decoder.receive_data(a.wire + b.wire + c.wire + d.wire)
    messages, _ = drain(decoder)
    assert [m.payload for m in messages] == [b"", b"hello", c.payload, b"hello"]
    assert messages[2].handles == (fd_a, fd_b)
    assert [m.handles for m in (messages[0], messages[1], messages[3])] == [()] * 3


def _three_message_stream() -> tuple[bytes, list[tuple[int, int]]]:
    """Examples B, C, D+fd back to back: (stream, [(start, num_handles)])."""
    parts = [e for e in EXAMPLES if e.name in ("B-normal-hello", "C-normal-two-fds")]
    parts += [e for e in EXAMPLES if e.name == "D-legacy-hello-one-fd"]
    starts = list(itertools.accumulate((len(p.wire) for p in parts), initial=0))
    stream = b"".join(p.wire for p in parts)
    return stream, [(s, p.num_handles) for s, p in zip(starts, parts, strict=False)]


def test_three_message_stream_split_at_every_pair_of_offsets(
    fds: FdFactory,
) -> None:
    # Each message's fds are queued just before the chunk holding its first
    # byte, as the kernel delivers them.
    stream, layout = _three_message_stream()
    expected = [
        (b"hello", MessageType.NORMAL),
        (bytes(range(1, 9)), MessageType.NORMAL),
        (b"hello", MessageType.NORMAL_LEGACY),
    ]
    for cut1 in range(len(stream) + 1):
        for cut2 in range(cut1, len(stream) + 1):
            decoder = MessageDecoder()
            sent = [fds.make(n) for _, n in layout]
            got: list[Message] = []
            for lo, hi in ((0, cut1), (cut1, cut2), (cut2, len(stream))):
                for (start, _), handles in zip(layout, sent, strict=True):
                    if lo <= start < hi:
                        decoder.receive_handles(handles)
                decoder.receive_data(stream[lo:hi])
                got += drain(decoder)[0]
            assert len(got) == 3, (cut1, cut2)
            for message, (payload, mtype), handles in zip(
                got, expected, sent, strict=True
            ):
                expect_message(message, payload, mtype, handles)
            decoder.receive_eof()
            assert decoder.next_message() is END_OF_STREAM
            for message in got:
                message.close()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_receive_data_accepts_any_bytes_like(kind: type[Any]) -> None:
    decoder = MessageDecoder()
    source = bytearray(encode_message(b"payload"))
    decoder.receive_data(kind(source))
    source[16:] = b"changed"  # the decoder kept its own copy
    expect_message(decoder.next_message(), b"payload", MessageType.NORMAL)


def test_empty_inputs_are_no_ops() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(b"")
    decoder.receive_handles([])
    assert decoder.buffered_bytes == 0
    assert decoder.next_message() is NEED_DATA
    decoder.receive_eof()
    decoder.receive_eof()  # idempotent
    assert decoder.next_message() is END_OF_STREAM
    assert decoder.next_message() is END_OF_STREAM  # and it stays there


def test_markers_have_readable_reprs() -> None:
    assert repr(NEED_DATA) == "trio_mojo.NEED_DATA"
    assert repr(END_OF_STREAM) == "trio_mojo.END_OF_STREAM"


def test_partial_message_stays_buffered_across_feeds() -> None:
    decoder = MessageDecoder()
    wire = encode_message(b"abc") + encode_message(b"defg")
    decoder.receive_data(wire[:20])  # first message + 1 byte of the second
    expect_message(decoder.next_message(), b"abc", MessageType.NORMAL)
    assert decoder.buffered_bytes == 1
    assert decoder.next_message() is NEED_DATA
    decoder.receive_data(wire[20:])
    expect_message(decoder.next_message(), b"defg", MessageType.NORMAL)
    assert decoder.buffered_bytes == 0


def test_large_message_in_chunks_is_collected_then_joined() -> None:
    # A chunk ending inside a message whose header is in switches the decoder
    # to collecting the missing bytes; check that collecting, joining and
    # carrying the rest of the last chunk over keep the bytes intact.
    big = bytes(range(256)) * 400  # 102 400 bytes
    small = b"tail message"
    wire = encode_message(big) + encode_message(small) + encode_message(b"last")
    decoder = MessageDecoder()
    cuts = [0, 70_000, 71_000, len(wire) - 30, len(wire) - 10, len(wire)]
    got: list[Message] = []
    for lo, hi in itertools.pairwise(cuts):
        decoder.receive_data(wire[lo:hi])
        got += drain(decoder)[0]
        assert decoder.buffered_bytes == hi - sum(16 + len(m.payload) for m in got)
    assert [m.payload for m in got] == [big, small, b"last"]


def test_many_small_feeds_of_a_large_message() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    wire = encode_message(payload)
    decoder = MessageDecoder()
    for offset in range(0, len(wire), 1000):
        assert decoder.next_message() is NEED_DATA
        decoder.receive_data(memoryview(wire)[offset : offset + 1000])
    expect_message(decoder.next_message(), payload, MessageType.NORMAL)


def test_extra_header_bytes_are_skipped() -> None:
    # mojo_spec.md 7.4 item 6: num_header_bytes = 24 on the read path is
    # accepted and the 8 extra bytes are skipped (Chromium behaviour).
    decoder = MessageDecoder()
    decoder.receive_data(normal(b"EXTRAHDRdata", header_bytes=24))
    expect_message(decoder.next_message(), b"data", MessageType.NORMAL)


def test_header_size_may_equal_num_bytes() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(normal(bytes(8), header_bytes=24))
    expect_message(decoder.next_message(), b"", MessageType.NORMAL)


def test_padding_bytes_are_ignored() -> None:
    wire = bytearray(encode_message(b"x"))
    wire[10:16] = b"\xff" * 6
    decoder = MessageDecoder()
    decoder.receive_data(wire)
    expect_message(decoder.next_message(), b"x", MessageType.NORMAL)


def test_smallest_legacy_message_is_accepted() -> None:
    # mojo_spec.md 7.4 item 5: num_bytes = 8 with the legacy header is OK.
    decoder = MessageDecoder()
    decoder.receive_data(legacy())
    expect_message(decoder.next_message(), b"", MessageType.NORMAL_LEGACY)


@pytest.mark.parametrize("size", [8, 16, 28])
def test_ipcz_header_sizes_are_accepted(size: int) -> None:
    # Chromium's IpczHeaderCompatibilityTest: sizes 8, 16 and 16 + 12, each
    # followed by 100 bytes of 'a'.
    decoder = MessageDecoder(framing=Framing.IPCZ)
    decoder.receive_data(ipcz(b"a" * 100, size=size))
    expect_message(decoder.next_message(), b"a" * 100, MessageType.NORMAL)


def test_ipcz_short_message_parses_from_8_bytes_by_default() -> None:
    (h,) = (e for e in EXAMPLES if e.name.startswith("H-"))
    decoder = MessageDecoder(framing=Framing.IPCZ)
    decoder.receive_data(h.wire[:8])
    assert decoder.next_message() is NEED_DATA
    empty = ipcz(size=8)  # 8 bytes: a whole message with no data
    decoder.receive_data(h.wire[8:] + empty)
    expect_message(decoder.next_message(), b"hi", MessageType.NORMAL)
    expect_message(decoder.next_message(), b"", MessageType.NORMAL)
    decoder.receive_eof()
    assert decoder.next_message() is END_OF_STREAM


def test_ipcz_chromium_threshold_waits_for_16_bytes() -> None:
    # With Chromium's threshold of 16 an 8-byte message is stranded until
    # more bytes arrive (mojo_spec.md 3.2 quirk).
    decoder = MessageDecoder(framing=Framing.IPCZ, ipcz_parse_threshold=16)
    decoder.receive_data(ipcz(size=8))
    assert decoder.next_message() is NEED_DATA
    assert decoder.buffered_bytes == 8
    decoder.receive_data(ipcz(b"more", size=16))
    expect_message(decoder.next_message(), b"", MessageType.NORMAL)
    expect_message(decoder.next_message(), b"more", MessageType.NORMAL)


@pytest.mark.parametrize(
    "mtype",
    [MessageType.UPGRADE_OFFER, MessageType.UPGRADE_ACCEPT, MessageType.UPGRADE_REJECT],
)
def test_control_messages_are_surfaced(mtype: MessageType, fds: FdFactory) -> None:
    # The decoder does not answer them: it hands them up (with their fds) so
    # the channel can reply UPGRADE_REJECT and close the fds.
    decoder = MessageDecoder()
    handles = fds.make(2)
    decoder.receive_handles(handles)
    decoder.receive_data(
        encode_message(b"\x01\0\0\0\x04\0\0\0", num_handles=2, type=mtype)
    )
    message = expect_message(
        decoder.next_message(), b"\x01\0\0\0\x04\0\0\0", mtype, handles
    )
    message.close()
    assert all(h.closed for h in handles)


def test_max_message_size_boundary_is_inclusive() -> None:
    decoder = MessageDecoder(max_message_size=100)
    decoder.receive_data(encode_message(bytes(84)))
    expect_message(decoder.next_message(), bytes(84), MessageType.NORMAL)
    decoder.receive_data(encode_message(bytes(85)))
    with pytest.raises(
        MalformedMessageError, match="num_bytes=101 exceeds max_message_size=100"
    ):
        decoder.next_message()


def test_253_handles_are_accepted(fds: FdFactory) -> None:
    decoder = MessageDecoder()
    handles = fds.make(253)
    decoder.receive_handles(handles[:128])
    decoder.receive_handles(handles[128:])
    decoder.receive_data(encode_message(b"x", num_handles=253))
    expect_message(decoder.next_message(), b"x", MessageType.NORMAL, handles)


def test_chromium_limits_when_hardening_is_off(fds: FdFactory) -> None:
    decoder = MessageDecoder(
        max_message_size=None, max_handles_per_message=None, max_queued_handles=None
    )
    assert decoder.max_message_size == 2**32 - 1
    assert decoder.max_handles_per_message == 65535
    assert decoder.max_queued_handles is None
    handles = fds.make(600)
    decoder.receive_handles(handles)
    decoder.receive_data(legacy(num_handles=300) + normal(b"z", num_handles=300))
    expect_message(
        decoder.next_message(), b"", MessageType.NORMAL_LEGACY, handles[:300]
    )
    expect_message(decoder.next_message(), b"z", MessageType.NORMAL, handles[300:])
    # A 4 GiB header is merely waited on, as Chromium does (no allocation).
    decoder.receive_data(normal(num_bytes=2**32 - 1))
    assert decoder.next_message() is NEED_DATA


# ---------------------------------------------------------------------------
# Handles: matching, waiting (Chromium mode), surplus


def test_fds_arriving_late_are_waited_for_in_chromium_mode(fds: FdFactory) -> None:
    # mojo_spec.md 7.4 item 9: delivered after the fds arrive, not before;
    # later messages are held back until then.
    decoder = MessageDecoder(strict_handles=False)
    first, second = fds.make(1), fds.make(1)
    decoder.receive_handles(first)
    decoder.receive_data(encode_message(b"one", num_handles=2) + encode_message(b"two"))
    assert decoder.next_message() is NEED_DATA
    assert decoder.next_message() is NEED_DATA
    decoder.receive_handles(second)
    expect_message(decoder.next_message(), b"one", MessageType.NORMAL, first + second)
    expect_message(decoder.next_message(), b"two", MessageType.NORMAL)


def test_surplus_fds_go_to_the_next_message_that_claims_some(fds: FdFactory) -> None:
    # mojo_spec.md 7.4 item 10, the documented Chromium quirk.
    decoder = MessageDecoder()
    handles = fds.make(3)
    decoder.receive_handles(handles)
    decoder.receive_data(
        encode_message(b"a", num_handles=1)
        + encode_message(b"b")
        + encode_message(b"c", num_handles=2)
    )
    expect_message(decoder.next_message(), b"a", MessageType.NORMAL, handles[:1])
    expect_message(decoder.next_message(), b"b", MessageType.NORMAL)
    expect_message(decoder.next_message(), b"c", MessageType.NORMAL, handles[1:])


def test_fds_are_counted_against_the_cap_only_after_their_data_is_parsed(
    fds: FdFactory,
) -> None:
    # A correct sender can have a 253-fd message in progress while the rest
    # of its bytes and two more 127-fd batches arrive: 507 fds are queued
    # for a moment, but the same read completes the first message.
    decoder = MessageDecoder()
    first, second, third = fds.make(253), fds.make(127), fds.make(127)
    big = encode_message(b"big", num_handles=253)
    decoder.receive_handles(first)
    decoder.receive_data(big[:5])
    assert decoder.next_message() is NEED_DATA
    decoder.receive_handles(second)
    decoder.receive_handles(third)
    assert decoder.queued_handles == 507
    decoder.receive_data(
        big[5:]
        + encode_message(b"two", num_handles=127)
        + encode_message(b"three", num_handles=127)[:3]
    )
    expect_message(decoder.next_message(), b"big", MessageType.NORMAL, first)
    expect_message(decoder.next_message(), b"two", MessageType.NORMAL, second)
    assert decoder.next_message() is NEED_DATA  # 127 queued: fine
    decoder.receive_data(encode_message(b"three", num_handles=127)[3:])
    expect_message(decoder.next_message(), b"three", MessageType.NORMAL, third)


def test_cap_on_queued_fds_is_inclusive(fds: FdFactory) -> None:
    decoder = MessageDecoder()
    decoder.receive_handles(fds.make(506))
    assert decoder.next_message() is NEED_DATA
    decoder.receive_handles(fds.make(1))
    with pytest.raises(MalformedMessageError, match="507 unclaimed"):
        decoder.next_message()
    assert all(h.closed for h in fds.made)


def test_unclaimed_fds_at_eof_are_closed_in_chromium_mode(fds: FdFactory) -> None:
    decoder = MessageDecoder(strict_handles=False)
    handles = fds.make(2)
    decoder.receive_handles(handles)
    decoder.receive_eof()
    assert decoder.next_message() is END_OF_STREAM
    assert all(h.closed for h in handles)
    assert decoder.queued_handles == 0


def test_close_closes_queued_fds_and_drops_bytes(fds: FdFactory) -> None:
    decoder = MessageDecoder()
    handles = fds.make(3)
    numbers = [h.fileno() for h in handles]
    decoder.receive_handles(handles)
    decoder.receive_data(b"partial")
    decoder.close()
    decoder.close()  # idempotent
    assert all(h.closed for h in handles)
    assert not any(fd_is_open(n) for n in numbers)
    assert decoder.buffered_bytes == 0
    assert decoder.queued_handles == 0


def test_receive_after_eof_is_a_programming_error(fds: FdFactory) -> None:
    decoder = MessageDecoder()
    decoder.receive_eof()
    with pytest.raises(RuntimeError, match=r"receive_data\(\) after receive_eof\(\)"):
        decoder.receive_data(b"x")
    (late,) = fds.make(1)
    with pytest.raises(
        RuntimeError, match=r"receive_handles\(\) after receive_eof\(\)"
    ):
        decoder.receive_handles([late])
    assert late.closed  # the decoder took ownership, then closed it
    assert not decoder.failed


# ---------------------------------------------------------------------------
# Validation tables (mojo_spec.md 3.1 and 3.2) and our hardening.  Each row
# queues ``fds`` real fds first (so we can check that they get closed), feeds
# ``data`` (and EOF if asked) and drains the decoder.


@dataclass(frozen=True)
class Row:
    data: bytes
    match: str
    error: type[ChannelError] = MalformedMessageError
    fds: int = 2
    eof: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def _rows() -> Iterator[Any]:
    # -- 3.1 row 1: num_bytes < 8 (legacy and normal type)
    for mtype in (0, 1):
        for num_bytes in range(8):
            yield pytest.param(
                Row(
                    LEGACY.pack(num_bytes, 0, mtype),
                    rf"invalid message size: num_bytes={num_bytes} is below 8\b",
                ),
                id=f"3.1-1-num_bytes-{num_bytes}-type-{mtype}",
            )
    # -- 3.1 row 3: num_header_bytes < 16 or > num_bytes, for every non-legacy type
    for header_bytes in range(16):
        yield pytest.param(
            Row(
                normal(bytes(16), header_bytes=header_bytes),
                rf"num_header_bytes={header_bytes}, num_bytes=32\b",
            ),
            id=f"3.1-3-num_header_bytes-{header_bytes}",
        )
    for mtype in MessageType:
        if mtype is not MessageType.NORMAL_LEGACY:
            yield pytest.param(
                Row(
                    normal(header_bytes=24, mtype=mtype),
                    r"invalid message header size: num_header_bytes=24, num_bytes=16\b",
                ),
                id=f"3.1-3-header-beyond-message-type-{int(mtype)}",
            )
    # -- 3.1 row 5: handles on a REJECT channel (declared by the header)
    reject = {"handle_policy": HandlePolicy.REJECT}
    yield pytest.param(
        Row(
            legacy(b"x", num_handles=1),
            r"num_handles=1 on a channel whose handle_policy is REJECT",
            fds=0,
            options=reject,
        ),
        id="3.1-5-reject-declared-legacy",
    )
    yield pytest.param(
        Row(
            normal(b"x", num_handles=3),
            r"num_handles=3 on a channel whose handle_policy is REJECT",
            fds=0,
            options=reject,
        ),
        id="3.1-5-reject-declared-normal",
    )
    # ... and handles that merely arrive (hardening: fail at once, hold nothing)
    yield pytest.param(
        Row(
            b"",
            r"peer sent 1 file descriptor\(s\) on a channel whose handle_policy is REJECT",
            fds=1,
            options=reject,
        ),
        id="3.1-5-reject-fd-arrives",
    )
    yield pytest.param(
        Row(
            normal(b"x", num_handles=1),
            r"peer sent 1 file descriptor\(s\) .* REJECT",
            fds=1,
            options=reject,
        ),
        id="3.1-5-reject-fd-present-and-declared",
    )
    # -- 3.1 row 7: fds missing from a complete message (hardening: strict)
    yield pytest.param(
        Row(
            normal(b"x", num_handles=3),
            r"file descriptors are missing: num_handles=3, received=2\b",
        ),
        id="3.1-7-missing-fds-strict",
    )
    yield pytest.param(
        Row(legacy(b"x", num_handles=1), r"num_handles=1, received=0\b", fds=0),
        id="3.1-7-missing-fds-strict-legacy",
    )
    yield pytest.param(
        Row(
            normal(b"x", num_handles=3),
            r"num_handles=3, received=2\b",
            eof=True,
            options={"strict_handles": False},
        ),
        id="3.1-7-missing-fds-at-eof-in-wait-mode",
    )
    # -- 3.1 row 8: unknown message types
    for mtype in (5, 6, 255, 0xFFFF):
        yield pytest.param(
            Row(normal(mtype=mtype), rf"unknown message_type={mtype}\b"),
            id=f"3.1-8-unknown-type-{mtype}",
        )
    # -- 3.2 row 1: IPCZ size < 8 or num_bytes < size
    for size in range(8):
        yield pytest.param(
            Row(
                IPCZ.pack(size, 0, 16, 0),
                rf"invalid IPCZ header: size={size}, num_bytes=16\b",
                options={"framing": Framing.IPCZ},
            ),
            id=f"3.2-1-ipcz-size-{size}",
        )
    for size, num_bytes in ((16, 15), (16, 0), (28, 27), (9, 8)):
        yield pytest.param(
            Row(
                IPCZ.pack(size, 0, num_bytes, 0),
                rf"size={size}, num_bytes={num_bytes}\b",
                options={"framing": Framing.IPCZ},
            ),
            id=f"3.2-1-ipcz-num_bytes-{num_bytes}-below-size-{size}",
        )
    # -- 3.2 row 3/4: IPCZ handles on REJECT, missing fds
    yield pytest.param(
        Row(
            ipcz(b"x", num_handles=2),
            r"num_handles=2 on a channel whose handle_policy is REJECT",
            fds=0,
            options={"framing": Framing.IPCZ, **reject},
        ),
        id="3.2-3-ipcz-reject-declared",
    )
    yield pytest.param(
        Row(
            ipcz(b"x", num_handles=5),
            r"num_handles=5, received=2\b",
            options={"framing": Framing.IPCZ},
        ),
        id="3.2-4-ipcz-missing-fds-strict",
    )
    # -- hardening: max_message_size, from the first 8 bytes alone
    too_big = r"num_bytes=4294967295 exceeds max_message_size=268435456\b"
    yield pytest.param(
        Row(LEGACY.pack(2**32 - 1, 0, 0), too_big), id="max-size-legacy-8-bytes"
    )
    yield pytest.param(
        Row(NORMAL.pack(2**32 - 1, 16, 1, 0)[:8], too_big), id="max-size-normal-8-bytes"
    )
    yield pytest.param(
        Row(NORMAL.pack(2**32 - 1, 16, 1, 0), too_big), id="max-size-normal-16-bytes"
    )
    yield pytest.param(
        Row(
            IPCZ.pack(16, 0, 2**32 - 1, 0)[:8],
            too_big,
            options={"framing": Framing.IPCZ},
        ),
        id="max-size-ipcz-8-bytes",
    )
    yield pytest.param(
        Row(
            legacy(bytes(1000)),
            r"num_bytes=1008 exceeds max_message_size=1000\b",
            options={"max_message_size": 1000},
        ),
        id="max-size-custom",
    )
    # -- hardening: num_handles above 253 (Chromium only asserts this on send)
    for num_handles in (254, 0xFFFF):
        yield pytest.param(
            Row(
                normal(num_handles=num_handles),
                rf"num_handles={num_handles} exceeds max_handles_per_message=253\b",
            ),
            id=f"too-many-handles-normal-{num_handles}",
        )
    yield pytest.param(
        Row(
            legacy(num_handles=254),
            r"num_handles=254 exceeds max_handles_per_message=253\b",
        ),
        id="too-many-handles-legacy",
    )
    yield pytest.param(
        Row(
            ipcz(num_handles=254),
            r"num_handles=254 exceeds max_handles_per_message=253\b",
            options={"framing": Framing.IPCZ},
        ),
        id="too-many-handles-ipcz",
    )
    yield pytest.param(
        Row(
            legacy(num_handles=3),
            r"num_handles=3 exceeds max_handles_per_message=2\b",
            options={"max_handles_per_message": 2},
        ),
        id="too-many-handles-custom",
    )
    # -- hardening: cap on queued unclaimed fds
    yield pytest.param(
        Row(
            b"",
            r"507 unclaimed file descriptors queued, above max_queued_handles=506\b",
            fds=507,
        ),
        id="queued-fds-cap-default",
    )
    yield pytest.param(
        Row(
            b"",
            r"5 unclaimed file descriptors queued, above max_queued_handles=4\b",
            fds=5,
            options={"max_handles_per_message": 4, "max_queued_handles": 4},
        ),
        id="queued-fds-cap-custom",
    )
    yield pytest.param(
        Row(
            normal(bytes(100))[:50],
            r"507 unclaimed file descriptors queued, above max_queued_handles=506\b",
            fds=507,
        ),
        id="queued-fds-cap-inside-a-message",
    )
    # -- hardening: surplus fds at a clean end of stream
    yield pytest.param(
        Row(
            encode_message(b"ok"),
            r"end of stream with 2 file descriptor\(s\) that no message claimed",
            eof=True,
        ),
        id="surplus-fds-at-eof",
    )
    # -- end of stream inside a message: DisconnectedError, not malformed
    for cut in (1, 7, 8, 15, 16, 20):
        yield pytest.param(
            Row(
                encode_message(b"hello")[:cut],
                rf"end of stream inside a message: {cut} byte\(s\)",
                DisconnectedError,
                eof=True,
            ),
            id=f"eof-after-{cut}-bytes",
        )
    yield pytest.param(
        Row(
            encode_message(b"x") + legacy(b"abc")[:9],
            r"9 byte\(s\) of an unfinished",
            DisconnectedError,
            eof=True,
        ),
        id="eof-after-a-whole-message",
    )
    yield pytest.param(
        Row(
            ipcz(b"hello")[:12],
            r"end of stream inside a message: 12 byte\(s\)",
            DisconnectedError,
            eof=True,
            options={"framing": Framing.IPCZ},
        ),
        id="eof-inside-ipcz-message",
    )
    yield pytest.param(
        Row(
            ipcz(size=8),
            r"end of stream inside a message: 8 byte\(s\)",
            DisconnectedError,
            eof=True,
            options={"framing": Framing.IPCZ, "ipcz_parse_threshold": 16},
        ),
        id="eof-strands-8-byte-ipcz-message-at-chromium-threshold",
    )


def _feed_until_error(
    decoder: MessageDecoder, row: Row, handles: list[Handle], delivered: list[Message]
) -> None:
    decoder.receive_handles(handles)
    decoder.receive_data(row.data)
    if row.eof:
        decoder.receive_eof()
    while True:
        event = decoder.next_message()
        assert isinstance(event, Message), f"no error, got {event!r}"
        delivered.append(event)


@pytest.mark.parametrize("row", list(_rows()))
def test_validation_row(row: Row, fds: FdFactory) -> None:
    decoder = MessageDecoder(**row.options)
    handles = fds.make(row.fds)
    numbers = [h.fileno() for h in handles]
    delivered: list[Message] = []
    with pytest.raises(ChannelError) as excinfo:
        _feed_until_error(decoder, row, handles, delivered)
    error = excinfo.value
    assert type(error) is row.error
    assert excinfo.match(row.match)

    # Every fd the decoder held is closed (delivered messages hold their own).
    for message in delivered:
        message.close()
    assert all(h.closed for h in handles)
    assert not any(fd_is_open(n) for n in numbers)
    assert decoder.queued_handles == 0
    assert decoder.buffered_bytes == 0

    # ... and the decoder is failed for good.
    assert decoder.failed
    for _ in range(2):
        with pytest.raises(row.error, match="decoder failed earlier") as again:
            decoder.next_message()
        assert again.value.__cause__ is error
    with pytest.raises(row.error, match="decoder failed earlier"):
        decoder.receive_data(encode_message(b"more"))
    (late,) = fds.make(1)
    with pytest.raises(row.error, match="decoder failed earlier"):
        decoder.receive_handles([late])
    assert late.closed
    decoder.receive_eof()
    with pytest.raises(row.error):
        decoder.next_message()
    assert decoder.buffered_bytes == 0


def test_error_classes_are_distinct() -> None:
    assert issubclass(MalformedMessageError, ChannelError)
    assert issubclass(DisconnectedError, ChannelError)
    assert not issubclass(DisconnectedError, MalformedMessageError)
    assert not issubclass(MalformedMessageError, DisconnectedError)
    # ChannelError is a trio.BrokenResourceError (checked without importing trio)
    assert "trio.BrokenResourceError" in {
        f"{cls.__module__}.{cls.__qualname__}" for cls in ChannelError.__mro__
    }


def test_messages_before_a_malformed_one_are_delivered() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(encode_message(b"fine") + normal(mtype=9))
    expect_message(decoder.next_message(), b"fine", MessageType.NORMAL)
    with pytest.raises(MalformedMessageError, match="message_type=9"):
        decoder.next_message()


# ---------------------------------------------------------------------------
# Memory: buffers grow only with the bytes that actually arrived


def _traced_peak(action: Any) -> int:
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_announced_size_is_not_preallocated(kind: type[Any]) -> None:
    decoder = MessageDecoder(max_message_size=1024 * MiB)  # cap raised
    chunk = kind(normal(num_bytes=200 * MiB) + b"0123456789")

    def feed() -> None:
        decoder.receive_data(chunk)
        assert decoder.next_message() is NEED_DATA

    assert _traced_peak(feed) < 16 * 1024
    assert decoder.buffered_bytes == 26


def test_buffer_grows_in_proportion_to_bytes_received() -> None:
    decoder = MessageDecoder(max_message_size=1024 * MiB)
    decoder.receive_data(normal(num_bytes=200 * MiB))
    chunk = bytes(64 * 1024)
    received = 16 + 16 * len(chunk)  # 1 MiB + the header

    def feed() -> None:
        for _ in range(16):
            decoder.receive_data(chunk)
            assert decoder.next_message() is NEED_DATA

    assert _traced_peak(feed) < 3 * received
    assert decoder.buffered_bytes == received


def test_ipcz_announced_size_is_not_preallocated() -> None:
    decoder = MessageDecoder(framing=Framing.IPCZ, max_message_size=1024 * MiB)
    chunk = ipcz(num_bytes=200 * MiB) + b"0123456789"

    def feed() -> None:
        decoder.receive_data(chunk)
        assert decoder.next_message() is NEED_DATA

    assert _traced_peak(feed) < 16 * 1024


# ---------------------------------------------------------------------------
# Constructor


def test_defaults_are_the_hardened_ones() -> None:
    decoder = MessageDecoder()
    assert decoder.framing is Framing.MOJO
    assert decoder.handle_policy is HandlePolicy.ACCEPT
    assert decoder.max_message_size == 256 * MiB
    assert decoder.max_handles_per_message == 253
    assert decoder.max_queued_handles == 506
    assert decoder.strict_handles is True
    assert decoder.ipcz_parse_threshold == 8
    assert not decoder.failed


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"framing": "mojo"}, TypeError, r"framing must be a Framing, not 'mojo'"),
        (
            {"handle_policy": "reject"},
            TypeError,
            r"handle_policy must be a HandlePolicy, not 'reject'",
        ),
        (
            {"max_message_size": 15},
            ValueError,
            r"max_message_size=15 is outside 16\.\.4294967295",
        ),
        (
            {"max_message_size": 2**32},
            ValueError,
            r"max_message_size=4294967296 is outside",
        ),
        (
            {"max_handles_per_message": -1},
            ValueError,
            r"max_handles_per_message=-1 is outside 0\.\.65535",
        ),
        (
            {"max_handles_per_message": 65536},
            ValueError,
            r"max_handles_per_message=65536 is outside",
        ),
        (
            {"max_queued_handles": 252},
            ValueError,
            r"max_queued_handles=252 is below max_handles_per_message=253",
        ),
        (
            {"ipcz_parse_threshold": 12},
            ValueError,
            r"ipcz_parse_threshold must be 8 or 16, not 12",
        ),
    ],
)
def test_constructor_rejects(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        MessageDecoder(**options)


def test_constructor_edge_values_are_accepted() -> None:
    decoder = MessageDecoder(
        max_message_size=16, max_handles_per_message=0, max_queued_handles=0
    )
    decoder.receive_data(encode_message(b""))
    expect_message(decoder.next_message(), b"", MessageType.NORMAL)


# ---------------------------------------------------------------------------
# Arbitrary input: only ChannelErrors, never a crash or a held fd


@given(
    framing=st.sampled_from(Framing),
    chunks=st.lists(st.binary(max_size=40), max_size=8),
    eof=st.booleans(),
)
def test_arbitrary_bytes_never_crash_the_decoder(
    framing: Framing, chunks: list[bytes], eof: bool
) -> None:
    decoder = MessageDecoder(framing=framing, max_message_size=4096)
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            drain(decoder)
        if eof:
            decoder.receive_eof()
            assert drain(decoder)[1] is END_OF_STREAM
    except (MalformedMessageError, DisconnectedError):
        assert decoder.failed
        assert decoder.buffered_bytes == 0
    else:
        assert not decoder.failed


@given(
    payloads=st.lists(
        st.tuples(st.binary(max_size=300), st.sampled_from([0, 1])), max_size=6
    ),
    framing=st.sampled_from(Framing),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_arbitrary_chunking_decodes_the_same_messages(
    payloads: list[tuple[bytes, int]], framing: Framing, cuts: list[int]
) -> None:
    types = [
        MessageType.NORMAL if framing is Framing.IPCZ else MessageType(t)
        for _, t in payloads
    ]
    stream = b"".join(
        encode_message(p, type=t, framing=framing)
        for (p, _), t in zip(payloads, types, strict=True)
    )
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    decoder = MessageDecoder(framing=framing)
    got: list[Message] = []
    for lo, hi in itertools.pairwise(points):
        decoder.receive_data(stream[lo:hi])
        got += drain(decoder)[0]
    decoder.receive_eof()
    assert decoder.next_message() is END_OF_STREAM
    assert [(m.payload, m.type) for m in got] == [
        (p, t) for (p, _), t in zip(payloads, types, strict=True)
    ]
    assert all(type(m.payload) is bytes for m in got)


def test_partial_message_collects_exactly_the_missing_bytes() -> None:
    payload = bytes(range(256)) * 1000
    wire = encode_message(payload) + encode_message(b"next")
    decoder = MessageDecoder()
    decoder.receive_data(wire[:100])
    assert decoder.next_message() is NEED_DATA
    decoder.receive_data(wire[100:50_000])
    assert decoder.next_message() is NEED_DATA
    assert decoder.buffered_bytes == 50_000
    decoder.receive_data(wire[50_000:])  # completes it, and carries "next"
    assert decoder.buffered_bytes == len(wire) - 16  # its header is parsed and gone
    messages, marker = drain(decoder)
    assert [m.payload for m in messages] == [payload, b"next"]
    assert marker is NEED_DATA
    assert decoder.buffered_bytes == 0


def test_partial_message_with_fds_after_its_bytes_in_lenient_mode(
    fds: FdFactory,
) -> None:
    wire = encode_message(b"z" * 70_000, num_handles=2)
    decoder = MessageDecoder(strict_handles=False)
    decoder.receive_data(wire[:1000])
    assert decoder.next_message() is NEED_DATA
    decoder.receive_data(wire[1000:])
    assert decoder.next_message() is NEED_DATA  # complete, but its fds are not in
    handles = fds.make(2)
    decoder.receive_handles(handles)
    message = decoder.next_message()
    assert isinstance(message, Message)
    assert message.payload == b"z" * 70_000
    assert message.handles == tuple(handles)
    message.close()


def test_partial_message_without_its_fds_is_malformed_in_strict_mode(
    fds: FdFactory,
) -> None:
    wire = encode_message(b"z" * 70_000, num_handles=1)
    decoder = MessageDecoder()
    decoder.receive_data(wire[:1000])
    assert decoder.next_message() is NEED_DATA
    decoder.receive_data(wire[1000:])
    with pytest.raises(MalformedMessageError, match="num_handles=1, received=0"):
        decoder.next_message()
    assert decoder.buffered_bytes == 0


def test_end_of_stream_inside_a_partial_message_is_a_disconnect() -> None:
    wire = encode_message(b"q" * 5000)
    decoder = MessageDecoder()
    decoder.receive_data(wire[:100])
    assert decoder.next_message() is NEED_DATA
    decoder.receive_data(wire[100:200])
    decoder.receive_eof()
    with pytest.raises(DisconnectedError, match="200 byte"):
        decoder.next_message()


def test_lenient_wait_for_fds_holds_a_bounded_amount_of_data() -> None:
    # strict_handles=False waits for missing fds as Chromium does, but a peer
    # that never sends them cannot make the decoder buffer its whole stream.
    decoder = MessageDecoder(strict_handles=False)
    decoder.receive_data(encode_message(b"wants an fd", num_handles=1))
    assert decoder.next_message() is NEED_DATA
    junk = encode_message(b"j" * 60_000)
    fed = 0
    while fed <= MAX_BUFFERED_WHILE_WAITING:
        decoder.receive_data(junk)
        fed += len(junk)
        if fed <= MAX_BUFFERED_WHILE_WAITING:
            assert decoder.next_message() is NEED_DATA
    with pytest.raises(MalformedMessageError, match="while a message waits"):
        decoder.next_message()
    assert decoder.buffered_bytes == 0


# ----------------------------------------------------------------------
# next_batch(): the receive path's hot loop, checked against next_message()


def drain_in_batches(
    decoder: MessageDecoder, max_messages: int = 1000, max_bytes: int = 1 << 30
) -> tuple[list[Message], Any]:
    """Like :func:`drain`, but through ``next_batch`` wherever it applies."""
    messages: list[Message] = []
    while True:
        batch, payload_bytes, handles, drained = decoder.next_batch(
            max_messages, max_bytes
        )
        assert len(batch) <= max_messages
        assert payload_bytes == sum(len(m.payload) for m in batch)
        assert handles == sum(len(m.handles) for m in batch)
        assert all(m.type is MessageType.NORMAL for m in batch)
        messages += batch
        if drained:
            assert decoder.next_message() is NEED_DATA  # what drained promises
            return messages, NEED_DATA
        event = decoder.next_message()
        if not isinstance(event, Message):
            return messages, event
        messages.append(event)


def outcome(
    decoder: MessageDecoder,
    feeds: Sequence[tuple[bytes, int]],
    fds: FdFactory,
    eof: bool,
    mode: str,
) -> list[object]:
    """Everything a decoder reports for ``feeds`` (bytes, fds to queue first).

    ``mode``: ``"message"`` drains with next_message, ``"batch"`` with
    next_batch wherever it applies, ``"fed"`` also feeds each chunk through
    receive_batch, ``"plain"`` offers each chunk to receive_plain first
    (as a borrowing receive() does).
    """
    seen: list[object] = []

    def record(messages: list[Message], event: object) -> None:
        for message in messages:
            seen.append((message.payload, message.type, len(message.handles)))
            message.close()
        seen.append(event)

    def pull(fed: list[Message]) -> None:
        if mode == "message":
            messages, event = drain(decoder)
        else:
            messages, event = drain_in_batches(decoder, max_messages=3, max_bytes=50)
        record(fed + messages, event)

    try:
        for data, count in feeds:
            decoder.receive_handles(fds.make(count))
            fed: list[Message] = []
            plain = decoder.receive_plain(data) if mode == "plain" else None
            if plain is not None:
                fed = [plain]
                assert not plain.handles
            elif mode in ("fed", "plain"):
                fed, payload_bytes, handles, _ = decoder.receive_batch(data, 3, 50)
                assert payload_bytes == sum(len(m.payload) for m in fed)
                assert handles == sum(len(m.handles) for m in fed)
            else:
                decoder.receive_data(data)
            pull(fed)
        if eof:
            decoder.receive_eof()
            pull([])
    except ChannelError as exc:
        seen.append(type(exc))
    seen.append(decoder.queued_handles)
    return seen


@given(
    pieces=st.lists(
        st.one_of(
            st.tuples(
                st.binary(max_size=40), st.integers(0, 3), st.sampled_from([0, 1, 2])
            ).map(
                lambda t: encode_message(t[0], num_handles=t[1], type=MessageType(t[2]))
            ),
            st.binary(max_size=20),  # garbage, a torn header, a stray byte
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    fd_counts=st.lists(st.integers(0, 5), max_size=8),
    strict=st.booleans(),
    eof=st.booleans(),
)
def test_next_batch_reports_exactly_what_next_message_would(
    pieces: list[bytes],
    cuts: list[int],
    fd_counts: list[int],
    strict: bool,
    eof: bool,
) -> None:
    stream = b"".join(pieces)
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    feeds = [
        (stream[lo:hi], fd_counts[i] if i < len(fd_counts) else 0)
        for i, (lo, hi) in enumerate(itertools.pairwise(points))
    ]
    results = []
    for mode in ("message", "batch", "fed", "plain"):
        with FdFactory() as fds:
            decoder = MessageDecoder(
                max_message_size=200,
                max_handles_per_message=3,
                max_queued_handles=6,
                strict_handles=strict,
            )
            results.append(outcome(decoder, feeds, fds, eof, mode))
            decoder.close()
    assert results[0] == results[1] == results[2] == results[3]


def test_next_batch_takes_many_plain_messages_at_once(fds: FdFactory) -> None:
    decoder = MessageDecoder()
    stream = b"".join(
        encode_message(bytes([i]) * i, num_handles=i % 3) for i in range(30)
    )
    decoder.receive_handles(fds.make(sum(i % 3 for i in range(30))))
    decoder.receive_data(stream)
    batch, payload_bytes, handles, drained = decoder.next_batch(100, 1 << 20)
    assert [m.payload for m in batch] == [bytes([i]) * i for i in range(30)]
    assert [len(m.handles) for m in batch] == [i % 3 for i in range(30)]
    assert payload_bytes == sum(range(30))
    assert handles == 30
    assert drained
    assert decoder.buffered_bytes == 0
    for message in batch:
        message.close()


def test_next_batch_stops_at_its_limits() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(b"".join(encode_message(b"x" * 10) for _ in range(5)))
    batch, payload_bytes, _, drained = decoder.next_batch(2, 1 << 20)
    assert (len(batch), payload_bytes, drained) == (2, 20, False)
    # max_bytes: the message that passes it is the last one taken.
    batch, payload_bytes, _, drained = decoder.next_batch(10, 15)
    assert (len(batch), payload_bytes, drained) == (2, 20, False)
    batch, _, _, drained = decoder.next_batch(10, 0)
    assert (len(batch), drained) == (1, True)


def test_next_batch_without_room_takes_nothing() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(encode_message(b"x"))
    assert decoder.next_batch(0, 1 << 20) == ([], 0, 0, False)
    assert decoder.next_batch(10, -1) == ([], 0, 0, False)
    assert decoder.next_batch(1, 0)[0][0].payload == b"x"


@pytest.mark.parametrize(
    "wire",
    [
        encode_message(b"legacy", type=MessageType.NORMAL_LEGACY),
        encode_message(b"", type=MessageType.UPGRADE_OFFER),
        normal(b"extra", header_bytes=24) + bytes(8),
        encode_message(b"x" * 300),  # above max_message_size: next_message fails it
        normal(b"", num_bytes=12),  # below the header size: next_message fails it
        encode_message(b"fds", num_handles=2),  # its fds have not arrived
        encode_message(b"header")[:10],
    ],
)
def test_next_batch_leaves_anything_unusual_to_next_message(wire: bytes) -> None:
    decoder = MessageDecoder(max_message_size=200)
    decoder.receive_data(wire)
    assert decoder.next_batch(10, 1 << 20) == ([], 0, 0, False)


def test_next_batch_collects_a_plain_message_across_chunks(fds: FdFactory) -> None:
    # A plain message that is still arriving is collected as next_message()
    # would, and returned first once complete, ahead of the plain ones after.
    wire = encode_message(b"a" * 40, num_handles=1) + encode_message(b"b")
    decoder = MessageDecoder()
    decoder.receive_data(encode_message(b"first") + wire[:30])
    batch, payload_bytes, _, drained = decoder.next_batch(10, 1 << 20)
    assert [m.payload for m in batch] == [b"first"]
    assert drained  # collecting: next_message() would say NEED_DATA too
    assert decoder.buffered_bytes == 30
    assert decoder.next_batch(10, 1 << 20) == ([], 0, 0, False)
    assert decoder.next_message() is NEED_DATA
    decoder.receive_handles(fds.make(1))
    decoder.receive_data(wire[30:])
    assert decoder.buffered_bytes == len(wire) - 16
    assert decoder.next_batch(0, 1 << 20) == ([], 0, 0, False)  # no room
    batch, payload_bytes, handles, drained = decoder.next_batch(10, 1 << 20)
    assert [(m.payload, len(m.handles)) for m in batch] == [(b"a" * 40, 1), (b"b", 0)]
    assert (payload_bytes, handles, drained) == (41, 1, True)
    close_all([h for m in batch for h in m.handles])
    # The byte bound counts the completed message too.
    assert decoder.receive_batch(wire[:30], 10, 0) == ([], 0, 0, True)
    decoder.receive_handles(fds.make(1))
    batch, _, _, drained = decoder.receive_batch(wire[30:], 10, 0)
    assert [m.payload for m in batch] == [b"a" * 40]
    assert not drained
    assert decoder.next_message().payload == b"b"  # type: ignore[union-attr]
    close_all(batch[0].handles)


def test_next_batch_leaves_a_collected_message_that_is_not_plain(
    fds: FdFactory,
) -> None:
    legacy = encode_message(b"L" * 30, type=MessageType.NORMAL_LEGACY)
    waiting = encode_message(b"W" * 30, num_handles=1)
    for wire, decoder in (
        (legacy, MessageDecoder()),
        (waiting, MessageDecoder(strict_handles=False)),  # its fd is late
    ):
        decoder.receive_data(wire[:20])
        assert decoder.next_message() is NEED_DATA  # collecting
        decoder.receive_data(wire[20:])
        assert decoder.next_batch(10, 1 << 20) == ([], 0, 0, False)
    decoder.receive_handles(fds.make(1))
    assert decoder.next_batch(10, 1 << 20)[0][0].payload == b"W" * 30


def test_next_batch_leaves_handles_to_next_message_when_over_a_limit(
    fds: FdFactory,
) -> None:
    for decoder in (
        MessageDecoder(max_handles_per_message=1),
        MessageDecoder(handle_policy=HandlePolicy.REJECT),
    ):
        decoder.receive_data(encode_message(b"x", num_handles=2))
        assert decoder.next_batch(10, 1 << 20) == ([], 0, 0, False)
        with pytest.raises(MalformedMessageError):
            decoder.next_message()


def test_next_batch_does_nothing_in_states_next_message_owns(fds: FdFactory) -> None:
    ipcz = MessageDecoder(framing=Framing.IPCZ)
    ipcz.receive_data(encode_message(b"i", framing=Framing.IPCZ))
    assert ipcz.next_batch(10, 1 << 20) == ([], 0, 0, False)
    collecting = MessageDecoder()
    collecting.receive_data(encode_message(b"b" * 100)[:50])
    assert collecting.next_message() is NEED_DATA  # now collecting the rest
    assert collecting.next_batch(10, 1 << 20) == ([], 0, 0, False)
    waiting = MessageDecoder(strict_handles=False)
    waiting.receive_data(encode_message(b"w" * 100, num_handles=1))
    assert waiting.next_message() is NEED_DATA  # complete, waiting for its fd
    assert waiting.next_batch(10, 1 << 20) == ([], 0, 0, False)
    failed = MessageDecoder()
    failed.receive_data(normal(mtype=9))
    with pytest.raises(MalformedMessageError):
        failed.next_message()
    assert failed.next_batch(10, 1 << 20) == ([], 0, 0, False)


def test_next_batch_is_not_drained_when_next_message_has_news(fds: FdFactory) -> None:
    at_eof = MessageDecoder()
    at_eof.receive_data(encode_message(b"last"))
    at_eof.receive_eof()
    batch, _, _, drained = at_eof.next_batch(10, 1 << 20)
    assert len(batch) == 1
    assert not drained
    assert at_eof.next_message() is END_OF_STREAM
    over_cap = MessageDecoder(max_queued_handles=253)
    over_cap.receive_handles(fds.make(254))
    over_cap.receive_data(encode_message(b"ok"))
    batch, _, _, drained = over_cap.next_batch(10, 1 << 20)
    assert len(batch) == 1
    assert not drained  # next_message() must see the surplus fds
    with pytest.raises(MalformedMessageError, match="max_queued_handles"):
        over_cap.next_message()
    unbounded = MessageDecoder(max_queued_handles=None)
    unbounded.receive_handles(fds.make(600))
    unbounded.receive_data(encode_message(b"ok"))
    assert unbounded.next_batch(10, 1 << 20)[3]
    unbounded.close()


def test_read_size_follows_what_arrived_of_a_large_message() -> None:
    decoder = MessageDecoder()
    assert decoder.read_size(64, 1000) == 64  # nothing is arriving
    wire = encode_message(b"L" * 5000)
    decoder.receive_data(wire[:100])
    assert decoder.next_message() is NEED_DATA
    assert decoder.read_size(64, 1000) == 100  # at most what arrived of it
    decoder.receive_data(wire[100:700])
    assert decoder.read_size(64, 1000) == 700
    decoder.receive_data(wire[700:2000])
    assert decoder.read_size(64, 1000) == 1000  # at most the maximum
    decoder.receive_data(wire[2000:4990])
    assert decoder.read_size(64, 1000) == 64  # what it still needs is small
    assert decoder.read_size(5, 1000) == 26  # ... exactly that


def test_receive_batch_is_receive_data_then_next_batch() -> None:
    decoder = MessageDecoder()
    batch, payload_bytes, handles, drained = decoder.receive_batch(
        encode_message(b"solo"), 10, 1 << 20
    )  # exactly one plain message: the request/response case
    assert ([m.payload for m in batch], payload_bytes, handles, drained) == (
        [b"solo"],
        4,
        0,
        True,
    )
    assert decoder.buffered_bytes == 0
    two = encode_message(b"one") + encode_message(b"two")
    batch, payload_bytes, handles, drained = decoder.receive_batch(
        bytearray(two[:20]), 10, 1 << 20
    )  # a bytearray is copied, as receive_data does
    assert (len(batch), payload_bytes, handles, drained) == (1, 3, 0, False)
    assert batch[0].payload == b"one"
    batch, _, _, drained = decoder.receive_batch(two[20:], 10, 1 << 20)
    assert [m.payload for m in batch] == [b"two"]
    assert drained
    decoder.receive_eof()
    with pytest.raises(RuntimeError, match="after receive_eof"):
        decoder.receive_batch(b"x", 10, 1 << 20)
    failed = MessageDecoder()
    assert failed.receive_batch(normal(mtype=9), 10, 1 << 20)[0] == []
    with pytest.raises(MalformedMessageError):
        failed.next_message()  # (next_batch leaves the bad header to it)
    with pytest.raises(MalformedMessageError, match="failed earlier"):
        failed.receive_batch(b"more", 10, 1 << 20)


# receive_plain(): one plain message without fds, or nothing changes


def test_receive_plain_takes_exactly_one_plain_message() -> None:
    decoder = MessageDecoder()
    for payload in (b"", b"ping", b"x" * 5000):
        message = decoder.receive_plain(encode_message(payload))
        assert message is not None
        assert message.__class__ is Message
        assert (message.payload, message.handles, message.type) == (
            payload,
            (),
            MessageType.NORMAL,
        )
        assert decoder.buffered_bytes == 0
    assert decoder.next_message() is NEED_DATA


def _plain_refused(decoder: MessageDecoder, data: bytes | bytearray) -> None:
    """receive_plain(data) returns None and the decoder reports what it
    would have reported without the call."""
    before = decoder.buffered_bytes, decoder.queued_handles, decoder.failed
    assert decoder.receive_plain(data) is None  # type: ignore[arg-type]
    assert (decoder.buffered_bytes, decoder.queued_handles, decoder.failed) == before


@pytest.mark.parametrize(
    "data",
    [
        encode_message(b"ab")[:15],  # shorter than a header
        encode_message(b"ab")[:-1],  # a message still arriving
        encode_message(b"ab") + encode_message(b"cd"),  # two messages
        encode_message(b"ab") + b"\x01",  # and the first byte of another
        encode_message(b"ab", num_handles=1),  # declares an fd
        encode_message(b"ab", type=MessageType.NORMAL_LEGACY),  # 8-byte header
        encode_message(b"", type=MessageType.UPGRADE_OFFER),  # control
        normal(b"ab", header_bytes=24),  # a longer header
        normal(b"x" * 300),  # over max_message_size
        normal(b"ab", num_bytes=12),  # num_bytes below the header
    ],
    ids=[
        "short",
        "partial",
        "two",
        "one-and-a-byte",
        "handles",
        "legacy",
        "control",
        "long-header",
        "oversized",
        "undersized",
    ],
)
def test_receive_plain_leaves_anything_else_to_the_full_parse(data: bytes) -> None:
    decoder = MessageDecoder(max_message_size=200)
    _plain_refused(decoder, data)
    _plain_refused(decoder, bytearray(encode_message(b"ab")))  # not bytes
    # The full parse still sees all of it, and says what it always said.
    fresh = MessageDecoder(max_message_size=200)
    for d in (decoder, fresh):
        d.receive_data(data)
    try:
        expected: object = drain(fresh)
    except ChannelError as exc:
        expected = type(exc)
    try:
        got: object = drain(decoder)
    except ChannelError as exc:
        got = type(exc)
    assert repr(got) == repr(expected)


def test_receive_plain_does_nothing_in_states_the_full_parse_owns(
    fds: FdFactory,
) -> None:
    one = encode_message(b"next")
    buffered = MessageDecoder()
    buffered.receive_data(encode_message(b"ab")[:5])  # a header arriving
    _plain_refused(buffered, one)
    with_fds = MessageDecoder()
    with_fds.receive_handles(fds.make(1))  # an fd ahead of its message
    _plain_refused(with_fds, one)
    collecting = MessageDecoder()
    collecting.receive_data(encode_message(b"b" * 100)[:50])
    assert collecting.next_message() is NEED_DATA  # now collecting the rest
    _plain_refused(collecting, one)
    waiting = MessageDecoder(strict_handles=False)
    waiting.receive_data(encode_message(b"w" * 100, num_handles=1))
    assert waiting.next_message() is NEED_DATA  # complete, waiting for its fd
    _plain_refused(waiting, one)
    ended = MessageDecoder()
    ended.receive_eof()
    _plain_refused(ended, one)
    failed = MessageDecoder()
    failed.receive_data(normal(mtype=9))
    with pytest.raises(MalformedMessageError):
        failed.next_message()
    _plain_refused(failed, one)
    ipcz = MessageDecoder(framing=Framing.IPCZ)
    _plain_refused(ipcz, one)
    assert ipcz.next_message() is NEED_DATA
