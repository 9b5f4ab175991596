"""Hostile worker targets for the red-team tests (``tests/test_redteam_*.py``).

Theory of operation
-------------------

A worker's target is hostile once its imports are done: it runs arbitrary
Python, and ``ctypes`` gives it every system call its seccomp filter
allows.  Each function here is such a target, or a probe that a target
runs, written to attack the parent or to reach past the sandbox.
Everything they need is imported at the top of this module: after the
lockdown a worker can import nothing (its root is empty).

:func:`probe` is the generic target: for each request, a JSON object
``{"probe": name, "args": {...}}``, it runs that probe of :data:`PROBES`
and replies with the probe's JSON result (an ``OSError`` becomes
``{"error": "<errno name>"}``).  A probe may leave state behind for the
next request (sockets whose queues hold fds, signal dispositions): the
worker is the attacker's for as long as it lives.

The other targets attack through the channel itself or through what the
parent gives them (what they send and when, what they hand back, whether
they exit); each docstring says what it does.  None of them is useful to
anything but the tests.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import mmap
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import trio

from trio_mojo._channel import Channel
from trio_mojo._core._message import Message
from trio_mojo._errors import BrokerError
from trio_mojo._handles import Handle
from trio_mojo._workers._broker import current_broker

__all__ = [
    "PROBES",
    "broker_open",
    "hand_back_channel_and_die",
    "linger",
    "probe",
    "reply_after",
    "share_a_pipe",
]

Args = Mapping[str, Any]
Probe = Callable[[Args], Any]

PROBES: dict[str, Probe] = {}
"""The probes :func:`probe` runs, by name."""

_MIB: Final = 1024 * 1024
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


def _probe(function: Probe) -> Probe:
    PROBES[function.__name__.lstrip("_")] = function
    return function


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _outcome(action: Callable[[], object]) -> str:
    """``"ALLOWED"``, or the errno name of the ``OSError`` it raised."""
    try:
        action()
    except OSError as exc:
        return _errno_name(exc)
    return "ALLOWED"


_channel_fds: list[int] = []
"""The fd of the channel :func:`probe` serves (for the probes)."""


def _fd_of(channel: Channel) -> int:
    """The fd of this worker's end of ``channel`` (its socket)."""
    return channel._sock.fileno()


# ---------------------------------------------------------------- memory

_MAP_GROWSDOWN: Final = 0x0100
_MAP_NORESERVE: Final = 0x4000
_MAPPINGS: Final = {
    "private": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
    "shared": mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
    "growsdown": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_GROWSDOWN,
}
"""``RLIMIT_DATA`` counts only private writable mappings that are not
stacks: a shared or a grows-down mapping is not "data"."""


@_probe
def _map_memory(args: Args) -> dict[str, Any]:
    """Map ``mib`` MiB of ``kind`` (a key of :data:`_MAPPINGS`) and write
    one byte per page of its top ``touch_mib`` MiB (real memory)."""
    size = args["mib"] * _MIB
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    flags = _MAPPINGS[args["kind"]] | _MAP_NORESERVE
    address = _libc.mmap(None, size, prot, flags, -1, 0)
    if address in (None, _MAP_FAILED):
        return {"mapped": errno.errorcode[ctypes.get_errno()]}
    try:
        touch = args.get("touch_mib", 0) * _MIB
        top = address + size  # a grows-down mapping has its guard gap below
        for offset in range(touch, 0, -mmap.PAGESIZE):
            ctypes.c_char.from_address(top - offset).value = b"x"
    finally:
        _libc.munmap(address, size)
    return {"mapped": "ALLOWED", "touched_mib": touch // _MIB}


@_probe
def _shared_memory_files(args: Args) -> dict[str, str]:
    """The ways to a file of shared memory: ``memfd_create``, ``/dev/shm``."""

    def memfd() -> None:
        os.close(os.memfd_create("hoard", os.MFD_CLOEXEC))

    def dev_shm() -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        os.close(os.open("/dev/shm/trio-mojo-hoard", flags, 0o600))

    return {"memfd_create": _outcome(memfd), "/dev/shm": _outcome(dev_shm)}


@_probe
def _park_in_socket_buffers(args: Args) -> dict[str, Any]:
    """Fill socket pairs of our own, both ways, until ``mib`` MiB sit in
    kernel buffers (or ``pairs`` pairs are full), after trying to raise
    their ``SO_SNDBUF`` to ``sndbuf`` when given; closed before replying."""
    sockets: list[socket.socket] = []
    parked = 0
    sndbuf = "not asked"
    chunk = bytes(64 * 1024)

    try:
        while parked < args["mib"] * _MIB and len(sockets) < 2 * args["pairs"]:
            pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets += pair
            for sock in pair:
                if args.get("sndbuf"):
                    sndbuf = _outcome(
                        functools.partial(
                            sock.setsockopt,
                            socket.SOL_SOCKET,
                            socket.SO_SNDBUF,
                            args["sndbuf"],
                        )
                    )
                sock.setblocking(False)
                while True:
                    try:
                        parked += sock.send(chunk)
                    except BlockingIOError:
                        break
    finally:
        for sock in sockets:
            sock.close()
    return {"parked_mib": parked // _MIB, "sockets": len(sockets), "sndbuf": sndbuf}


# ---------------------------------------------------------------- counts the kernel keeps per uid

_kept: list[socket.socket] = []
"""Sockets kept open across requests: their queues hold fds in flight."""


def _send_fds(sock: socket.socket, fds: list[int]) -> None:
    rights = struct.pack(f"{len(fds)}i", *fds)
    sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])


@_probe
def _hoard_fds_in_flight(args: Args) -> dict[str, Any]:
    """Send ``count`` copies of one fd (253 per message) into a socket pair
    of our own and never receive them.  Each stays "in flight", and the
    kernel counts in-flight fds per user (``user->unix_inflight``), whatever
    the namespace: every process of our uid shares the count."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    _kept.extend((left, right))
    sent = 0
    try:
        while sent < args["count"]:
            batch = min(253, args["count"] - sent)
            _send_fds(left, [left.fileno()] * batch)
            sent += batch
    except OSError as exc:
        return {"sent": sent, "error": _errno_name(exc)}
    return {"sent": sent, "error": None}


@_probe
def _pass_an_fd(args: Args) -> dict[str, str]:
    """Pass one fd over a fresh socket pair of our own, as any reply with
    a handle does."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        return {"outcome": _outcome(lambda: _send_fds(left, [left.fileno()]))}


@_probe
def _queue_signals(args: Args) -> dict[str, int]:
    """Block a real-time signal and send it to ourselves ``count`` times.
    Each is queued (kept by the kernel) while the count of queued signals
    of our uid stays under ``RLIMIT_SIGPENDING``; past it, more are lost."""
    signum = signal.SIGRTMIN + 1
    signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    for _ in range(args["count"]):
        os.kill(os.getpid(), signum)
    return {"sent": args["count"]}


# ---------------------------------------------------------------- kernel surface

_SO_ATTACH_FILTER: Final = 26
_SO_PEERPIDFD: Final = 77
_ACCEPT_ALL: Final = struct.pack("HBBI", 0x06, 0, 0, 0xFFFFFFFF)
"""A classic BPF socket filter of one instruction: ``ret #-1``."""


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


@_probe
def _socket_options(args: Args) -> dict[str, str]:
    """Attach a classic BPF program to a socket of our own (the kernel
    checks, converts and JIT-compiles it), and ask our channel for a pidfd
    of its peer: the parent, which created the socket pair."""
    program = ctypes.create_string_buffer(_ACCEPT_ALL)
    fprog = bytes(_SockFprog(1, ctypes.addressof(program)))
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = socket.socket(fileno=os.dup(_channel_fds[-1]))
    with left, right, channel:
        return {
            "SO_ATTACH_FILTER": _outcome(
                lambda: left.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
            ),
            "SO_PEERPIDFD": _outcome(
                lambda: os.close(channel.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD))
            ),
        }


# ---------------------------------------------------------------- the parent's fds


@_probe
def _set_blocking(args: Args) -> dict[str, bool]:
    """Set or clear ``O_NONBLOCK`` on our fd ``fd``: the flag lives in the
    open file description, so it changes the fd of every process that
    shares that description."""
    os.set_blocking(args["fd"], args["blocking"])
    return {"blocking": os.get_blocking(args["fd"])}


@_probe
def _flood_stderr(args: Args) -> dict[str, int]:
    """Write to stderr for ``seconds`` as fast as the parent reads it (the
    pipe made non-blocking, so a parent that stops reading stops us)."""
    chunk = b"e" * (64 * 1024)
    written = 0
    os.set_blocking(2, False)
    deadline = time.monotonic() + args["seconds"]
    while (left := deadline - time.monotonic()) > 0:
        try:
            written += os.write(2, chunk)
        except BlockingIOError:
            select.select([], [2], [], left)
    return {"written_mib": written // _MIB}


@_probe
def _write_stdout(args: Args) -> dict[str, int]:
    """Write ``kib`` KiB to stdout (blocking: a pipe nobody reads stops us),
    as a chatty target does."""
    data = b"o" * (args["kib"] * 1024)
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]
    return {"written_kib": args["kib"]}


# ---------------------------------------------------------------- processes

_PTRACE_SEIZE: Final = 0x4206


@_probe
def _attack_init(args: Args) -> dict[str, str]:
    """What a worker can do to the init of its PID namespace (pid 1, which
    runs outside seccomp): signal it, trace it."""

    def trace() -> None:
        if _libc.ptrace(_PTRACE_SEIZE, 1, None, None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return {
        "SIGTERM": _outcome(lambda: os.kill(1, signal.SIGTERM)),
        "SIGKILL": _outcome(lambda: os.kill(1, signal.SIGKILL)),
        "SIGSTOP": _outcome(lambda: os.kill(1, signal.SIGSTOP)),
        "ptrace": _outcome(trace),
        "getppid": str(os.getppid()),
    }


@_probe
def _leave_a_process(args: Args) -> dict[str, Any]:
    """Fork a child in a session of its own that sleeps ``seconds``; reply
    with its pid (or the errno of the fork)."""
    try:
        pid = os.fork()
    except OSError as exc:
        return {"pid": None, "error": _errno_name(exc)}
    if pid == 0:
        try:
            os.setsid()
            time.sleep(args["seconds"])
        finally:
            os._exit(0)
    return {"pid": pid, "error": None}


# ---------------------------------------------------------------- targets


async def probe(channel: Channel) -> None:
    """Run the probe each request names; reply with its JSON result."""
    _channel_fds.append(_fd_of(channel))
    async for message in channel:
        message.close()
        request = json.loads(message.payload)
        try:
            result = PROBES[request["probe"]](request.get("args", {}))
        except OSError as exc:
            result = {"error": _errno_name(exc)}
        await channel.send(Message(json.dumps(result).encode()))


async def broker_open(channel: Channel) -> None:
    """For each request ``{"path": p, "mode": m, "seconds": s}``, ask the
    broker to open ``p`` (``mode`` default ``"r"``) once, or again and
    again for ``s`` seconds; reply ``{"opened": n, "errno": e}`` (the errno
    of the last refusal, or null)."""
    broker = current_broker()
    async for message in channel:
        message.close()
        request = json.loads(message.payload)
        opened = 0
        refused = None
        deadline = trio.current_time() + request.get("seconds", 0)
        while True:
            try:
                with await broker.open(request["path"], request.get("mode", "r")):
                    opened += 1
            except BrokerError as exc:
                refused = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            if trio.current_time() >= deadline:
                break
        reply = {"opened": opened, "errno": refused}
        await channel.send(Message(json.dumps(reply).encode()))


async def reply_after(channel: Channel) -> None:
    """Answer each request, in order, ``float(payload)`` seconds after it
    was received: slow, but never quite late enough to be killed."""
    async for request in channel:
        with request:
            await trio.sleep(float(request.payload))
            await channel.send(Message(request.payload))


async def linger(channel: Channel) -> None:
    """Answer each request with its payload; once the channel ends, ignore
    ``SIGTERM`` and stay (a recycled worker that will not go)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    async for request in channel:
        with request:
            await channel.send(Message(request.payload))
    await trio.sleep_forever()


async def hand_back_channel_and_die(channel: Channel) -> None:
    """Answer the first request with a copy of this worker's own end of the
    channel attached, then exit at once, answering nothing else.

    The parent sees no end of stream while anything in it holds that copy.
    """
    try:
        (await channel.receive()).close()
    except trio.EndOfChannel:
        return
    await channel.send(Message(b"here", (Handle(os.dup(_fd_of(channel))),)))
    os._exit(0)


async def share_a_pipe(channel: Channel) -> None:
    """Hand the parent the read end of a pipe, keeping a copy of it (the
    same open file description).  On the next request ``{"delay": s}``,
    make the description blocking, reply, and write one byte ``s`` seconds
    later; then wait for the channel to end.

    The parent made its copy non-blocking to read it with Trio; now a read
    of it blocks the parent's whole event loop until the byte comes.
    """
    read_end, write_end = os.pipe()
    (await channel.receive()).close()
    await channel.send(Message(b"pipe", (Handle(os.dup(read_end)),)))
    request = await channel.receive()
    request.close()
    os.set_blocking(read_end, True)
    await channel.send(Message(b"blocking"))
    await trio.sleep(json.loads(request.payload)["delay"])
    os.write(write_end, b"!")
    async for message in channel:
        message.close()
