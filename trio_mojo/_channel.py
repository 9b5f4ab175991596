"""Channel: Mojo's ChannelPosix as a Trio structured-concurrency transport.

Theory of operation
-------------------

:func:`open_channel` consumes an :class:`Endpoint` and opens a nursery with
two tasks around a non-blocking ``AF_UNIX`` stream socket:

* The **reader** owns the socket's read side.  It calls ``recvmsg``
  (through ``_fdpass``) until the socket would block, feeding bytes and fds
  into a :class:`MessageDecoder` and the parsed messages into the receive
  queue (a deque) that ``receive()`` drains, and awaits ``wait_readable``
  only when the socket is empty.  It takes a checkpoint after 256 KiB
  (Mojo's per-wake-up fairness cap), answers upgrade offers and sees the
  end of the stream.  When the receive queue is full (in messages, bytes,
  or fds: the queue's plus those received ahead of their message) it stops
  reading: the kernel buffer fills and the peer's sends wait.  That is the
  end-to-end backpressure.
* The **writer** drains a bounded Trio memory channel of outgoing entries
  into a :class:`MessageEncoder`, and writes everything queued with as few
  ``sendmsg`` calls as the planner allows, resuming partial writes at the
  exact byte and handle.  It awaits ``wait_writable`` only on ``EAGAIN``.

The per-message path is free of scheduler passes.  ``send()`` checks for
cancellation without yielding and then, when nothing is queued, writes on
the caller's task at once (Mojo's ``Write`` fast path), leaving only what the
kernel did not take to the writer; otherwise it queues, packing a small
message into the last queued entry while the writer has not taken it yet
(one buffer and one ``sendmsg`` for a burst).  ``receive()`` pops the
receive queue.  Both only block when they must, and yield once every
:data:`_YIELD_EVERY` non-blocking calls so a busy producer or consumer
cannot starve other tasks.

Read lending.  A reader task that hands each message to a consumer task
costs a second task step per message: Trio runs a task woken during a
scheduler pass only in the next one.  So when ``receive()`` finds the
queue empty and the reader idles in ``wait_readable``, the receiver takes
the read side over: it cancels the reader's wait (its epoll registration is
dropped at once) and waits, reads and parses on its own task, one task step
per message (and when a read is exactly one plain message without fds,
as a request or a reply is, one ``recvmsg`` and one call of the decoder).
The reader, meanwhile "lent", sleeps.  Only one receiver (the
*borrower*) reads at a time; other receivers park, and a borrower that
leaves (with its message, or cancelled while it waited: the bytes stay in
the kernel, nothing is lost) wakes the next one.  Messages a read brings
beyond the borrower's go into the queue and wake that many parked
receivers.  The read side goes back to the reader as soon as a read brings
anything but complete plain messages (the end of the stream, a failure, a
control message, a message still arriving, a queue that must absorb a
burst), and when nobody has borrowed it for :data:`_LEND_IDLE` seconds, so
that reading ahead, backpressure and the end of the stream stay the
reader's.  The reader does not lend while a message is arriving (the next
read would only give the read side back); it then waits without a cancel
scope.  While a borrower waits on the socket the reader sleeps without a
timer: an idle channel costs nothing.

Errors.  The tasks never raise into the nursery; they record the failure
and wake whoever waits.  ``receive()`` first delivers every message parsed
before a failure (Chromium's ``PeerShutdownDuringRead``), then raises the
failure as one exception with its cause chained.  A write error
(``EPIPE``/``ECONNRESET``) stops writing but not reading, as in Chromium:
``send()`` raises it, while ``receive()`` goes on delivering what the peer
sent before it vanished.  Any other write error (``sendmsg`` refusing an
fd, ``ENOBUFS``) also shuts the socket down for writing, so that a peer
holding the first bytes of a message reads the end of the stream instead of
waiting for the rest.  A malformed message fails both directions and
shuts the socket down at once, so a hostile peer is cut off immediately.
An error nobody saw is raised when the ``async with`` block is left (or by
``aclose()``; a flush that fails counts), so no failure is ever swallowed;
one the user was already handed is not raised again, and once a
``DisconnectedError`` was handed over, the other direction's disconnect is
the same news and is not raised again either.

Bounds.  The send queue's bounds (messages and bytes) count everything
accepted and not yet written, including what the writer has already moved
into the encoder; the reader answers an ``UPGRADE_OFFER`` only when the
send queue has room, and stops reading until it has, so no peer behaviour
can grow a queue past its bound.

Shutdown.  ``send_eof()`` closes only the sending side: the writer (or the
caller, if nothing is queued) shuts the socket down for writing once the
queue has drained, and the reader goes on.  Leaving the block normally (or
``aclose()``) flushes the outgoing queue, bounded by ``flush_timeout``,
half-closes the socket so the peer reads a clean end of stream, then
cancels both tasks.  Leaving by an
exception or cancellation aborts at once.  Either way every fd the channel
still holds (queued outgoing, received but undelivered, unclaimed) is
closed before the block is left.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, NoReturn

import attrs
import trio

from . import _fdpass
from ._core._decoder import END_OF_STREAM, NEED_DATA, MessageDecoder
from ._core._encoder import (
    INLINE_PAYLOAD,
    MessageEncoder,
    OutgoingMessage,
    plain_frame,
)
from ._core._message import Message
from ._core._wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    IPCZ_HEADER_SIZE,
    IPCZ_MIN_HEADER_SIZE,
    LEGACY_HEADER_SIZE,
    MAX_ATTACHED_HANDLES,
    MAX_BATCH_READ_SIZE,
    Framing,
    HandlePolicy,
    MessageType,
)
from ._endpoint import Endpoint
from ._errors import (
    ChannelError,
    DisconnectedError,
    FlushTimeoutError,
    MalformedMessageError,
)
from ._handles import Handle, close_all, close_fds, give_back, take_all

__all__ = ["Channel", "ChannelStatistics", "open_channel"]

_YIELD_EVERY: Final = 64
"""Non-blocking send()/receive() calls between two schedule points."""
_READ_SIZE: Final = MAX_BATCH_READ_SIZE
"""Bytes read per wake-up of the reader before it yields (Mojo's fairness cap)."""
_RECV_SIZE: Final = 64 * 1024
"""Bytes asked of one ``recvmsg``.  Below glibc's mmap threshold, so the
receive buffer comes from the heap instead of a fresh mmap/munmap per call
(measured: 3 us per call instead of 15 us for 256 KiB)."""
_MAX_RECV_SIZE: Final = MAX_BATCH_READ_SIZE
"""Most bytes asked of one ``recvmsg`` for the rest of a large message
(the decoder's ``read_size``: never more than already arrived of it, and
never past the fairness cap in one call)."""
_RECV_CONTROL_SIZE: Final = _fdpass.RECV_CONTROL_SIZE
_RECV_FLAGS: Final = _fdpass.RECV_FLAGS
_MSG_CTRUNC: Final = _fdpass.MSG_CTRUNC
_SEND_FLAGS: Final = _fdpass.SEND_FLAGS
_LEND_IDLE: Final = 0.005
"""Seconds the read side stays lent while nobody borrows it."""
_NORMAL: Final = MessageType.NORMAL
_checkpoint_if_cancelled: Final = trio.lowlevel.checkpoint_if_cancelled
_DATA_TYPES: Final = frozenset((MessageType.NORMAL, MessageType.NORMAL_LEGACY))
_REJECT_SIZE: Final = HEADER_SIZE
"""Wire size of the UPGRADE_REJECT we answer an offer with."""

_Outbox = trio.MemorySendChannel["OutgoingMessage | None"]
_OutboxReader = trio.MemoryReceiveChannel["OutgoingMessage | None"]


class _Pumped(enum.Enum):
    """Why ``Channel._pump`` stopped moving messages into the receive queue."""

    NEED_DATA = "the decoder needs more bytes"
    FULL = "the receive queue is full"
    STALLED = "an UPGRADE_OFFER waits for room in the send queue"
    END = "the stream ended cleanly"


_NEED_DATA: Final = _Pumped.NEED_DATA
_FULL: Final = _Pumped.FULL
_STALLED: Final = _Pumped.STALLED
_END: Final = _Pumped.END


@attrs.frozen
class ChannelStatistics:
    """A snapshot of a channel's counters, from :meth:`Channel.statistics`.

    Messages and bytes are counted on the wire: headers included, and
    control messages (an upgrade offer, our rejection) counted alongside
    data messages in both directions.  ``send_queue_*`` count what
    was accepted by ``send()`` but is not yet completely written;
    ``receive_queue_*`` what was parsed but not yet returned by
    ``receive()``; ``read_buffer_bytes`` bytes of a message still arriving;
    ``unclaimed_handles`` fds received ahead of their message.
    """

    messages_sent: int
    bytes_sent: int
    handles_sent: int
    messages_received: int
    bytes_received: int
    handles_received: int
    send_queue_messages: int
    send_queue_bytes: int
    receive_queue_messages: int
    receive_queue_bytes: int
    read_buffer_bytes: int
    unclaimed_handles: int
    receive_queue_handles: int = 0
    send_queue_handles: int = 0


class Channel(trio.abc.Channel[Message]):
    """A message channel to a peer process, running inside a nursery.

    Do not construct it directly: use :func:`open_channel`, which owns the
    channel's tasks.  ``send`` and ``receive`` may be called from any number
    of tasks; each message is sent whole and messages from one task keep
    their order.
    """

    # Slots, not a __dict__: CPython shares an instance dict's keys only up
    # to 30 attributes, and beyond that every self._x on the per-message
    # path is a dict lookup instead of a fixed offset.
    __slots__ = (
        "_aborted",
        "_borrowed",
        "_borrows",
        "_bytes_received",
        "_bytes_sent",
        "_closed",
        "_corked",
        "_decoder",
        "_disconnect_reported",
        "_encoder",
        "_eof_requested",
        "_eof_sent",
        "_fail_on_truncation",
        "_fds_in_flight",
        "_flush_timeout",
        "_handles_received",
        "_handles_sent",
        "_header_size",
        "_inbox",
        "_inbox_bytes",
        "_inbox_handles",
        "_lent",
        "_messages_received",
        "_messages_sent",
        "_mojo_framing",
        "_no_handles",
        "_open_batch",
        "_outbox",
        "_outbox_reader",
        "_parked_receivers",
        "_pending",
        "_pending_bytes",
        "_pending_handles",
        "_plain_max_size",
        "_read_error",
        "_reader_done",
        "_reader_idle_scope",
        "_reader_lot",
        "_reader_scope",
        "_reader_untimed",
        "_reader_wants_room",
        "_reads_done",
        "_receive_credit",
        "_receive_queue_bytes_limit",
        "_receive_queue_handles_limit",
        "_receive_queue_messages_limit",
        "_receivers",
        "_refusing",
        "_reopen_pipes",
        "_room",
        "_send_credit",
        "_send_queue_bytes_limit",
        "_send_queue_handles_limit",
        "_send_queue_messages_limit",
        "_send_space",
        "_sock",
        "_stalled_offer",
        "_started",
        "_unreported",
        "_wait_first",
        "_write_error",
        "_writer_done",
        "_writer_scope",
        "framing",
        "handle_policy",
        "max_message_size",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        framing: Framing,
        handle_policy: HandlePolicy,
        max_message_size: int | None,
        max_handles_per_message: int | None,
        max_queued_handles: int | None,
        strict_handles: bool,
        ipcz_parse_threshold: int,
        fail_on_truncated_handles: bool,
        send_queue_messages: int,
        send_queue_bytes: int,
        send_queue_handles: int,
        receive_queue_messages: int,
        receive_queue_bytes: int,
        receive_queue_handles: int,
        flush_timeout: float | None,
        reopen_pipes: bool,
    ) -> None:
        self._decoder = MessageDecoder(
            framing=framing,
            handle_policy=handle_policy,
            max_message_size=max_message_size,
            max_handles_per_message=max_handles_per_message,
            max_queued_handles=max_queued_handles,
            strict_handles=strict_handles,
            ipcz_parse_threshold=ipcz_parse_threshold,
        )
        for name, value in (
            ("send_queue_messages", send_queue_messages),
            ("send_queue_bytes", send_queue_bytes),
            ("send_queue_handles", send_queue_handles),
            ("receive_queue_messages", receive_queue_messages),
            ("receive_queue_bytes", receive_queue_bytes),
            ("receive_queue_handles", receive_queue_handles),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if flush_timeout is not None and not flush_timeout >= 0:
            raise ValueError(f"flush_timeout={flush_timeout} must be >= 0 or None")
        self.framing: Final = framing
        self.handle_policy: Final = handle_policy
        self._no_handles = handle_policy is HandlePolicy.REJECT
        self.max_message_size: Final = self._decoder.max_message_size
        self._header_size = IPCZ_HEADER_SIZE if framing is Framing.IPCZ else HEADER_SIZE
        # A NORMAL message's header is packed without encode_header (see send).
        self._mojo_framing = framing is Framing.MOJO
        # The largest plain message (see plain_frame): 0 in IPCZ framing,
        # which has no plain messages.
        self._plain_max_size = (
            min(HEADER_SIZE + INLINE_PAYLOAD, self.max_message_size)
            if framing is Framing.MOJO
            else 0
        )
        self._fail_on_truncation = fail_on_truncated_handles
        self._reopen_pipes = reopen_pipes
        self._flush_timeout = math.inf if flush_timeout is None else flush_timeout
        self._sock = sock
        self._started = False
        self._closed = False  # aclose() began: send() refuses, flush may run
        # send() refuses: not started, closed, send_eof() called, or writing
        # failed (one flag for the hot path; _refuse() says which).
        self._refusing = True
        self._aborted = False  # _abort() began: failures are no longer news
        self._unreported: list[BaseException] = []
        self._disconnect_reported = False
        self._init_sending(send_queue_messages, send_queue_bytes, send_queue_handles)
        self._init_receiving(
            receive_queue_messages, receive_queue_bytes, receive_queue_handles
        )

    def _init_sending(
        self, queue_messages: int, queue_bytes: int, queue_handles: int
    ) -> None:
        self._encoder = MessageEncoder()
        # The send queue's bounds are enforced by _pending/_pending_bytes
        # (which also count what the writer already moved into the encoder),
        # not by the outbox's capacity: the outbox never holds more than
        # send_queue_messages entries plus one wake-up (None), so
        # send_nowait on it cannot block.
        outbox, outbox_reader = trio.open_memory_channel["OutgoingMessage | None"](
            queue_messages + 1
        )
        self._outbox: _Outbox = outbox
        self._outbox_reader: _OutboxReader = outbox_reader
        # The last entry in the outbox, while the writer has not taken it:
        # small messages queued behind it are packed into it.
        self._open_batch: OutgoingMessage | None = None
        self._send_queue_messages_limit = queue_messages
        self._send_queue_bytes_limit = queue_bytes
        self._send_queue_handles_limit = queue_handles
        # Messages/bytes/fds accepted by send() and not yet written.
        self._pending = 0
        self._pending_bytes = 0
        self._pending_handles = 0
        self._send_space = trio.lowlevel.ParkingLot()
        self._send_credit = _YIELD_EVERY  # non-blocking sends until a yield
        # An inline write happened and neither the writer nor a wake-up by
        # the peer's data has happened since: further sends join the
        # writer's next sendmsg.
        self._corked = False
        self._fds_in_flight = False  # the kernel refused fds: ETOOMANYREFS
        self._eof_requested = False  # send_eof() was called
        self._eof_sent = False  # ... and the socket is shut down for writing
        self._writer_scope = trio.CancelScope()
        self._writer_done = trio.Event()
        self._write_error: BaseException | None = None
        self._messages_sent = 0
        self._bytes_sent = 0
        self._handles_sent = 0

    def _init_receiving(
        self, queue_messages: int, queue_bytes: int, queue_handles: int
    ) -> None:
        # The receive queue: parsed messages not yet returned by receive().
        self._inbox: collections.deque[Message] = collections.deque()
        self._inbox_bytes = 0
        self._inbox_handles = 0
        self._receive_queue_messages_limit = queue_messages
        self._receive_queue_bytes_limit = queue_bytes
        self._receive_queue_handles_limit = queue_handles
        self._receive_credit = _YIELD_EVERY  # ... receives until a yield
        # Tasks in receive() waiting for a message (or for the socket).
        self._receivers = trio.lowlevel.ParkingLot()
        self._parked_receivers = 0  # ... so many (ParkingLot.__bool__ is slow)
        # The reader task waits here for room in the receive queue.
        self._room = trio.lowlevel.ParkingLot()
        self._reader_wants_room = False  # ... and it waits there now
        self._reads_done = False  # end of stream or failure: the inbox is final
        self._read_error: BaseException | None = None
        # An UPGRADE_OFFER whose answer waits for room in the send queue.
        self._stalled_offer = False
        # Read lending (see the module docstring).
        self._lent = False  # the read side belongs to receive() callers
        self._borrowed = False  # a receive() call is reading
        self._borrows = 0  # borrows so far: shows the reader lending is in use
        self._reader_idle_scope: trio.CancelScope | None = None
        self._reader_lot = trio.lowlevel.ParkingLot()  # the reader, while lent
        self._reader_untimed = False  # ... parked until a borrower leaves
        self._wait_first = False  # the last read drained the socket
        self._reader_scope = trio.CancelScope()
        self._reader_done = trio.Event()
        self._messages_received = 0
        self._bytes_received = 0
        self._handles_received = 0

    # ------------------------------------------------------------------
    # Public API

    async def send(self, message: Message) -> None:
        """Send ``message``; wait only while the send queue is full.

        Cancel-atomic: if cancelled, the message was not queued and the
        caller still owns its handles.  Otherwise ``send`` takes the fds:
        it moves each out of its handle into the send queue, so the
        message's handles read as closed when ``send`` returns (sending one
        again is a ``ValueError``, closing it does nothing), and the channel
        closes the fds once the kernel has them, or when the message cannot
        be sent.

        Raises:
            TypeError: ``message`` is not a :class:`Message`.
            ValueError: the message is invalid (over ``max_message_size``,
                more than 253 handles, a closed or repeated handle, or one
                already given to ``send``, handles on a ``REJECT`` channel,
                a type this framing cannot carry); nothing was queued and
                the caller keeps the handles.
            trio.ClosedResourceError: the channel was closed, or
                :meth:`send_eof` was called.
            ChannelError: the channel failed (:class:`DisconnectedError`,
                :class:`MalformedMessageError`), cause chained.
        """
        await _checkpoint_if_cancelled()
        if (
            message.__class__ is Message
            and not (self._corked or self._pending or self._refusing)
            and message.type is _NORMAL
            and not message.handles
        ):
            payload = message.payload
            size = HEADER_SIZE + len(payload)
            if size <= self._plain_max_size:
                # The request/response path: a plain message without fds,
                # nothing queued, not corked (see below).  One buffer, one
                # send on the caller's task, no planning (what _write_now
                # does, inlined).
                self._corked = True
                frame = plain_frame(payload)
                try:
                    sent = self._sock.send(frame, _SEND_FLAGS)
                except BaseException as exc:
                    sent = self._inline_write_failed(exc)
                if sent == size:
                    self._messages_sent += 1
                    self._bytes_sent += sent
                else:
                    self._queue_rest(frame, sent)
                self._send_credit -= 1
                if not self._send_credit:
                    self._send_credit = _YIELD_EVERY
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
        if message.__class__ is Message and message.type is _NORMAL:
            handles = message.handles
            if handles and (len(handles) > MAX_ATTACHED_HANDLES or self._no_handles):
                self._check_handles(handles)  # raises
            size = self._header_size + len(message.payload)  # the common case
            normal = self._mojo_framing
            if size > self.max_message_size:
                self._validate(message)  # raises
        else:
            size = self._validate(message)
            handles = message.handles
            normal = False
        if self._refusing:
            self._refuse(message)
        fds: list[int] | tuple[()] = ()
        if handles:
            # Accepted: the fds move out of the caller's handles (which read
            # as closed, so none is queued twice) into the send queue, as
            # bare numbers; given back if this send is cancelled before the
            # message is queued.
            fds = take_all(handles)
        if self._pending:
            batch = self._open_batch
            if (
                batch is not None
                and self._pending < self._send_queue_messages_limit
                and self._pending_bytes + size <= self._send_queue_bytes_limit
                and (
                    not fds
                    or self._pending_handles + len(fds)
                    <= self._send_queue_handles_limit
                )
                and (
                    batch.append_payload(message.payload, fds)
                    if normal
                    else batch.append(message, self.framing, fds)
                )
            ):
                # Packed behind the messages queued before it.
                self._pending += 1
                self._pending_bytes += size
                if fds:
                    self._pending_handles += len(fds)
            else:
                await self._enqueue(message, size, fds, tried=batch is not None)
        elif not self._corked:
            # Mojo's fast path: the first message of a burst is written at
            # once.  The rest of the burst is corked: queued for the writer
            # task, which sends all of it with one sendmsg at the next
            # schedule point (the producer yields at least every
            # _YIELD_EVERY sends), unless the peer answers first (then the
            # reader uncorks and the next send is again written at once).
            self._corked = True
            self._write_now(OutgoingMessage.encode(message, self.framing, fds))
            if self._write_error is not None:
                self._raise_write_error()
        else:
            await self._enqueue(message, size, fds)
        self._send_credit -= 1
        if not self._send_credit:
            self._send_credit = _YIELD_EVERY
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        """Close the sending side: flush what is queued, then half-close.

        The peer's ``receive`` raises :class:`trio.EndOfChannel` once it has
        every message sent before; this side goes on receiving.  Follows
        :meth:`trio.abc.HalfCloseableStream.send_eof`: calling it again
        does nothing (it waits for the same end of stream to go out), and
        ``send`` raises :class:`trio.ClosedResourceError` from the moment it
        is called.

        If cancelled, it stops waiting but the end of stream still goes out
        after the messages already queued (the writer task half-closes the
        socket once they are written); ``aclose`` and leaving the block
        then behave as usual.

        Raises:
            trio.ClosedResourceError: the channel was closed.
            ChannelError: the channel failed before everything queued was
                written (those messages are lost).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._aborted or (self._closed and not self._eof_requested):
            raise trio.ClosedResourceError("the channel was closed")
        if not self._started:
            raise RuntimeError("use the Channel inside 'async with open_channel(...)'")
        if not self._eof_requested:
            self._eof_requested = True
            self._refusing = True
            self._open_batch = None
            if self._pending == 0:
                self._shut_down_writing()
            else:
                # The writer half-closes once the queue has drained.
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    self._outbox.send_nowait(None)
        while not self._eof_sent and self._write_error is None:
            if self._aborted:
                raise trio.ClosedResourceError("the channel was closed")
            await self._send_space.park()
        if self._write_error is not None and not self._eof_sent:
            self._raise_write_error()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> Message:
        """Return the next message; wait while none has arrived.

        Cancellation loses nothing: a message is taken from the receive
        queue (or read from the socket) only by a call that then returns
        it.  Several tasks may wait at once; each message goes to exactly
        one of them, in the order the peer sent them.

        Returns:
            The next :class:`Message`; its handles now belong to the caller.

        Raises:
            trio.EndOfChannel: the peer closed its end (or its sending side)
                cleanly, after every message it sent was returned.
            DisconnectedError: the peer vanished inside a message or reset.
            MalformedMessageError: the peer broke the protocol; raised after
                the messages that arrived before the bad one.
            trio.ClosedResourceError: this channel was closed.
        """
        inbox = self._inbox
        if inbox:  # (_abort empties it)
            await _checkpoint_if_cancelled()
            message = inbox.popleft()
            self._inbox_bytes -= len(message.payload)
            if message.handles:
                self._inbox_handles -= len(message.handles)
            if self._reader_wants_room:
                self._let_reader_on()
            self._receive_credit -= 1
            if not self._receive_credit:
                self._receive_credit = _YIELD_EVERY
                await trio.lowlevel.cancel_shielded_checkpoint()
            return message
        # The queue is empty: borrow the read side (see the module
        # docstring) if it is lent or the reader idles, or wait to be woken.
        # A borrower waits and reads on its own task until a read brings it
        # a message, or brings anything but complete plain messages: then
        # the read side goes back to the reader task (_hand_back) and this
        # receiver waits like any other.  Cancelled while it waits, it
        # leaves everything as it was: the bytes stay in the kernel.
        # Waiting on the socket is this call's checkpoint; every path that
        # does not wait first checks for cancellation before it changes
        # anything.  (All in this one coroutine: on the request/response
        # path each further coroutine call costs more than a read's parse.)
        checkpointed = False  # this call has been through a checkpoint
        while True:
            if (self._lent or self._reader_idle_scope is not None) and not (
                self._borrowed or inbox or self._reads_done or self._aborted
            ):
                scope = self._reader_idle_scope
                if scope is not None:
                    # The reader waits for data that we are waiting for:
                    # take the read side over rather than be handed each
                    # message by another task.  (It waits without a scope
                    # while a message is arriving.)
                    self._reader_idle_scope = None
                    scope.cancel()
                    self._lent = True
                self._borrowed = True
                self._borrows += 1
                sock = self._sock
                read: Message | None = None
                failure: BaseException | None = None
                try:
                    while True:
                        if self._wait_first:
                            await trio.lowlevel.wait_readable(sock)
                            self._corked = False  # the peer answered: a new burst
                            self._receive_credit = _YIELD_EVERY
                        elif not checkpointed:
                            await _checkpoint_if_cancelled()
                        checkpointed = True
                        # (_fdpass.receive, inlined.)
                        try:
                            data, ancdata, flags, _ = sock.recvmsg(
                                _RECV_SIZE, _RECV_CONTROL_SIZE, _RECV_FLAGS
                            )
                        except BlockingIOError:
                            self._wait_first = True
                            continue  # the socket was empty: wait for it
                        except Exception as exc:
                            failure = _fdpass.failure(exc, "recvmsg")
                            break
                        try:
                            if ancdata or flags & _MSG_CTRUNC or not data:  # fds, EOF
                                self._arrived(
                                    data,
                                    _fdpass.received_handles(
                                        ancdata,
                                        flags,
                                        fail_on_truncation=self._fail_on_truncation,
                                        reopen=self._reopen_pipes,
                                    ),
                                    _RECV_SIZE,
                                )
                            else:
                                # The request/response path: exactly one
                                # plain message without fds costs one call.
                                size = len(data)
                                self._bytes_received += size
                                self._wait_first = size < _RECV_SIZE
                                read = self._decoder.receive_plain(data)
                                if read is not None:
                                    self._messages_received += 1
                                    break
                            read = self._read_lent(data)
                        except Exception as exc:
                            failure = exc
                            break
                        if read is not None or not self._lent:
                            break
                except trio.ClosedResourceError:
                    if not self._aborted:
                        raise
                finally:
                    self._borrowed = False
                    if self._lent:
                        if self._parked_receivers:
                            self._receivers.unpark()  # the next one borrows
                        elif self._reader_untimed:
                            self._reader_lot.unpark()  # the reader re-arms its timer
                if failure is not None:
                    self._end_reads(failure)
                    if inbox:  # messages before the failure come first
                        return self._take_one()
                    self._raise_end()
                if read is not None:
                    return read
                checkpointed = True  # (None: handed back, or closed)
                continue
            if not checkpointed:
                await _checkpoint_if_cancelled()
                checkpointed = True
            if self._aborted:
                raise trio.ClosedResourceError("the channel was closed")
            if inbox:
                return self._take_one()
            if self._reads_done:
                self._raise_end()
            self._parked_receivers += 1
            try:
                await self._receivers.park()
            finally:
                self._parked_receivers -= 1
            self._receive_credit = _YIELD_EVERY

    async def aclose(self) -> None:
        """Flush what is queued (up to ``flush_timeout``) and close.

        Idempotent.  If cancelled, it still closes, without flushing.  Every
        fd the channel held is closed when it returns.

        Raises:
            FlushTimeoutError: the queue did not drain in time.
            ChannelError: a failure the user has not yet seen (data was lost).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._refusing = True
        try:
            await self._flush()
        finally:
            self._abort()
        self._raise_unreported()

    def statistics(self) -> ChannelStatistics:
        """Return a snapshot of the channel's counters and queue depths.

        Returns:
            A frozen :class:`ChannelStatistics`.
        """
        return ChannelStatistics(
            messages_sent=self._messages_sent,
            bytes_sent=self._bytes_sent,
            handles_sent=self._handles_sent,
            messages_received=self._messages_received,
            bytes_received=self._bytes_received,
            handles_received=self._handles_received,
            send_queue_messages=self._pending,
            send_queue_bytes=self._pending_bytes,
            send_queue_handles=self._pending_handles,
            receive_queue_messages=len(self._inbox),
            receive_queue_bytes=self._inbox_bytes,
            read_buffer_bytes=self._decoder.buffered_bytes,
            unclaimed_handles=self._decoder.queued_handles,
            receive_queue_handles=self._inbox_handles,
        )

    # ------------------------------------------------------------------
    # Sending

    def _validate(self, message: Message) -> int:
        """Check what the Message did not; return the message's wire size."""
        if message.__class__ is not Message and not isinstance(message, Message):
            raise TypeError(
                f"send() needs a trio_mojo.Message, not {type(message).__name__}"
            )
        if message.handles:
            self._check_handles(message.handles)
        mtype = message.type
        if mtype is _NORMAL:
            size = self._header_size + len(message.payload)
        elif mtype is MessageType.NORMAL_LEGACY:
            if self.framing is not Framing.MOJO:
                # (Checked here, not by the encoder: once send() has taken
                # the handles, nothing may fail.)
                raise ValueError(
                    f"Framing.IPCZ carries only NORMAL messages, not {mtype!r}"
                )
            size = LEGACY_HEADER_SIZE + len(message.payload)
        else:
            raise ValueError(f"message type {mtype!r} is reserved for the channel")
        if size > self.max_message_size:
            raise ValueError(
                f"message of {size} bytes exceeds "
                f"max_message_size={self.max_message_size}"
            )
        return size

    def _check_handles(self, handles: tuple[Handle, ...]) -> None:
        """Check that a message may carry so many handles (not 0) here.

        (That each is open and there once, ``take_all`` checks as it takes
        them.)
        """
        if len(handles) > MAX_ATTACHED_HANDLES:
            raise ValueError(
                f"a message carries at most {MAX_ATTACHED_HANDLES} handles, "
                f"not {len(handles)}"
            )
        if self._no_handles:
            raise ValueError("this channel's handle_policy is REJECT: no handles")

    def _refuse(self, message: Message) -> NoReturn:
        """Raise why ``send`` cannot take ``message``, closing its handles.

        (Its handles own its fds: ``send`` gives them back first if it had
        taken them.)
        """
        if not self._started:
            raise RuntimeError("use the Channel inside 'async with open_channel(...)'")
        close_all(message.handles)
        if self._write_error is not None and not self._closed:
            self._raise_write_error()
        if self._eof_requested and not self._closed:
            raise trio.ClosedResourceError(
                "send_eof() was called: this channel's sending side is closed"
            )
        raise trio.ClosedResourceError("the channel was closed")

    def _send_queue_full(self, size: int, handles: int = 0) -> bool:
        """True if queuing ``size`` bytes and ``handles`` fds would pass a bound.

        An empty queue always has room, so a message larger than
        ``send_queue_bytes`` (or with more fds than ``send_queue_handles``)
        can still be sent; a message without fds is not held back by the
        fds of the messages before it.
        """
        return bool(self._pending) and (
            self._pending >= self._send_queue_messages_limit
            or self._pending_bytes + size > self._send_queue_bytes_limit
            or (
                handles > 0
                and self._pending_handles + handles > self._send_queue_handles_limit
            )
        )

    async def _enqueue(
        self,
        message: Message,
        size: int,
        fds: list[int] | tuple[()],
        *,
        tried: bool = False,
    ) -> None:
        """Queue ``message`` behind what is pending; cancel-atomic.

        ``fds`` are the message's fds, already taken from its handles;
        ``tried``: ``send`` found room but the open batch refused the
        message (it is not offered to that batch again unless this waited
        for room, which may have sealed the batch or freed it).  The
        only await is the wait for room, before anything is queued, so a
        cancelled send leaves nothing behind and the caller keeps the
        handles: each gets its fd back.  (The bounds are checked against
        ``_pending``, which counts what the writer has already pulled into
        the encoder too; checking the outbox's capacity alone let the
        writer's read-ahead of up to 256 KiB exceed ``send_queue_messages``
        many times over.)
        """
        while self._send_queue_full(size, len(fds)):
            tried = False  # the queue changes while this waits
            try:
                await self._send_space.park()
            except BaseException:  # Cancelled: nothing queued yet
                give_back(message.handles, fds)
                raise
            if self._refusing:
                give_back(message.handles, fds)
                self._refuse(message)
        batch = self._open_batch
        if batch is not None and not tried and batch.append(message, self.framing, fds):
            self._pending += 1
            self._pending_bytes += size
            self._pending_handles += len(fds)
            return
        entry = OutgoingMessage.encode(message, self.framing, fds)
        try:
            self._outbox.send_nowait(entry)  # room: see _init_sending
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            give_back(message.handles, fds)
            self._refuse(message)
        self._pending += 1
        self._pending_bytes += size
        self._pending_handles += len(fds)
        self._open_batch = entry

    def _inline_write_failed(self, exc: BaseException) -> int:
        """An inline ``send`` raised ``exc``: 0 (nothing sent) if the socket
        was full; otherwise fail writing and raise the error."""
        if not isinstance(exc, BlockingIOError):
            self._fail_writes(_fdpass.failure(exc, "send"))
            self._raise_write_error()
        return 0

    def _queue_rest(self, frame: bytes, sent: int) -> None:
        """Queue what the kernel did not take of an inline write of ``frame``."""
        entry = OutgoingMessage(frame, b"")
        if sent:
            self._bytes_sent += sent
            entry.offset = sent
        self._queue_unsent(entry)

    def _write_now(self, entry: OutgoingMessage) -> None:
        """Write ``entry`` on the caller's task (nothing is pending)."""
        if not entry.fds:
            # One sendmsg of its buffers, no planning.  (A plain message
            # without fds never gets here: send() writes its frame itself.)
            try:
                sent = _fdpass.send(self._sock, entry.parts, [])
            except BaseException as exc:
                self._fail_writes(exc)
                return
            if sent:
                self._bytes_sent += sent
                if sent == entry.size:
                    self._messages_sent += 1
                    return
                entry.offset = sent
        self._queue_unsent(entry)

    def _queue_unsent(self, entry: OutgoingMessage) -> None:
        """Queue what the kernel did not take of an inline write, and flush."""
        self._pending += entry.count
        self._pending_bytes += entry.size - entry.offset
        self._pending_handles += len(entry.fds)
        self._encoder.push(entry)
        if not self._flush_nowait():
            # The kernel took part of it; wake the writer task for the rest.
            # A full or closed outbox means the writer is awake anyway.
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._outbox.send_nowait(None)

    def _flush_nowait(self) -> bool:
        """Write queued bytes until done or EAGAIN.  True if all were written."""
        encoder = self._encoder
        sock = self._sock
        try:
            while encoder:
                buffers, fds = encoder.plan()
                sent = _fdpass.send(sock, buffers, fds)
                if sent is None:
                    self._fds_in_flight = False  # EAGAIN: wait for writability
                    return False
                if sent < 0:  # ETOOMANYREFS: the writer retries after a delay
                    self._fds_in_flight = True
                    return False
                done = encoder.advance(sent)
                self._pending -= done
                self._pending_bytes -= sent
                self._messages_sent += done
                self._bytes_sent += sent
                if sent and fds:
                    self._handles_sent += len(fds)
                    self._pending_handles -= len(fds)
            if self._eof_requested and not self._pending:
                self._shut_down_writing()
        except BaseException as exc:
            self._fail_writes(exc)
            return True
        finally:
            if self._send_space:
                self._send_space.unpark_all()
        return True

    def _shut_down_writing(self) -> None:
        """Everything queued is written: half-close for send_eof()."""
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(OSError):  # a vanished peer: reads report it
                self._sock.shutdown(socket.SHUT_WR)
            self._send_space.unpark_all()

    def _fail_writes(self, exc: BaseException) -> None:
        """Stop writing for good: drop the queue and close its fds.

        A failure that is not a vanished peer (``sendmsg`` refused an fd,
        ``ENOBUFS``, a bug) also shuts the socket down for writing: the
        peer may hold the first bytes of a message whose rest will never
        come, and must read the end of the stream rather than wait for it.
        A failure while ``aclose()`` flushes is recorded too (the flush lost
        messages, so ``aclose`` must raise); only once ``_abort`` has begun
        are failures the expected fallout of closing and ignored.
        """
        if self._write_error is None and not self._aborted:
            if not isinstance(exc, (DisconnectedError, trio.ClosedResourceError)):
                with contextlib.suppress(OSError):  # (reads report a vanished peer)
                    self._sock.shutdown(socket.SHUT_WR)
                if not isinstance(exc, ChannelError):
                    wrapped = ChannelError(f"writing failed: {exc!r}")
                    wrapped.__cause__ = exc
                    exc = wrapped
            self._write_error = exc
            self._unreported.append(exc)
        self._refusing = True
        self._writer_scope.cancel()
        self._drop_outgoing()
        self._send_space.unpark_all()

    def _drop_outgoing(self) -> None:
        self._encoder.close()
        self._open_batch = None
        reader = self._outbox_reader
        while True:
            try:
                entry = reader.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if entry is not None:
                close_fds(entry.fds[entry.fds_sent :])
        reader.close()  # senders blocked in send() now get BrokenResourceError
        self._pending = 0
        self._pending_bytes = 0
        self._pending_handles = 0

    def _raise_write_error(self) -> NoReturn:
        error = self._write_error
        assert error is not None
        self._report(error)
        raise _fresh(error)

    async def _writer(self) -> None:
        try:
            with self._writer_scope:
                await self._write_loop()
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):
                raise
            self._fail_writes(exc)
        finally:
            self._writer_done.set()

    def _take_outgoing(self, item: OutgoingMessage | None) -> None:
        """Move an entry from the outbox into the encoder, sealing a batch."""
        if item is not None:
            if item is self._open_batch:
                self._open_batch = None  # from now on it is being sent
            self._encoder.push(item)

    async def _write_loop(self) -> None:
        encoder = self._encoder
        reader = self._outbox_reader
        delay = _fdpass.IN_FLIGHT_DELAYS[0]
        while True:
            if not encoder:
                try:
                    item = reader.receive_nowait()
                except trio.WouldBlock:
                    self._corked = False
                    try:
                        item = await reader.receive()
                    except trio.EndOfChannel:
                        return  # closed and fully flushed
                except trio.EndOfChannel:
                    return
                self._take_outgoing(item)
            self._corked = False
            while encoder.queued_bytes < _READ_SIZE:
                try:
                    item = reader.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self._take_outgoing(item)
            if self._eof_requested and not self._pending:
                self._shut_down_writing()
            if self._flush_nowait():
                delay = _fdpass.IN_FLIGHT_DELAYS[0]
            elif self._fds_in_flight:
                # Too many of this user's fds are in flight (_fdpass.send):
                # the socket is writable, so wait for the peer to read some.
                self._fds_in_flight = False
                await trio.sleep(delay)
                delay = min(2 * delay, _fdpass.IN_FLIGHT_DELAYS[1])
            else:
                delay = _fdpass.IN_FLIGHT_DELAYS[0]
                await trio.lowlevel.wait_writable(self._sock)
            if self._write_error is not None:
                return

    # ------------------------------------------------------------------
    # Receiving: the queue

    def _took(self, message: Message) -> None:
        """``message`` left the receive queue: account, and let the reader on."""
        self._inbox_bytes -= len(message.payload)
        handles = message.handles
        if handles:
            self._inbox_handles -= len(handles)
        if self._reader_wants_room:
            self._let_reader_on()

    def _let_reader_on(self) -> None:
        """Wake the reader waiting for room, if the receive queue has some."""
        if self._reader_may_read():
            self._reader_wants_room = False
            self._room.unpark_all()

    def _reader_may_read(self) -> bool:
        """True if the receive queue has room for what one more read brings.

        The fds count everything received and not yet returned (the queue's
        and the decoder's unclaimed ones); a queue with nothing in it always
        has room, since only reading can complete the message its fds wait
        for.
        """
        inbox = self._inbox
        return not inbox or (
            len(inbox) < self._receive_queue_messages_limit
            and self._inbox_bytes <= self._receive_queue_bytes_limit
            and self._inbox_handles + self._decoder.queued_handles
            < self._receive_queue_handles_limit
        )

    def _pump(self, keep: int = 0) -> _Pumped:
        """Move parsed messages from the decoder into the receive queue.

        Never waits: returns why it stopped.  ``keep`` messages are about
        to be taken by the caller, so that many fewer receivers are woken.
        Raises what the decoder raises (the messages before the bad one are
        queued).
        """
        decoder = self._decoder
        inbox = self._inbox
        queued = len(inbox)
        try:
            while True:
                room = self._receive_queue_messages_limit - len(inbox)
                allowance = self._receive_queue_bytes_limit - self._inbox_bytes
                if room <= 0 or allowance < 0:
                    return _FULL
                batch, payload_bytes, handles, drained = decoder.next_batch(
                    room, allowance
                )
                if batch:
                    inbox.extend(batch)
                    self._inbox_bytes += payload_bytes
                    self._inbox_handles += handles
                    self._messages_received += len(batch)
                if drained:
                    return _NEED_DATA
                if batch:
                    continue
                event = decoder.next_message()
                if event is NEED_DATA:
                    return _NEED_DATA
                if event is END_OF_STREAM:
                    return _END
                self._messages_received += 1
                if event.type in _DATA_TYPES:
                    inbox.append(event)
                    self._inbox_bytes += len(event.payload)
                    self._inbox_handles += len(event.handles)
                elif not self._on_control(event):
                    return _STALLED
        finally:
            arrived = len(inbox) - queued - keep
            if arrived > 0 and self._parked_receivers:
                self._receivers.unpark(count=arrived)

    def _on_control(self, message: Message) -> bool:
        """Decline upgrades; ignore stray answers (Chromium's ChannelLinux).

        Returns False if the answer must wait for room in the send queue:
        a peer that floods offers and never reads must not grow the send
        queue without bound, so the reader stops reading until there is
        room, as ``send()`` would wait.
        """
        message.close()  # control fds are unused
        if message.type is MessageType.UPGRADE_OFFER:
            if self._send_queue_full(_REJECT_SIZE) and self._write_error is None:
                self._stalled_offer = True
                return False
            self._decline_upgrade()
        return True

    def _decline_upgrade(self) -> None:
        self._stalled_offer = False
        if self._write_error is None and not self._closed and not self._eof_requested:
            # (closing: the writer may be gone already; after send_eof the
            # socket may be shut down for writing: the peer gets no answer.)
            reply = OutgoingMessage.encode(Message(b"", (), MessageType.UPGRADE_REJECT))
            if self._pending == 0:
                self._write_now(reply)
            else:
                self._pending += 1
                self._pending_bytes += reply.size
                self._encoder.push(reply)

    def _raise_end(self) -> NoReturn:
        error = self._read_error
        if error is None:
            raise trio.EndOfChannel
        self._report(error)
        raise _fresh(error)

    def _end_reads(self, exc: BaseException | None) -> None:
        """The stream ended (``exc is None``) or reading failed: wake everyone."""
        if not self._reads_done:
            self._reads_done = True
            if exc is not None:
                self._fail_reads(exc)
        self._lent = False
        self._receivers.unpark_all()
        self._reader_lot.unpark_all()

    def _fail_reads(self, exc: BaseException) -> None:
        self._decoder.close()
        if self._aborted or isinstance(exc, trio.ClosedResourceError):
            return
        if not isinstance(exc, ChannelError):
            wrapped = ChannelError(f"reading failed: {exc!r}")
            wrapped.__cause__ = exc
            exc = wrapped
        self._read_error = exc
        self._unreported.append(exc)
        if isinstance(exc, MalformedMessageError):
            # The peer is hostile or broken: stop talking to it, and cut it
            # off now (as Chromium's delegate does by shutting the channel
            # down) rather than when the block is left, so it can neither
            # park more fds in our receive queue nor wait on us.  The fd
            # itself is closed by _abort, which owns the socket's lifetime.
            self._fail_writes(exc)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _read_once(self) -> bytes | None:
        """One ``recvmsg`` by the reader.

        Returns the bytes read, for the caller to feed to the decoder;
        ``b""`` at the end of the stream (already recorded in the decoder),
        or None if the socket had nothing.  The fds that came with them
        are in the decoder already.  Remembers whether the read drained the
        socket.
        """
        size = self._decoder.read_size(_RECV_SIZE, _MAX_RECV_SIZE)
        received = _fdpass.receive(
            self._sock,
            size,
            fail_on_truncation=self._fail_on_truncation,
            reopen=self._reopen_pipes,
        )
        if received is None:
            self._wait_first = True
            return None
        data, handles = received
        self._arrived(data, handles, size)
        return data

    def _arrived(self, data: bytes, handles: list[Handle], size: int) -> None:
        """Count what a read of ``size`` bytes brought; fds and EOF to the decoder."""
        if handles:
            self._handles_received += len(handles)
            self._decoder.receive_handles(handles)
        if data:
            self._bytes_received += len(data)
            self._wait_first = len(data) < size
        else:
            self._decoder.receive_eof()

    # ------------------------------------------------------------------
    # Receiving: read lending (receive() borrows)

    def _take_one(self) -> Message:
        message = self._inbox.popleft()
        self._took(message)
        return message

    def _read_lent(self, data: bytes) -> Message | None:
        """What a borrower's read brought, ``data``: the message it returns, or None.

        (Counted already, its fds and an end of stream given to the
        decoder.)  None after handing the socket back: the read brought
        anything but complete plain messages (the inbox got what it
        brought).  With the socket still lent, the messages beyond the
        first go into the inbox and wake that many parked receivers.
        Raises what the decoder raises.
        """
        keep = 1  # the message this borrower takes wakes nobody else
        if data:
            # (A borrower reads only while the inbox is empty: all of it is room.)
            batch, payload_bytes, nhandles, drained = self._decoder.receive_batch(
                data,
                self._receive_queue_messages_limit,
                self._receive_queue_bytes_limit,
            )
            if batch:
                self._messages_received += len(batch)
                if drained:
                    # Only complete plain messages: ours is the first.
                    message = batch[0]
                    if len(batch) > 1:
                        del batch[0]
                        self._inbox.extend(batch)
                        self._inbox_bytes += payload_bytes - len(message.payload)
                        self._inbox_handles += nhandles - len(message.handles)
                        if self._parked_receivers:
                            self._receivers.unpark(count=len(batch))
                    return message
                self._inbox.extend(batch)
                self._inbox_bytes += payload_bytes
                self._inbox_handles += nhandles
                if len(batch) > 1 and self._parked_receivers:
                    self._receivers.unpark(count=len(batch) - 1)
                keep = 0
        status = self._pump(keep)
        if status is not _NEED_DATA or not self._inbox:
            self._hand_back()
        if self._inbox:
            return self._take_one()
        return None

    def _hand_back(self) -> None:
        if self._lent:
            self._lent = False
            self._reader_lot.unpark()

    async def _lend(self) -> None:
        """Let receive() callers read until they hand the socket back.

        While lent and nobody borrows, nothing reads ahead; so the reader
        takes the socket back once nobody has borrowed it for
        :data:`_LEND_IDLE` seconds.  While a borrower waits on the socket
        the reader sleeps without a timer (an idle channel costs nothing),
        and is woken when the borrower leaves.
        """
        while self._lent:
            borrows = self._borrows
            with trio.move_on_after(_LEND_IDLE):
                await self._reader_lot.park()
            # (Handed back meanwhile: _lent is False and the loop ends.)
            if self._borrowed and self._lent:
                # Someone waits on the socket: sleep until they leave, then
                # give the next ones _LEND_IDLE again.  (Woken at most once
                # per _LEND_IDLE, however many messages pass meanwhile.)
                self._reader_untimed = True
                try:
                    await self._reader_lot.park()
                finally:
                    self._reader_untimed = False
            elif self._borrows == borrows and not self._borrowed:
                self._lent = False  # take it back; parked receivers wait for us

    # ------------------------------------------------------------------
    # Receiving: the reader task

    async def _reader(self) -> None:
        try:
            with self._reader_scope:
                await self._read_loop()
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):
                raise
            self._end_reads(exc)
        finally:
            self._end_reads(None)
            self._reader_done.set()

    async def _read_loop(self) -> None:
        sock = self._sock
        total = 0  # bytes read since the last schedule point (fairness cap)
        while True:
            if self._reads_done:
                return
            if self._stalled_offer:
                while self._send_queue_full(_REJECT_SIZE) and self._write_error is None:
                    await self._send_space.park()
                self._decline_upgrade()
            status = self._pump()
            if status is _END:
                return
            if status is _FULL or (
                status is _NEED_DATA and not self._reader_may_read()
            ):
                self._reader_wants_room = True
                try:
                    await self._room.park()
                finally:
                    self._reader_wants_room = False
                continue
            if status is _STALLED:
                continue
            if total >= _READ_SIZE:
                total = 0
                await trio.lowlevel.checkpoint()
                continue
            if not self._wait_first:
                data = self._read_once()
                if data is not None:
                    if data:
                        self._decoder.receive_data(data)
                        total += len(data)
                    continue
            total = 0
            arriving = self._decoder.buffered_bytes
            if arriving:
                # A message is arriving: no lending (its next read would only
                # give the socket back), so no cancel scope to lend with.
                await trio.lowlevel.wait_readable(sock)
                self._corked = False  # the peer answered: a new burst may begin
                self._wait_first = False
            elif self._parked_receivers and not self._inbox:
                # Someone waits for a message: let them read themselves.
                self._lent = True
                self._receivers.unpark()
            else:
                scope = trio.CancelScope()
                self._reader_idle_scope = scope
                try:
                    with scope:
                        await trio.lowlevel.wait_readable(sock)
                finally:
                    self._reader_idle_scope = None
                if not self._lent:
                    self._corked = False  # the peer answered: a new burst may begin
                    self._wait_first = False
            if self._lent:
                await self._lend()

    # ------------------------------------------------------------------
    # Lifecycle

    def _start(self, nursery: trio.Nursery) -> None:
        self._started = True
        self._refusing = self._closed
        nursery.start_soon(
            self._reader, name=f"trio_mojo reader fd={self._sock.fileno()}"
        )
        nursery.start_soon(
            self._writer, name=f"trio_mojo writer fd={self._sock.fileno()}"
        )

    async def _flush(self) -> None:
        """Let the writer drain the queue, then half-close the socket."""
        self._outbox.close()
        self._open_batch = None
        if self._write_error is not None:
            return
        if self._started and not self._writer_done.is_set():
            with trio.move_on_after(self._flush_timeout) as scope:
                await self._writer_done.wait()
            if scope.cancelled_caught:
                unsent = self._pending
                error = FlushTimeoutError(
                    f"gave up flushing after {self._flush_timeout} s; "
                    f"{unsent} message(s) were not sent"
                )
                self._write_error = error
                self._unreported.append(error)
                self._refusing = True
                return
        if self._write_error is None:
            # Already disconnected? The reader reports it if it matters.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    def _abort(self) -> None:
        """Stop both tasks and close the socket and every fd.  Idempotent."""
        self._closed = True
        self._aborted = True
        self._refusing = True
        self._reader_scope.cancel()
        self._writer_scope.cancel()
        self._outbox.close()
        self._drop_outgoing()
        inbox = self._inbox
        while inbox:
            inbox.popleft().close()
        self._inbox_bytes = 0
        self._inbox_handles = 0
        self._decoder.close()
        self._send_space.unpark_all()
        self._room.unpark_all()
        self._receivers.unpark_all()
        self._reader_lot.unpark_all()
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    def _report(self, error: BaseException) -> None:
        """``error`` is being raised to the user: it is no longer news.

        A MalformedMessageError is both the read and the write failure, so
        it can be listed twice: seeing it once reports it.  And a vanished
        peer usually fails both directions (EPIPE in the writer, ECONNRESET
        or EOF inside a message in the reader): once the user has seen one
        DisconnectedError, the other direction's is the same news and is
        not raised again when the block is left (send()/receive() still
        raise it if called).
        """
        self._unreported = [e for e in self._unreported if e is not error]
        if isinstance(error, DisconnectedError):
            self._disconnect_reported = True

    def _raise_unreported(self) -> None:
        unreported = self._unreported
        self._unreported = []
        if self._disconnect_reported:
            unreported = [e for e in unreported if not isinstance(e, DisconnectedError)]
        if unreported:
            raise _fresh(unreported[0])


def _fresh(error: BaseException) -> BaseException:
    """A new exception like ``error``, chained to the same cause.

    Raising one stored instance again and again would grow its traceback
    with every raise; each caller gets its own instance instead.
    """
    fresh = type(error)(*error.args)
    fresh.__cause__ = error.__cause__ if error.__cause__ is not None else error
    return fresh


@asynccontextmanager
async def open_channel(
    endpoint: Endpoint,
    *,
    framing: Framing = Framing.MOJO,
    handle_policy: HandlePolicy = HandlePolicy.ACCEPT,
    max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
    max_handles_per_message: int | None = MAX_ATTACHED_HANDLES,
    max_queued_handles: int | None = 2 * MAX_ATTACHED_HANDLES,
    strict_handles: bool = True,
    ipcz_parse_threshold: int = IPCZ_MIN_HEADER_SIZE,
    fail_on_truncated_handles: bool = True,
    send_queue_messages: int = 4096,
    send_queue_bytes: int = 8 * 1024 * 1024,
    send_queue_handles: int = 1024,
    receive_queue_messages: int = 4096,
    receive_queue_bytes: int = 8 * 1024 * 1024,
    receive_queue_handles: int = 2 * MAX_ATTACHED_HANDLES,
    flush_timeout: float | None = 30.0,
    reopen_pipes: bool = False,
) -> AsyncIterator[Channel]:
    """Open a :class:`Channel` on ``endpoint`` for the duration of the block.

    The endpoint is consumed: the channel owns its socket from now on.  The
    reader and writer tasks run in a nursery owned by this context manager.

    Leaving the block normally flushes queued messages (waiting up to
    ``flush_timeout`` seconds; ``None`` waits forever), half-closes the
    socket so the peer sees a clean end of stream, and closes everything.
    Leaving it by an exception or cancellation aborts at once.  A channel
    failure that no ``send``/``receive`` call raised is raised on exit.

    Args:
        endpoint: a connected stream socket from :func:`channel_pair`,
            :meth:`Endpoint.from_fd` or :func:`recover_endpoint`.
        framing: ``Framing.MOJO`` (legacy Mojo core headers) or
            ``Framing.IPCZ`` (MojoIpcz headers).  Both ends must agree.
        handle_policy: ``HandlePolicy.REJECT`` refuses fds from the peer.
        max_message_size: largest message accepted or sent, header
            included (default 256 MiB; ``None``: the u32 limit).
        max_handles_per_message: most handles one message may declare
            (default 253; ``None``: 65535, as Chromium).
        max_queued_handles: most fds that may wait for their message
            (default 506; ``None``: unbounded, as Chromium).
        strict_handles: a complete message whose fds have not all arrived,
            or fds beyond what messages claim, are malformed (default);
            ``False`` waits for missing fds, as Chromium.
        ipcz_parse_threshold: bytes needed before an IPCZ header is parsed,
            8 (default) or Chromium's 16.
        fail_on_truncated_handles: fail on ``MSG_CTRUNC`` (default) rather
            than carry on without the lost fds as Chromium does.
        send_queue_messages: most messages ``send`` queues before it waits
            (default 4096).
        send_queue_bytes: most bytes ``send`` queues before it waits
            (default 8 MiB); a single message over a bound is still
            accepted when the queue is empty.
        send_queue_handles: most fds ``send`` queues before it waits
            (default 1024: a fast producer of fd-laden messages must not
            run its own process out of fds).
        receive_queue_messages: most messages the reader parses ahead of
            ``receive`` (default 4096); beyond it the reader stops reading
            and the peer's sends wait.
        receive_queue_bytes: the same bound in payload bytes (default
            8 MiB).
        receive_queue_handles: bound on the fds received and not yet
            returned by ``receive`` (those of queued messages and those
            that arrived ahead of their message; default 506); at or beyond
            it the reader stops reading, exactly as for bytes.  One read
            brings at most 128 more, so with the defaults the receive path
            holds at most 506 + 128 fds whatever the peer does.
        flush_timeout: seconds a normal exit waits for the queue to drain.
        reopen_pipes: reopen every pipe and FIFO the peer sends
            (:meth:`Handle.reopen`) before ``receive`` returns it, so the
            peer cannot change the flags (``O_NONBLOCK``) of the description
            you read or write; on for the channels of :func:`open_worker`.
            Costs an ``lseek`` per fd and an ``open`` per pipe; a FIFO
            write end without a reader fails the channel
            (:exc:`MalformedMessageError`).

    Yields:
        The open :class:`Channel`.

    Raises:
        ValueError: the endpoint was already consumed, or an option is out
            of range.
    """
    sock = endpoint._consume()
    try:
        channel = Channel(
            sock,
            framing=framing,
            handle_policy=handle_policy,
            max_message_size=max_message_size,
            max_handles_per_message=max_handles_per_message,
            max_queued_handles=max_queued_handles,
            strict_handles=strict_handles,
            ipcz_parse_threshold=ipcz_parse_threshold,
            fail_on_truncated_handles=fail_on_truncated_handles,
            send_queue_messages=send_queue_messages,
            send_queue_bytes=send_queue_bytes,
            send_queue_handles=send_queue_handles,
            receive_queue_messages=receive_queue_messages,
            receive_queue_bytes=receive_queue_bytes,
            receive_queue_handles=receive_queue_handles,
            flush_timeout=flush_timeout,
            reopen_pipes=reopen_pipes,
        )
    except BaseException:
        sock.close()
        raise
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            channel._start(nursery)
            try:
                yield channel
            except BaseException as exc:  # the body's error: abort, re-raise bare
                raised = exc
                channel._abort()
            else:
                try:
                    await channel.aclose()
                except BaseException as exc:
                    raised = exc
    except BaseException:
        # The tasks saw an outer cancellation too: the nursery raises a group
        # of Cancelled that must not replace the body's own error.
        if raised is None:
            raise
    finally:
        channel._abort()
    if raised is not None:
        raise raised
