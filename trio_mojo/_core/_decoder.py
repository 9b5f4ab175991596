"""MessageDecoder: bytes and fds in, validated messages out.

Theory of operation
-------------------

The decoder is Mojo's ``Channel::ReadBuffer`` + ``TryDispatchMessage`` +
``incoming_fds_`` as a pure object, in the style of h11:

* ``receive_data(bytes)`` appends to the read buffer; ``receive_handles``
  appends received fds to a FIFO; ``receive_eof()`` records the end of the
  stream.  None of them parses.
* ``next_message()`` parses one message off the front of the buffer and
  returns it, or returns :data:`NEED_DATA` (feed more) or
  :data:`END_OF_STREAM` (clean EOF at a message boundary, everything
  delivered).  Call it in a loop after each feed; many messages per chunk
  are normal.
* The receive path's shortcuts return exactly what ``next_message`` would:
  ``next_batch`` (and ``receive_batch``, a feed and a batch in one call)
  parses the plain messages at the front of the buffer many at a time,
  and ``receive_plain`` takes a chunk that is exactly one plain message
  without fds while the decoder holds nothing (the request/response case)
  and leaves anything else untouched.

File descriptors are not tied to byte positions.  The kernel hands them out
with the first byte of the ``sendmsg`` that carried them, and a correct
sender attaches a message's fds to a ``sendmsg`` carrying its bytes, so the
fds of a message are always queued no later than its last byte.  When a
complete message is parsed it takes exactly ``num_handles`` fds from the
front of the FIFO, in order.  (The FIFO is a list: a message takes its fds
with one slice and one ``del``, both in C, rather than one ``popleft`` per
fd; it holds at most ``max_queued_handles`` plus one read's fds, so the
``del`` moves a few hundred pointers at most.)

Every header field is checked before it is used, in Chromium's order
(``mojo_spec.md`` sections 3.1 and 3.2), plus the hardening below.  A
malformed stream raises :class:`MalformedMessageError`, closes every fd the
decoder holds and leaves the decoder failed for good; an end of stream in
the middle of a message raises :class:`DisconnectedError` instead.

Hardening, each a constructor switch (the Chromium behaviour in brackets):

``max_message_size`` (256 MiB) [no cap below the u32 limit]
    A header whose ``num_bytes`` exceeds it is rejected as soon as the first
    8 bytes are in, before the message is buffered.
``max_handles_per_message`` (253) [65535]
    A header declaring more handles than this is malformed.
``max_queued_handles`` (506, twice the per-message maximum) [unbounded]
    More fds left waiting in the FIFO than this, once every complete message
    has been returned, is malformed: a peer cannot make us hold fds without
    limit.  (Checked when :meth:`~MessageDecoder.next_message` runs out of
    messages, not on arrival: the fds that come with a read usually belong
    to messages that the same read completes, and a correct sender can have
    a 253-fd message in progress plus two 128-fd batches in flight.  So at
    most ``max_queued_handles`` plus one read's fds are ever held.)
``strict_handles`` (True) [False: wait]
    A complete message whose fds have not arrived is malformed (Chromium
    stalls the channel forever waiting for them), and fds left unclaimed at
    a clean end of stream are malformed (Chromium silently hands surplus fds
    to the next message that claims some).  With ``False`` the decoder waits,
    but holds at most :data:`MAX_BUFFERED_WHILE_WAITING` (1 MiB) meanwhile.
``ipcz_parse_threshold`` (8) [16]
    In IPCZ framing Chromium only parses once 16 bytes are buffered, which
    strands a final message with an 8-byte header and no data; we parse
    from 8 bytes on.
``handle_policy=REJECT`` fails as soon as an fd *arrives*, not only when a
message claims one, so rejected fds are never held.

Memory and copies: the decoder holds only bytes that actually arrived,
never the size a header announces.  Each received chunk is kept as it came
(``bytes``) and messages are sliced out of it: one copy per payload.  When a
chunk ends inside a message whose header has been read, the decoder knows
how many bytes are missing; the following chunks are kept in a list until
exactly that many arrived, then joined into the payload (one copy, however
many chunks the message spans) and the rest of the last chunk becomes the
buffer.  So decoding is linear in the bytes received, a 4 MiB message costs
one copy after the kernel's, and a chunk is never copied just because a
message straddles its start.  Only a chunk that ends inside a *header* (at
most 15 bytes) is concatenated with the next one.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import Final, Literal, NoReturn, TypeAlias

from trio_mojo._errors import ChannelError, DisconnectedError, MalformedMessageError
from trio_mojo._handles import Handle, close_all

from ._message import (
    Message,
    _new,
    _set_handles,
    _set_payload,
    _set_type,
    received_message,
)
from ._wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    IPCZ_MIN_HEADER_SIZE,
    LEGACY_HEADER_SIZE,
    MAX_ATTACHED_HANDLES,
    MAX_HANDLES_FIELD,
    MAX_MESSAGE_SIZE_LIMIT,
    Framing,
    HandlePolicy,
    MessageType,
)

__all__ = ["END_OF_STREAM", "NEED_DATA", "MessageDecoder"]


class _Marker(enum.Enum):
    NEED_DATA = "NEED_DATA"
    END_OF_STREAM = "END_OF_STREAM"

    def __repr__(self) -> str:
        return f"trio_mojo.{self.value}"


NEED_DATA: Final = _Marker.NEED_DATA
"""What :meth:`MessageDecoder.next_message` returns when it needs more data."""
END_OF_STREAM: Final = _Marker.END_OF_STREAM
"""What :meth:`MessageDecoder.next_message` returns after a clean end of stream."""

DecoderEvent: TypeAlias = "Literal[_Marker.NEED_DATA, _Marker.END_OF_STREAM] | Message"

MAX_BUFFERED_WHILE_WAITING: Final = 1024 * 1024
"""With ``strict_handles=False``: bytes the decoder holds, at most, while a
complete message waits for its fds (then the stream is malformed)."""

_FIRST8 = struct.Struct("<IHH")  # num_bytes, (num_handles|num_header_bytes), type
_PLAIN_HEADER = struct.Struct("<IIH")  # num_bytes, (num_header_bytes|type), handles
_PLAIN_TAG = HEADER_SIZE | 1 << 16
"""The middle field of a plain message's header: num_header_bytes == 16 and
message_type == NORMAL (1), read as one little-endian u32."""
_unpack_plain = _PLAIN_HEADER.unpack_from
_U16 = struct.Struct("<H")
_IPCZ_FIRST8 = struct.Struct("<HHI")  # size, num_handles, num_bytes
_TYPES = tuple(MessageType)
_MAX_TYPE = len(_TYPES) - 1
_NORMAL = MessageType.NORMAL


def _take(queue: list[Handle], count: int) -> tuple[Handle, ...]:
    """Remove and return the first ``count`` handles of ``queue`` (which
    holds that many)."""
    taken = tuple(queue[:count])
    del queue[:count]
    return taken


class MessageDecoder:
    """Turns the received byte stream and fds back into :class:`Message` s.

    Args:
        framing: the header layout the peer writes.
        handle_policy: ``REJECT`` makes any fd from the peer malformed.
        max_message_size: largest accepted ``num_bytes`` (whole message,
            header included); ``None`` means the u32 limit (Chromium).
        max_handles_per_message: largest accepted handle count in a header;
            ``None`` means 65535 (Chromium).
        max_queued_handles: most fds that may wait unclaimed once every
            complete message was returned; ``None`` means unbounded
            (Chromium).
        strict_handles: missing or surplus fds are malformed (``True``) or,
            as in Chromium, the decoder waits for missing fds (``False``).
        ipcz_parse_threshold: bytes needed before an IPCZ header is parsed,
            8 (default) or Chromium's 16.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        *,
        framing: Framing = Framing.MOJO,
        handle_policy: HandlePolicy = HandlePolicy.ACCEPT,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        max_handles_per_message: int | None = MAX_ATTACHED_HANDLES,
        max_queued_handles: int | None = 2 * MAX_ATTACHED_HANDLES,
        strict_handles: bool = True,
        ipcz_parse_threshold: int = IPCZ_MIN_HEADER_SIZE,
    ) -> None:
        if not isinstance(framing, Framing):
            raise TypeError(f"framing must be a Framing, not {framing!r}")
        if not isinstance(handle_policy, HandlePolicy):
            raise TypeError(
                f"handle_policy must be a HandlePolicy, not {handle_policy!r}"
            )
        if max_message_size is None:
            max_message_size = MAX_MESSAGE_SIZE_LIMIT
        if not HEADER_SIZE <= max_message_size <= MAX_MESSAGE_SIZE_LIMIT:
            raise ValueError(
                f"max_message_size={max_message_size} is outside "
                f"{HEADER_SIZE}..{MAX_MESSAGE_SIZE_LIMIT}"
            )
        if max_handles_per_message is None:
            max_handles_per_message = MAX_HANDLES_FIELD
        if not 0 <= max_handles_per_message <= MAX_HANDLES_FIELD:
            raise ValueError(
                f"max_handles_per_message={max_handles_per_message} is outside "
                f"0..{MAX_HANDLES_FIELD}"
            )
        if (
            max_queued_handles is not None
            and max_queued_handles < max_handles_per_message
        ):
            raise ValueError(
                f"max_queued_handles={max_queued_handles} is below "
                f"max_handles_per_message={max_handles_per_message}"
            )
        if ipcz_parse_threshold not in (8, 16):
            raise ValueError(
                f"ipcz_parse_threshold must be 8 or 16, not {ipcz_parse_threshold}"
            )
        self.framing: Final = framing
        self.handle_policy: Final = handle_policy
        self.max_message_size: Final = max_message_size
        self.max_handles_per_message: Final = max_handles_per_message
        self.max_queued_handles: Final = max_queued_handles
        self.strict_handles: Final = strict_handles
        self.ipcz_parse_threshold: Final = ipcz_parse_threshold
        self._ipcz = framing is Framing.IPCZ
        self._accept_handles = handle_policy is HandlePolicy.ACCEPT
        self._buf = b""
        self._pos = 0
        # A message whose header was read but whose bytes are still arriving:
        # its header fields, the later chunks received for it, and how many
        # bytes it still needs.  _need == 0: no such message.
        self._partial: tuple[int, int, MessageType, int] = (0, 0, _NORMAL, 0)
        self._parts: list[bytes | memoryview] = []
        self._parts_size = 0
        self._need = 0
        # Its payload once complete, waiting for its fds or for next_message.
        self._complete: bytes | None = None
        self._handles: list[Handle] = []  # the fd FIFO
        self._eof = False
        self._failure: ChannelError | None = None

    # -- introspection --------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as part of a message."""
        complete = 0 if self._complete is None else len(self._complete)
        return len(self._buf) - self._pos + self._parts_size + complete

    @property
    def queued_handles(self) -> int:
        """Fds received but not yet claimed by a message."""
        return len(self._handles)

    @property
    def failed(self) -> bool:
        """True once the decoder raised; it stays failed."""
        return self._failure is not None

    # -- input ----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (the decoder keeps a copy if it must).

        Raises:
            RuntimeError: called after :meth:`receive_eof`.
            ChannelError: the decoder has already failed.
        """
        self._check_usable()
        if self._eof:
            raise RuntimeError("receive_data() after receive_eof()")
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # a snapshot: the caller may reuse its buffer
        need = self._need
        if need:
            if len(data) < need:
                self._parts.append(data)
                self._parts_size += len(data)
                self._need = need - len(data)
                return
            self._parts.append(memoryview(data)[:need])
            self._finish_partial()
            self._buf = data
            self._pos = need
            return
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = data
        else:
            self._buf = buf[pos:] + data  # a header, or a caller that did not drain
        self._pos = 0

    def _finish_partial(self) -> None:
        """Join the partial message's bytes into its payload (one copy)."""
        header_size = self._partial[0]
        with memoryview(self._buf) as view:
            first = view[self._pos + header_size :]
            self._complete = b"".join([first, *self._parts])
            first.release()
        for part in self._parts:
            if isinstance(part, memoryview):
                part.release()
        self._parts = []
        self._parts_size = 0
        self._need = 0
        self._buf = b""
        self._pos = 0

    def receive_handles(self, handles: Iterable[Handle]) -> None:
        """Take ownership of fds received from the peer, in arrival order.

        Raises:
            MalformedMessageError: the channel rejects handles.  All handles
                (these and the queued ones) are closed first.
            ChannelError: the decoder has already failed (the handles are
                closed).
        """
        handles = list(handles)
        if not handles:
            return
        if self._failure is not None or self._eof:
            close_all(handles)
            self._check_usable()
            raise RuntimeError("receive_handles() after receive_eof()")
        self._handles.extend(handles)
        if not self._accept_handles:
            self._fail(
                f"peer sent {len(handles)} file descriptor(s) on a channel whose "
                "handle_policy is REJECT"
            )

    def receive_eof(self) -> None:
        """Record the end of the stream.  Idempotent."""
        self._eof = True

    # -- output ---------------------------------------------------------

    def next_message(self) -> DecoderEvent:
        """Parse and return the next message.

        Returns:
            The next :class:`Message` (its handles now belong to the caller),
            :data:`NEED_DATA` if the buffered bytes hold no complete message,
            or :data:`END_OF_STREAM` after :meth:`receive_eof` once every
            message was returned.

        Raises:
            MalformedMessageError: the stream breaks the protocol or a limit.
            DisconnectedError: the stream ended inside a message.
        """
        if self._failure is not None:
            self._raise_failed()
        if self._complete is not None:
            return self._complete_message()
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if self._need:
            return self._short(avail + self._parts_size)
        if self._ipcz:
            if avail < self.ipcz_parse_threshold:
                return self._short(avail)
            header_size, num_handles, num_bytes = _IPCZ_FIRST8.unpack_from(buf, pos)
            if header_size < IPCZ_MIN_HEADER_SIZE or num_bytes < header_size:
                self._fail(
                    f"invalid IPCZ header: size={header_size}, "
                    f"num_bytes={num_bytes} (need 8 <= size <= num_bytes)"
                )
            self._check_size(num_bytes)
            mtype = _NORMAL
        else:
            if avail < LEGACY_HEADER_SIZE:
                return self._short(avail)
            num_bytes, field4, raw_type = _FIRST8.unpack_from(buf, pos)
            if num_bytes < LEGACY_HEADER_SIZE:
                self._fail(f"invalid message size: num_bytes={num_bytes} is below 8")
            self._check_size(num_bytes)  # before waiting for a 16-byte header
            if raw_type == 0:
                header_size = LEGACY_HEADER_SIZE
                num_handles = field4
            else:
                if raw_type > _MAX_TYPE:
                    self._fail(f"unknown message_type={raw_type}")
                if field4 < HEADER_SIZE or field4 > num_bytes:
                    self._fail(
                        f"invalid message header size: num_header_bytes={field4}, "
                        f"num_bytes={num_bytes} (need 16 <= num_header_bytes "
                        "<= num_bytes)"
                    )
                header_size = field4
                if avail < HEADER_SIZE:
                    return self._short(avail)
                num_handles = _U16.unpack_from(buf, pos + 8)[0]
            mtype = _TYPES[raw_type]
        if num_handles:
            if num_handles > self.max_handles_per_message:
                self._fail(
                    f"num_handles={num_handles} exceeds "
                    f"max_handles_per_message={self.max_handles_per_message}"
                )
            if not self._accept_handles:
                self._fail(
                    f"message declares num_handles={num_handles} on a channel whose "
                    "handle_policy is REJECT"
                )
        if avail < num_bytes:
            if avail >= header_size and not self._eof:
                # Whole header in: collect the rest of the payload as it comes.
                self._partial = (header_size, num_handles, mtype, num_bytes)
                self._need = num_bytes - avail
            return self._short(avail)
        handles = self._claim_handles(num_handles)
        if handles is None:
            return NEED_DATA
        end = pos + num_bytes
        payload = buf[pos + header_size : end]
        if end >= len(buf):
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end
        return received_message(payload, handles, mtype)

    def next_batch(
        self, max_messages: int, max_bytes: int
    ) -> tuple[list[Message], int, int, bool]:
        """Parse the plain messages at the front of the buffer, many at once.

        A plain message is a complete ``NORMAL`` message with the 16-byte
        header (``Framing.MOJO``) whose fds have all arrived: what a
        trio_mojo or Chromium peer sends.  This is the receive path's hot
        loop; it stops at ``max_messages``, once the payloads returned add up
        to more than ``max_bytes``, or before the first message that is not
        plain, which :meth:`next_message` then handles with every check.  A
        plain message that is still arriving is collected exactly as
        :meth:`next_message` would collect it (so the buffer then holds its
        first bytes, and the following calls return it first once it is
        complete).  Calling it never raises and never changes what
        :meth:`next_message` would return next, except that the messages it
        returns are gone.

        Returns:
            ``(messages, payload_bytes, handles, drained)``: the messages
            (their handles now belong to the caller), their total payload
            size, their total number of handles, and whether the buffer is
            now empty with nothing else to report, so that
            :meth:`next_message` would return :data:`NEED_DATA` (then the
            caller may skip it).
        """
        return self.receive_batch(b"", max_messages, max_bytes)

    def receive_batch(
        self, data: bytes | bytearray | memoryview, max_messages: int, max_bytes: int
    ) -> tuple[list[Message], int, int, bool]:
        """:meth:`receive_data` then :meth:`next_batch`, in one call.

        The receive path's hot spot: a read that brought one or a few
        plain messages costs one call, not two.

        Raises:
            ChannelError, RuntimeError: as :meth:`receive_data` (only when
                ``data`` is not empty; nothing was parsed then).
        """
        if (
            self._pos >= len(self._buf)
            and data.__class__ is bytes
            and not self._need
            and self._complete is None
            and self._failure is None
            and not self._eof
            and not self._ipcz
        ):
            # Nothing buffered: parse ``data`` itself (the common case).
            buf = self._buf = data
            pos = 0
            messages: list[Message] = []
            payload_bytes = handles_taken = 0
        else:
            if data:
                self.receive_data(data)
            if max_messages > 0 and max_bytes >= 0:
                messages, payload_bytes, handles_taken = self._completed_batch()
            else:
                messages, payload_bytes, handles_taken = [], 0, 0
            if (
                self._need
                or self._complete is not None
                or self._failure is not None
                or self._ipcz
            ):
                return messages, payload_bytes, handles_taken, False
            buf = self._buf
            pos = self._pos
            if messages:
                max_messages -= 1
                if payload_bytes > max_bytes:
                    max_messages = 0  # that one message passed the byte bound
        end = len(buf)
        collecting = False
        if max_messages > 0 and max_bytes >= 0:
            limit = self.max_message_size
            room = max_messages
            while end - pos >= HEADER_SIZE:
                num_bytes, tag, num_handles = _unpack_plain(buf, pos)
                stop = pos + num_bytes
                if (
                    tag != _PLAIN_TAG
                    or stop > end
                    or num_bytes < HEADER_SIZE
                    or num_bytes > limit
                ):
                    if (
                        stop > end
                        and tag == _PLAIN_TAG
                        and HEADER_SIZE <= num_bytes <= limit
                        and not self._eof
                        and (not num_handles or self._may_carry(num_handles))
                    ):
                        # A plain message that is still arriving: collect
                        # it as next_message() would.
                        self._partial = (HEADER_SIZE, num_handles, _NORMAL, num_bytes)
                        self._need = stop - end
                        collecting = True
                    break
                if num_handles:
                    queued = self._handles
                    if not self._may_carry(num_handles) or num_handles > len(queued):
                        break
                    handles: tuple[Handle, ...]
                    if num_handles == 1:
                        handles = (queued.pop(0),)
                    else:  # _take(), inlined
                        handles = tuple(queued[:num_handles])
                        del queued[:num_handles]
                    handles_taken += num_handles
                else:
                    handles = ()
                # received_message(), inlined: this runs once per message.
                message = _new(Message)
                _set_payload(message, buf[pos + HEADER_SIZE : stop])
                _set_handles(message, handles)
                _set_type(message, _NORMAL)
                messages.append(message)
                payload_bytes += num_bytes - HEADER_SIZE
                pos = stop
                room -= 1
                if not room or payload_bytes > max_bytes:
                    break
        if collecting:
            self._buf = buf
            self._pos = pos
        elif pos < end:
            self._pos = pos
            return messages, payload_bytes, handles_taken, False
        else:
            self._buf = b""
            self._pos = 0
        # The checks next_message() would make now (_short).
        queue_limit = self.max_queued_handles
        drained = not self._eof and (
            queue_limit is None or len(self._handles) <= queue_limit
        )
        return messages, payload_bytes, handles_taken, drained

    def receive_plain(self, data: bytes) -> Message | None:
        """``data`` as one message, if it is exactly one plain message without fds.

        The request/response case in one call, before :meth:`receive_batch`:
        when the decoder holds nothing (no bytes, no fds, no message in
        progress, no end of stream, no failure) and ``data`` is exactly one
        plain message (see :meth:`next_batch`) that declares no fds,
        returns that message, and the decoder still holds nothing.
        Otherwise returns None and changes nothing: then feed ``data`` as
        usual, with every check.  Never raises.
        """
        if (
            len(data) >= HEADER_SIZE
            and self._pos >= len(self._buf)
            and not self._handles
            and not self._need
            and self._complete is None
            and self._failure is None
            and not self._eof
            and not self._ipcz
            and data.__class__ is bytes
        ):
            num_bytes, tag, num_handles = _unpack_plain(data)
            if (
                num_bytes == len(data)
                and tag == _PLAIN_TAG
                and not num_handles
                and num_bytes <= self.max_message_size
            ):
                # received_message(), inlined: this runs once per message.
                message = _new(Message)
                _set_payload(message, data[HEADER_SIZE:])
                _set_handles(message, ())
                _set_type(message, _NORMAL)
                return message
        return None

    def _may_carry(self, num_handles: int) -> bool:
        """True if a header may declare ``num_handles`` (> 0) fds here."""
        return self._accept_handles and num_handles <= self.max_handles_per_message

    def _completed_batch(self) -> tuple[list[Message], int, int]:
        """The message collected across chunks, if it is plain and its fds are in.

        (:meth:`next_batch` returns it first; anything else about it is
        left to :meth:`next_message`.)
        """
        payload = self._complete
        if payload is not None:
            header_size, num_handles, mtype, _ = self._partial
            if (
                mtype is _NORMAL
                and header_size == HEADER_SIZE
                and num_handles <= len(self._handles)
            ):
                self._complete = None
                message = _new(Message)
                _set_payload(message, payload)
                _set_handles(
                    message, _take(self._handles, num_handles) if num_handles else ()
                )
                _set_type(message, _NORMAL)
                return [message], len(payload), num_handles
        return [], 0, 0

    def read_size(self, default: int, maximum: int) -> int:
        """How many bytes the next read should ask for.

        ``default``, unless a message larger than that is still arriving:
        then as much of it as is still missing, but never more than has
        already arrived of it (so the buffer of a read is at most as large
        as what the peer has actually sent, and memory follows the bytes
        received, not the size announced) and never more than ``maximum``.
        """
        need = self._need
        if need <= default:
            return default
        arrived = self._parts_size + len(self._buf) - self._pos
        return max(default, min(need, arrived, maximum))

    def _complete_message(self) -> DecoderEvent:
        _, num_handles, mtype, _ = self._partial
        handles = self._claim_handles(num_handles)
        if handles is None:
            return NEED_DATA
        payload = self._complete
        assert payload is not None
        self._complete = None
        return received_message(payload, handles, mtype)

    def _claim_handles(self, num_handles: int) -> tuple[Handle, ...] | None:
        """The next ``num_handles`` fds, or None to wait for them (lenient mode)."""
        if not num_handles:
            return ()
        queued = self._handles
        if len(queued) < num_handles:
            if self.strict_handles or self._eof:
                self._fail(
                    f"message complete but its file descriptors are missing: "
                    f"num_handles={num_handles}, received={len(queued)}"
                )
            if self.buffered_bytes > MAX_BUFFERED_WHILE_WAITING:
                # Chromium would buffer without end; a peer that never sends
                # the fds must not make us hold (and re-copy) its stream.
                self._fail(
                    f"{self.buffered_bytes} bytes buffered while a message waits for "
                    f"its num_handles={num_handles} file descriptors (received "
                    f"{len(queued)}; at most {MAX_BUFFERED_WHILE_WAITING} bytes wait)"
                )
            return None
        return _take(queued, num_handles)

    def close(self) -> None:
        """Close every queued fd and drop buffered bytes.  Idempotent."""
        self._buf = b""
        self._pos = 0
        self._parts = []
        self._parts_size = 0
        self._need = 0
        self._complete = None
        handles = self._handles
        self._handles = []
        close_all(handles)

    # -- internals ------------------------------------------------------

    def _short(self, avail: int) -> DecoderEvent:
        if not self._eof:
            limit = self.max_queued_handles
            if limit is not None and len(self._handles) > limit:
                self._fail(
                    f"{len(self._handles)} unclaimed file descriptors queued, above "
                    f"max_queued_handles={limit}"
                )
            return NEED_DATA
        if avail:
            self._fail(
                f"end of stream inside a message: {avail} byte(s) of an unfinished "
                "message were buffered",
                DisconnectedError,
            )
        if self._handles:
            if self.strict_handles:
                self._fail(
                    f"end of stream with {len(self._handles)} file descriptor(s) that "
                    "no message claimed"
                )
            self.close()
        return END_OF_STREAM

    def _check_size(self, num_bytes: int) -> None:
        if num_bytes > self.max_message_size:
            self._fail(
                f"num_bytes={num_bytes} exceeds max_message_size={self.max_message_size}"
            )

    def _fail(
        self, reason: str, kind: type[ChannelError] = MalformedMessageError
    ) -> NoReturn:
        error = kind(reason)
        self._failure = error
        self.close()
        raise error

    def _check_usable(self) -> None:
        if self._failure is not None:
            self._raise_failed()

    def _raise_failed(self) -> NoReturn:
        failure = self._failure
        assert failure is not None
        raise type(failure)(f"decoder failed earlier: {failure}") from failure
