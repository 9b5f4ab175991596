"""A reference parse of the Mojo and ipcz framings: slow, obvious, independent.

The decoder under test keeps received chunks as they came, slices messages
out of them, collects a straddling message's chunks in a list and joins them
once.  This reference keeps one ``bytearray`` of everything received and not
yet delivered and, at every step, re-parses the message at its front
straight from ``mojo_spec.md`` (sections 2 and 3) and the limits documented
in ``trio_mojo._core._decoder``.  File descriptors are counted, not held:
a delivered message names the serial numbers (arrival order) of its fds.

The fuzz target feeds the same chunks to both and compares what comes out,
step by step.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, TypeAlias

from trio_mojo import (
    DisconnectedError,
    Framing,
    HandlePolicy,
    MalformedMessageError,
    MessageType,
)
from trio_mojo._core._decoder import MAX_BUFFERED_WHILE_WAITING

__all__ = [
    "Delivered",
    "Event",
    "Options",
    "ReferenceDecoder",
    "ReferenceParseError",
]


@dataclass(frozen=True)
class Options:
    """The decoder's constructor arguments, with ``None`` limits resolved."""

    framing: Framing
    handle_policy: HandlePolicy
    strict_handles: bool
    ipcz_parse_threshold: int
    max_message_size: int
    max_handles_per_message: int
    max_queued_handles: int | None


@dataclass(frozen=True)
class Delivered:
    """One delivered message; ``handles`` are the serials of its fds."""

    payload: bytes
    type: MessageType
    handles: tuple[int, ...]


Event: TypeAlias = "Delivered | Literal['need', 'end'] | type[Exception]"
"""What one step yields: a message, ``"need"`` (NEED_DATA), ``"end"``
(END_OF_STREAM), or the documented error class the step raised."""


class ReferenceParseError(Exception):
    """The reference decoder failed; ``kind`` is the documented error class."""

    def __init__(self, kind: type[Exception], reason: str) -> None:
        super().__init__(f"{kind.__name__}: {reason}")
        self.kind = kind


_MOJO_FIRST8 = struct.Struct("<IHH")  # num_bytes, num_header_bytes|num_handles, type
_IPCZ_FIRST8 = struct.Struct("<HHI")  # size, num_handles, num_bytes
_U16 = struct.Struct("<H")
_LEGACY_HEADER = 8
_HEADER = 16
_IPCZ_MIN_HEADER = 8
_LARGEST_TYPE = max(MessageType)


class ReferenceDecoder:
    """Mojo's framing rules, parsed again from the front at every step."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._stream = bytearray()
        self._fds_in = 0
        self._fds_out = 0
        self._eof = False
        # The front message's header was read while the message was still
        # arriving (its header size and size): once it is complete, the
        # decoder holds its payload without the header.
        self._collected: tuple[int, int] = (0, 0)

    @property
    def queued_handles(self) -> int:
        """Fds received and not yet claimed."""
        return self._fds_in - self._fds_out

    @property
    def held_bytes(self) -> int:
        """Bytes the decoder holds (a collected message's header is dropped)."""
        header_size, num_bytes = self._collected
        if header_size and len(self._stream) >= num_bytes:
            return len(self._stream) - header_size
        return len(self._stream)

    def receive_handles(self, count: int) -> None:
        if not count:
            return
        self._fds_in += count
        if self.options.handle_policy is HandlePolicy.REJECT:
            raise ReferenceParseError(MalformedMessageError, "fds on a REJECT channel")

    def receive_data(self, data: bytes) -> None:
        self._stream += data

    def receive_eof(self) -> None:
        self._eof = True

    def next_event(self) -> Delivered | Literal["need", "end"]:
        options = self.options
        stream = self._stream
        avail = len(stream)
        if options.framing is Framing.IPCZ:
            if avail < options.ipcz_parse_threshold:
                return self._short(avail)
            header_size, num_handles, num_bytes = _IPCZ_FIRST8.unpack_from(stream)
            if header_size < _IPCZ_MIN_HEADER or num_bytes < header_size:
                raise ReferenceParseError(MalformedMessageError, "bad ipcz header size")
            self._check_size(num_bytes)
            mtype = MessageType.NORMAL
        else:
            if avail < _LEGACY_HEADER:
                return self._short(avail)
            num_bytes, field, raw_type = _MOJO_FIRST8.unpack_from(stream)
            if num_bytes < _LEGACY_HEADER:
                raise ReferenceParseError(MalformedMessageError, "num_bytes below 8")
            self._check_size(num_bytes)
            if raw_type == MessageType.NORMAL_LEGACY:
                header_size, num_handles = _LEGACY_HEADER, field
            else:
                if raw_type > _LARGEST_TYPE:
                    raise ReferenceParseError(MalformedMessageError, "unknown type")
                if not _HEADER <= field <= num_bytes:
                    raise ReferenceParseError(MalformedMessageError, "num_header_bytes")
                if avail < _HEADER:
                    return self._short(avail)
                header_size = field
                num_handles = _U16.unpack_from(stream, 8)[0]
            mtype = MessageType(raw_type)
        if num_handles > options.max_handles_per_message:
            raise ReferenceParseError(MalformedMessageError, "too many handles")
        if num_handles and options.handle_policy is HandlePolicy.REJECT:
            raise ReferenceParseError(
                MalformedMessageError, "handles declared on REJECT"
            )
        if avail < num_bytes:
            if avail >= header_size and not self._eof:
                self._collected = (header_size, num_bytes)
            return self._short(avail)
        if num_handles > self.queued_handles:
            if options.strict_handles or self._eof:
                raise ReferenceParseError(MalformedMessageError, "fds missing")
            if self.held_bytes > MAX_BUFFERED_WHILE_WAITING:
                raise ReferenceParseError(
                    MalformedMessageError, "too much while waiting"
                )
            return "need"
        payload = bytes(stream[header_size:num_bytes])
        del stream[:num_bytes]
        self._collected = (0, 0)
        first = self._fds_out
        self._fds_out += num_handles
        return Delivered(payload, mtype, tuple(range(first, self._fds_out)))

    def _check_size(self, num_bytes: int) -> None:
        if num_bytes > self.options.max_message_size:
            raise ReferenceParseError(MalformedMessageError, "above max_message_size")

    def _short(self, avail: int) -> Literal["need", "end"]:
        if not self._eof:
            limit = self.options.max_queued_handles
            if limit is not None and self.queued_handles > limit:
                raise ReferenceParseError(MalformedMessageError, "too many queued fds")
            return "need"
        if avail:
            raise ReferenceParseError(DisconnectedError, "end of stream in a message")
        if self.queued_handles:
            if self.options.strict_handles:
                raise ReferenceParseError(MalformedMessageError, "unclaimed fds at end")
            self._fds_out = self._fds_in  # the lenient decoder closes them
        return "end"
