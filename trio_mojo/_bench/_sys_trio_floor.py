"""Peer "trio_floor": what one Trio task costs per message, nothing else.

The floor of W4 for anything built on Trio: one task per process doing the
least Trio allows on a plain non-blocking socket: ``send`` inline, then
``recv``, and ``await trio.lowlevel.wait_readable`` only when that would
block; the 8-byte header is packed and checked, nothing more (no framing
state, no message objects).

The floor of W1 for trio_mojo's API: the same single task, but each
message goes through what an awaited, cancellable ``send(Message(...))``
and ``receive()`` cost at the least: a :class:`trio_mojo.Message` built on
each side, ``trio.lowlevel.checkpoint_if_cancelled`` per call, frames packed
into one buffer written 64 KiB at a time, and read 64 KiB at a time
(``wait_readable`` / ``wait_writable`` only when the socket would block).
No bounds, no counters, no fds.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from trio_mojo import Message

from ._clock import trio_clock
from ._common import (
    FRAME,
    FRAME_TYPE,
    MAX_BATCH_BYTES,
    ControlReader,
    ControlWriter,
    Meter,
    ReceiverResult,
    RunSpec,
    SenderResult,
    monotonic,
    payload_of,
)

__all__ = ["receiver", "sender"]


async def _receive_frame(sock: socket.socket) -> bytes:
    """One whole frame (the ping-pong never has more than one in flight)."""
    data = b""
    while len(data) < FRAME.size or len(data) < FRAME.size + FRAME.unpack_from(data)[0]:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
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
    if spec.pingpong:
        clock = time.monotonic_ns
        rtts = result.rtts_ns
        for _ in range(spec.count):
            t = clock()
            sock.send(frame)  # 72 bytes always fit: the peer drained the last one
            if await _receive_frame(sock) != frame:
                raise RuntimeError("the reply differs from the request")
            rtts.append(clock() - t)
    else:
        await _stream(sock, spec.count, payload)
    sock.shutdown(socket.SHUT_WR)
    meter.stop()
    result.t_done = monotonic()
    result.take_meter(meter)
    sock.close()
    return result


async def _write_all(sock: socket.socket, data: bytearray) -> None:
    with memoryview(data) as view:
        sent = 0
        while sent < len(data):
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)


async def _stream(sock: socket.socket, count: int, payload: bytes) -> None:
    """``count`` times ``await send(Message(payload))``, at the least cost."""
    checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
    header = FRAME.pack(len(payload), 0, FRAME_TYPE)
    buffer = bytearray()
    for _ in range(count):
        message = Message(payload)
        await checkpoint_if_cancelled()  # what a cancellable send() checks
        buffer += header
        buffer += message.payload
        if len(buffer) >= MAX_BATCH_BYTES:
            await _write_all(sock, buffer)
            buffer = bytearray()
    await _write_all(sock, buffer)


class _Messages:
    """``await receive()`` of one message at a time, at the least cost."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._rest = b""
        self._ready: list[Message] = []
        self._next = 0

    async def receive(self) -> Message:
        ready = self._ready
        if self._next < len(ready):
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            ready = self._ready = await self._read()
            self._next = 0
        message = ready[self._next]
        self._next += 1
        return message

    async def _read(self) -> list[Message]:
        unpack_from = FRAME.unpack_from
        header = FRAME.size
        while True:
            try:
                chunk = self._sock.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            if not chunk:
                raise EOFError
            data = self._rest + chunk if self._rest else chunk
            messages = []
            pos = 0
            while len(data) - pos >= header:
                length = unpack_from(data, pos)[0]
                stop = pos + header + length
                if stop > len(data):
                    break
                messages.append(Message(data[pos + header : stop]))
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
    result = ReceiverResult()
    meter = Meter()
    meter.start(track_memory=True)
    result.t_ready = monotonic()
    ctl.ready()
    nbytes = 0
    if spec.pingpong:
        for _ in range(spec.count):
            frame = await _receive_frame(sock)
            sock.send(frame)
            nbytes += len(frame) - FRAME.size
        read_extra: Callable[[], Awaitable[object]] = partial(_receive_frame, sock)
    else:
        messages = _Messages(sock)
        for _ in range(spec.count):
            nbytes += len((await messages.receive()).payload)
        read_extra = messages.receive
    result.t_end = monotonic()
    meter.stop(track_memory=True)
    result.messages, result.payload_bytes = spec.count, nbytes
    try:
        await read_extra()
        result.extra_messages += 1
    except EOFError:
        pass
    result.take_meter(meter)
    sock.close()
    return result
