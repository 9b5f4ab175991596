"""Peer "trio_floor": what one Trio task costs per round trip, nothing else.

The floor of W4 for anything built on Trio: one task per process doing the
least Trio allows on a plain non-blocking socket: ``send`` inline, then
``recv``, and ``await trio.lowlevel.wait_readable`` only when that would
block; the 8-byte header is packed and checked, nothing more (no framing
state, no message objects).  It runs only the ping-pong (W4).
"""

from __future__ import annotations

import socket
import time

import trio

from ._common import (
    FRAME,
    FRAME_TYPE,
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
    return trio.run(_sender, spec, sock, ctl)


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
    clock = time.monotonic_ns
    rtts = result.rtts_ns
    for _ in range(spec.count):
        t = clock()
        sock.send(frame)  # 72 bytes always fit: the peer drained the last one
        if await _receive_frame(sock) != frame:
            raise RuntimeError("the reply differs from the request")
        rtts.append(clock() - t)
    sock.shutdown(socket.SHUT_WR)
    meter.stop()
    result.t_done = monotonic()
    result.take_meter(meter)
    sock.close()
    return result


def receiver(
    spec: RunSpec, sock_fd: int, argv: list[str], ctl: ControlWriter
) -> ReceiverResult:
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(False)
    return trio.run(_receiver, spec, sock, ctl)


async def _receiver(
    spec: RunSpec, sock: socket.socket, ctl: ControlWriter
) -> ReceiverResult:
    result = ReceiverResult()
    meter = Meter()
    meter.start(track_memory=True)
    result.t_ready = monotonic()
    ctl.ready()
    nbytes = 0
    for _ in range(spec.count):
        frame = await _receive_frame(sock)
        sock.send(frame)
        nbytes += len(frame) - FRAME.size
    result.t_end = monotonic()
    meter.stop(track_memory=True)
    result.messages, result.payload_bytes = spec.count, nbytes
    try:
        await _receive_frame(sock)
        result.extra_messages += 1
    except EOFError:
        pass
    result.take_meter(meter)
    sock.close()
    return result
