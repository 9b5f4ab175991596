"""Peer "mp": ``multiprocessing.connection.Connection`` + ``reduction.sendfds``.

What the standard library offers: ``send_bytes``/``recv_bytes`` with
multiprocessing's own 4-byte length prefix, and fds passed with
``multiprocessing.reduction.sendfds``/``recvfds`` (a separate 1-byte
``sendmsg`` per message, after its bytes).  Blocking, no event loop.
Every ratio in the report is taken against this peer.  W4c10 (ten requests
in flight) uses threads: ten clients sending under a lock and one thread
routing each reply to the client that waits for it.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection

from ._common import (
    REQUEST,
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
    if spec.concurrency > 1:
        _requests_in_flight(conn, spec, result.rtts_ns)
    elif spec.pingpong:
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


def _requests_in_flight(conn: Connection, spec: RunSpec, rtts: list[int]) -> None:
    """W4c10 with threads: clients send under a lock, one thread routes replies."""
    body = payload_of(spec.payload_size)[REQUEST.size :]
    clock = time.monotonic_ns
    counts = [
        spec.count // spec.concurrency + (i < spec.count % spec.concurrency)
        for i in range(spec.concurrency)
    ]
    inboxes: list[queue.SimpleQueue[bytes]] = [queue.SimpleQueue() for _ in counts]
    lock = threading.Lock()
    failures: list[BaseException] = []

    def route() -> None:
        for _ in range(spec.count):
            reply = conn.recv_bytes()
            inboxes[REQUEST.unpack_from(reply)[0]].put(reply)

    def client(index: int, count: int) -> None:
        for sequence in range(count):
            request = REQUEST.pack(index, sequence) + body
            t = clock()
            with lock:
                conn.send_bytes(request)
            if inboxes[index].get() != request:
                failures.append(RuntimeError("a reply that does not match its request"))
                return
            rtts.append(clock() - t)

    threads = [threading.Thread(target=route)]
    threads += [
        threading.Thread(target=client, args=(index, count))
        for index, count in enumerate(counts)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


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
