"""What both processes of a benchmark run share: the run spec, the meter, the pipe.

A run is one (system, workload, repetition).  The driver starts a fresh
*sender* process for it; the sender makes the socket pair and a control
pipe, starts the *receiver* as its child (the receiver's end of the socket
is passed by fd, named ``--mojo-platform-channel-handle=N`` as Chromium
does), and then both run the system's own event loop (or none).

Timing follows ``performance_baseline.md``: the receiver signals readiness
over the control pipe from *inside* its loop; the sender stamps
``t0 = CLOCK_MONOTONIC`` right before its first send; the receiver stamps
``t_end`` right after counting the last message; ``elapsed = t_end - t0``.
Interpreter start, imports and loop start-up are outside the window.

CPU time is ``getrusage(RUSAGE_SELF)`` (user + system) of each process over
its measured window: the receiver from "ready" to ``t_end``, the sender
from ``t0`` until everything it sent was flushed.  Memory is the
receiver's ``VmHWM`` (peak RSS) from ``/proc/self/status``; its peak is
reset at "ready" (``/proc/self/clear_refs``) so that the growth during the
run can be told apart from the interpreter and its imports.
"""

from __future__ import annotations

import array
import json
import os
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable, MutableSequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from trio_mojo import Message

__all__ = [
    "FRAME",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_FDS",
    "READ_SIZE",
    "REQUEST",
    "ControlReader",
    "ControlWriter",
    "Meter",
    "ReceiverResult",
    "RunSpec",
    "SenderResult",
    "dev_null",
    "measured_receive",
    "monotonic",
    "receive_all",
    "take_rights",
]

FRAME: Final = struct.Struct("<IHH")
"""The peers' 8-byte header: payload length, number of fds, message type.

This is Mojo's legacy channel header (``LegacyHeader``); every peer except
``multiprocessing`` (its own 4-byte prefix) and trio_mojo (Mojo's 16-byte
``Header``) frames its messages with it.
"""
FRAME_TYPE: Final = 1
MAX_BATCH_BYTES: Final = 64 * 1024
"""Batched writers coalesce up to this many bytes per ``sendmsg``."""
MAX_BATCH_FDS: Final = 253
"""...and at most this many fds (Linux ``SCM_MAX_FD``)."""
READ_SIZE: Final = 256 * 1024
"""Bytes asked for per ``recv``/``recvmsg`` by the batched readers."""
BIG_PAYLOAD: Final = 64 * 1024
"""Payloads above this are received straight into their own buffer."""

monotonic = time.monotonic  # CLOCK_MONOTONIC on Linux, same clock in every process


@dataclass
class RunSpec:
    """Everything a process needs to play its role in one run."""

    system: str
    workload: str
    count: int
    payload_size: int
    fds_per_message: int = 0
    pingpong: bool = False
    concurrency: int = 1
    worker: bool = False
    # Special runs (see _extras): "slow" consumer, "trickle" header.
    mode: str = "normal"
    consumer_rate: float = 0.0
    trickle_bytes: int = 0
    trickle_chunk: int = 0
    trickle_interval: float = 0.0
    profile_path: str | None = None
    timeout: float = 600.0
    valgrind: bool = False
    """The run is under valgrind (``bench instructions``): Trio runs on a
    clock slowed down as much as the program (``_clock.trio_clock``)."""

    @property
    def total_fds(self) -> int:
        return self.count * self.fds_per_message

    @property
    def total_bytes(self) -> int:
        return self.count * self.payload_size

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls(**json.loads(text))


def read_status_kib(*names: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``...)."""
    wanted = set(names)
    found: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = int(value.split()[0])
    return found


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


@dataclass
class Meter:
    """CPU time and peak RSS of this process over a measured window."""

    user0: float = 0.0
    sys0: float = 0.0
    user: float = 0.0
    system: float = 0.0
    rss_start_kib: int = 0
    hwm_start_kib: int = 0
    hwm_end_kib: int = 0
    hwm_reset: bool = False
    ctx_switches: int = 0
    _vcsw0: int = 0
    _ivcsw0: int = 0

    def start(self, *, track_memory: bool = False) -> None:
        if track_memory:
            self.hwm_reset = reset_peak_rss()
            status = read_status_kib("VmRSS", "VmHWM")
            self.rss_start_kib = status["VmRSS"]
            self.hwm_start_kib = status["VmHWM"]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._vcsw0, self._ivcsw0 = usage.ru_nvcsw, usage.ru_nivcsw
        self.user0, self.sys0 = usage.ru_utime, usage.ru_stime

    def stop(self, *, track_memory: bool = False) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.user = usage.ru_utime - self.user0
        self.system = usage.ru_stime - self.sys0
        self.ctx_switches = (
            usage.ru_nvcsw - self._vcsw0 + usage.ru_nivcsw - self._ivcsw0
        )
        if track_memory:
            self.hwm_end_kib = read_status_kib("VmHWM")["VmHWM"]

    @property
    def cpu(self) -> float:
        return self.user + self.system

    @property
    def rss_growth_kib(self) -> int:
        """Peak RSS during the window minus RSS at its start."""
        base = self.rss_start_kib if self.hwm_reset else self.hwm_start_kib
        return max(0, self.hwm_end_kib - base)


@dataclass
class ReceiverResult:
    """What the receiver reports to the sender at the end of a run."""

    messages: int = 0
    payload_bytes: int = 0
    fds: int = 0
    extra_messages: int = 0
    t_ready: float = 0.0
    t_end: float = 0.0
    cpu_user: float = 0.0
    cpu_system: float = 0.0
    ctx_switches: int = 0
    rss_start_kib: int = 0
    hwm_end_kib: int = 0
    rss_growth_kib: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def take_meter(self, meter: Meter) -> None:
        self.cpu_user = meter.user
        self.cpu_system = meter.system
        self.ctx_switches = meter.ctx_switches
        self.rss_start_kib = meter.rss_start_kib
        self.hwm_end_kib = meter.hwm_end_kib
        self.rss_growth_kib = meter.rss_growth_kib


@dataclass
class SenderResult:
    """What the sender measured itself (its counts are the expected totals)."""

    t0: float = 0.0
    t_done: float = 0.0
    cpu_user: float = 0.0
    cpu_system: float = 0.0
    ctx_switches: int = 0
    rtts_ns: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def take_meter(self, meter: Meter) -> None:
        self.cpu_user = meter.user
        self.cpu_system = meter.system
        self.ctx_switches = meter.ctx_switches


class ControlWriter:
    """The receiver's end of the control pipe: "ready", then its result."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ready(self) -> None:
        os.write(self.fd, b"R")

    def result(self, result: ReceiverResult) -> None:
        data = (json.dumps(asdict(result)) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        os.close(self.fd)
        self.fd = -1


class ControlReader:
    """The sender's end of the control pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def take_ready(self) -> None:
        """Consume the ready byte (call once the fd is readable)."""
        byte = os.read(self.fd, 1)
        if byte != b"R":
            raise RuntimeError("the receiver died before it was ready")

    def result(self) -> ReceiverResult:
        """Block until the receiver's result arrives (after the run)."""
        os.set_blocking(self.fd, True)  # an event loop may have cleared it
        chunks = []
        while chunk := os.read(self.fd, 65536):
            chunks.append(chunk)
        os.close(self.fd)
        self.fd = -1
        text = b"".join(chunks).decode()
        if not text.strip():
            raise RuntimeError("the receiver exited without reporting a result")
        return ReceiverResult(**json.loads(text))


_dev_null_fd = -1


def dev_null() -> int:
    """An fd open on ``/dev/null`` that fd workloads ``dup`` for every fd sent."""
    global _dev_null_fd  # noqa: PLW0603 - one per process, opened lazily
    if _dev_null_fd < 0:
        _dev_null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _dev_null_fd


REQUEST: Final = struct.Struct("<HI")
"""W4c10: a request's first bytes, ``(client, sequence)``; the echo returns
it, so each reply finds the client that waits for it."""


def payload_of(size: int) -> bytes:
    """A payload of ``size`` bytes (not all zero, so nothing can shortcut it)."""
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


_RIGHTS: Final = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
"""(An ``int``: ``flags & socket.MSG_CTRUNC`` runs ``IntFlag.__and__``, in
Python, on every read.)"""


def take_rights(
    ancdata: list[tuple[int, int, bytes]], flags: int, fifo: MutableSequence[int]
) -> int:
    """Append the fds of a ``recvmsg``'s control messages to ``fifo``; how many.

    Raises:
        RuntimeError: fds were lost (``MSG_CTRUNC``) or a control message
            other than ``SCM_RIGHTS`` arrived.
    """
    if flags & _MSG_CTRUNC:
        raise RuntimeError("MSG_CTRUNC: file descriptors were lost")
    count = 0
    for level, kind, data in ancdata:
        if (level, kind) != _RIGHTS:
            raise RuntimeError(f"unexpected control message {(level, kind)}")
        fds = array.array("i")
        fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        fifo.extend(fds)
        count += len(fds)
    return count


async def measured_receive(
    spec: RunSpec,
    ctl: ControlWriter,
    read_all: Callable[[], Awaitable[tuple[int, int]]],
    read_extra: Callable[[], Awaitable[object]],
) -> ReceiverResult:
    """A receiver's run, for the peers that read with ``await``: say ready,
    then ``read_all()`` (the payload bytes and fds of ``spec.count``
    messages) under the meter, then ``read_extra()`` once, which must raise
    ``EOFError``: a message beyond the count is reported, not hidden.
    """
    result = ReceiverResult()
    meter = Meter()
    meter.start(track_memory=True)
    result.t_ready = monotonic()
    ctl.ready()
    nbytes, nfds = await read_all()
    result.t_end = monotonic()
    meter.stop(track_memory=True)
    result.messages, result.payload_bytes, result.fds = spec.count, nbytes, nfds
    try:
        extra = await read_extra()
        if isinstance(extra, Message):
            extra.close()
        result.extra_messages += 1
    except EOFError:
        pass
    result.take_meter(meter)
    return result


async def receive_all(
    receive: Callable[[], Awaitable[Message]], count: int
) -> tuple[int, int]:
    """``await receive()`` ``count`` messages, closing their fds.

    Returns the payload bytes and the fds received.
    """
    nbytes = nfds = 0
    for _ in range(count):
        message = await receive()
        nbytes += len(message.payload)
        handles = message.handles
        if handles:
            for handle in handles:
                handle.close()
            nfds += len(handles)
    return nbytes, nfds
