"""Peer "trio_tasks": the channel's task shape at its least, two tasks a side.

``trio_floor`` runs one Trio task per process.  A trio_mojo channel runs the
shape its users asked for: a writer task drains a queue that ``send()``
fills, and a reader task fills a queue that ``receive()`` drains.  This
peer is that shape and nothing more, on a plain socket, so that the cost of
the shape itself (a task parked by one side and woken by the other: a
Trio scheduler pass each time) is measured apart from what trio_mojo adds
to it.  One-way workloads only (W1, W2, W3, W5, W5x8); a ping-pong is
``trio_floor``'s (trio_mojo lends its read side to the receiver there).

* Sender: ``send()`` pays what ``trio_floor``'s does (a coroutine call,
  ``checkpoint_if_cancelled``, the caller's ``Message``, frames up to 1 KiB
  copied into one buffer and larger payloads sent from the caller's
  ``bytes``), but it only queues: in batches of up to 64 KiB and 128 fds.
  A writer task takes the batches and writes each with one ``sendmsg``,
  awaiting ``wait_writable`` on ``EAGAIN``; ``send`` parks while 4,096
  messages, 8 MiB or 1,024 fds are queued (trio_mojo's default bounds) and
  yields every 64 calls, as trio_mojo's does.
* Receiver: a reader task reads as ``trio_floor`` does (``recvmsg`` of
  64 KiB with ``MSG_CMSG_CLOEXEC``, ``wait_readable`` only when the socket
  is empty, a payload never allocated at its announced size), puts the
  messages in a deque and wakes the receiver; it yields after 256 KiB per
  wake-up (Mojo's fairness cap, which trio_mojo keeps) and parks while
  4,096 messages or 506 fds are queued (trio_mojo's default bounds).  ``receive()`` pops the deque
  (``checkpoint_if_cancelled``, a yield every 64 calls) and parks while it
  is empty.

No inline write, no read lending, no bounds in bytes or fds on the receive
side, no validation, no counters.
"""

from __future__ import annotations

import collections
import socket
from functools import partial

import trio

from trio_mojo import Handle, Message

from ._clock import trio_clock
from ._common import (
    FRAME,
    FRAME_TYPE,
    MAX_BATCH_BYTES,
    READ_SIZE,
    ControlReader,
    ControlWriter,
    Meter,
    ReceiverResult,
    RunSpec,
    SenderResult,
    measured_receive,
    monotonic,
    payload_of,
    receive_all,
)
from ._sys_trio_floor import INLINE, Messages, stream, write_all

__all__ = ["receiver", "sender"]

_QUEUE_BYTES = 8 * 1024 * 1024
"""``send`` parks while this much is queued (trio_mojo's ``send_queue_bytes``) ..."""
_QUEUE_FDS = 1024
"""... or this many fds (``send_queue_handles``), or ..."""
_QUEUE_MESSAGES = 4096
"""... this many messages (``send_queue_messages``); the reader parks while
this many wait (``receive_queue_messages``), or ..."""
_RECEIVE_FDS = 506
"""... while it holds this many fds (``receive_queue_handles``)."""
_YIELD_EVERY = 64
"""``send`` and ``receive`` yield once per this many calls, as trio_mojo's do."""
_MAX_FDS = 128
"""At most this many fds per ``sendmsg`` (Mojo's limit)."""


class _Batch:
    """What one ``sendmsg`` of the writer carries."""

    __slots__ = ("buffer", "count", "handles", "parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes | bytearray] = []
        self.buffer = bytearray()  # the frames of small payloads, in order
        self.handles: list[Handle] = []
        self.size = 0
        self.count = 0


class _QueuedSender:
    """``send()`` into a queue of batches; a writer task writes them."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._batches: collections.deque[_Batch] = collections.deque()
        self._queued = 0  # bytes queued and not yet written
        self._queued_messages = 0
        self._queued_fds = 0
        self._space = trio.lowlevel.ParkingLot()  # senders waiting for room
        self._work = trio.lowlevel.ParkingLot()  # the writer waiting for batches
        self._credit = _YIELD_EVERY
        self._done = False

    async def send(self, message: Message) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while (
            self._queued >= _QUEUE_BYTES
            or self._queued_messages >= _QUEUE_MESSAGES
            or self._queued_fds >= _QUEUE_FDS
        ):
            await self._space.park()
        payload = message.payload
        handles = message.handles
        batches = self._batches
        batch = batches[-1] if batches else None
        size = FRAME.size + len(payload)
        if (
            batch is None
            or batch.size + size > MAX_BATCH_BYTES
            or len(batch.handles) + len(handles) > _MAX_FDS
        ):
            batch = _Batch()
            batches.append(batch)
            if self._work:
                self._work.unpark()
        header = FRAME.pack(len(payload), len(handles), FRAME_TYPE)
        if len(payload) <= INLINE:
            if not batch.buffer:
                batch.parts.append(batch.buffer)
            batch.buffer += header
            batch.buffer += payload
        else:
            batch.parts += (header, payload)
            batch.buffer = bytearray()
        batch.handles += handles
        batch.size += size
        batch.count += 1
        self._queued += size
        self._queued_messages += 1
        self._queued_fds += len(handles)
        self._credit -= 1
        if not self._credit:
            self._credit = _YIELD_EVERY
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def write(self) -> None:
        """The writer task: write every batch, until :meth:`close` and empty."""
        batches = self._batches
        while True:
            if not batches:
                if self._done:
                    return
                await self._work.park()
                continue
            batch = batches.popleft()
            # (A batch taken here gets no more frames: send() adds to the
            # last one in the deque only.)
            fds = len(batch.handles)
            await write_all(self._sock, batch.parts, batch.handles)
            self._queued -= batch.size
            self._queued_messages -= batch.count
            self._queued_fds -= fds
            if self._space:
                self._space.unpark_all()

    def close(self) -> None:
        self._done = True
        self._work.unpark_all()


async def _stream_queued(
    sock: socket.socket, count: int, payload: bytes, nfds: int
) -> None:
    sender = _QueuedSender(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.write)
        await stream(sender.send, count, payload, nfds)
        sender.close()


def sender(spec: RunSpec, sock: socket.socket, ctl: ControlReader) -> SenderResult:
    sock.setblocking(False)
    return trio.run(_sender, spec, sock, ctl, clock=trio_clock(spec))


async def _sender(
    spec: RunSpec, sock: socket.socket, ctl: ControlReader
) -> SenderResult:
    result = SenderResult()
    meter = Meter()
    payload = payload_of(spec.payload_size)
    await trio.lowlevel.wait_readable(ctl.fd)
    ctl.take_ready()
    meter.start()
    result.t0 = monotonic()
    await _stream_queued(sock, spec.count, payload, spec.fds_per_message)
    sock.shutdown(socket.SHUT_WR)
    meter.stop()
    result.t_done = monotonic()
    result.take_meter(meter)
    sock.close()
    return result


class _ReaderTask:
    """A reader task fills a deque; ``receive()`` drains it."""

    def __init__(self, sock: socket.socket) -> None:
        self._messages = Messages(sock)
        self._inbox: collections.deque[Message] = collections.deque()
        self._arrived = trio.lowlevel.ParkingLot()  # receivers waiting
        self._room = trio.lowlevel.ParkingLot()  # the reader waiting for room
        self._credit = _YIELD_EVERY
        self._end: BaseException | None = None
        # (Counted here: ParkingLot.__bool__ is a Python call.)
        self._receivers_waiting = 0
        self._reader_waiting = False
        self._fds_taken = 0  # fds of the messages receive() returned

    async def read(self) -> None:
        """The reader task: read until the end of the stream."""
        inbox = self._inbox
        total = 0  # bytes read since the last yield (the fairness cap)
        try:
            while True:
                while (
                    len(inbox) >= _QUEUE_MESSAGES
                    or self._messages.fds_received - self._fds_taken >= _RECEIVE_FDS
                ):
                    self._reader_waiting = True
                    try:
                        await self._room.park()
                    finally:
                        self._reader_waiting = False
                if total >= READ_SIZE:
                    total = 0
                    await trio.lowlevel.checkpoint()
                messages = self._messages
                waits, before = messages.waits, messages.received
                batch = await messages.read()
                if messages.waits != waits:
                    total = 0  # it waited: a new wake-up
                total += messages.received - before
                inbox.extend(batch)
                if self._receivers_waiting:
                    self._arrived.unpark(count=len(batch))
        except EOFError as exc:
            self._end = exc
            self._arrived.unpark_all()

    async def receive(self) -> Message:
        inbox = self._inbox
        if inbox:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            while not inbox:
                if self._end is not None:
                    raise EOFError
                self._receivers_waiting += 1
                try:
                    await self._arrived.park()
                finally:
                    self._receivers_waiting -= 1
        message = inbox.popleft()
        if message.handles:
            self._fds_taken += len(message.handles)
        if self._reader_waiting:
            self._room.unpark()
        self._credit -= 1
        if not self._credit:
            self._credit = _YIELD_EVERY
            await trio.lowlevel.cancel_shielded_checkpoint()
        return message


def receiver(
    spec: RunSpec, sock_fd: int, argv: list[str], ctl: ControlWriter
) -> ReceiverResult:
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(False)
    return trio.run(_receiver, spec, sock, ctl, clock=trio_clock(spec))


async def _receiver(
    spec: RunSpec, sock: socket.socket, ctl: ControlWriter
) -> ReceiverResult:
    reader = _ReaderTask(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.read)
        result = await measured_receive(
            spec, ctl, partial(receive_all, reader.receive, spec.count), reader.receive
        )
        nursery.cancel_scope.cancel()
    sock.close()
    return result
