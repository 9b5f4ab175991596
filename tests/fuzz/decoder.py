"""Rule: any bytes and fds, whole or split, in any framing and handle policy, yield exactly the reference parse's messages or its documented error (MalformedMessageError/DisconnectedError), the decoder holds at most a small multiple of the bytes fed, and no fd leaks.

Input layout (read with :class:`~fuzz._input.FuzzInput`)::

    u8  flags      bit 0 IPCZ framing, bit 1 HandlePolicy.REJECT,
                   bit 2 lenient handles (strict_handles=False),
                   bit 3 ipcz_parse_threshold=16, bit 4 end of stream at
                   the end, bit 5 each read is a bytearray that is
                   overwritten once fed (the decoder must keep a copy)
    u8  limits     bits 0-2 max_message_size, bits 3-4
                   max_handles_per_message, bits 5-6 max_queued_handles
                   (indexes into the tables below)
    u8  chunks     how many chunk records follow (mod 17)
    per chunk:     u16 length, u8 fds arriving just before its bytes,
                   u8 repeat (the chunk's bytes repeated that many times)
    rest           the stream; what the chunks leave is one final chunk

The decoder is fed like the channel feeds it (a read's fds, then its bytes,
then drained with ``next_message`` until ``NEED_DATA``), and so is the
reference (:mod:`fuzz._reference`); every step's outcome must match.  The
fds are real (dups of one ``/dev/null`` fd): the decoder must close every fd
it did not deliver, must not close one it delivered, and the process' fd
table must be back to where it was.  ``tracemalloc`` measures the peak of
what was allocated while feeding.
"""

from __future__ import annotations

import contextlib
import os
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from _fds import open_fds

from trio_mojo import (
    DEFAULT_MAX_MESSAGE_SIZE,
    END_OF_STREAM,
    MAX_ATTACHED_HANDLES,
    NEED_DATA,
    DisconnectedError,
    Framing,
    Handle,
    HandlePolicy,
    MalformedMessageError,
    Message,
    MessageDecoder,
)

from ._input import FuzzInput, InputWriter
from ._reference import Delivered, Event, Options, ReferenceDecoder, ReferenceParseError

__all__ = ["Chunk", "DecoderCase", "open_target"]

MAX_MESSAGE_SIZES: tuple[int | None, ...] = (
    DEFAULT_MAX_MESSAGE_SIZE,
    None,
    16,
    24,
    100,
    4096,
    65536,
    1 << 20,
)
MAX_HANDLES_PER_MESSAGE: tuple[int | None, ...] = (MAX_ATTACHED_HANDLES, 0, 3, None)
QUEUED_CHOICES = ("default", "unbounded", "equal", "plus-one-read")
MAX_CHUNKS = 16
MAX_FDS = 1024
"""Fds per input, at most (later chunks bring none)."""
MAX_FED = 8 << 20
"""Bytes per input, at most (a repeat is cut short)."""
MEMORY_FACTOR = 3
MEMORY_SLACK = 64 * 1024
MEMORY_PER_FD = 512
"""What decoding may allocate, at most: ``MEMORY_FACTOR`` x the bytes fed
(which were allocated before), plus slack, plus per fd (each is also a
Handle and list slots in the harness)."""

_DOCUMENTED = (MalformedMessageError, DisconnectedError)


@dataclass(frozen=True)
class Chunk:
    """One read: ``fds`` fds arrive, then ``data`` repeated ``repeat`` times."""

    data: bytes
    fds: int = 0
    repeat: int = 1

    @property
    def payload(self) -> bytes:
        return self.data * max(1, self.repeat)


@dataclass(frozen=True)
class DecoderCase:
    """One decoded fuzz input."""

    framing: Framing = Framing.MOJO
    handle_policy: HandlePolicy = HandlePolicy.ACCEPT
    strict_handles: bool = True
    ipcz_parse_threshold: int = 8
    eof: bool = False
    reused_buffers: bool = False
    size_index: int = 0
    handles_index: int = 0
    queued_index: int = 0
    chunks: tuple[Chunk, ...] = ()

    @classmethod
    def from_bytes(cls, data: bytes) -> DecoderCase:
        reader = FuzzInput(data)
        flags = reader.u8()
        limits = reader.u8()
        records = [
            (reader.u16(), reader.u8(), reader.u8())
            for _ in range(reader.u8() % (MAX_CHUNKS + 1))
        ]
        stream = reader.rest()
        chunks = []
        pos = fds = fed = 0
        for length, wanted_fds, repeat in records:
            piece = stream[pos : pos + length]
            pos += len(piece)
            nfds = min(wanted_fds, MAX_FDS - fds)
            fds += nfds
            times = max(1, min(repeat, (MAX_FED - fed) // max(1, len(piece))))
            fed += len(piece) * times
            chunks.append(Chunk(piece, nfds, times))
        if pos < len(stream):
            chunks.append(Chunk(stream[pos:]))
        return cls(
            framing=Framing.IPCZ if flags & 1 else Framing.MOJO,
            handle_policy=HandlePolicy.REJECT if flags & 2 else HandlePolicy.ACCEPT,
            strict_handles=not flags & 4,
            ipcz_parse_threshold=16 if flags & 8 else 8,
            eof=bool(flags & 16),
            reused_buffers=bool(flags & 32),
            size_index=limits & 7,
            handles_index=(limits >> 3) & 3,
            queued_index=(limits >> 5) & 3,
            chunks=tuple(chunks),
        )

    def to_bytes(self) -> bytes:
        """The input that :meth:`from_bytes` reads back as this case."""
        flags = (
            (self.framing is Framing.IPCZ)
            | (self.handle_policy is HandlePolicy.REJECT) << 1
            | (not self.strict_handles) << 2
            | (self.ipcz_parse_threshold == 16) << 3
            | self.eof << 4
            | self.reused_buffers << 5
        )
        limits = self.size_index | self.handles_index << 3 | self.queued_index << 5
        writer = InputWriter().u8(flags).u8(limits).u8(len(self.chunks))
        for chunk in self.chunks:
            writer.u16(len(chunk.data)).u8(chunk.fds).u8(chunk.repeat)
        for chunk in self.chunks:
            writer.raw(chunk.data)
        return writer.build()

    def options(self) -> Options:
        per_message = MAX_HANDLES_PER_MESSAGE[self.handles_index]
        resolved = 0xFFFF if per_message is None else per_message
        queued = {
            "default": max(2 * MAX_ATTACHED_HANDLES, resolved),
            "unbounded": None,
            "equal": resolved,
            "plus-one-read": resolved + 128,
        }[QUEUED_CHOICES[self.queued_index]]
        size = MAX_MESSAGE_SIZES[self.size_index]
        return Options(
            framing=self.framing,
            handle_policy=self.handle_policy,
            strict_handles=self.strict_handles,
            ipcz_parse_threshold=self.ipcz_parse_threshold,
            max_message_size=0xFFFF_FFFF if size is None else size,
            max_handles_per_message=resolved,
            max_queued_handles=queued,
        )

    def decoder(self) -> MessageDecoder:
        options = self.options()
        return MessageDecoder(
            framing=self.framing,
            handle_policy=self.handle_policy,
            max_message_size=MAX_MESSAGE_SIZES[self.size_index],
            max_handles_per_message=MAX_HANDLES_PER_MESSAGE[self.handles_index],
            max_queued_handles=options.max_queued_handles,
            strict_handles=self.strict_handles,
            ipcz_parse_threshold=self.ipcz_parse_threshold,
        )


def reference_events(case: DecoderCase) -> tuple[list[Event], ReferenceDecoder]:
    """What the reference yields, step by step, for ``case``."""
    reference = ReferenceDecoder(case.options())
    events: list[Event] = []
    try:
        for chunk in case.chunks:
            reference.receive_handles(chunk.fds)
            reference.receive_data(chunk.payload)
            _drain_reference(reference, events)
        if case.eof:
            reference.receive_eof()
            _drain_reference(reference, events)
    except ReferenceParseError as failure:
        events.append(failure.kind)
    return events, reference


def _drain_reference(reference: ReferenceDecoder, events: list[Event]) -> None:
    while True:
        event = reference.next_event()
        events.append(event)
        if not isinstance(event, Delivered):
            return


class _Run:
    """The decoder under test, fed one case; keeps every fd it was given."""

    def __init__(self, case: DecoderCase, devnull: int) -> None:
        self.case = case
        self.decoder = case.decoder()
        self._devnull = devnull
        self.fed: list[Handle] = []
        self._serial: dict[int, int] = {}
        self.delivered: list[Message] = []
        self.events: list[Event] = []

    def run(self, payloads: list[bytes | bytearray]) -> None:
        decoder = self.decoder
        try:
            for chunk, payload in zip(self.case.chunks, payloads, strict=True):
                handles = [Handle(os.dup(self._devnull)) for _ in range(chunk.fds)]
                for handle in handles:
                    self._serial[id(handle)] = len(self.fed)
                    self.fed.append(handle)
                decoder.receive_handles(handles)
                decoder.receive_data(payload)
                if isinstance(payload, bytearray) and payload:
                    payload.reverse()  # the reader reuses its buffer (in
                    payload[0] ^= 0xFF  # place: no allocation to count)
                self._drain()
            if self.case.eof:
                decoder.receive_eof()
                self._drain()
                self._check_closed_for_input()
        except _DOCUMENTED as exc:
            self.events.append(type(exc))
            self._check_failed_for_good(type(exc))

    def _drain(self) -> None:
        while True:
            event = self.decoder.next_message()
            if event is NEED_DATA:
                self.events.append("need")
                return
            if event is END_OF_STREAM:
                self.events.append("end")
                return
            assert isinstance(event, Message), event
            self.delivered.append(event)
            serials = tuple(self._serial[id(handle)] for handle in event.handles)
            self.events.append(Delivered(event.payload, event.type, serials))

    def _check_closed_for_input(self) -> None:
        """After ``receive_eof``, feeding more is a RuntimeError (fds closed)."""
        decoder = self.decoder
        decoder.receive_eof()  # idempotent
        late = Handle(os.dup(self._devnull))
        try:
            assert _raises(RuntimeError, lambda: decoder.receive_data(b"x"))
            assert _raises(RuntimeError, lambda: decoder.receive_handles([late]))
            assert late.closed, "receive_handles() after EOF kept the fd"
        finally:
            late.close()
        event = decoder.next_message()
        assert event is END_OF_STREAM, f"after the end: {event!r}"

    def _check_failed_for_good(self, kind: type[Exception]) -> None:
        """A failed decoder raises the same error again and takes nothing."""
        decoder = self.decoder
        assert decoder.failed
        assert decoder.queued_handles == 0
        assert _raises(kind, decoder.next_message)
        assert _raises(kind, lambda: decoder.receive_data(b"x"))
        late = Handle(os.dup(self._devnull))
        try:
            assert _raises(kind, lambda: decoder.receive_handles([late]))
            assert late.closed, "a failed decoder kept an fd handed to it"
        finally:
            late.close()


def _raises(kind: type[Exception], call: Callable[[], object]) -> bool:
    """Whether ``call()`` raises ``kind`` (anything else propagates)."""
    try:
        call()
    except kind:
        return True
    return False


def check(case: DecoderCase, devnull: int) -> None:
    """Run ``case`` through the decoder and the reference; check the rule."""
    expected, reference = reference_events(case)
    payloads: list[bytes | bytearray] = [chunk.payload for chunk in case.chunks]
    if case.reused_buffers:
        payloads = [bytearray(payload) for payload in payloads]
    fed_bytes = sum(map(len, payloads))
    fds_before = len(open_fds())
    run = _Run(case, devnull)
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    try:
        run.run(payloads)
        peak = tracemalloc.get_traced_memory()[1] - start
        _compare(run.events, expected)
        allowance = (
            MEMORY_FACTOR * fed_bytes + MEMORY_SLACK + MEMORY_PER_FD * len(run.fed)
        )
        assert peak <= allowance, (
            f"decoding {fed_bytes} bytes and {len(run.fed)} fds allocated up to "
            f"{peak} bytes (allowed {allowance})"
        )
        if not run.decoder.failed:
            assert run.decoder.queued_handles == reference.queued_handles
            assert run.decoder.buffered_bytes == reference.held_bytes, (
                run.decoder.buffered_bytes,
                reference.held_bytes,
            )
        delivered = {id(h) for message in run.delivered for h in message.handles}
        for handle in run.fed:
            if id(handle) in delivered:
                assert not handle.closed, "the decoder closed a delivered fd"
            elif run.decoder.failed or run.events[-1] == "end":
                assert handle.closed, "the decoder kept an fd it will never deliver"
        run.decoder.close()
        assert all(handle.closed for handle in run.fed if id(handle) not in delivered)
    finally:
        run.decoder.close()
        for handle in run.fed:  # whatever a failed check left open
            handle.close()
    assert len(open_fds()) == fds_before, "fds leaked"


def _compare(actual: list[Event], expected: list[Event]) -> None:
    if actual == expected:
        return
    for index, (got, want) in enumerate(zip(actual, expected, strict=False)):
        if got != want:
            raise AssertionError(
                f"step {index}: the decoder gave {_show(got)}, the reference "
                f"{_show(want)} (steps so far agree: {len(actual[:index])})"
            )
    raise AssertionError(
        f"the decoder gave {len(actual)} steps, the reference {len(expected)}: "
        f"{[_show(e) for e in actual[-3:]]} vs {[_show(e) for e in expected[-3:]]}"
    )


def _show(event: Event) -> str:
    if isinstance(event, Delivered):
        return (
            f"message(type={event.type.name}, {len(event.payload)} bytes "
            f"{event.payload[:16]!r}, fds={event.handles[:8]})"
        )
    if isinstance(event, str):
        return event
    return event.__name__


@contextlib.contextmanager
def open_target(workdir: Path) -> Iterator[Callable[[bytes], None]]:
    """Yield the one-input function (``workdir`` is unused here)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield lambda data: check(DecoderCase.from_bytes(data), devnull)
    finally:
        os.close(devnull)
        if started:
            tracemalloc.stop()
