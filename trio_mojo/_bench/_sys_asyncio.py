"""Peers "asyncio" and "uvloop": asyncio streams on the default loop or on uvloop.

``asyncio.open_unix_connection(sock=...)``; the sender ``writer.write()`` s
each framed message and ``await writer.drain()`` s, the receiver
``await reader.readexactly()`` s the 8-byte header, then the payload.
asyncio streams have no fd API, so these peers sit out W5 and W5x8.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._common import (
    BIG_PAYLOAD,
    FRAME,
    FRAME_TYPE,
    REQUEST,
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

_T = TypeVar("_T")


def _run(system: str, main: Coroutine[Any, Any, _T]) -> _T:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if system == "uvloop":
        uvloop = importlib.import_module("uvloop")
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def _wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def sender(spec: RunSpec, sock: socket.socket, ctl: ControlReader) -> SenderResult:
    return _run(spec.system, _sender(spec, sock, ctl))


async def _sender(
    spec: RunSpec, sock: socket.socket, ctl: ControlReader
) -> SenderResult:
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    result = SenderResult()
    meter = Meter()
    payload = payload_of(spec.payload_size)
    size = len(payload)
    pack = FRAME.pack
    await _wait_readable(ctl.fd)
    ctl.take_ready()
    meter.start()
    result.t0 = monotonic()
    write = writer.write
    drain = writer.drain
    if spec.concurrency > 1:
        await _requests_in_flight(reader, writer, spec, result.rtts_ns)
    elif spec.pingpong:
        readexactly = reader.readexactly
        clock = time.monotonic_ns
        rtts = result.rtts_ns
        frame = pack(size, 0, FRAME_TYPE) + payload
        for _ in range(spec.count):
            t = clock()
            write(frame)
            await drain()
            length = FRAME.unpack(await readexactly(FRAME.size))[0]
            await readexactly(length)
            rtts.append(clock() - t)
    elif size > BIG_PAYLOAD:
        for _ in range(spec.count):
            write(pack(size, 0, FRAME_TYPE))
            write(payload)
            await drain()
    else:
        for _ in range(spec.count):
            write(pack(size, 0, FRAME_TYPE) + payload)
            await drain()
    writer.write_eof()
    await drain()
    meter.stop()
    result.t_done = monotonic()
    result.take_meter(meter)
    writer.close()
    await writer.wait_closed()
    return result


async def _requests_in_flight(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    spec: RunSpec,
    rtts: list[int],
) -> None:
    """W4c10: client tasks, and one task routing each reply by its tag."""
    body = payload_of(spec.payload_size)[REQUEST.size :]
    clock = time.monotonic_ns
    counts = [
        spec.count // spec.concurrency + (i < spec.count % spec.concurrency)
        for i in range(spec.concurrency)
    ]
    inboxes: list[asyncio.Queue[bytes]] = [asyncio.Queue(1) for _ in counts]

    async def route() -> None:
        for _ in range(spec.count):
            length = FRAME.unpack(await reader.readexactly(FRAME.size))[0]
            reply = await reader.readexactly(length)
            inboxes[REQUEST.unpack_from(reply)[0]].put_nowait(reply)

    async def client(index: int, count: int) -> None:
        for sequence in range(count):
            request = REQUEST.pack(index, sequence) + body
            t = clock()
            writer.write(FRAME.pack(len(request), 0, FRAME_TYPE) + request)
            await writer.drain()
            if await inboxes[index].get() != request:
                raise RuntimeError("a reply that does not match its request")
            rtts.append(clock() - t)

    async with asyncio.TaskGroup() as group:
        group.create_task(route())
        for index, count in enumerate(counts):
            group.create_task(client(index, count))


def receiver(
    spec: RunSpec, sock_fd: int, argv: list[str], ctl: ControlWriter
) -> ReceiverResult:
    sock = socket.socket(fileno=sock_fd)
    return _run(spec.system, _receiver(spec, sock, ctl))


async def _receiver(
    spec: RunSpec, sock: socket.socket, ctl: ControlWriter
) -> ReceiverResult:
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    result = ReceiverResult()
    meter = Meter()
    unpack = FRAME.unpack
    header = FRAME.size
    readexactly = reader.readexactly
    meter.start(track_memory=True)
    result.t_ready = monotonic()
    ctl.ready()
    nbytes = 0
    for _ in range(spec.count):
        length = unpack(await readexactly(header))[0]
        message = await readexactly(length)
        if spec.pingpong:
            writer.write(FRAME.pack(length, 0, FRAME_TYPE) + message)
            await writer.drain()
        nbytes += len(message)
    result.t_end = monotonic()
    meter.stop(track_memory=True)
    result.messages, result.payload_bytes = spec.count, nbytes
    while True:
        try:
            length = unpack(await readexactly(header))[0]
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                result.error = f"{len(exc.partial)} stray bytes at the end"
            break
        await readexactly(length)
        result.extra_messages += 1
    result.take_meter(meter)
    writer.close()
    await writer.wait_closed()
    return result
