"""trio_mojo itself, through its public API only.

The sender ``await channel.send(Message(...))`` s one message at a time, the
receiver ``await channel.receive()`` s one at a time: the plain way an
application uses a channel.  The receiver's end is passed to it by fd on
its command line (``--mojo-platform-channel-handle=N``) and recovered with
``trio_mojo.recover_endpoint`` (``Endpoint.from_fd`` where that does not
exist yet).

W4c10 runs ten clients on one channel, with one task routing each reply to
the client that waits for it; W4w ping-pongs with an ``open_worker`` echo
worker under ``SandboxPolicy.strict()`` (the sender process is the parent;
there is no separate receiver).

Two special runs for the memory checks live here too:
``mode="slow"`` (a consumer throttled to ``consumer_rate`` messages/s) and
``mode="trickle"`` (a raw writer announces a ``max_message_size`` message
and then trickles its bytes; the receiver samples its buffer and RSS).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import trio

import trio_mojo

from ._clock import trio_clock
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
    read_status_kib,
    receive_all,
)

__all__ = ["client_counts", "receiver", "sender", "worker_pingpong"]

_ECHO_TARGET = "trio_mojo._examples:echo"


def _recover(argv: list[str], sock_fd: int) -> trio_mojo.Endpoint:
    recover = getattr(trio_mojo, "recover_endpoint", None)
    if recover is not None:
        endpoint: trio_mojo.Endpoint = recover(argv)
        return endpoint
    return trio_mojo.Endpoint.from_fd(sock_fd)


def sender(spec: RunSpec, sock: socket.socket, ctl: ControlReader) -> SenderResult:
    if spec.mode == "trickle":
        return _trickle_sender(spec, sock, ctl)
    endpoint = trio_mojo.Endpoint.from_fd(sock.detach())
    return trio.run(_sender, spec, endpoint, ctl, clock=trio_clock(spec))


async def _wait_ready(ctl: ControlReader) -> None:
    await trio.lowlevel.wait_readable(ctl.fd)
    ctl.take_ready()


async def _sender(
    spec: RunSpec, endpoint: trio_mojo.Endpoint, ctl: ControlReader
) -> SenderResult:
    result = SenderResult()
    meter = Meter()
    payload = payload_of(spec.payload_size)
    message_cls = trio_mojo.Message
    async with trio_mojo.open_channel(endpoint) as channel:
        await _wait_ready(ctl)
        meter.start()
        result.t0 = monotonic()
        send = channel.send
        if spec.concurrency > 1:
            await _requests_in_flight(channel, spec, result.rtts_ns)
        elif spec.pingpong:
            receive = channel.receive
            clock = time.monotonic_ns
            rtts = result.rtts_ns
            for _ in range(spec.count):
                t = clock()
                await send(message_cls(payload))
                reply = await receive()
                rtts.append(clock() - t)
                if len(reply.payload) != len(payload):
                    raise RuntimeError("short pong")
        elif spec.fds_per_message:
            nfds = spec.fds_per_message
            null = dev_null()
            dup = os.dup
            handle_cls = trio_mojo.Handle
            for _ in range(spec.count):
                handles = tuple([handle_cls(dup(null)) for _ in range(nfds)])
                await send(message_cls(payload, handles))
        else:
            for _ in range(spec.count):
                await send(message_cls(payload))
        stats = channel.statistics()
    # Leaving the block flushed everything queued and half-closed the socket.
    meter.stop()
    result.t_done = monotonic()
    result.take_meter(meter)
    result.info["messages_sent"] = stats.messages_sent
    return result


def client_counts(count: int, clients: int) -> list[int]:
    """Split ``count`` requests between ``clients`` as evenly as possible."""
    return [count // clients + (i < count % clients) for i in range(clients)]


async def _requests_in_flight(
    channel: trio_mojo.Channel, spec: RunSpec, rtts: list[int]
) -> None:
    """W4c10: clients each wait for their own reply; one task routes replies.

    The usual shape of request/response over one channel: a task receives
    every reply and hands it to the client whose tag it carries.
    """
    body = payload_of(spec.payload_size)[REQUEST.size :]
    clock = time.monotonic_ns
    counts = client_counts(spec.count, spec.concurrency)
    inboxes = [trio.open_memory_channel[bytes](1) for _ in counts]

    async def route() -> None:
        for _ in range(spec.count):
            reply = await channel.receive()
            client, _ = REQUEST.unpack_from(reply.payload)
            inboxes[client][0].send_nowait(reply.payload)

    async def client(index: int, count: int) -> None:
        replies = inboxes[index][1]
        for sequence in range(count):
            request = REQUEST.pack(index, sequence) + body
            t = clock()
            await channel.send(trio_mojo.Message(request))
            if await replies.receive() != request:
                raise RuntimeError("a reply that does not match its request")
            rtts.append(clock() - t)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(route)
        for index, count in enumerate(counts):
            nursery.start_soon(client, index, count)


def _process_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (from /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def worker_pingpong(spec: RunSpec) -> tuple[SenderResult, ReceiverResult]:
    """W4w: ping-pong with ``open_worker(echo, sandbox=SandboxPolicy.strict())``."""
    return trio.run(_worker_pingpong, spec)


async def _worker_pingpong(spec: RunSpec) -> tuple[SenderResult, ReceiverResult]:
    sent = SenderResult()
    received = ReceiverResult()
    meter = Meter()
    payload = payload_of(spec.payload_size)
    policy = trio_mojo.SandboxPolicy.strict()
    async with trio_mojo.open_worker(_ECHO_TARGET, sandbox=policy) as worker:
        channel = worker.channel
        await channel.send(trio_mojo.Message(payload))  # warm up
        (await channel.receive()).close()
        cpu0 = _process_cpu(worker.pid)
        meter.start()
        received.t_ready = sent.t0 = monotonic()
        clock = time.monotonic_ns
        rtts = sent.rtts_ns
        for _ in range(spec.count):
            t = clock()
            await channel.send(trio_mojo.Message(payload))
            reply = await channel.receive()
            rtts.append(clock() - t)
            if reply.payload != payload:
                raise RuntimeError("the worker's reply differs from the request")
            received.messages += 1
            received.payload_bytes += len(reply.payload)
        received.t_end = monotonic()
        meter.stop()
        cpu1 = _process_cpu(worker.pid)
    sent.t_done = monotonic()
    sent.take_meter(meter)
    received.cpu_user = cpu1[0] - cpu0[0]
    received.cpu_system = cpu1[1] - cpu0[1]
    received.info["worker"] = "SandboxPolicy.strict()"
    return sent, received


def receiver(
    spec: RunSpec, sock_fd: int, argv: list[str], ctl: ControlWriter
) -> ReceiverResult:
    endpoint = _recover(argv, sock_fd)
    if spec.mode == "trickle":
        return trio.run(_trickle_receiver, spec, endpoint, ctl, clock=trio_clock(spec))
    return trio.run(_receiver, spec, endpoint, ctl, clock=trio_clock(spec))


async def _receiver(
    spec: RunSpec, endpoint: trio_mojo.Endpoint, ctl: ControlWriter
) -> ReceiverResult:
    result = ReceiverResult()
    meter = Meter()
    count = spec.count
    slow = spec.mode == "slow"
    peaks: dict[str, int] = {}
    async with (
        trio_mojo.open_channel(endpoint) as channel,
        trio.open_nursery() as nursery,
    ):
        if slow:
            nursery.start_soon(_sample_queues, channel, peaks)
        meter.start(track_memory=True)
        result.t_ready = monotonic()
        ctl.ready()
        receive = channel.receive
        nbytes = nfds = done = 0
        if spec.pingpong:
            send = channel.send
            message_cls = trio_mojo.Message
            for _ in range(count):
                message = await receive()
                await send(message_cls(message.payload))
                nbytes += len(message.payload)
                done += 1
        elif slow:
            # A consumer ``consumer_rate`` messages/s slow: it sleeps whenever
            # it is ahead of that pace (checked every 64 messages).
            period = 1.0 / spec.consumer_rate
            t_start = trio.current_time()
            for _ in range(count):
                message = await receive()
                nbytes += len(message.payload)
                done += 1
                if not done & 63:
                    ahead = t_start + done * period - trio.current_time()
                    if ahead > 0:
                        await trio.sleep(ahead)
        else:
            nbytes, nfds = await receive_all(receive, count)
            done = count
        result.t_end = monotonic()
        meter.stop(track_memory=True)
        nursery.cancel_scope.cancel()
        result.messages, result.payload_bytes, result.fds = done, nbytes, nfds
        try:
            while True:
                extra = await receive()
                extra.close()
                result.extra_messages += 1
        except trio.EndOfChannel:
            pass
    result.take_meter(meter)
    result.info.update(peaks)
    return result


async def _sample_queues(channel: trio_mojo.Channel, peaks: dict[str, int]) -> None:
    keys = ("receive_queue_messages", "receive_queue_bytes", "read_buffer_bytes")
    for key in keys:
        peaks["max_" + key] = 0
    while True:
        stats = channel.statistics()
        for key in keys:
            value = getattr(stats, key)
            if value > peaks["max_" + key]:
                peaks["max_" + key] = value
        await trio.sleep(0.01)


def _trickle_sender(
    spec: RunSpec, sock: socket.socket, ctl: ControlReader
) -> SenderResult:
    """A raw writer: a header announcing the largest allowed message, then a trickle."""
    sock.setblocking(True)
    announced = trio_mojo.DEFAULT_MAX_MESSAGE_SIZE
    header = trio_mojo.encode_header(announced - 16)
    chunk = payload_of(spec.trickle_chunk)
    result = SenderResult()
    ctl.take_ready()
    result.t0 = monotonic()
    sock.sendall(header)
    sent = 0
    next_at = monotonic()
    while sent < spec.trickle_bytes:
        sock.sendall(chunk)
        sent += len(chunk)
        next_at += spec.trickle_interval
        delay = next_at - monotonic()
        if delay > 0:
            time.sleep(delay)
    time.sleep(0.1)  # let the receiver take its last sample
    result.t_done = monotonic()
    result.info.update(announced=announced, trickled=sent)
    sock.close()
    return result


async def _trickle_receiver(
    spec: RunSpec, endpoint: trio_mojo.Endpoint, ctl: ControlWriter
) -> ReceiverResult:
    result = ReceiverResult()
    meter = Meter()
    samples: list[dict[str, Any]] = []
    outcome = "no error"
    async with trio_mojo.open_channel(endpoint) as channel:
        meter.start(track_memory=True)
        base = meter.rss_start_kib if meter.hwm_reset else meter.hwm_start_kib
        result.t_ready = monotonic()
        ctl.ready()

        def sample() -> None:
            stats = channel.statistics()
            status = read_status_kib("VmRSS", "VmHWM")
            samples.append(
                {
                    "t": monotonic() - result.t_ready,
                    "bytes_received": stats.bytes_received,
                    "read_buffer_bytes": stats.read_buffer_bytes,
                    "rss_growth_kib": status["VmRSS"] - base,
                    "peak_growth_kib": status["VmHWM"] - base,
                }
            )

        async def sampler() -> None:
            while True:
                sample()
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler)
            try:
                message = await channel.receive()
                message.close()
                outcome = "a message arrived (unexpected)"
            except trio_mojo.ChannelError as exc:
                outcome = type(exc).__name__
            sample()
            nursery.cancel_scope.cancel()
        result.t_end = monotonic()
        meter.stop(track_memory=True)
    result.take_meter(meter)
    result.info.update(samples=samples, outcome=outcome)
    return result
