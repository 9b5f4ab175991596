"""A catalogue of escape attempts, run as a worker's target.

Theory of operation
-------------------

Each :class:`Attempt` is one thing a hostile target would try, written as a
plain function of a *context* (what the parent set up for it to reach: a
file, sockets, its own pid, ...) that returns a short outcome:

* ``"ALLOWED"``: the attempt got what it was after;
* an errno name (``"EPERM"``, ``"ENOENT"``, ...): the call failed so;
  ``MemoryError`` is ``"ENOMEM"`` and "can't start new thread" ``"EAGAIN"``;
* ``"hidden"``: the call worked but showed the worker's own view, nothing
  of the host (its host name, ``/`` as its working directory, ...);
* an exception's name when something else failed (a module that had to be
  imported lazily, after the lockdown, cannot be);
* a few outcomes name what was seen instead (``"uid of its own"``,
  ``"none"``).

:func:`run_attempts` is the target that runs a list of attempts in one
worker and replies with their outcomes; an attempt marked ``isolated`` (it
kills the worker, or changes what later attempts would see) runs alone in
a worker of its own, and when that worker dies its outcome is the signal
(``"SIGSYS"``).  ``trio_mojo._escape_matrix`` runs the catalogue under each
policy and prints the table ``docs/security.rst`` shows.

To extend the catalogue, add an :class:`Attempt` to :data:`ATTEMPTS` with
the :func:`attempt` decorator; rows keep the catalogue's order.  The
``*_at_once`` targets make a fatal call before anything else (the tests
use them to race the parent's checks).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import trio

from trio_mojo._channel import Channel
from trio_mojo._core._message import Message

from . import _credentials, _libc
from ._policy import DEFAULT_MAX_DATA, PID_MAX_LIMIT, WORKER_ID_BASE

__all__ = [
    "ATTEMPTS",
    "Attempt",
    "attempt",
    "hold_threads",
    "int80_at_once",
    "outcome_of",
    "run_attempts",
    "sigkill_at_once",
    "use_threads",
    "x32_at_once",
]

Context = Mapping[str, Any]
"""What the parent prepared, from JSON: ``file``, ``directory``, ``dgram``
(a pathname datagram socket), ``tcp``/``udp`` (``[host, port]``),
``abstract`` (an abstract unix socket name), ``parent``, ``victim`` (pids),
``cwd``, ``hostname``; and, added by :func:`run_attempts`, ``channel``
(the fd of the worker's channel, whose peer is the parent)."""

ALLOWED: Final = "ALLOWED"
HIDDEN: Final = "hidden"


@attrs.frozen
class Attempt:
    """One escape attempt: a row of the escape matrix."""

    name: str
    """What is tried, as the matrix shows it."""
    action: Callable[[Context], str | None]
    """Does it; returns an outcome, or ``None`` for ``"ALLOWED"``."""
    isolated: bool = False
    """Runs in a worker of its own (it may kill it or change its state)."""


ATTEMPTS: list[Attempt] = []
"""The catalogue, in the matrix's order."""


def attempt(
    name: str, *, isolated: bool = False
) -> Callable[[Callable[[Context], str | None]], Callable[[Context], str | None]]:
    """Add the decorated function to :data:`ATTEMPTS` as ``name``."""

    def register(
        action: Callable[[Context], str | None],
    ) -> Callable[[Context], str | None]:
        ATTEMPTS.append(Attempt(name, action, isolated))
        return action

    return register


def outcome_of(action: Callable[[Context], str | None], context: Context) -> str:
    """Run one attempt; its outcome string."""
    try:
        result = action(context)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    except MemoryError:
        return "ENOMEM"
    except RuntimeError as exc:  # threading: "can't start new thread"
        return "EAGAIN" if "thread" in str(exc) else type(exc).__name__
    except Exception as exc:  # e.g. a lazy import that the sandbox refused
        return type(exc).__name__
    return ALLOWED if result is None else result


# ---------------------------------------------------------------- files


@attempt("open a host file for reading")
def _open_read(context: Context) -> None:
    os.close(os.open(context["file"], os.O_RDONLY))


@attempt("open a host file for writing")
def _open_write(context: Context) -> None:
    os.close(os.open(context["file"], os.O_WRONLY))


@attempt("create a file")
def _create(context: Context) -> None:
    path = os.path.join(context["directory"], "created-by-worker")
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.unlink(path)


@attempt("stat a host path")
def _stat(context: Context) -> None:
    os.stat(context["file"])


@attempt("execute a program")
def _execute(context: Context) -> None:
    pid = os.posix_spawn("/bin/true", ["true"], {})
    os.waitpid(pid, 0)


@attempt("fork")
def _fork(context: Context) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


# ---------------------------------------------------------------- processes


_PTRACE_SEIZE: Final = 0x4206


@attempt("ptrace another process")
def _ptrace(context: Context) -> None:
    _libc.call("ptrace", _PTRACE_SEIZE, context["victim"], None, None)


@attempt("signal the parent (kill 0)")
def _signal_parent(context: Context) -> None:
    os.kill(context["parent"], 0)


@attempt("probe a host pid (sched_getaffinity)")
def _probe_pid(context: Context) -> None:
    os.sched_getaffinity(context["parent"])


@attempt("read another process's CPU clock")
def _cpu_clock(context: Context) -> None:
    clock = (~context["parent"] << 3) | 2  # CPUCLOCK_SCHED of that process
    time.clock_gettime(clock)


@attempt("list the host's processes (/proc)")
def _list_pids(context: Context) -> str | None:
    return None if str(context["parent"]) in os.listdir("/proc") else HIDDEN


# ---------------------------------------------------------------- network


@attempt("create an AF_INET socket")
def _inet_socket(context: Context) -> None:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()


@attempt("create an AF_UNIX socket")
def _unix_socket(context: Context) -> None:
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()


@attempt("TCP connect to the host")
def _tcp_connect(context: Context) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(tuple(context["tcp"]))  # numeric: no resolver, no codec


@attempt("UDP sendto the host")
def _udp_sendto(context: Context) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"escaped", tuple(context["udp"]))


@attempt("connect to an abstract unix socket")
def _abstract_connect(context: Context) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect("\0" + context["abstract"])


@attempt("sendto a pathname unix socket (from a socketpair)")
def _dgram_sendto(context: Context) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right:
        left.sendto(b"escaped", context["dgram"])


@attempt("connect to a pathname unix socket")
def _dgram_connect(context: Context) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(context["dgram"])
        sock.send(b"escaped")


@attempt("send out-of-band data (MSG_OOB) on a unix socket")
def _oob(context: Context) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        left.send(b"!", socket.MSG_OOB)


# ---------------------------------------------------------------- socket options

_SO_ATTACH_FILTER: Final = 26
_SO_PEERPIDFD: Final = 77
_ACCEPT_ALL: Final = struct.pack("HBBI", 0x06, 0, 0, 0xFFFFFFFF)
"""A classic BPF socket filter of one instruction: ``ret #-1``."""


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


@attempt("attach classic BPF to a socket (SO_ATTACH_FILTER)")
def _attach_filter(context: Context) -> None:
    program = ctypes.create_string_buffer(_ACCEPT_ALL)
    fprog = bytes(_SockFprog(1, ctypes.addressof(program)))
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        left.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


@attempt("get a pidfd of the parent (SO_PEERPIDFD)")
def _peer_pidfd(context: Context) -> None:
    channel = socket.socket(fileno=os.dup(context["channel"]))
    with channel:
        os.close(channel.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD))


_BIG_SOCKET_BUFFER: Final = 64 * 1024 * 1024


@attempt("raise a socket's send buffer (SO_SNDBUF)")
def _raise_sndbuf(context: Context) -> str | None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BIG_SOCKET_BUFFER)
        raised = left.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        default = right.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return None if raised > default else f"unchanged ({raised} bytes)"


# ---------------------------------------------------------------- kernel surface


@attempt("io_uring_setup")
def _io_uring(context: Context) -> None:
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    os.close(_libc.syscall("io_uring_setup", 1, params))


class _BpfMapAttr(ctypes.Structure):
    _fields_ = (
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("padding", ctypes.c_uint8 * 112),
    )


@attempt("bpf (create a map)")
def _bpf(context: Context) -> None:
    attr = _BpfMapAttr(map_type=2, key_size=4, value_size=4, max_entries=1)  # ARRAY
    os.close(_libc.syscall("bpf", 0, ctypes.byref(attr), ctypes.sizeof(attr)))


_X32_GETPID: Final = 0x40000000 | 39


def _x32_call() -> str | None:
    result = _libc.call("syscall", _X32_GETPID)
    return None if result > 0 else f"returned {result}"


@attempt("x32 system call", isolated=True)
def _x32(context: Context) -> str | None:
    return _x32_call()


_I386_GETPID: Final = bytes((0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3))
"""``mov eax, 20; int 0x80; ret``: the i386 ``getpid``."""


def _int80_call() -> str | None:
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    with mmap.mmap(-1, mmap.PAGESIZE, prot=prot) as code:
        code.write(_I386_GETPID)
        buffer = ctypes.c_char.from_buffer(code)
        try:
            result = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(buffer))()
        finally:
            del buffer
    return None if result > 0 else f"returned {result}"


@attempt("int 0x80 (i386) system call", isolated=True)
def _int80(context: Context) -> str | None:
    return _int80_call()


_CLONE_NEWUSER: Final = 0x10000000
_CLONE_NEWNET: Final = 0x40000000


@attempt("unshare a user namespace", isolated=True)
def _unshare(context: Context) -> None:
    _libc.call("unshare", _CLONE_NEWUSER)


@attempt("setns into the parent's network namespace", isolated=True)
def _setns(context: Context) -> None:
    fd = os.open(f"/proc/{context['parent']}/ns/net", os.O_RDONLY)
    try:
        _libc.call("setns", fd, _CLONE_NEWNET)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- what it sees


@attempt("read the parent's working directory")
def _getcwd(context: Context) -> str | None:
    return None if os.getcwd() == context["cwd"] else HIDDEN


@attempt("read the host name")
def _hostname(context: Context) -> str | None:
    return None if socket.gethostname() == context["hostname"] else HIDDEN


@attempt("run as uid 0")
def _uid(context: Context) -> str | None:
    uid = os.getuid()
    if uid == 0:
        return None
    own = WORKER_ID_BASE < uid < WORKER_ID_BASE + PID_MAX_LIMIT
    return "uid of its own" if own else f"uid {uid}"


@attempt("hold capabilities")
def _capabilities(context: Context) -> str | None:
    return None if _credentials.effective_capabilities() else "none"


# ---------------------------------------------------------------- resources

_BIG_ALLOCATION: Final = 12 * 1024**3
_BIG_MAPPING: Final = 2 * DEFAULT_MAX_DATA
_THREADS: Final = 500
_MAP_GROWSDOWN: Final = 0x0100


@attempt("allocate 12 GiB (past RLIMIT_DATA)")
def _allocate(context: Context) -> None:
    block = bytes(_BIG_ALLOCATION)  # calloc: mapped, never touched
    del block


def _map(flags: int) -> None:
    mmap.mmap(-1, _BIG_MAPPING, flags=flags).close()  # mapped, never touched


@attempt("map 16 GiB shared (RLIMIT_DATA does not count it)")
def _map_shared(context: Context) -> None:
    _map(mmap.MAP_SHARED)


@attempt("map 16 GiB growing down (RLIMIT_DATA does not count it)")
def _map_growsdown(context: Context) -> None:
    _map(mmap.MAP_PRIVATE | _MAP_GROWSDOWN)


@attempt(f"start {_THREADS} threads")
def _thread_bomb(context: Context) -> None:
    release = threading.Event()
    threads = []
    try:
        for _ in range(_THREADS):
            thread = threading.Thread(target=release.wait)
            thread.start()
            threads.append(thread)
    finally:
        release.set()
        for thread in threads:
            thread.join()


# ---------------------------------------------------------------- targets


async def run_attempts(channel: Channel) -> None:
    """For each request, run the attempts it names; reply with their outcomes.

    Request (JSON): ``{"attempts": [name, ...], "context": {...}}``; reply
    (JSON): ``{name: outcome}``.  An unknown name gets ``"unknown"``.
    """
    by_name = {entry.name: entry for entry in ATTEMPTS}
    async for message in channel:
        message.close()
        request = json.loads(message.payload)
        context = {**request["context"], "channel": channel._sock.fileno()}
        outcomes = {}
        for name in request["attempts"]:
            entry = by_name.get(name)
            outcomes[name] = (
                "unknown" if entry is None else outcome_of(entry.action, context)
            )
        await channel.send(Message(json.dumps(outcomes).encode()))


async def hold_threads(channel: Channel) -> None:
    """A thread bomb that keeps its threads until told to let them go.

    On the first message, starts threads (at most 1000) until the kernel
    refuses one, replies ``{"started": n, "error": "..." or null}``; on the
    second, lets them end and replies ``b"released"``.
    """
    release = threading.Event()
    threads: list[threading.Thread] = []
    error = None
    (await channel.receive()).close()
    try:
        while len(threads) < 1000:
            thread = threading.Thread(target=release.wait)
            thread.start()
            threads.append(thread)
    except RuntimeError as exc:
        error = str(exc)
    try:
        reply = {"started": len(threads), "error": error}
        await channel.send(Message(json.dumps(reply).encode()))
        (await channel.receive()).close()
    finally:
        release.set()
        for thread in threads:
            thread.join()
    await channel.send(Message(b"released"))


async def use_threads(channel: Channel) -> None:
    """For each message ``b"<n>"``, run ``n`` blocking calls at once in
    ``trio.to_thread`` and reply ``b"<n> done"`` (what a well-behaved target
    does within its thread limit)."""
    async for message in channel:
        message.close()
        count = int(message.payload)
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(trio.to_thread.run_sync, time.sleep, 0.05)
        await channel.send(Message(b"%d done" % count))


async def x32_at_once(channel: Channel) -> None:
    """Make an x32 system call first thing (seccomp kills the worker for it)."""
    _x32_call()


async def int80_at_once(channel: Channel) -> None:
    """Make an i386 ``int 0x80`` system call first thing."""
    _int80_call()


async def sigkill_at_once(channel: Channel) -> None:
    """SIGKILL this process first thing."""
    os.kill(os.getpid(), 9)
