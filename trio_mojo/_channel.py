"""Channel: Mojo's ChannelPosix as a Trio structured-concurrency transport.

Theory of operation
-------------------

:func:`open_channel` consumes an :class:`Endpoint` and opens a nursery with
two tasks around a non-blocking ``AF_UNIX`` stream socket:

* The **reader** calls ``recvmsg`` (through ``_fdpass``) until the socket
  would block, feeding bytes and fds into a :class:`MessageDecoder` and the
  parsed messages into a bounded Trio memory channel that ``receive()``
  drains.  It only awaits ``wait_readable`` when the socket is empty, and
  takes a checkpoint after 256 KiB (Mojo's per-wake-up fairness cap).  When
  the receive queue is full (in messages or in bytes) the reader stops
  reading: the kernel buffer fills and the peer's sends wait.  That is the
  end-to-end backpressure.
* The **writer** drains a bounded memory channel of encoded messages into a
  :class:`MessageEncoder`, and writes everything queued with as few
  ``sendmsg`` calls as the planner allows, resuming partial writes at the
  exact byte and handle.  It awaits ``wait_writable`` only on ``EAGAIN``.

The per-message path is free of scheduler passes.  ``send()`` checks for
cancellation without yielding and then, when nothing is queued, writes on
the caller's task at once (Mojo's ``Write`` fast path), leaving only what the
kernel did not take to the writer; otherwise it uses ``send_nowait`` on the
queue.  ``receive()`` takes from the queue with ``receive_nowait``.  Both
only block when they must, and yield once every
:data:`_YIELD_EVERY` non-blocking calls so a busy producer or consumer
cannot starve other tasks.  Batching falls out: while the peer keeps up, a
message costs one ``sendmsg``; once it falls behind, messages queue up and
leave many per ``sendmsg``, and the reader parses many per ``recvmsg``.

Errors.  The tasks never raise into the nursery; they record the failure
and wake whoever waits.  ``receive()`` first delivers every message parsed
before a failure (Chromium's ``PeerShutdownDuringRead``), then raises the
failure as one exception with its cause chained.  A write error
(``EPIPE``/``ECONNRESET``) stops writing but not reading, as in Chromium:
``send()`` raises it, while ``receive()`` goes on delivering what the peer
sent before it vanished.  A malformed message fails both directions and
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

Shutdown.  Leaving the block normally (or ``aclose()``) flushes the
outgoing queue, bounded by ``flush_timeout``, half-closes the socket so the
peer reads a clean end of stream, then cancels both tasks.  Leaving by an
exception or cancellation aborts at once.  Either way every fd the channel
still holds (queued outgoing, received but undelivered, unclaimed) is
closed before the block is left.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

from . import _fdpass
from ._core._decoder import END_OF_STREAM, NEED_DATA, MessageDecoder
from ._core._encoder import MessageEncoder, OutgoingMessage
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
from ._handles import Handle, close_all

__all__ = ["Channel", "ChannelStatistics", "open_channel"]

_YIELD_EVERY: Final = 64
"""Non-blocking send()/receive() calls between two schedule points."""
_READ_SIZE: Final = MAX_BATCH_READ_SIZE
"""Bytes read per wake-up of the reader before it yields (Mojo's fairness cap)."""
_RECV_SIZE: Final = 64 * 1024
"""Bytes asked of one ``recvmsg``.  Below glibc's mmap threshold, so the
receive buffer comes from the heap instead of a fresh mmap/munmap per call
(measured: 3 us per call instead of 15 us for 256 KiB)."""
_DATA_TYPES: Final = frozenset((MessageType.NORMAL, MessageType.NORMAL_LEGACY))
_REJECT_SIZE: Final = HEADER_SIZE
"""Wire size of the UPGRADE_REJECT we answer an offer with."""

_Outbox = trio.MemorySendChannel["OutgoingMessage | None"]
_OutboxReader = trio.MemoryReceiveChannel["OutgoingMessage | None"]


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


class Channel(trio.abc.Channel[Message]):
    """A message channel to a peer process, running inside a nursery.

    Do not construct it directly: use :func:`open_channel`, which owns the
    channel's tasks.  ``send`` and ``receive`` may be called from any number
    of tasks; each message is sent whole and messages from one task keep
    their order.
    """

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
        receive_queue_messages: int,
        receive_queue_bytes: int,
        flush_timeout: float | None,
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
            ("receive_queue_messages", receive_queue_messages),
            ("receive_queue_bytes", receive_queue_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if flush_timeout is not None and not flush_timeout >= 0:
            raise ValueError(f"flush_timeout={flush_timeout} must be >= 0 or None")
        self.framing: Final = framing
        self.handle_policy: Final = handle_policy
        self.max_message_size: Final = self._decoder.max_message_size
        self._header_size = IPCZ_HEADER_SIZE if framing is Framing.IPCZ else HEADER_SIZE
        self._fail_on_truncation = fail_on_truncated_handles
        self._flush_timeout = math.inf if flush_timeout is None else flush_timeout
        self._sock = sock
        self._encoder = MessageEncoder()
        # The send queue's bounds are enforced by _pending/_pending_bytes
        # (which also count what the writer already moved into the encoder),
        # not by the outbox's capacity: the outbox never holds more than
        # send_queue_messages entries plus one wake-up (None), so
        # send_nowait on it cannot block.
        outbox, outbox_reader = trio.open_memory_channel["OutgoingMessage | None"](
            send_queue_messages + 1
        )
        self._outbox: _Outbox = outbox
        self._outbox_reader: _OutboxReader = outbox_reader
        self._send_queue_messages_limit = send_queue_messages
        self._send_queue_bytes_limit = send_queue_bytes
        inbox, inbox_reader = trio.open_memory_channel[Message](receive_queue_messages)
        self._inbox = inbox
        self._inbox_reader = inbox_reader
        self._receive_queue_bytes_limit = receive_queue_bytes
        # Accounting: messages/bytes accepted by send() and not yet written.
        self._pending = 0
        self._pending_bytes = 0
        self._inbox_bytes = 0
        self._send_space = trio.lowlevel.ParkingLot()
        self._receive_space = trio.lowlevel.ParkingLot()
        self._send_streak = 0
        self._receive_streak = 0
        # An inline write happened and neither the writer nor the reader
        # task has run since: further sends join the writer's next sendmsg.
        self._corked = False
        self._closed = False  # aclose() began: send() refuses, flush may run
        self._aborted = False  # _abort() began: failures are no longer news
        self._started = False
        self._reader_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self._writer_done = trio.Event()
        self._reader_done = trio.Event()
        # Failures: read side, write side; and whether the user has seen each.
        self._read_error: BaseException | None = None
        self._write_error: BaseException | None = None
        self._unreported: list[BaseException] = []
        self._disconnect_reported = False
        # Statistics.
        self._messages_sent = 0
        self._bytes_sent = 0
        self._handles_sent = 0
        self._messages_received = 0
        self._bytes_received = 0
        self._handles_received = 0

    # ------------------------------------------------------------------
    # Public API

    async def send(self, message: Message) -> None:
        """Send ``message``; wait only while the send queue is full.

        Cancel-atomic: if cancelled, the message was not queued and the
        caller still owns its handles.  Otherwise the channel owns the
        handles from the moment ``send`` is called: it closes them once the
        kernel has them, or when the message cannot be sent.

        Raises:
            TypeError: ``message`` is not a :class:`Message`.
            ValueError: the message is invalid (over ``max_message_size``,
                more than 253 handles, a closed or repeated handle, handles
                on a ``REJECT`` channel, a type this framing cannot carry);
                nothing was queued and the caller keeps the handles.
            trio.ClosedResourceError: the channel was closed.
            ChannelError: the channel failed (:class:`DisconnectedError`,
                :class:`MalformedMessageError`), cause chained.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        entry = self._encode(message)
        try:
            self._check_sendable()
        except BaseException:
            close_all(message.handles)
            raise
        if self._pending == 0 and not self._corked:
            # Mojo's fast path: the first message of a burst is written at
            # once.  The rest of the burst is corked: queued for the writer
            # task, which sends all of it with one sendmsg at the next
            # schedule point (the producer yields at least every
            # _YIELD_EVERY sends), unless the peer answers first (then the
            # reader uncorks and the next send is again written at once).
            self._corked = True
            self._write_now(entry)
            if self._write_error is not None:
                self._raise_write_error()
        else:
            await self._enqueue(entry, message)
        self._send_streak += 1
        if self._send_streak >= _YIELD_EVERY:
            self._send_streak = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> Message:
        """Return the next message; wait while none has arrived.

        Raises:
            trio.EndOfChannel: the peer closed its end cleanly, after every
                message it sent was returned.
            DisconnectedError: the peer vanished inside a message or reset.
            MalformedMessageError: the peer broke the protocol; raised after
                the messages that arrived before the bad one.
            trio.ClosedResourceError: this channel was closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            message = self._inbox_reader.receive_nowait()
        except trio.WouldBlock:
            try:
                message = await self._inbox_reader.receive()
            except trio.EndOfChannel:
                self._raise_end()
            except trio.ClosedResourceError:
                raise trio.ClosedResourceError("the channel was closed") from None
            self._receive_streak = 0
        except trio.EndOfChannel:
            self._raise_end()
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the channel was closed") from None
        else:
            self._receive_streak += 1
            if self._receive_streak >= _YIELD_EVERY:
                self._receive_streak = 0
                self._took(message)
                await trio.lowlevel.cancel_shielded_checkpoint()
                return message
        self._took(message)
        return message

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
        try:
            await self._flush()
        finally:
            self._abort()
        self._raise_unreported()

    def statistics(self) -> ChannelStatistics:
        """Return a snapshot of the channel's counters and queue depths."""
        return ChannelStatistics(
            messages_sent=self._messages_sent,
            bytes_sent=self._bytes_sent,
            handles_sent=self._handles_sent,
            messages_received=self._messages_received,
            bytes_received=self._bytes_received,
            handles_received=self._handles_received,
            send_queue_messages=self._pending,
            send_queue_bytes=self._pending_bytes,
            receive_queue_messages=self._inbox.statistics().current_buffer_used,
            receive_queue_bytes=self._inbox_bytes,
            read_buffer_bytes=self._decoder.buffered_bytes,
            unclaimed_handles=self._decoder.queued_handles,
        )

    # ------------------------------------------------------------------
    # Sending

    def _encode(self, message: Message) -> OutgoingMessage:
        if not isinstance(message, Message):
            raise TypeError(
                f"send() needs a trio_mojo.Message, not {type(message).__name__}"
            )
        handles = message.handles
        if handles:
            if len(handles) > MAX_ATTACHED_HANDLES:
                raise ValueError(
                    f"a message carries at most {MAX_ATTACHED_HANDLES} handles, "
                    f"not {len(handles)}"
                )
            if self.handle_policy is HandlePolicy.REJECT:
                raise ValueError("this channel's handle_policy is REJECT: no handles")
            for handle in handles:
                if not isinstance(handle, Handle):
                    raise TypeError(f"handles must be Handle objects, not {handle!r}")
                if handle.closed:
                    raise ValueError(f"cannot send a closed handle ({handle!r})")
            if len({id(h) for h in handles}) != len(handles):
                raise ValueError("the same Handle appears twice in one message")
        mtype = message.type
        if mtype not in _DATA_TYPES:
            raise ValueError(f"message type {mtype!r} is reserved for the channel")
        header = (
            self._header_size
            if mtype is not MessageType.NORMAL_LEGACY
            else LEGACY_HEADER_SIZE
        )
        if header + len(message.payload) > self.max_message_size:
            raise ValueError(
                f"message of {header + len(message.payload)} bytes exceeds "
                f"max_message_size={self.max_message_size}"
            )
        return OutgoingMessage.encode(message, self.framing)

    def _check_sendable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the channel was closed")
        if self._write_error is not None:
            self._raise_write_error()
        if not self._started:
            raise RuntimeError("use the Channel inside 'async with open_channel(...)'")

    def _send_queue_full(self, size: int) -> bool:
        """True if queuing ``size`` more bytes would pass a send-queue bound.

        An empty queue always has room, so a message larger than
        ``send_queue_bytes`` can still be sent.
        """
        return bool(self._pending) and (
            self._pending >= self._send_queue_messages_limit
            or self._pending_bytes + size > self._send_queue_bytes_limit
        )

    async def _enqueue(self, entry: OutgoingMessage, message: Message) -> None:
        """Queue ``entry`` behind what is pending; cancel-atomic.

        The only await is the wait for room, before anything is queued, so
        a cancelled send leaves nothing behind and the caller keeps the
        handles.  (The bounds are checked against ``_pending``, which counts
        what the writer has already pulled into the encoder too; checking the
        outbox's capacity alone let the writer's read-ahead of up to 256 KiB
        exceed ``send_queue_messages`` many times over.)
        """
        size = entry.size
        while self._send_queue_full(size):
            await self._send_space.park()  # Cancelled: nothing queued yet
            try:
                self._check_sendable()
            except BaseException:
                close_all(message.handles)
                raise
        self._pending += 1
        self._pending_bytes += size
        try:
            self._outbox.send_nowait(entry)  # room: see __init__
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._pending -= 1
            self._pending_bytes -= size
            close_all(message.handles)
            self._check_sendable()
            raise trio.ClosedResourceError("the channel was closed") from None

    def _write_now(self, entry: OutgoingMessage) -> None:
        """Queue ``entry`` and write on the caller's task (nothing is pending)."""
        self._pending += 1
        self._pending_bytes += entry.size
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
                    return False
                done = encoder.advance(sent)
                self._pending -= done
                self._pending_bytes -= sent
                self._messages_sent += done
                self._bytes_sent += sent
                if sent and fds:
                    self._handles_sent += len(fds)
        except BaseException as exc:
            self._fail_writes(exc)
            return True
        finally:
            if self._send_space:
                self._send_space.unpark_all()
        return True

    def _fail_writes(self, exc: BaseException) -> None:
        """Stop writing for good: drop the queue and close its fds.

        A failure while ``aclose()`` flushes is recorded too (the flush lost
        messages, so ``aclose`` must raise); only once ``_abort`` has begun
        are failures the expected fallout of closing and ignored.
        """
        if self._write_error is None and not self._aborted:
            if not isinstance(exc, (ChannelError, trio.ClosedResourceError)):
                wrapped = ChannelError(f"writing failed: {exc!r}")
                wrapped.__cause__ = exc
                exc = wrapped
            self._write_error = exc
            self._unreported.append(exc)
        self._writer_scope.cancel()
        self._drop_outgoing()
        self._send_space.unpark_all()

    def _drop_outgoing(self) -> None:
        self._encoder.close()
        reader = self._outbox_reader
        while True:
            try:
                entry = reader.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if entry is not None:
                close_all(entry.handles[entry.handles_sent :])
        reader.close()  # senders blocked in send() now get BrokenResourceError
        self._pending = 0
        self._pending_bytes = 0

    def _raise_write_error(self) -> None:
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

    async def _write_loop(self) -> None:
        encoder = self._encoder
        reader = self._outbox_reader
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
                if item is not None:
                    encoder.push(item)
            self._corked = False
            while encoder.queued_bytes < _READ_SIZE:
                try:
                    item = reader.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if item is not None:
                    encoder.push(item)
            if not self._flush_nowait():
                await trio.lowlevel.wait_writable(self._sock)
            if self._write_error is not None:
                return

    # ------------------------------------------------------------------
    # Receiving

    def _took(self, message: Message) -> None:
        self._inbox_bytes -= len(message.payload)
        if self._receive_space and self._inbox_bytes <= self._receive_queue_bytes_limit:
            self._receive_space.unpark_all()

    def _raise_end(self) -> None:
        error = self._read_error
        if error is None:
            raise trio.EndOfChannel
        self._report(error)
        raise _fresh(error)

    async def _reader(self) -> None:
        try:
            with self._reader_scope:
                await self._read_loop()
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):
                raise
            self._fail_reads(exc)
        finally:
            self._inbox.close()
            self._reader_done.set()

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

    async def _read_loop(self) -> None:
        sock = self._sock
        decoder = self._decoder
        fail_on_truncation = self._fail_on_truncation
        while True:
            total = 0
            while True:
                received = _fdpass.receive(
                    sock, _RECV_SIZE, fail_on_truncation=fail_on_truncation
                )
                if received is None:
                    break
                data, handles = received
                if handles:
                    self._handles_received += len(handles)
                    decoder.receive_handles(handles)
                if not data:
                    decoder.receive_eof()
                    await self._dispatch()
                    return
                self._bytes_received += len(data)
                decoder.receive_data(data)
                await self._dispatch()
                total += len(data)
                if len(data) < _RECV_SIZE or total >= _READ_SIZE:
                    break
            if total >= _READ_SIZE:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(sock)
                self._corked = False  # the peer answered: a new burst may begin

    async def _dispatch(self) -> None:
        """Move every complete message from the decoder to the inbox."""
        decoder = self._decoder
        inbox = self._inbox
        while True:
            message = decoder.next_message()
            if message is NEED_DATA or message is END_OF_STREAM:
                return
            self._messages_received += 1
            if message.type not in _DATA_TYPES:
                message.close()  # before any await: control fds are unused
                if message.type is MessageType.UPGRADE_OFFER:
                    # Each offer queues a reply; a peer that floods offers and
                    # never reads must not grow the send queue without bound,
                    # so wait for room (and stop reading) as send() would.
                    while (
                        self._send_queue_full(_REJECT_SIZE)
                        and self._write_error is None
                    ):
                        await self._send_space.park()
                self._on_control(message)
                continue
            self._inbox_bytes += len(message.payload)
            try:
                try:
                    inbox.send_nowait(message)
                except trio.WouldBlock:
                    await inbox.send(message)
            except BaseException:
                self._inbox_bytes -= len(message.payload)
                message.close()
                raise
            while self._inbox_bytes > self._receive_queue_bytes_limit:
                await self._receive_space.park()

    def _on_control(self, message: Message) -> None:
        """Decline upgrades; ignore stray answers (Chromium's ChannelLinux)."""
        message.close()
        if (
            message.type is MessageType.UPGRADE_OFFER
            and self._write_error is None
            and not self._closed  # closing: the writer may be gone already
        ):
            reply = OutgoingMessage.encode(Message(b"", (), MessageType.UPGRADE_REJECT))
            if self._pending == 0:
                self._write_now(reply)
            else:
                self._pending += 1
                self._pending_bytes += reply.size
                self._encoder.push(reply)

    # ------------------------------------------------------------------
    # Lifecycle

    def _start(self, nursery: trio.Nursery) -> None:
        self._started = True
        nursery.start_soon(
            self._reader, name=f"trio_mojo reader fd={self._sock.fileno()}"
        )
        nursery.start_soon(
            self._writer, name=f"trio_mojo writer fd={self._sock.fileno()}"
        )

    async def _flush(self) -> None:
        """Let the writer drain the queue, then half-close the socket."""
        self._outbox.close()
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
                return
        if self._write_error is None:
            # Already disconnected? The reader reports it if it matters.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    def _abort(self) -> None:
        """Stop both tasks and close the socket and every fd.  Idempotent."""
        self._closed = True
        self._aborted = True
        self._reader_scope.cancel()
        self._writer_scope.cancel()
        self._outbox.close()
        self._drop_outgoing()
        inbox_reader = self._inbox_reader
        while True:
            try:
                inbox_reader.receive_nowait().close()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        inbox_reader.close()
        self._inbox.close()
        self._decoder.close()
        self._send_space.unpark_all()
        self._receive_space.unpark_all()
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
    receive_queue_messages: int = 4096,
    receive_queue_bytes: int = 8 * 1024 * 1024,
    flush_timeout: float | None = 30.0,
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
        max_handles_per_message, max_queued_handles, strict_handles,
            ipcz_parse_threshold: decoder hardening, see
            :class:`MessageDecoder`.
        fail_on_truncated_handles: fail on ``MSG_CTRUNC`` (default) rather
            than carry on without the lost fds as Chromium does.
        send_queue_messages, send_queue_bytes: bound on what ``send`` queues
            before it waits (a single message larger than the byte bound is
            still accepted when the queue is empty).
        receive_queue_messages, receive_queue_bytes: bound on what the
            reader parses ahead of ``receive``; beyond it the reader stops
            reading and the peer's sends wait.
        flush_timeout: seconds a normal exit waits for the queue to drain.

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
            receive_queue_messages=receive_queue_messages,
            receive_queue_bytes=receive_queue_bytes,
            flush_timeout=flush_timeout,
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
