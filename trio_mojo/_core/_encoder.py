"""MessageEncoder: the outgoing queue and the planner of each ``sendmsg``.

Theory of operation
-------------------

Mojo's ``ChannelPosix`` keeps a queue of ``MessageView`` s: each is one
encoded message, an ``offset`` (its first unsent byte) and how many of its
handles were already sent.  This module is that queue, pure: the shell asks
:meth:`MessageEncoder.plan` what to hand to the next ``sendmsg``, makes the
call, and reports back with :meth:`MessageEncoder.advance`.

Messages queued behind others are packed into one entry before they reach
the queue (:meth:`OutgoingMessage.append`, up to :data:`MAX_BATCH_BYTES`,
:data:`MAX_BATCH_PARTS` buffers and 128 fds): one object for a whole burst
instead of one per message.  Small messages are copied into one buffer; a
large payload is a buffer of its own, the caller's ``bytes``.  The fds of
a batch all ride on its first ``sendmsg``, which rule 1 below allows.

A plan coalesces the unsent bytes of as many queued entries as fit under
:data:`MAX_PLAN_BYTES` and :data:`MAX_PLAN_BUFFERS` into one list of
buffers (large payloads are memoryviews, never copied), plus at most
:data:`~trio_mojo._core._wire.MAX_SENDMSG_HANDLES` fds.  The fd rules, which keep
the receiver's FIFO matching fds to messages:

1. A message's fds ride on a ``sendmsg`` that carries at least one of its
   bytes and is no later than the one carrying its first byte, so they always
   reach the peer before the message is complete.  (If the kernel takes only
   part of the plan, fds planned for a later message in it have been
   delivered early; the FIFO keeps them in order, and rule 4 bounds them.)
2. Never more than 128 fds per ``sendmsg``: a message whose unsent fds would
   push the plan past 128 starts the next plan instead.
3. Never fds with zero data bytes (Linux silently drops them).  A message
   with more than 128 fds is split: each batch of 128 is sent with exactly
   one of its bytes, the last batch with the rest of the message.  Since a
   header alone is 8 bytes and a message carries at most 253 handles
   (:meth:`OutgoingMessage.encode` refuses more), there are always enough
   bytes.
4. While fds that went out ahead of their message's bytes are outstanding,
   no further fds are planned.  (A batch's fds all ride on its first byte,
   so a partly written batch counts as outstanding until it is done.)  Without this, a run of short writes would
   deliver another 128 early fds per ``sendmsg`` and push the receiver past
   its cap on queued fds (``max_queued_handles``, 2 x 253); with it the
   receiver holds at most one plan's worth of early fds beside those of the
   message it is reading.

Fd ownership.  A queued entry owns its fds as bare numbers (``fds``), not
as :class:`~trio_mojo.Handle` objects: :meth:`OutgoingMessage.encode` moves
them out of the message's handles (``take_all``: the handles read as closed
from then on), or takes the numbers the channel's ``send`` already moved.
One object per fd less to build and to free, and no second owner.  The
encoder is the only one that closes them: once ``sendmsg`` returns a
positive count, the kernel holds its own reference to every fd in that
call, so :meth:`advance` closes ours at once (it first counts them as sent,
so no path reaches them again).  A failed call changes nothing: the fds
stay queued, and :meth:`close` closes every unsent one if the channel gives
up.  An entry that was never pushed (the channel gives its fds back to the
caller's handles when a ``send`` is cancelled) is the channel's business.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Sequence
from typing import Final, TypeAlias

from trio_mojo._handles import close_fds, give_back, take_all

from ._message import Message
from ._wire import (
    HEADER_SIZE,
    MAX_ATTACHED_HANDLES,
    MAX_MESSAGE_SIZE_LIMIT,
    MAX_SENDMSG_HANDLES,
    Framing,
    MessageType,
    encode_header,
)

Buffer: TypeAlias = bytes | bytearray | memoryview
"""What a plan is made of: whole encoded entries or views into them."""

__all__ = [
    "INLINE_PAYLOAD",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_PARTS",
    "MAX_PLAN_BUFFERS",
    "MAX_PLAN_BYTES",
    "MessageEncoder",
    "OutgoingMessage",
    "plain_frame",
]

MAX_PLAN_BYTES: Final = 512 * 1024
"""Stop adding messages to a plan once it holds this many bytes."""
MAX_PLAN_BUFFERS: Final = 512
"""At most this many buffers per plan (Linux's IOV_MAX is 1024)."""
INLINE_PAYLOAD: Final = 1024
"""Payloads up to this size are copied next to their header (one buffer);
larger ones are sent from the caller's ``bytes`` as a second buffer."""
MAX_BATCH_BYTES: Final = 256 * 1024
"""An entry packs further messages (:meth:`OutgoingMessage.append`) only up
to this many bytes ..."""
MAX_BATCH_PARTS: Final = 64
"""... and this many parts (a large message takes two)."""
_PARTS_BEFORE_LAST: Final = MAX_BATCH_PARTS - 2
_NORMAL_HEADER: Final = struct.Struct("<IHHH6x")
"""Mojo's 16-byte ``Header`` (see ``_wire``), inlined for the common case."""
_NORMAL: Final = MessageType.NORMAL
_MOJO: Final = Framing.MOJO
_FAST_MAX_PAYLOAD: Final = MAX_MESSAGE_SIZE_LIMIT - HEADER_SIZE


def plain_frame(payload: bytes) -> bytes:
    """The wire bytes of a *plain* message without handles: header and payload.

    A plain message is a ``NORMAL`` message in ``Framing.MOJO`` whose
    payload is at most :data:`INLINE_PAYLOAD` bytes (what the decoder's
    ``next_batch`` calls plain, too).  Without handles it is the
    request/response case, which the channel writes without building an
    :class:`OutgoingMessage` when the kernel takes it whole.  The caller
    checks that the message is plain.
    """
    return _NORMAL_HEADER.pack(HEADER_SIZE + len(payload), HEADER_SIZE, 1, 0) + payload


def _header(message: Message, framing: Framing, num_handles: int) -> bytes:
    """The header of ``message`` with ``num_handles`` fds; raises ValueError
    as ``encode_header``.

    A ``NORMAL`` header in ``Framing.MOJO`` (the common case) is packed
    here, without ``encode_header``'s argument checks and its
    ``MessageType()`` call.
    """
    size = len(message.payload)
    if framing is _MOJO and message.type is _NORMAL and size <= _FAST_MAX_PAYLOAD:
        return _NORMAL_HEADER.pack(
            HEADER_SIZE + size, HEADER_SIZE, _NORMAL, num_handles
        )
    return encode_header(
        size,
        num_handles=num_handles,
        type=message.type,
        framing=framing,
    )


class OutgoingMessage:
    """One queued entry: encoded bytes and the fds it owns until they are sent.

    Usually one message, but an entry that nothing was sent of yet can take
    more (:meth:`append`): the rest of a burst then costs one entry, one
    hop through the channel's queue and one ``sendmsg``, not one of each per
    message.  ``parts`` are its bytes, in order: a small message's frame is
    copied into one buffer with the small messages that follow it, a large
    message is its header and its payload (the caller's ``bytes``, not
    copied).  ``fds`` are the fd numbers of its messages, in order, owned by
    the entry (see the module docstring); ``count`` is the number of
    messages in it, ``size`` its bytes, ``offset`` counts the bytes already
    sent and ``fds_sent`` the fds already sent (and closed).
    """

    __slots__ = (
        "_cursor",
        "buffer",
        "count",
        "fds",
        "fds_sent",
        "offset",
        "parts",
        "size",
    )

    def __init__(
        self,
        head: bytes | bytearray,
        tail: bytes = b"",
        fds: Sequence[int] = (),
        count: int = 1,
    ) -> None:
        self.parts: list[Buffer] = [head, tail] if tail else [head]
        # The last part, while small messages can still be copied into it:
        self.buffer: bytearray | None = None
        self.fds = fds
        self.count = count
        self.size = len(head) + len(tail)
        self.offset = 0
        self.fds_sent = 0
        self._cursor = (0, 0)  # (a part, the offset of its first byte)

    @classmethod
    def encode(
        cls,
        message: Message,
        framing: Framing = Framing.MOJO,
        fds: Sequence[int] | None = None,
    ) -> OutgoingMessage:
        """Encode ``message`` (which must already be validated).

        The entry takes the message's fds: it moves them out of
        ``message.handles``, which read as closed from then on, unless
        ``fds`` gives their numbers, already taken from those handles (the
        channel's ``send`` takes them first; ``message.handles`` is not
        looked at then).

        Raises:
            ValueError: the header cannot express the message, it carries
                more than 253 handles (the batching of rule 3 relies on it),
                or a handle is closed or repeated; then nothing was taken.
        """
        count = len(message.handles) if fds is None else len(fds)
        if count > MAX_ATTACHED_HANDLES:
            raise ValueError(
                f"a message carries at most {MAX_ATTACHED_HANDLES} handles, not {count}"
            )
        header = _header(message, framing, count)
        payload = message.payload
        if fds is None:
            fds = take_all(message.handles) if count else ()
        if len(payload) <= INLINE_PAYLOAD:
            return cls(header + payload, b"", fds)
        return cls(header, payload, fds)

    def append(
        self,
        message: Message,
        framing: Framing = Framing.MOJO,
        fds: Sequence[int] | None = None,
    ) -> bool:
        """Pack ``message`` into this entry, if it can take it; True if it did.

        It can while nothing of the entry was sent, the entry stays within
        256 KiB and 64 parts, and its fds within
        :data:`MAX_SENDMSG_HANDLES` (128), so that they all ride on the
        entry's first ``sendmsg`` (fd rule 1).  A payload of at most 1 KiB
        is copied behind the small messages before it; a larger one becomes
        two parts, its header and the payload itself.  Otherwise nothing
        changes and the message needs an entry of its own.  The entry takes
        the message's fds as :meth:`encode` does (``fds``: their numbers,
        already taken from ``message.handles``).

        Raises:
            ValueError: as :meth:`encode` (then nothing changes either).
        """
        count = len(message.handles) if fds is None else len(fds)
        header = _header(message, framing, count)
        if fds is not None:
            return self.append_payload(message.payload, fds, header)
        taken = take_all(message.handles) if count else []
        if self.append_payload(message.payload, taken, header):
            return True
        give_back(message.handles, taken)
        return False

    def append_payload(
        self, payload: bytes, fds: Sequence[int] = (), header: bytes | None = None
    ) -> bool:
        """:meth:`append` of a message given as its parts; True if it did.

        ``fds`` are the message's fd numbers, already taken from its
        handles; ``header`` its encoded header, by default that of a
        ``NORMAL`` message in ``Framing.MOJO`` with ``len(fds)`` handles
        (the caller checked that the header can express the payload's
        size).  The same rules as :meth:`append`, without its checks: the
        per-message path of a burst.  If it returns True, the entry owns
        ``fds``.
        """
        length = len(payload)
        if header is None:
            size = HEADER_SIZE + length
            header = _NORMAL_HEADER.pack(size, HEADER_SIZE, 1, len(fds))
        else:
            size = len(header) + length
        new_size = self.size + size
        if (
            self.offset
            or new_size > MAX_BATCH_BYTES
            or (fds and len(self.fds) + len(fds) > MAX_SENDMSG_HANDLES)
        ):
            return False
        buffer = self.buffer
        if buffer is not None and length <= INLINE_PAYLOAD:
            # The common case: copied behind the small messages before it.
            buffer += header
            buffer += payload
        else:
            parts = self.parts
            if len(parts) > _PARTS_BEFORE_LAST:
                return False
            if length <= INLINE_PAYLOAD:
                buffer = self.buffer = bytearray(header)
                buffer += payload
                parts.append(buffer)
            else:
                parts.append(header)
                parts.append(payload)
                self.buffer = None
        if fds:
            batch = self.fds
            if not isinstance(batch, list):
                batch = self.fds = list(batch)
            batch.extend(fds)
        self.size = new_size
        self.count += 1
        return True

    def unsent(self) -> list[Buffer]:
        """The buffers that hold this entry's unsent bytes (do not modify it)."""
        offset = self.offset
        parts = self.parts
        if offset == 0:
            return parts
        # Resume the walk where the last call left it: a large batch is
        # written in many short writes, each planned with a call to this.
        index, start = self._cursor
        if offset < start:  # (offset was moved back by hand)
            index = start = 0
        while offset - start >= len(parts[index]):
            start += len(parts[index])
            index += 1
        self._cursor = (index, start)
        rest: list[Buffer] = [memoryview(parts[index])[offset - start :]]
        rest += parts[index + 1 :]
        return rest

    def first_unsent_byte(self) -> Buffer:
        """A one-byte buffer: the next unsent byte."""
        return self.unsent()[0][:1]


class MessageEncoder:
    """The outgoing queue; plans ``sendmsg`` calls and tracks partial writes."""

    def __init__(self) -> None:
        self._queue: collections.deque[OutgoingMessage] = collections.deque()
        self._queued_bytes = 0
        self._planned: list[tuple[OutgoingMessage, int]] = []
        self._planned_bytes = 0

    @property
    def queued_messages(self) -> int:
        """Messages not yet completely sent."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Bytes not yet sent."""
        return self._queued_bytes

    def __bool__(self) -> bool:
        return bool(self._queue)

    def push(self, entry: OutgoingMessage) -> None:
        """Append an encoded entry to the queue; the queue now owns its fds.

        Do not :meth:`~OutgoingMessage.append` to an entry once it is queued.
        """
        self._queue.append(entry)
        self._queued_bytes += entry.size - entry.offset

    def plan(self) -> tuple[list[Buffer], list[int]]:
        """Return ``(buffers, fds)`` for the next ``sendmsg``.

        The buffers are never empty while the queue is not.  Calling
        :meth:`plan` again before :meth:`advance` replaces the previous plan.

        Raises:
            RuntimeError: the queue is empty.
        """
        queue = self._queue
        if not queue:
            raise RuntimeError("plan() on an empty MessageEncoder")
        planned: list[tuple[OutgoingMessage, int]] = []
        self._planned = planned
        self._planned_bytes = 0
        buffers: list[Buffer] = []
        fds: list[int] = []
        nbytes = 0
        early = False
        for entry in queue:
            if len(buffers) + len(entry.parts) > MAX_PLAN_BUFFERS:
                break  # (the first entry always fits: MAX_BATCH_PARTS)
            pending = len(entry.fds) - entry.fds_sent
            if pending:
                if early:
                    break  # rule 4: wait until the early fds' bytes are out
                start = entry.fds_sent
                if pending > MAX_SENDMSG_HANDLES and not buffers:
                    # Rule 3: a full batch of 128 with exactly one byte.
                    fds += entry.fds[start : start + MAX_SENDMSG_HANDLES]
                    planned.append((entry, MAX_SENDMSG_HANDLES))
                    buffers.append(entry.first_unsent_byte())
                    break
                if len(fds) + pending > MAX_SENDMSG_HANDLES:
                    break  # rule 2: this message starts the next plan
                fds += entry.fds[start:] if start else entry.fds
                planned.append((entry, pending))
            elif entry.fds_sent and (buffers or entry.count > 1):
                # Its fds went before its bytes (not the first entry), or it
                # is a batch whose fds all rode on its first byte: those of
                # its later messages may still be ahead of their bytes.
                early = True
            parts = entry.unsent()
            buffers.extend(parts)
            nbytes += entry.size - entry.offset
            if nbytes >= MAX_PLAN_BYTES:
                break
        self._planned_bytes = sum(map(len, buffers))
        return buffers, fds

    def advance(self, sent: int) -> int:
        """Record that the last planned ``sendmsg`` sent ``sent`` bytes.

        Closes the fds that call carried (the kernel now holds them) and
        drops completely sent entries.  Returns how many messages were
        completed (a batch counts all of its messages when it is done).

        Raises:
            ValueError: ``sent`` is negative or larger than the plan (then
                nothing is recorded).
        """
        if sent < 0:
            raise ValueError(f"sent={sent} is negative")
        if sent > self._planned_bytes:
            raise ValueError(
                f"sent={sent} is more than the {self._planned_bytes} planned bytes"
            )
        planned = self._planned
        self._planned = []
        self._planned_bytes = 0
        if sent == 0:
            return 0
        sent_fds: list[int] = []
        for entry, count in planned:
            start = entry.fds_sent
            sent_fds += entry.fds[start : start + count]
            entry.fds_sent = start + count  # counted before they are closed
        queue = self._queue
        remaining = sent  # never more than is queued: the plan bounds it
        completed = 0
        while remaining:
            entry = queue[0]
            left = entry.size - entry.offset
            if remaining < left:
                entry.offset += remaining
                break
            remaining -= left
            entry.offset = entry.size
            queue.popleft()
            completed += entry.count
        self._queued_bytes -= sent
        close_fds(sent_fds)
        return completed

    def close(self) -> None:
        """Drop every queued message and close its unsent fds."""
        fds: list[int] = []
        for entry in self._queue:
            fds += entry.fds[entry.fds_sent :]
        self._queue.clear()
        self._queued_bytes = 0
        self._planned = []
        self._planned_bytes = 0
        close_fds(fds)
