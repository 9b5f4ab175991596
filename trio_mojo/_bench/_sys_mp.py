"""Peer "mp": ``multiprocessing.connection.Connection`` + ``reduction.sendfds``.

What the standard library offers: ``send_bytes``/``recv_bytes`` with
multiprocessing's own 4-byte length prefix, and fds passed with
``multiprocessing.reduction.sendfds``/``recvfds`` (a separate 1-byte
``sendmsg`` per message, after its bytes).  Blocking, no event loop.
Every ratio in the report is taken against this peer.
"""

from __future__ import annotations

import os
import socket
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection

from ._common import (
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


def sender(spec: RunSpec, sock: socket.socket, ctl: ControlReader) -> SenderResult:
    sock.setblocking(True)
    conn = Connection(os.dup(sock.fileno()))
    result = SenderResult()
    meter = Meter()
    payload = payload_of(spec.payload_size)
    ctl.take_ready()
    meter.start()
    result.t0 = monotonic()
    send_bytes = conn.send_bytes
    if spec.pingpong:
        recv_bytes = conn.recv_bytes
        clock = time.monotonic_ns
        rtts = result.rtts_ns
        for _ in range(spec.count):
            t = clock()
            send_bytes(payload)
            reply = recv_bytes()
            rtts.append(clock() - t)
            if len(reply) != len(payload):
                raise RuntimeError("short pong")
    elif spec.fds_per_message:
        nfds = spec.fds_per_message
        null = dev_null()
        dup = os.dup
        sendfds = reduction.sendfds
        close = os.close
        for _ in range(spec.count):
            fds = [dup(null) for _ in range(nfds)]
            send_bytes(payload)
            sendfds(sock, fds)
            for fd in fds:
                close(fd)
    else:
        for _ in range(spec.count):
            send_bytes(payload)
    conn.close()
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
    sock.setblocking(True)
    conn = Connection(os.dup(sock_fd))
    result = ReceiverResult()
    meter = Meter()
    nfds = spec.fds_per_message
    meter.start(track_memory=True)
    result.t_ready = monotonic()
    ctl.ready()
    recv_bytes = conn.recv_bytes
    nbytes = fds_total = 0
    if spec.pingpong:
        send_bytes = conn.send_bytes
        for _ in range(spec.count):
            message = recv_bytes()
            send_bytes(message)
            nbytes += len(message)
    elif nfds:
        recvfds = reduction.recvfds
        close = os.close
        for _ in range(spec.count):
            message = recv_bytes()
            fds = recvfds(sock, nfds)
            for fd in fds:
                close(fd)
            nbytes += len(message)
            fds_total += len(fds)
    else:
        for _ in range(spec.count):
            nbytes += len(recv_bytes())
    result.t_end = monotonic()
    meter.stop(track_memory=True)
    result.messages, result.payload_bytes, result.fds = spec.count, nbytes, fds_total
    try:
        while True:
            recv_bytes()
            result.extra_messages += 1
    except EOFError:
        pass
    result.take_meter(meter)
    conn.close()
    sock.close()
    return result
