"""Peer "trio_floor": what one Trio task costs per message, nothing else.

The floor of W4 for anything built on Trio: one task per process doing the
least Trio allows on a plain non-blocking socket: ``send`` inline, then
``await trio.lowlevel.wait_readable`` and ``recv`` (the reply is never
there before it is awaited, so reading first would only fail); the 8-byte
header is packed and checked, nothing more (no framing state, no message
objects).

Peer "trio_floor_api" (W4 only) is the floor of W4 for trio_mojo's API: the
same single task, but each message goes through an awaited ``send()`` of a
``Message`` (a coroutine call, ``checkpoint_if_cancelled``, the frame
written at once) and an awaited ``receive()`` that returns a ``Message``
(built without checks, as trio_mojo's decoder builds it), on each side.

The floor of the one-way workloads (W1, W2, W3, W5, W5x8) for trio_mojo's
API: the same single task, but each message goes through what an awaited,
cancellable ``send(Message(...))`` and ``receive()`` cost at the least, under
the rules trio_mojo keeps:

* a :class:`trio_mojo.Message` built on each side (the receiver's without
  checks, as trio_mojo's decoder builds it), and each fd in a
  :class:`trio_mojo.Handle` on each side: the sender's closed once
  ``sendmsg`` took it, the receiver's closed by the benchmark;
* a coroutine call per ``send`` and per ``receive``, each with
  ``trio.lowlevel.checkpoint_if_cancelled``;
* frames up to 1 KiB of payload copied into one buffer, larger payloads
  sent from the caller's ``bytes`` (no copy), as many as fit in 64 KiB (and
  128 fds, Mojo's limit per ``sendmsg``, which trio_mojo keeps) per
  ``sendmsg``; ``wait_writable`` only on ``EAGAIN``;
* ``recvmsg`` 64 KiB at a time with ``MSG_CMSG_CLOEXEC`` (``wait_readable``
  only when the socket is empty), every complete frame of a read sliced out
  as a ``bytes`` payload;
* a payload that spans reads is never allocated at its announced size (the
  hardening rule): the rest is read in pieces of at most 256 KiB and joined
  once into ``bytes``.

No bounds, no counters, no second task, no validation of the peer.
"""

from __future__ import annotations

import array
import collections
import os
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import trio

from trio_mojo import Handle, Message
from trio_mojo._core._message import received_message
from trio_mojo._core._wire import MAX_SENDMSG_HANDLES, MessageType
from trio_mojo._handles import adopt_all

from ._clock import trio_clock
from ._common import (
    FRAME,
    FRAME_TYPE,
    MAX_BATCH_BYTES,
    MAX_BATCH_FDS,
    READ_SIZE,
    ControlReader,
    ControlWriter,
    Meter,
    ReceiverResult,
    RunSpec,
    SenderResult,
    dev_null,
    measured_receive,
    monotonic,
    payload_of,
    receive_all,
    take_rights,
)

__all__ = ["receiver", "sender"]

INLINE: Final = 1024
"""Payloads up to this size are copied next to their header (trio_mojo's
``INLINE_PAYLOAD``); larger ones go out from the caller's ``bytes``."""
_RECV_SIZE: Final = 64 * 1024
_CMSG_SPACE: Final = socket.CMSG_SPACE(MAX_BATCH_FDS * array.array("i").itemsize)
_RIGHTS: Final = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
_NORMAL: Final = MessageType.NORMAL


async def _receive_frame(sock: socket.socket) -> bytes:
    """One whole frame (the ping-pong never has more than one in flight).

    It waits for the socket before each read, as trio_mojo's ``receive()``
    does when its last read emptied the socket: in a ping-pong the reply is
    never there before it is awaited, and a read first would fail (an
    exception) every time.
    """
    data = b""
    while len(data) < FRAME.size or len(data) < FRAME.size + FRAME.unpack_from(data)[0]:
        await trio.lowlevel.wait_readable(sock)
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            continue
        if not chunk:
            raise EOFError
        data += chunk
    return data


def sender(spec: RunSpec, sock: socket.socket, ctl: ControlReader) -> SenderResult:
    sock.setblocking(False)
    return trio.run(_sender, spec, sock, ctl, clock=trio_clock(spec))


async def _sender(
    spec: RunSpec, sock: socket.socket, ctl: ControlReader
) -> SenderResult:
    result = SenderResult()
    meter = Meter()
    payload = payload_of(spec.payload_size)
    frame = FRAME.pack(len(payload), 0, FRAME_TYPE) + payload
    await trio.lowlevel.wait_readable(ctl.fd)
    ctl.take_ready()
    meter.start()
    result.t0 = monotonic()
    if spec.pingpong and spec.system == "trio_floor_api":
        clock = time.monotonic_ns
        rtts = result.rtts_ns
        for _ in range(spec.count):
            t = clock()
            await _send_now(sock, Message(payload))
            if (await _receive_message(sock)).payload != payload:
                raise RuntimeError("the reply differs from the request")
            rtts.append(clock() - t)
    elif spec.pingpong:
        clock = time.monotonic_ns
        rtts = result.rtts_ns
        for _ in range(spec.count):
            t = clock()
            sock.send(frame)  # 72 bytes always fit: the peer drained the last one
            if await _receive_frame(sock) != frame:
                raise RuntimeError("the reply differs from the request")
            rtts.append(clock() - t)
    else:
        floor = _Sender(sock)
        await stream(floor.send, spec.count, payload, spec.fds_per_message)
        await floor.flush()
    sock.shutdown(socket.SHUT_WR)
    meter.stop()
    result.t_done = monotonic()
    result.take_meter(meter)
    sock.close()
    return result


async def _receive_message(sock: socket.socket) -> Message:
    """``await receive()`` of the one message in flight (W4), at the least cost.

    Its checkpoint is the wait for the message (trio_mojo's ``receive()``
    also checks for cancellation only when it does not wait); in a
    ping-pong the message is never there before it is awaited.
    """
    frame = await _receive_frame(sock)
    return received_message(frame[FRAME.size :], (), _NORMAL)


async def _send_now(sock: socket.socket, message: Message) -> None:
    """``await send(message)`` that writes at once, at the least cost (W4)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    payload = message.payload
    frame = FRAME.pack(len(payload), 0, FRAME_TYPE) + payload
    try:
        sent = sock.send(frame)
    except BlockingIOError:
        sent = 0
    if sent < len(frame):
        await write_all(sock, [frame[sent:]], [])


async def write_all(
    sock: socket.socket, parts: list[bytes | bytearray], handles: list[Handle]
) -> None:
    """``sendmsg`` every byte of ``parts``, the fds of ``handles`` on the first.

    Closes the handles once the kernel took them, and empties both lists.
    """
    ancillary = []
    if handles:
        fds = array.array("i", [handle.fileno() for handle in handles])
        ancillary.append((*_RIGHTS, fds))
    views: list[bytes | bytearray | memoryview] = list(parts)
    parts.clear()
    while True:
        try:
            sent = sock.sendmsg(views, ancillary)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if ancillary:
            ancillary = []
            for handle in handles:
                handle.close()
            handles.clear()
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if not views:
            return
        if sent:
            views[0] = memoryview(views[0])[sent:]


class _Sender:
    """``await send(message)`` of one message at a time, at the least cost."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._parts: list[bytes | bytearray] = []  # what the next sendmsg carries
        self._buffer = bytearray()  # ... of which the frames of small payloads
        self._queued = 0  # bytes in parts and buffer
        self._handles: list[Handle] = []  # ... and the fds it carries

    async def send(self, message: Message) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        payload = message.payload
        handles = message.handles
        if handles:
            if len(self._handles) + len(handles) > MAX_SENDMSG_HANDLES:
                await self.flush()
            self._handles.extend(handles)
        header = FRAME.pack(len(payload), len(handles), FRAME_TYPE)
        if len(payload) <= INLINE:
            buffer = self._buffer
            buffer += header
            buffer += payload
        else:
            self._parts.append(header)
            self._parts.append(payload)
        self._queued += len(header) + len(payload)
        if self._queued >= MAX_BATCH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            self._parts.append(self._buffer)
            self._buffer = bytearray()
        self._queued = 0
        await write_all(self._sock, self._parts, self._handles)


async def stream(
    send: Callable[[Message], Awaitable[None]], count: int, payload: bytes, nfds: int
) -> None:
    """``count`` times ``await send(Message(payload, handles))``, at the least cost."""
    if nfds:
        null = dev_null()
        dup = os.dup
        for _ in range(count):
            await send(Message(payload, [Handle(dup(null)) for _ in range(nfds)]))
    else:
        for _ in range(count):
            await send(Message(payload))


class Messages:
    """``await receive()`` of one message at a time, at the least cost."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._rest = b""  # the start of a frame whose header is incomplete
        # A frame whose header is in but whose payload spans reads:
        self._pieces: list[bytes] = []  # ... its payload's bytes so far,
        self._lacking = 0  # ... how many it still lacks,
        self._lacking_fds = 0  # ... and its number of fds.
        self._fds: collections.deque[int] = collections.deque()
        self._ready: list[Message] = []
        self._next = 0
        self.received = 0  # bytes read so far
        self.fds_received = 0
        self.waits = 0  # how often a read found the socket empty

    async def receive(self) -> Message:
        ready = self._ready
        if self._next < len(ready):
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            ready = self._ready = await self.read()
            self._next = 0
        message = ready[self._next]
        self._next += 1
        return message

    def _message(self, payload: bytes, nfds: int) -> Message:
        if nfds:
            fds = self._fds
            taken = tuple(adopt_all([fds.popleft() for _ in range(nfds)]))
            return received_message(payload, taken, _NORMAL)
        return received_message(payload, (), _NORMAL)

    async def _recv(self, size: int) -> bytes:
        while True:
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    size, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                self.waits += 1
                await trio.lowlevel.wait_readable(self._sock)
                continue
            self.fds_received += take_rights(ancdata, flags, self._fds)
            if not data:
                raise EOFError
            self.received += len(data)
            return data

    async def read(self) -> list[Message]:
        """The messages of the next read that completes any (at least one)."""
        unpack_from = FRAME.unpack_from
        header = FRAME.size
        while True:
            lacking = self._lacking
            chunk = await self._recv(min(READ_SIZE, max(lacking, _RECV_SIZE)))
            messages = []
            if lacking:
                if len(chunk) < lacking:
                    self._pieces.append(chunk)
                    self._lacking -= len(chunk)
                    continue
                self._pieces.append(chunk[:lacking])
                payload = b"".join(self._pieces)
                self._pieces = []
                self._lacking = 0
                messages.append(self._message(payload, self._lacking_fds))
                data = chunk
                pos = lacking
            else:
                data = self._rest + chunk if self._rest else chunk
                pos = 0
            end = len(data)
            while end - pos >= header:
                length, nfds, _ = unpack_from(data, pos)
                start = pos + header
                stop = start + length
                if stop > end:
                    # It spans reads: keep what came, read the rest later
                    # (never a buffer of the size it announces).
                    self._pieces = [data[start:]]
                    self._lacking = stop - end
                    self._lacking_fds = nfds
                    pos = end
                    break
                messages.append(self._message(data[start:stop], nfds))
                pos = stop
            self._rest = data[pos:]
            if messages:
                return messages


def receiver(
    spec: RunSpec, sock_fd: int, argv: list[str], ctl: ControlWriter
) -> ReceiverResult:
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(False)
    return trio.run(_receiver, spec, sock, ctl, clock=trio_clock(spec))


async def _receiver(
    spec: RunSpec, sock: socket.socket, ctl: ControlWriter
) -> ReceiverResult:
    read_extra: Callable[[], Awaitable[object]]
    if spec.pingpong and spec.system == "trio_floor_api":

        async def read_all() -> tuple[int, int]:
            nbytes = 0
            for _ in range(spec.count):
                request = await _receive_message(sock)
                await _send_now(sock, Message(request.payload))
                nbytes += len(request.payload)
            return nbytes, 0

        read_extra = partial(_receive_message, sock)
    elif spec.pingpong:

        async def read_all() -> tuple[int, int]:
            nbytes = 0
            for _ in range(spec.count):
                frame = await _receive_frame(sock)
                sock.send(frame)
                nbytes += len(frame) - FRAME.size
            return nbytes, 0

        read_extra = partial(_receive_frame, sock)
    else:
        messages = Messages(sock)
        read_all = partial(receive_all, messages.receive, spec.count)
        read_extra = messages.receive
    result = await measured_receive(spec, ctl, read_all, read_extra)
    sock.close()
    return result
