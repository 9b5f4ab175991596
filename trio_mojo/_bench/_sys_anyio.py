"""Peers "anyio_trio" and "anyio_asyncio": anyio's UNIX socket stream.

The public way to wrap a socket pair in anyio: ``UNIXSocketStream.from_socket``.
The sender ``await stream.send()`` s each framed message (fds with
``send_fds``, one ``sendmsg`` per message); the receiver reads header and
payload with ``BufferedByteReceiveStream.receive_exactly``, or, when fds
travel, ``receive_fds`` chunks of up to 64 KiB that it parses itself with
an fd FIFO (anyio has no buffered fd-aware reader).  Only imported when
anyio is installed.
"""

from __future__ import annotations

import collections
import os
import socket
import time

import anyio  # type: ignore[import-not-found, unused-ignore]
from anyio.abc import UNIXSocketStream  # type: ignore[import-not-found, unused-ignore]
from anyio.streams.buffered import (  # type: ignore[import-not-found, unused-ignore]
    BufferedByteReceiveStream,
)

from ._common import (
    BIG_PAYLOAD,
    FRAME,
    FRAME_TYPE,
    MAX_BATCH_BYTES,
    MAX_BATCH_FDS,
    ControlReader,
    ControlWriter,
    Meter,
    ReceiverResult,
    RunSpec,
    SenderResult,
    dev_null,
    monotonic,
    payload_of,
)

__all__ = ["receiver", "sender"]


def _backend(system: str) -> str:
    return "trio" if system == "anyio_trio" else "asyncio"


def sender(spec: RunSpec, sock: socket.socket, ctl: ControlReader) -> SenderResult:
    result: SenderResult = anyio.run(
        _sender, spec, sock, ctl, backend=_backend(spec.system)
    )
    return result


async def _sender(
    spec: RunSpec, sock: socket.socket, ctl: ControlReader
) -> SenderResult:
    sock.setblocking(False)
    stream = await UNIXSocketStream.from_socket(sock)
    result = SenderResult()
    meter = Meter()
    payload = payload_of(spec.payload_size)
    size = len(payload)
    pack = FRAME.pack
    await anyio.wait_readable(ctl.fd)
    ctl.take_ready()
    meter.start()
    result.t0 = monotonic()
    send = stream.send
    if spec.pingpong:
        buffered = BufferedByteReceiveStream(stream)
        receive_exactly = buffered.receive_exactly
        clock = time.monotonic_ns
        rtts = result.rtts_ns
        frame = pack(size, 0, FRAME_TYPE) + payload
        for _ in range(spec.count):
            t = clock()
            await send(frame)
            length = FRAME.unpack(await receive_exactly(FRAME.size))[0]
            await receive_exactly(length)
            rtts.append(clock() - t)
    elif spec.fds_per_message:
        nfds = spec.fds_per_message
        null = dev_null()
        dup = os.dup
        close = os.close
        send_fds = stream.send_fds
        for _ in range(spec.count):
            fds = [dup(null) for _ in range(nfds)]
            await send_fds(pack(size, nfds, FRAME_TYPE) + payload, fds)
            for fd in fds:
                close(fd)
    elif size > BIG_PAYLOAD:
        for _ in range(spec.count):
            await send(pack(size, 0, FRAME_TYPE))
            await send(payload)
    else:
        for _ in range(spec.count):
            await send(pack(size, 0, FRAME_TYPE) + payload)
    await stream.send_eof()
    meter.stop()
    result.t_done = monotonic()
    result.take_meter(meter)
    await stream.aclose()
    return result


def receiver(
    spec: RunSpec, sock_fd: int, argv: list[str], ctl: ControlWriter
) -> ReceiverResult:
    sock = socket.socket(fileno=sock_fd)
    result: ReceiverResult = anyio.run(
        _receiver, spec, sock, ctl, backend=_backend(spec.system)
    )
    return result


class _FdFrameParser:
    """Parses ``<IHH`` frames out of received chunks, matching fds by count."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fifo: collections.deque[int] = collections.deque()
        self.messages = 0
        self.payload_bytes = 0
        self.fds = 0

    def feed(self, data: bytes, fds: list[int]) -> None:
        self.fifo.extend(fds)
        buf = self.buf
        buf += data
        unpack_from = FRAME.unpack_from
        header = FRAME.size
        popleft = self.fifo.popleft
        close = os.close
        pos = 0
        end = len(buf)
        while end - pos >= header:
            length, count, _type = unpack_from(buf, pos)
            stop = pos + header + length
            if stop > end:
                break
            message = buf[pos + header : stop]
            for _ in range(count):
                close(popleft())
            self.messages += 1
            self.payload_bytes += len(message)
            self.fds += count
            pos = stop
        del buf[:pos]


async def _receiver(
    spec: RunSpec, sock: socket.socket, ctl: ControlWriter
) -> ReceiverResult:
    sock.setblocking(False)
    stream = await UNIXSocketStream.from_socket(sock)
    result = ReceiverResult()
    meter = Meter()
    count = spec.count
    meter.start(track_memory=True)
    result.t_ready = monotonic()
    ctl.ready()
    if spec.fds_per_message:
        parser = _FdFrameParser()
        receive_fds = stream.receive_fds
        while parser.messages < count:
            data, fds = await receive_fds(MAX_BATCH_BYTES, MAX_BATCH_FDS)
            parser.feed(data, fds)
        result.t_end = monotonic()
        meter.stop(track_memory=True)
        result.messages = parser.messages
        result.payload_bytes = parser.payload_bytes
        result.fds = parser.fds
        try:
            while True:
                data, fds = await receive_fds(MAX_BATCH_BYTES, MAX_BATCH_FDS)
                parser.feed(data, fds)
        except anyio.EndOfStream:
            pass
        result.extra_messages = parser.messages - result.messages
        if parser.buf or parser.fifo:
            result.error = f"{len(parser.buf)} bytes, {len(parser.fifo)} fds left over"
            for fd in parser.fifo:
                os.close(fd)
    else:
        buffered = BufferedByteReceiveStream(stream)
        receive_exactly = buffered.receive_exactly
        unpack = FRAME.unpack
        header = FRAME.size
        nbytes = 0
        for _ in range(count):
            length = unpack(await receive_exactly(header))[0]
            message = await receive_exactly(length)
            if spec.pingpong:
                await stream.send(FRAME.pack(length, 0, FRAME_TYPE) + message)
            nbytes += len(message)
        result.t_end = monotonic()
        meter.stop(track_memory=True)
        result.messages, result.payload_bytes = count, nbytes
        try:
            while True:
                length = unpack(await receive_exactly(header))[0]
                await receive_exactly(length)
                result.extra_messages += 1
        except (anyio.EndOfStream, anyio.IncompleteRead):
            pass
    result.take_meter(meter)
    await stream.aclose()
    return result
