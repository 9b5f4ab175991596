"""Peer "raw": blocking Python sockets with a batching writer (the baseline's S1).

The writer packs each message's 8-byte header, joins up to 64 KiB (and at
most 253 fds) into one ``sendmsg``; payloads above 64 KiB go out as header
and payload buffers of their own.  The reader ``recvmsg_into`` s up to
256 KiB (with room for 253 fds) into one buffer and parses every complete
frame out of it; a payload above 64 KiB is received straight into its own
buffer.  This is about the fastest a Python program can do it, and the
ceiling trio_mojo's per-message cost is compared with.

Peer "raw_bytes" is the same reader with every payload copied into a
``bytes`` (W2 and W3 only): the least any receiver pays whose payloads are
``bytes``, as ``trio_mojo.Message.payload`` is (one copy after the
kernel's; a payload is received into a buffer first).
"""

from __future__ import annotations

import array
import collections
import os
import socket
import time
from typing import Final

from ._common import (
    BIG_PAYLOAD,
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
    monotonic,
    payload_of,
    take_rights,
)

__all__ = ["FrameReader", "receiver", "send_all", "sender"]

_CMSG_SPACE: Final = socket.CMSG_SPACE(MAX_BATCH_FDS * array.array("i").itemsize)
_RIGHTS: Final = (socket.SOL_SOCKET, socket.SCM_RIGHTS)


def send_all(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """``sendmsg`` ``data`` with ``fds`` on its first byte, then close the fds."""
    if fds:
        sent = sock.sendmsg([data], [(*_RIGHTS, array.array("i", fds))])
        for fd in fds:
            os.close(fd)  # the kernel holds its own reference now
        fds.clear()
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
    else:
        sock.sendall(data)


class FrameReader:
    """Parses ``<IHH`` frames and their fds off a blocking socket."""

    def __init__(self, sock: socket.socket, *, as_bytes: bool = False) -> None:
        self.sock = sock
        self.as_bytes = as_bytes
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.fifo: collections.deque[int] = collections.deque()
        self.messages = 0
        self.payload_bytes = 0
        self.fds = 0
        self.eof = False

    def _recv_into(self, view: memoryview) -> int:
        nbytes, ancdata, flags, _ = self.sock.recvmsg_into([view], _CMSG_SPACE)
        take_rights(ancdata, flags, self.fifo)
        return nbytes

    def _take_big(self, length: int) -> bytearray:
        """Receive a large payload into its own buffer (its header is parsed)."""
        have = self.end - self.start - FRAME.size
        message = bytearray(length)
        message[:have] = self.buf[self.start + FRAME.size : self.end]
        self.start = self.end = 0
        with memoryview(message) as view:
            while have < length:
                n = self._recv_into(view[have:])
                if n == 0:
                    raise RuntimeError("end of stream inside a message")
                have += n
        return message

    def run(self, limit: int, *, echo: bool = False) -> int:
        """Parse up to ``limit`` messages, receiving as needed; stop at EOF.

        Every message is materialised (a ``bytearray`` copy, or ``bytes``
        with ``as_bytes``), every fd closed.  With ``echo`` each frame is
        sent back as soon as it is parsed.
        """
        buf = self.buf
        view = self.view
        as_bytes = self.as_bytes
        message: bytes | bytearray
        size = len(buf)
        unpack_from = FRAME.unpack_from
        header = FRAME.size
        fifo = self.fifo
        popleft = fifo.popleft
        close = os.close
        sock = self.sock
        start, end = self.start, self.end
        done = nbytes = nfds = 0
        while done < limit:
            while end - start >= header:
                length, count, _type = unpack_from(buf, start)
                stop = start + header + length
                if stop > end:
                    if length > BIG_PAYLOAD:
                        self.start, self.end = start, end
                        message = self._take_big(length)
                        if as_bytes:
                            message = bytes(message)
                        start = end = 0
                    else:
                        break
                else:
                    if as_bytes:
                        message = bytes(view[start + header : stop])
                    else:
                        message = buf[start + header : stop]
                    if echo:
                        sock.sendall(buf[start:stop])
                    start = stop
                for _ in range(count):
                    close(popleft())
                done += 1
                nbytes += len(message)
                nfds += count
                if done >= limit:
                    break
            if done >= limit:
                break
            if start == end:
                start = end = 0
            elif start:
                buf[: end - start] = buf[start:end]
                end -= start
                start = 0
            received = self._recv_into(self.view[end:size])
            if received == 0:
                self.eof = True
                break
            end += received
        self.start, self.end = start, end
        self.messages += done
        self.payload_bytes += nbytes
        self.fds += nfds
        return done


def sender(spec: RunSpec, sock: socket.socket, ctl: ControlReader) -> SenderResult:
    sock.setblocking(True)
    result = SenderResult()
    meter = Meter()
    ctl.take_ready()
    meter.start()
    result.t0 = monotonic()
    if spec.pingpong:
        result.rtts_ns = _ping(sock, spec)
    else:
        _stream(sock, spec)
    sock.shutdown(socket.SHUT_WR)
    meter.stop()
    result.t_done = monotonic()
    result.take_meter(meter)
    sock.close()
    return result


def _stream(sock: socket.socket, spec: RunSpec) -> None:
    payload = payload_of(spec.payload_size)
    size = len(payload)
    nfds = spec.fds_per_message
    pack = FRAME.pack
    if size > BIG_PAYLOAD:
        for _ in range(spec.count):
            sock.sendmsg([pack(size, 0, FRAME_TYPE), payload])  # blocking: all of it
        return
    null = dev_null()
    dup = os.dup
    parts: list[bytes] = []
    fds: list[int] = []
    nbytes = 0
    frame = FRAME.size + size
    for _ in range(spec.count):
        if nfds:
            if len(fds) + nfds > MAX_BATCH_FDS:
                send_all(sock, b"".join(parts), fds)
                parts.clear()
                nbytes = 0
            fds.extend([dup(null) for _ in range(nfds)])
        parts.append(pack(size, nfds, FRAME_TYPE))
        parts.append(payload)
        nbytes += frame
        if nbytes >= MAX_BATCH_BYTES:
            send_all(sock, b"".join(parts), fds)
            parts.clear()
            nbytes = 0
    if parts:
        send_all(sock, b"".join(parts), fds)


def _ping(sock: socket.socket, spec: RunSpec) -> list[int]:
    payload = payload_of(spec.payload_size)
    frame = FRAME.pack(len(payload), 0, FRAME_TYPE) + payload
    reader = FrameReader(sock)
    clock = time.monotonic_ns
    rtts = []
    for _ in range(spec.count):
        t = clock()
        sock.sendall(frame)
        if reader.run(1) != 1:
            raise RuntimeError("the ponger closed the connection")
        rtts.append(clock() - t)
    return rtts


def receiver(
    spec: RunSpec, sock_fd: int, argv: list[str], ctl: ControlWriter
) -> ReceiverResult:
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    reader = FrameReader(sock, as_bytes=spec.system == "raw_bytes")
    result = ReceiverResult()
    meter = Meter()
    meter.start(track_memory=True)
    result.t_ready = monotonic()
    ctl.ready()
    reader.run(spec.count, echo=spec.pingpong)
    result.t_end = monotonic()
    meter.stop(track_memory=True)
    result.messages = reader.messages
    result.payload_bytes = reader.payload_bytes
    result.fds = reader.fds
    while not reader.eof:
        result.extra_messages += reader.run(1 << 30)
    result.take_meter(meter)
    leftover = len(reader.fifo)
    for fd in reader.fifo:
        os.close(fd)
    if leftover or reader.end != reader.start:
        result.error = (
            f"{leftover} unclaimed fds, {reader.end - reader.start} bytes left"
        )
    sock.close()
    return result
