"""MessageEncoder (``_encoder.py``): the outgoing queue and the sendmsg planner."""

from __future__ import annotations

import bisect
import itertools
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import pytest
from _core_support import EXAMPLES, FdFactory, WireExample, drain, file_identity
from _fds import fd_is_open
from hypothesis import given
from hypothesis import strategies as st

from trio_mojo import (
    END_OF_STREAM,
    MAX_ATTACHED_HANDLES,
    MAX_SENDMSG_HANDLES,
    Framing,
    Handle,
    Message,
    MessageDecoder,
    MessageEncoder,
    MessageType,
    OutgoingMessage,
    encode_message,
)
from trio_mojo._core._encoder import (
    INLINE_PAYLOAD,
    MAX_BATCH_BYTES,
    MAX_BATCH_PARTS,
    MAX_PLAN_BUFFERS,
    MAX_PLAN_BYTES,
    Buffer,
    plain_frame,
)
from trio_mojo._handles import close_fds


@pytest.fixture
def fds() -> Iterator[FdFactory]:
    with FdFactory() as factory:
        yield factory


def joined(buffers: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def numbers(handles: Sequence[Handle]) -> list[int]:
    """The fds of ``handles``, read before an entry takes them."""
    return [h.fileno() for h in handles]


def all_open(fds: Sequence[int]) -> bool:
    return all(fd_is_open(fd) for fd in fds)


def none_open(fds: Sequence[int]) -> bool:
    return not any(fd_is_open(fd) for fd in fds)


def queue(encoder: MessageEncoder, *messages: Message) -> list[OutgoingMessage]:
    entries = [OutgoingMessage.encode(m) for m in messages]
    for entry in entries:
        encoder.push(entry)
    return entries


# ---------------------------------------------------------------------------
# Worked examples through the encoder


ENCODABLE = [pytest.param(e, id=e.name) for e in EXAMPLES if e.encodable]


@pytest.mark.parametrize("example", ENCODABLE)
def test_worked_example_is_planned_byte_for_byte(
    example: WireExample, fds: FdFactory
) -> None:
    handles = fds.make(example.num_handles)
    owned = numbers(handles)
    entry = OutgoingMessage.encode(
        Message(example.payload, handles, example.type), example.framing
    )
    assert all(h.closed for h in handles)  # the entry took the fds
    assert list(entry.fds) == owned
    encoder = MessageEncoder()
    encoder.push(entry)
    buffers, plan_fds = encoder.plan()
    wire = joined(buffers)
    if example.framing is Framing.IPCZ:
        # creation_timeticks_us is "now"; everything else is the example's.
        wire = wire[:8] + example.wire[8:16] + wire[16:]
    assert wire == example.wire
    assert plan_fds == owned
    assert all_open(owned)  # not closed before the kernel has them
    assert encoder.advance(len(wire)) == 1
    assert none_open(owned)
    assert not encoder


def test_examples_coalesce_into_one_plan(fds: FdFactory) -> None:
    mojo = [e for e in EXAMPLES if e.framing is Framing.MOJO]
    handles = [fds.make(e.num_handles) for e in mojo]
    owned = [fd for hs in handles for fd in numbers(hs)]
    encoder = MessageEncoder()
    queue(
        encoder,
        *(Message(e.payload, h, e.type) for e, h in zip(mojo, handles, strict=True)),
    )
    assert encoder.queued_messages == len(mojo)
    assert encoder.queued_bytes == sum(len(e.wire) for e in mojo)
    buffers, plan_fds = encoder.plan()
    assert joined(buffers) == b"".join(e.wire for e in mojo)
    assert plan_fds == owned
    assert all_open(owned)
    assert encoder.advance(encoder.queued_bytes) == len(mojo)
    assert encoder.queued_bytes == 0
    assert none_open(owned)


# ---------------------------------------------------------------------------
# OutgoingMessage


def test_small_payload_is_copied_next_to_its_header() -> None:
    entry = OutgoingMessage.encode(Message(b"x" * INLINE_PAYLOAD))
    assert entry.parts == [encode_message(b"x" * INLINE_PAYLOAD)]
    assert entry.size == 16 + INLINE_PAYLOAD
    assert entry.unsent() == entry.parts


def test_large_payload_is_not_copied() -> None:
    payload = b"y" * (INLINE_PAYLOAD + 1)
    entry = OutgoingMessage.encode(Message(payload))
    assert entry.parts == [encode_message(payload)[:16], payload]
    assert entry.parts[1] is payload
    assert entry.unsent() == entry.parts


def test_payload_that_is_not_bytes_is_snapshotted() -> None:
    payload = bytearray(b"abc")
    entry = OutgoingMessage.encode(Message(cast(bytes, payload)))
    payload[:] = b"XYZ"
    assert entry.parts == [encode_message(b"abc")]


def test_encode_uses_the_framing_and_type() -> None:
    legacy = OutgoingMessage.encode(Message(b"hello", (), MessageType.NORMAL_LEGACY))
    assert legacy.parts == [bytes.fromhex("0d 00 00 00 00 00 00 00 68 65 6c 6c 6f")]
    ipcz = OutgoingMessage.encode(Message(b"hi"), Framing.IPCZ)
    (frame,) = ipcz.parts
    assert frame[:8] == bytes.fromhex("10 00 00 00 12 00 00 00")
    assert frame[16:] == b"hi"


def test_encode_refuses_more_than_253_handles(fds: FdFactory) -> None:
    handles = fds.make(MAX_ATTACHED_HANDLES + 1)
    with pytest.raises(ValueError, match=r"at most 253 handles, not 254"):
        OutgoingMessage.encode(Message(b"x", handles))
    assert all(not h.closed for h in handles)  # still the caller's


def test_encode_propagates_header_errors() -> None:
    with pytest.raises(ValueError, match=r"Framing\.IPCZ carries only NORMAL"):
        OutgoingMessage.encode(
            Message(b"", (), MessageType.NORMAL_LEGACY), Framing.IPCZ
        )


@pytest.mark.parametrize(
    ("payload_size", "offset", "expected"),
    [
        pytest.param(100, 0, [(0, 116)], id="inline-unsent"),
        pytest.param(100, 5, [(5, 116)], id="inline-inside"),
        pytest.param(20000, 0, [(0, 16), (16, 20016)], id="tail-unsent"),
        pytest.param(20000, 3, [(3, 16), (16, 20016)], id="tail-inside-head"),
        pytest.param(20000, 16, [(16, 20016)], id="tail-at-tail"),
        pytest.param(20000, 19999, [(19999, 20016)], id="tail-inside-tail"),
    ],
)
def test_unsent_buffers(
    payload_size: int, offset: int, expected: list[tuple[int, int]]
) -> None:
    payload = random.Random(payload_size).randbytes(payload_size)
    wire = encode_message(payload)
    entry = OutgoingMessage.encode(Message(payload))
    entry.offset = offset
    parts = entry.unsent()
    assert [bytes(p) for p in parts] == [wire[lo:hi] for lo, hi in expected]
    assert bytes(entry.first_unsent_byte()) == wire[offset : offset + 1]


# ---------------------------------------------------------------------------
# plan() and advance()


def test_plan_on_an_empty_queue_is_an_error() -> None:
    encoder = MessageEncoder()
    assert not encoder
    assert encoder.queued_messages == 0
    with pytest.raises(RuntimeError, match="empty"):
        encoder.plan()


def test_partial_writes_resume_where_they_stopped(fds: FdFactory) -> None:
    encoder = MessageEncoder()
    handles = fds.make(2)
    owned = numbers(handles)
    payload = bytes(range(256)) * 100  # 25 600 bytes: header + tail
    queue(encoder, Message(payload, handles), Message(b"second"))
    stream = encode_message(payload, num_handles=2) + encode_message(b"second")
    sent = 0
    completed = []
    for step in (1, 10, 5, 20000, 5600, 3, 19):  # 25 616 + 22 bytes
        buffers, plan_fds = encoder.plan()
        assert joined(buffers) == stream[sent:]
        assert plan_fds == (owned if sent == 0 else [])
        completed.append(encoder.advance(step))
        sent += step
        assert none_open(owned)  # closed with the first send
        assert encoder.queued_bytes == len(stream) - sent
    assert completed == [0, 0, 0, 0, 1, 0, 1]
    assert not encoder


def test_advance_zero_changes_nothing(fds: FdFactory) -> None:
    encoder = MessageEncoder()
    handles = fds.make(3)
    owned = numbers(handles)
    queue(encoder, Message(b"abc", handles))
    first = encoder.plan()
    assert encoder.advance(0) == 0
    assert all_open(owned)
    assert encoder.queued_bytes == 19
    assert encoder.plan() == first
    encoder.close()
    assert none_open(owned)


def test_advance_rejects_negative_and_oversized_counts(fds: FdFactory) -> None:
    encoder = MessageEncoder()
    handles = fds.make(1)
    owned = numbers(handles)
    queue(encoder, Message(b"abc"), Message(b"def", handles))
    with pytest.raises(ValueError, match="sent=-1 is negative"):
        encoder.advance(-1)
    encoder.plan()
    with pytest.raises(ValueError, match="sent=39 is more than the 38 planned bytes"):
        encoder.advance(39)
    # Nothing was recorded: the queue, the plan and the fds are as they were.
    assert encoder.queued_bytes == 38
    assert all_open(owned)
    assert encoder.advance(38) == 2
    assert none_open(owned)
    with pytest.raises(ValueError, match="sent=1 is more than the 0 planned bytes"):
        encoder.advance(1)  # that plan is used up


def test_advance_without_plan_is_refused() -> None:
    encoder = MessageEncoder()
    queue(encoder, Message(b"abc"))
    with pytest.raises(ValueError, match="more than the 0 planned bytes"):
        encoder.advance(1)


def test_replanning_replaces_the_previous_plan(fds: FdFactory) -> None:
    encoder = MessageEncoder()
    handles = fds.make(1)
    owned = numbers(handles)
    queue(encoder, Message(b"abc", handles))
    encoder.plan()
    _, plan_fds = encoder.plan()
    assert plan_fds == owned
    encoder.advance(19)
    assert none_open(owned)


def test_more_than_128_fds_are_split_into_batches_with_data(fds: FdFactory) -> None:
    encoder = MessageEncoder()
    handles = fds.make(253)
    owned = numbers(handles)
    queue(encoder, Message(b"payload", handles))
    wire = encode_message(b"payload", num_handles=253)

    buffers, plan_fds = encoder.plan()
    assert joined(buffers) == wire[:1]  # exactly one byte with the first batch
    assert plan_fds == owned[:128]
    assert encoder.advance(1) == 0
    assert none_open(owned[:128])
    assert all_open(owned[128:])

    buffers, plan_fds = encoder.plan()
    assert joined(buffers) == wire[1:]  # the rest rides with the last batch
    assert plan_fds == owned[128:]
    assert encoder.advance(len(wire) - 1) == 1
    assert none_open(owned)


def test_a_large_batch_waits_for_its_own_plan(fds: FdFactory) -> None:
    encoder = MessageEncoder()
    handles = fds.make(200)
    queue(encoder, Message(b"first"), Message(b"second", handles))
    buffers, plan_fds = encoder.plan()
    assert joined(buffers) == encode_message(b"first")
    assert plan_fds == []
    encoder.advance(21)
    buffers, plan_fds = encoder.plan()
    assert len(joined(buffers)) == 1
    assert len(plan_fds) == 128
    encoder.close()


def test_fds_of_the_next_message_that_would_exceed_128_start_a_new_plan(
    fds: FdFactory,
) -> None:
    encoder = MessageEncoder()
    first, second = fds.make(100), fds.make(29)
    queue(encoder, Message(b"1", first), Message(b"2", second))
    buffers, plan_fds = encoder.plan()
    assert joined(buffers) == encode_message(b"1", num_handles=100)
    assert len(plan_fds) == 100
    encoder.advance(17)
    buffers, plan_fds = encoder.plan()
    assert joined(buffers) == encode_message(b"2", num_handles=29)
    assert len(plan_fds) == 29
    encoder.advance(17)
    assert not encoder


def test_exactly_128_fds_share_a_plan(fds: FdFactory) -> None:
    encoder = MessageEncoder()
    queue(encoder, Message(b"1", fds.make(100)), Message(b"2", fds.make(28)))
    buffers, plan_fds = encoder.plan()
    assert len(joined(buffers)) == 34
    assert len(plan_fds) == 128
    assert encoder.advance(34) == 2


def test_plan_stops_after_max_plan_bytes() -> None:
    encoder = MessageEncoder()
    size = MAX_PLAN_BYTES // 2
    queue(encoder, *(Message(bytes(size)) for _ in range(4)))
    buffers, _ = encoder.plan()
    assert len(joined(buffers)) == 2 * (16 + size)
    assert len(buffers) == 4  # header + payload view, twice: no copy
    assert encoder.advance(2 * (16 + size)) == 2


def test_plan_stops_before_max_plan_buffers() -> None:
    encoder = MessageEncoder()
    queue(encoder, *(Message(b"%d" % i) for i in range(MAX_PLAN_BUFFERS + 10)))
    buffers, _ = encoder.plan()
    assert len(buffers) == MAX_PLAN_BUFFERS
    assert encoder.advance(len(joined(buffers))) == MAX_PLAN_BUFFERS
    buffers, _ = encoder.plan()
    assert len(buffers) == 10


def test_fds_sent_ahead_of_their_bytes_hold_back_further_fds(
    fds: FdFactory,
) -> None:
    # A partial write can carry the fds of a message whose bytes did not go
    # out yet.  While such fds are outstanding, no further fds are planned,
    # so a slow kernel cannot pile up fds in the receiver's queue beyond its
    # max_queued_handles (2 x 253) one 128-fd plan at a time.
    encoder = MessageEncoder()
    batches = [fds.make(128) for _ in range(5)]
    queue(encoder, Message(bytes(1000)), *(Message(b"m", b) for b in batches))
    decoder = MessageDecoder()  # max_queued_handles=506
    got: list[Message] = []
    plans: list[tuple[int, int]] = []
    try:
        while encoder:  # the kernel takes one byte per sendmsg
            buffers, plan_fds = encoder.plan()
            plans.append((len(joined(buffers)), len(plan_fds)))
            decoder.receive_handles([Handle.dup(fd) for fd in plan_fds])
            decoder.receive_data(joined(buffers)[:1])
            encoder.advance(1)
            got += drain(decoder)[0]
            assert decoder.queued_handles <= 2 * MAX_SENDMSG_HANDLES
        assert plans[0] == (1016 + 17, 128)  # the first batch went early ...
        assert plans[1] == (1015 + 17, 0)  # ... so the next one waits
        assert plans[1016] == (17 + 17, 128)
        assert [m.payload for m in got] == [bytes(1000)] + [b"m"] * 5
        assert [len(m.handles) for m in got] == [0] + [128] * 5
    finally:
        decoder.close()
        for message in got:
            message.close()


def test_coalesced_batches_stay_within_the_receivers_fd_cap(fds: FdFactory) -> None:
    # Found by the round-trip property below: a plan that finishes a 253-fd
    # message also carries the next batch of 127 fds, the receiver reads only
    # one byte of it, and its next read brings another 127 fds.
    encoder = MessageEncoder()
    counts = [0, 0, 253, 0, 127, 127]
    batches = [fds.make(n) for n in counts]
    queue(encoder, *(Message(b"", b) for b in batches))
    segments: list[tuple[bytes, list[Handle]]] = []
    for sent, planned_fds in zip(
        [32, 1, 1, 46, 16], [0, 128, 125, 127, 127], strict=True
    ):
        buffers, plan_fds = encoder.plan()
        assert len(plan_fds) == planned_fds
        kernel = [Handle.dup(fd) for fd in plan_fds]
        segments.append((joined(buffers)[:sent], kernel))
        encoder.advance(sent)
    assert not encoder
    decoder = MessageDecoder()
    got: list[Message] = []
    try:
        # reads: [0, 33) [33, 34) [34, 35) [35, 96), fds before their bytes
        stream = b"".join(data for data, _ in segments)
        reads = [(0, 33, [1]), (33, 34, [2]), (34, 35, [3]), (35, 96, [4])]
        for lo, hi, with_fds in reads:
            for index in with_fds:
                decoder.receive_handles(segments[index][1])
            decoder.receive_data(stream[lo:hi])
            got += drain(decoder)[0]
        assert [len(m.handles) for m in got] == counts
    finally:
        decoder.close()
        for message in got:
            message.close()
        for _, kernel in segments:
            for handle in kernel:
                handle.close()


def test_close_closes_only_unsent_handles(fds: FdFactory) -> None:
    encoder = MessageEncoder()
    big = fds.make(200)
    other = fds.make(2)
    owned = numbers(big + other)
    queue(encoder, Message(b"big", big), Message(b"other", other))
    encoder.plan()
    encoder.advance(1)  # the first 128 went out and are closed already
    assert none_open(owned[:128])
    # New fds take the numbers just freed: closing one of those again would
    # close someone else's file.
    reused = [os.dup(0) for _ in range(128)]
    assert sorted(reused) == sorted(owned[:128])
    try:
        encoder.close()
        encoder.close()  # idempotent
        assert none_open(owned[128:])
        assert all_open(reused)
    finally:
        close_fds(reused)
    assert not encoder
    assert encoder.queued_bytes == 0
    with pytest.raises(ValueError, match="planned"):
        encoder.advance(1)


# ---------------------------------------------------------------------------
# Round trip: MessageEncoder -> (simulated kernel) -> MessageDecoder


@dataclass
class Spec:
    payload: bytes
    num_handles: int
    type: MessageType


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


specs_strategy = st.lists(
    st.builds(
        lambda size, seed, n, legacy: Spec(
            _payload(size, seed),
            n,
            MessageType.NORMAL_LEGACY if legacy else MessageType.NORMAL,
        ),
        st.one_of(st.integers(0, 64), st.integers(0, 64 * 1024)),
        st.integers(0, 2**16),
        st.one_of(st.just(0), st.integers(1, 4), st.integers(0, MAX_ATTACHED_HANDLES)),
        st.booleans(),
    ),
    max_size=6,
)


@given(framing=st.sampled_from(Framing), specs=specs_strategy, data=st.data())
def test_round_trip_through_partial_writes_and_arbitrary_reads(
    framing: Framing, specs: list[Spec], data: st.DataObject
) -> None:
    if framing is Framing.IPCZ:
        for spec in specs:
            spec.type = MessageType.NORMAL
    made: list[Handle] = []  # every handle of this example, closed at the end
    pipes = [os.pipe() for _ in specs]
    # The entries own the fds they took until they are sent: an example that
    # hypothesis stops half-way leaves them in one or the other.
    entries: list[OutgoingMessage] = []
    encoder = MessageEncoder()
    try:
        _round_trip(encoder, entries, framing, specs, pipes, made, data)
    finally:
        close_fds(fd for entry in entries for fd in entry.fds)
        encoder.close()
        for handle in made:
            handle.close()
        for pipe in pipes:
            os.close(pipe[0])
            os.close(pipe[1])


def _round_trip(
    encoder: MessageEncoder,
    entries: list[OutgoingMessage],
    framing: Framing,
    specs: list[Spec],
    pipes: list[tuple[int, int]],
    made: list[Handle],
    data: st.DataObject,
) -> None:
    owner: dict[int, tuple[int, int]] = {}  # sender fd -> (message, handle index)
    starts: list[int] = []
    stream_size = 0
    expected_stream = []
    for index, spec in enumerate(specs):
        handles = [Handle.dup(pipes[index][0]) for _ in range(spec.num_handles)]
        made.extend(handles)
        owner.update({h.fileno(): (index, j) for j, h in enumerate(handles)})
        message = Message(spec.payload, handles, spec.type)
        # Sometimes pack it into the previous entry, as the channel does.
        previous = entries[-1] if entries else None
        before = len(joined(previous.parts)) if previous is not None else 0
        wire: bytes
        if (
            previous is not None
            and data.draw(st.booleans(), label="batch")
            and previous.append(message, framing)
        ):
            wire = joined(previous.parts)[before:]
        else:
            entry = OutgoingMessage.encode(message, framing)
            entries.append(entry)
            wire = joined(entry.parts)
        expected_stream.append(wire)
        starts.append(stream_size)
        stream_size += len(wire)
    for entry in entries:
        encoder.push(entry)
    assert sum(entry.count for entry in entries) == len(specs)
    entries.clear()  # the encoder owns them now
    ends = [*starts[1:], stream_size]
    all_fds = [(i, j) for i, spec in enumerate(specs) for j in range(spec.num_handles)]

    # -- send: plan, check the plan, let the "kernel" take a prefix
    segments: list[tuple[int, list[Handle]]] = []  # (first byte, kernel's fds)
    stream = bytearray()
    fds_sent = [0] * len(specs)
    partial_writes = 0
    while encoder:
        buffers, plan_fds = encoder.plan()
        plan = joined(buffers)
        pos = len(stream)
        assert plan == b"".join(expected_stream)[pos : pos + len(plan)]
        assert len(plan) >= 1
        assert len(plan_fds) <= MAX_SENDMSG_HANDLES
        # fds go in global FIFO order, each in a plan with one of its bytes
        planned = [owner[fd] for fd in plan_fds]
        assert planned == all_fds[sum(fds_sent) : sum(fds_sent) + len(planned)]
        for i, _ in planned:
            assert starts[i] < pos + len(plan)
            assert ends[i] > pos
        if partial_writes < 40:
            sent = data.draw(
                st.one_of(st.just(len(plan)), st.integers(1, len(plan))), label="sent"
            )
        else:
            sent = len(plan)
        partial_writes += sent < len(plan)
        kernel = [Handle.dup(fd) for fd in plan_fds]  # the kernel's references
        made.extend(kernel)
        segments.append((pos, kernel))
        stream += plan[:sent]
        encoder.advance(sent)
        for i, _ in planned:
            fds_sent[i] += 1
        assert none_open(plan_fds)
        new_pos = len(stream)
        for i, spec in enumerate(specs):
            # no later than the first byte (the first batch of 128) ...
            if pos <= starts[i] < new_pos:
                assert fds_sent[i] >= min(spec.num_handles, MAX_SENDMSG_HANDLES)
            # ... and all of them no later than the last byte
            if pos < ends[i] <= new_pos:
                assert fds_sent[i] == spec.num_handles
        early = sum(n for i, n in enumerate(fds_sent) if starts[i] >= new_pos)
        assert early <= MAX_SENDMSG_HANDLES
    assert bytes(stream) == b"".join(expected_stream)
    assert sum(fds_sent) == len(all_fds)

    # -- receive: arbitrary chunks; a segment's fds come with its first byte.
    # Like Linux, one recvmsg returns the fds of at most one sendmsg: it ends
    # inside the first segment that carried fds.
    cuts = set(
        data.draw(
            st.lists(st.integers(0, len(stream)), max_size=16, unique=True),
            label="cuts",
        )
    )
    with_fds = [s for s, kernel in segments if kernel]
    for prev, nxt in itertools.pairwise(with_fds):
        if not any(prev < c <= nxt for c in cuts):
            cuts.add(nxt)
    points = sorted({0, len(stream), *cuts})
    seg_starts = [s for s, _ in segments]
    decoder = MessageDecoder(framing=framing)
    got: list[Message] = []
    for lo, hi in itertools.pairwise(points):
        first = bisect.bisect_left(seg_starts, lo)
        last = bisect.bisect_left(seg_starts, hi)
        for _, kernel in segments[first:last]:
            decoder.receive_handles(kernel)
        decoder.receive_data(memoryview(stream)[lo:hi])
        got += drain(decoder)[0]
    decoder.receive_eof()
    assert decoder.next_message() is END_OF_STREAM

    assert len(got) == len(specs)
    received = [h for m in got for h in m.handles]
    assert received == [h for _, kernel in segments for h in kernel]  # FIFO
    for index, (message, spec) in enumerate(zip(got, specs, strict=True)):
        assert message.payload == spec.payload
        assert message.type is spec.type
        assert len(message.handles) == spec.num_handles
        identity = file_identity(pipes[index][0])
        assert all(file_identity(h.fileno()) == identity for h in message.handles)


# ---------------------------------------------------------------------------
# Batches: small messages packed into one entry


def test_append_packs_small_messages_into_one_entry(fds: FdFactory) -> None:
    first = OutgoingMessage.encode(Message(b"one"))
    handles = fds.make(2)
    owned = numbers(handles)
    assert first.append(Message(b"two", handles))
    assert all(h.closed for h in handles)  # the entry took the fds
    assert first.append(Message(b"three", (), MessageType.NORMAL_LEGACY))
    assert first.count == 3
    assert first.fds == owned
    assert joined(first.parts) == (
        encode_message(b"one")
        + encode_message(b"two", num_handles=2)
        + encode_message(b"three", type=MessageType.NORMAL_LEGACY)
    )
    assert len(first.parts) == 2  # the first frame, then one buffer for the rest
    assert first.size == len(joined(first.parts))
    encoder = MessageEncoder()
    encoder.push(first)
    buffers, plan_fds = encoder.plan()
    assert joined(buffers) == joined(first.parts)
    assert plan_fds == owned  # all with the first byte
    assert encoder.advance(10) == 0  # a batch counts when it is done
    assert none_open(owned)
    assert encoder.plan()[1] == []
    assert encoder.advance(first.size - 10) == 3


def test_append_in_ipcz_framing() -> None:
    entry = OutgoingMessage.encode(Message(b"a"), Framing.IPCZ)
    assert entry.append(Message(b"bc"), Framing.IPCZ)
    decoder = MessageDecoder(framing=Framing.IPCZ)
    decoder.receive_data(joined(entry.parts))
    assert [m.payload for m in drain(decoder)[0]] == [b"a", b"bc"]


def test_append_refuses_what_does_not_fit(fds: FdFactory) -> None:
    small = Message(b"s")
    started = OutgoingMessage.encode(small)
    started.offset = 1
    assert not started.append(small)  # part of it was sent
    full = OutgoingMessage.encode(Message(b"f" * INLINE_PAYLOAD))
    while full.append(Message(b"f" * INLINE_PAYLOAD)):
        pass
    assert full.size <= MAX_BATCH_BYTES < full.size + INLINE_PAYLOAD + 16
    assert full.count == MAX_BATCH_BYTES // (INLINE_PAYLOAD + 16)
    assert len(full.parts) == 2  # the first frame, then one buffer
    large = b"L" * (INLINE_PAYLOAD + 1)
    parted = OutgoingMessage.encode(Message(large))
    while parted.append(Message(large)):
        pass
    assert len(parted.parts) == MAX_BATCH_PARTS  # header and payload each
    assert parted.count == MAX_BATCH_PARTS // 2
    assert not parted.append(small)  # a third part
    many = OutgoingMessage.encode(Message(b"", fds.make(MAX_SENDMSG_HANDLES - 1)))
    extra = fds.make(2)
    assert not many.append(Message(b"", extra))  # 129 fds in one sendmsg
    assert not any(h.closed for h in extra)  # refused: nothing was taken
    assert many.append(Message(b"", extra[:1]))
    assert len(many.fds) == MAX_SENDMSG_HANDLES
    assert [e.count for e in (started, many)] == [1, 2]
    assert not extra[1].closed
    close_fds(many.fds)


def test_append_gives_back_the_fds_of_a_message_it_refuses(fds: FdFactory) -> None:
    entry = OutgoingMessage.encode(Message(bytes(MAX_BATCH_BYTES - 100)))
    handles = fds.make(3)
    owned = numbers(handles)
    assert not entry.append(Message(bytes(200), handles))  # past 256 KiB
    assert numbers(handles) == owned  # the same handles own them again
    assert len(entry.fds) == 0
    assert entry.append(Message(bytes(50), handles))
    assert all(h.closed for h in handles)
    assert list(entry.fds) == owned
    close_fds(entry.fds)


def test_large_and_small_messages_share_an_entry(fds: FdFactory) -> None:
    # The rest of a burst, whatever its sizes, is one entry: small frames
    # copied into one buffer, large payloads sent from the caller's bytes.
    large = bytes(range(256)) * 8
    handles = fds.make(2)
    owned = numbers(handles)
    entry = OutgoingMessage.encode(Message(b"a"))
    assert entry.append(Message(large, handles[:1]))
    assert entry.append(Message(b"b"))
    assert entry.append_payload(b"c")
    assert entry.append(Message(large, handles[1:]))
    assert entry.append_payload(large)
    assert entry.count == 6
    assert entry.fds == owned
    assert [len(part) for part in entry.parts] == [17, 16, 2048, 34, 16, 2048, 16, 2048]
    assert entry.parts[2] is large  # not copied
    wire = (
        encode_message(b"a")
        + encode_message(large, num_handles=1)
        + encode_message(b"b")
        + encode_message(b"c")
        + encode_message(large, num_handles=1)
        + encode_message(large)
    )
    assert joined(entry.parts) == wire
    assert entry.size == len(wire)
    offsets = [0, 1, 17, 20, 33, 2081, 2115, len(wire) - 1]
    for offset in [*offsets, *reversed(offsets)]:  # forward, then back
        entry.offset = offset
        assert joined(entry.unsent()) == wire[offset:]
        assert bytes(entry.first_unsent_byte()) == wire[offset : offset + 1]
    entry.offset = 0
    encoder = MessageEncoder()
    encoder.push(entry)
    buffers, plan_fds = encoder.plan()
    assert plan_fds == owned
    assert joined(buffers) == wire
    assert encoder.advance(len(wire)) == 6
    assert none_open(owned)


def test_append_payload_packs_like_append(fds: FdFactory) -> None:
    handles = fds.make(3)
    owned = numbers(handles)
    bare = [h.detach() for h in fds.make(3)]  # taken from their handles
    by_append = OutgoingMessage.encode(Message(b"one"))
    by_payload = OutgoingMessage.encode(Message(b"one"))
    for payload, attached, attached_fds in (
        (b"two", handles[:1], bare[:1]),
        (b"", (), []),
        (b"L" * (INLINE_PAYLOAD + 1), (), []),
        (b"x" * 9, handles[1:], bare[1:]),
    ):
        assert by_append.append(Message(payload, attached))
        assert by_payload.append_payload(payload, attached_fds)
    assert joined(by_payload.parts) == joined(by_append.parts)
    assert (by_payload.size, by_payload.count) == (by_append.size, by_append.count)
    assert (by_append.fds, by_payload.fds) == (owned, bare)
    close_fds([*by_append.fds, *by_payload.fds])
    assert plain_frame(b"two") == encode_message(b"two")


def test_encode_and_append_take_fd_numbers_already_taken(fds: FdFactory) -> None:
    # The channel's send takes the fds from the handles first and passes
    # their numbers; the message's handles are not looked at then.
    bare = [h.detach() for h in fds.make(3)]
    entry = OutgoingMessage.encode(Message(b"a"), fds=bare[:1])
    assert entry.append(Message(b"L" * (INLINE_PAYLOAD + 1)), fds=bare[1:])
    assert list(entry.fds) == bare
    assert joined(entry.parts) == encode_message(b"a", num_handles=1) + (
        encode_message(b"L" * (INLINE_PAYLOAD + 1), num_handles=2)
    )
    close_fds(entry.fds)


def test_append_payload_refuses_what_does_not_fit(fds: FdFactory) -> None:
    started = OutgoingMessage.encode(Message(b"s"))
    started.offset = 1
    assert not started.append_payload(b"s")  # part of it was sent
    full = OutgoingMessage.encode(Message(b"f" * INLINE_PAYLOAD))
    while full.append_payload(b"f" * INLINE_PAYLOAD):
        pass
    assert full.size <= MAX_BATCH_BYTES < full.size + INLINE_PAYLOAD + 16
    parted = OutgoingMessage.encode(Message(b"s"))
    while parted.append_payload(b"L" * (INLINE_PAYLOAD + 1)):
        pass
    assert len(parted.parts) == MAX_BATCH_PARTS - 1  # 1 + 31 x 2
    assert not parted.append_payload(b"s")  # a new buffer would pass the bound
    many = OutgoingMessage.encode(Message(b"", fds.make(MAX_SENDMSG_HANDLES - 1)))
    extra = [h.detach() for h in fds.make(2)]
    assert not many.append_payload(b"", extra)  # 129 fds in one sendmsg
    assert many.append_payload(b"", extra[:1])
    assert len(many.fds) == MAX_SENDMSG_HANDLES
    assert [e.count for e in (started, many)] == [1, 2]
    assert many.fds[-1] == extra[0]
    close_fds([*many.fds, extra[1]])


def test_a_batch_whose_fds_went_early_holds_back_further_fds(fds: FdFactory) -> None:
    # Rule 4 for a batch: its fds all ride on its first byte, so those of its
    # later messages are ahead of their bytes until the batch is written.
    # (Found by the round-trip property test: the next entry's fds went out
    # too, and the receiver held 129 early fds.)
    batch = OutgoingMessage.encode(Message(b""))
    assert batch.append(Message(b"", fds.make(64)))
    after = OutgoingMessage.encode(Message(b"", fds.make(65)))
    encoder = MessageEncoder()
    encoder.push(batch)
    encoder.push(after)
    buffers, plan_fds = encoder.plan()
    assert len(plan_fds) == 64  # (with the next entry's 65: past 128)
    assert joined(buffers) == joined(batch.parts)
    encoder.advance(1)  # the batch's fds are out, its second message is not
    buffers, plan_fds = encoder.plan()
    assert plan_fds == []
    assert joined(buffers) == joined(batch.parts)[1:]
    encoder.advance(batch.size - 1)
    buffers, plan_fds = encoder.plan()
    assert len(plan_fds) == 65
    assert encoder.advance(len(joined(buffers))) == 1


def test_append_propagates_header_errors() -> None:
    entry = OutgoingMessage.encode(Message(b"a"), Framing.IPCZ)
    with pytest.raises(ValueError, match="IPCZ carries only NORMAL"):
        entry.append(Message(b"b", (), MessageType.NORMAL_LEGACY), Framing.IPCZ)
    assert entry.count == 1
    assert entry.size == len(joined(entry.parts))
