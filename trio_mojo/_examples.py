"""Small worker targets, shipped so that any install can run them.

The tutorial, the demo and the test suite start workers with these
(``open_worker("trio_mojo._examples:echo", ...)``): a worker's target must
be importable by an isolated interpreter, so it has to live in an installed
package.  Each one is a complete, honest worker; none is a stub.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import attrs
import trio

from ._channel import Channel
from ._core._message import Message
from ._core._wire import encode_message
from ._errors import BrokerError
from ._handles import Handle
from ._sandbox import _seccomp
from ._workers._broker import BROKER_SWITCH, current_broker, encode_request
from ._workers._spawn import CHANNEL_SWITCH

__all__ = [
    "SYSCALL_ATTEMPTS",
    "attempt_escapes",
    "attempt_syscall_escapes",
    "broker_reader",
    "chatty",
    "crash",
    "describe_self",
    "echo",
    "fail",
    "flood_broker",
    "ignore_eof",
    "terminal_escapes",
]


async def echo(channel: Channel) -> None:
    """Send every message back, handles included, until end of channel."""
    async for message in channel:
        await channel.send(message)


async def crash(channel: Channel) -> None:
    """Wait for one message, then exit with the status it names (default 3).

    Writes a line to stderr first, so tests can check the stderr tail.
    """
    try:
        message = await channel.receive()
    except trio.EndOfChannel:
        return
    message.close()
    status = int(message.payload or b"3")
    os.write(2, f"crash: exiting with status {status}\n".encode())
    os._exit(status)


async def fail(channel: Channel) -> None:
    """Wait for one message, then raise ``RuntimeError`` with its payload as text.

    A target that raises: the worker exits with status 1 and the traceback
    on stderr, which the parent keeps.
    """
    message = await channel.receive()
    message.close()
    raise RuntimeError(message.payload.decode(errors="replace"))


async def chatty(channel: Channel) -> None:
    """Echo every message, printing a line about it first; say goodbye on
    stderr when the channel ends.

    What a worker prints goes nowhere by default (stdout is ``/dev/null``,
    stderr only kept as a tail); ``open_worker(..., forward_output=True)``
    shows it.
    """
    async for message in channel:
        print(f"echoing {len(message.payload)} bytes", flush=True)
        await channel.send(message)
    print("end of channel, goodbye", file=sys.stderr, flush=True)


async def ignore_eof(channel: Channel) -> None:
    """Say ``b"ready"``, then never return on its own (tests the grace period)."""
    await channel.send(Message(b"ready"))
    await trio.sleep_forever()


async def describe_self(channel: Channel) -> None:
    """Reply to each message with a JSON description of this process.

    Keys: ``pid``, ``fds`` (``/proc/self/fd`` targets), ``socket_creators``
    (for each ``AF_UNIX`` socket fd, the pid ``SO_PEERCRED`` reports, which
    for a ``socketpair`` is the process that created it: the parent for the
    channel, this process for sockets it made itself, such as Trio's wakeup
    pairs), ``received`` (for each handle that came with the request: the
    first 64 bytes read from it), ``cloexec`` (whether each received fd is
    close-on-exec).
    """
    async for message in channel:
        fds = {}
        creators = {}
        # Probed with fstat rather than listed: under Landlock this process
        # may not read the /proc/self/fd directory (readlink still works).
        for fd in range(min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 16)):
            try:
                os.fstat(fd)
            except OSError:
                continue
            name = str(fd)
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
            if fds[name].startswith("socket:"):
                creators[name] = _socket_creator(fd)
        received = []
        cloexec = []
        for handle in message.handles:
            cloexec.append(not os.get_inheritable(handle.fileno()))
            received.append(os.read(handle.fileno(), 64).decode(errors="replace"))
        message.close()
        info = {
            "pid": os.getpid(),
            "fds": fds,
            "socket_creators": creators,
            "received": received,
            "cloexec": cloexec,
        }
        await channel.send(Message(json.dumps(info).encode()))


def _socket_creator(fd: int) -> int | None:
    """``SO_PEERCRED``'s pid for an ``AF_UNIX`` socket fd, else ``None``."""
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid: int = struct.unpack("3i", creds)[0]
        return pid
    finally:
        sock.detach()


async def broker_reader(channel: Channel) -> None:
    """For each request ``b"<mode> <path>"``, ask the broker and report.

    Replies ``b"ok <first 64 bytes>"`` (read modes) or ``b"ok"`` after
    writing ``b"written by worker"`` (write modes), or
    ``b"refused <errno> <message>"``.
    """
    broker = current_broker()
    async for message in channel:
        message.close()
        mode, _, path = message.payload.decode().partition(" ")
        try:
            handle = await broker.open(path, mode)
        except BrokerError as exc:
            await channel.send(Message(f"refused {exc.errno} {exc.strerror}".encode()))
            continue
        with handle:
            if mode == "r":
                data = os.read(handle.fileno(), 64)
                await channel.send(Message(b"ok " + data))
            else:
                os.write(handle.fileno(), b"written by worker")
                await channel.send(Message(b"ok"))


def _attempt(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ALLOWED"


def _escape_attempts(path: str) -> dict[str, str]:
    def tcp() -> None:
        with socket.create_connection(("127.0.0.1", 9), timeout=1):
            pass

    return {
        "open": _attempt(lambda: os.close(os.open(path, os.O_RDONLY))),
        "create": _attempt(
            lambda: os.close(os.open(path + ".new", os.O_WRONLY | os.O_CREAT, 0o600))
        ),
        "listdir": _attempt(lambda: os.listdir(os.path.dirname(path))),
        "exec": _attempt(lambda: subprocess.run(["/bin/true"], check=False)),
        "tcp": _attempt(tcp),
        "signal_parent": _attempt(lambda: os.kill(os.getppid(), 0)),
    }


async def attempt_escapes(channel: Channel) -> None:
    """For each message (a path), try what a sandbox should stop; report JSON.

    Each key maps to ``"ALLOWED"`` or the errno name the attempt failed with:
    ``open`` (read the path), ``create`` (create a file next to it),
    ``listdir`` (its directory), ``exec`` (run ``/bin/true``), ``tcp``
    (connect to 127.0.0.1:9), ``signal_parent`` (``kill(getppid(), 0)``).
    """
    async for message in channel:
        message.close()
        results = _escape_attempts(message.payload.decode())
        await channel.send(Message(json.dumps(results).encode()))


# ----------------------------------------------------------------------
# System calls the seccomp filter restricts by argument


@attrs.frozen
class _Target:
    """What the system-call attempts aim at (from the request)."""

    pid: int
    """Another process (the parent)."""
    listener: str
    """The path of a datagram socket to try to reach."""
    dgram: Handle | None
    """An unconnected ``AF_UNIX`` datagram socket the parent handed over."""


@contextlib.contextmanager
def _borrowed_socket(fd: int) -> Iterator[socket.socket]:
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _channel_fd() -> int:
    """The channel's fd, read from the command line as any target could."""
    prefix = CHANNEL_SWITCH + "="
    for arg in sys.argv:
        if arg.startswith(prefix):
            return int(arg[len(prefix) :])
    raise OSError(errno.EBADF, "no channel on the command line")


def _raw_syscall(name: str, *args: object) -> int:
    """Make the system call itself: no vDSO, no libc wrapper in between."""
    if _seccomp.HOST is None:
        raise OSError(errno.ENOSYS, "no system-call table for this machine")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    number = _seccomp.HOST.numbers[name]
    converted = [ctypes.c_long(arg) if isinstance(arg, int) else arg for arg in args]
    result: int = libc.syscall(ctypes.c_long(number), *converted)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class _Timespec(ctypes.Structure):
    _fields_ = (("sec", ctypes.c_long), ("nsec", ctypes.c_long))


_TIMER_ABSTIME = 1


def _clock_call(call: str, clock: int) -> None:
    """``clock_gettime``, ``clock_getres`` or an already expired
    ``clock_nanosleep`` (absolute time 0) on ``clock``."""
    spec = _Timespec(0, 0)
    if call == "clock_nanosleep":
        _raw_syscall(call, clock, _TIMER_ABSTIME, ctypes.byref(spec), None)
    else:
        _raw_syscall(call, clock, ctypes.byref(spec))


def _clock_calls(clock: int, *, sleep: bool = True) -> None:
    _clock_call("clock_gettime", clock)
    _clock_call("clock_getres", clock)
    if sleep:  # the kernel refuses to sleep on the caller's own thread clock
        _clock_call("clock_nanosleep", clock)


def _own_process_clocks(target: _Target) -> None:
    for clock in range(3):  # CPUCLOCK_PROF, CPUCLOCK_VIRT, CPUCLOCK_SCHED
        _clock_calls(_seccomp.cpu_clock(0, clock))
        _clock_calls(_seccomp.cpu_clock(os.getpid(), clock))
    time.process_time()


def _own_thread_clocks(target: _Target) -> None:
    _clock_calls(_seccomp.cpu_clock(0, thread=True), sleep=False)
    _clock_calls(time.pthread_getcpuclockid(threading.get_ident()), sleep=False)
    main = threading.main_thread().ident
    if main is not None and main != threading.get_ident():
        _clock_calls(time.pthread_getcpuclockid(main))
    time.thread_time()


def _other_thread_clock(target: _Target) -> None:
    """Read a second thread's CPU clock (its tid is not the pid) from here."""
    started = threading.Event()
    done = threading.Event()

    def run() -> None:
        started.set()
        done.wait()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        started.wait()
        assert thread.ident is not None
        _clock_calls(time.pthread_getcpuclockid(thread.ident))
    finally:
        done.set()
        thread.join()


def _static_clocks(target: _Target) -> None:
    for clock in _seccomp.STATIC_CLOCKS:
        _clock_calls(clock, sleep=False)
    _clock_call("clock_nanosleep", time.CLOCK_MONOTONIC)
    time.sleep(0.001)


def _other_process_clock(call: str) -> Callable[[_Target], None]:
    return lambda target: _clock_call(call, _seccomp.cpu_clock(target.pid))


def _foreign_thread_clock(target: _Target) -> None:
    _clock_call("clock_gettime", _seccomp.cpu_clock(target.pid, thread=True))


def _scheduler_of_self(target: _Target) -> None:
    for pid in (0, os.getpid()):
        os.sched_getaffinity(pid)
        os.sched_getparam(pid)
        os.sched_getscheduler(pid)
    os.sched_yield()


def _limits_of_self(target: _Target) -> None:
    for pid in (0, os.getpid()):
        resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.getrlimit(resource.RLIMIT_DATA)


class _IoVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(_IoVec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("hdr", _MsgHdr), ("len", ctypes.c_uint))


def _one_mmsg(call: str, sock: socket.socket, flags: int) -> None:
    """``sendmmsg``/``recvmmsg`` of one one-byte message (Python has neither)."""
    buffer = ctypes.create_string_buffer(b"!", 1)
    iov = _IoVec(ctypes.cast(buffer, ctypes.c_void_p), 1)
    vector = _MMsgHdr(_MsgHdr(None, 0, ctypes.pointer(iov), 1, None, 0, 0), 0)
    timeout = (None,) if call == "recvmmsg" else ()
    _raw_syscall(call, sock.fileno(), ctypes.byref(vector), 1, flags, *timeout)


def _on_a_stream_pair(
    action: Callable[[socket.socket, socket.socket], object],
) -> Callable[[_Target], None]:
    def attempt(target: _Target) -> None:
        sender, receiver = socket.socketpair()
        with sender, receiver:
            action(sender, receiver)

    return attempt


def _queue_oob_then(
    receive: Callable[[socket.socket], object],
) -> Callable[[socket.socket, socket.socket], None]:
    def action(sender: socket.socket, receiver: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the filter refuses it: receive anyway
            sender.send(b"!", socket.MSG_OOB)
        receive(receiver)

    return action


def _socketpair_dgram(target: _Target) -> None:
    first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with first, second:
        first.sendto(b"socketpair_dgram", target.listener)


def _socketpairs(kind: int) -> Callable[[_Target], None]:
    def attempt(target: _Target) -> None:
        first, second = socket.socketpair(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK)
        first.close()
        second.close()

    return attempt


def _sendto_address(target: _Target) -> None:
    if target.dgram is None:
        raise OSError(errno.EBADF, "no datagram socket was handed over")
    with _borrowed_socket(target.dgram.fileno()) as sock:
        sock.sendto(b"sendto_address", target.listener)


def _sendto_channel_address(target: _Target) -> None:
    with _borrowed_socket(_channel_fd()) as sock:
        sock.sendto(b"sendto_channel_address", target.listener)


def _sendmsg_with_a_name(kind: int) -> Callable[[_Target], None]:
    def attempt(target: _Target) -> None:
        first, second = socket.socketpair(socket.AF_UNIX, kind)
        with first, second:
            first.sendmsg([b"sendmsg_name"], [], 0, target.listener)

    return attempt


def _oob_on_the_channel(target: _Target) -> None:
    with _borrowed_socket(_channel_fd()) as sock:
        sock.send(b"!", socket.MSG_OOB)


def _runtime(target: _Target) -> None:
    """What ordinary worker code does: threads, pipes, hashing, JSON, random."""
    results: list[str] = []
    thread = threading.Thread(
        target=lambda: results.append(hashlib.sha256(b"x" * 100_000).hexdigest())
    )
    thread.start()
    thread.join()
    json.loads(json.dumps({"digest": results, "random": os.urandom(16).hex()}))
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"through a pipe")
        os.read(read_end, 64)
        os.close(os.dup(read_end))
    finally:
        os.close(read_end)
        os.close(write_end)


SYSCALL_ATTEMPTS: dict[str, Callable[[_Target], object]] = {
    "socketpair_dgram": _socketpair_dgram,
    "socketpair_stream": _socketpairs(socket.SOCK_STREAM),
    "socketpair_seqpacket": _socketpairs(socket.SOCK_SEQPACKET),
    "sendto_address": _sendto_address,
    "sendto_channel_address": _sendto_channel_address,
    "sendmsg_name_stream": _sendmsg_with_a_name(socket.SOCK_STREAM),
    "sendmsg_name_seqpacket": _sendmsg_with_a_name(socket.SOCK_SEQPACKET),
    "oob_channel": _oob_on_the_channel,
    "oob_sendto": _on_a_stream_pair(lambda a, b: a.send(b"!", socket.MSG_OOB)),
    "oob_sendmsg": _on_a_stream_pair(
        lambda a, b: a.sendmsg([b"!"], [], socket.MSG_OOB)
    ),
    "oob_sendmmsg": _on_a_stream_pair(
        lambda a, b: _one_mmsg("sendmmsg", a, socket.MSG_OOB)
    ),
    "oob_recvfrom": _on_a_stream_pair(
        _queue_oob_then(lambda s: s.recv(1, socket.MSG_OOB))
    ),
    "oob_recvmsg": _on_a_stream_pair(
        _queue_oob_then(lambda s: s.recvmsg(1, 0, socket.MSG_OOB))
    ),
    "oob_recvmmsg": _on_a_stream_pair(
        _queue_oob_then(lambda s: _one_mmsg("recvmmsg", s, socket.MSG_OOB))
    ),
    "getcwd": lambda target: os.getcwd(),
    "clock_gettime_other_process": _other_process_clock("clock_gettime"),
    "clock_getres_other_process": _other_process_clock("clock_getres"),
    "clock_nanosleep_other_process": _other_process_clock("clock_nanosleep"),
    "clock_foreign_thread": _foreign_thread_clock,
    "clock_own_process": _own_process_clocks,
    "clock_own_thread": _own_thread_clocks,
    "clock_other_own_thread": _other_thread_clock,
    "clock_static": _static_clocks,
    "trio_thread": _own_thread_clocks,
    "sched_getaffinity_other": lambda target: os.sched_getaffinity(target.pid),
    "sched_getparam_other": lambda target: os.sched_getparam(target.pid),
    "sched_getscheduler_other": lambda target: os.sched_getscheduler(target.pid),
    "sched_self": _scheduler_of_self,
    "prlimit_other": lambda target: resource.prlimit(
        target.pid, resource.RLIMIT_NOFILE
    ),
    "prlimit_self": _limits_of_self,
    "runtime": _runtime,
}
"""The attempts of :func:`attempt_syscall_escapes`, by name."""

_IN_A_TRIO_THREAD = frozenset({"trio_thread"})


async def attempt_syscall_escapes(channel: Channel) -> None:
    """For each request, make the system calls seccomp restricts; report JSON.

    A request is a JSON object: ``pid`` (another process: the parent),
    ``listener`` (the path of a datagram socket to try to reach) and
    optionally ``attempts`` (names from :data:`SYSCALL_ATTEMPTS`; default:
    all).  It may carry one handle, an unconnected ``AF_UNIX`` datagram
    socket, for ``sendto_address``.  The reply maps each attempt to
    ``"ALLOWED"`` or the errno name it failed with.  What they try:

    * ``socketpair_dgram`` (then ``sendto`` the listener),
      ``socketpair_stream``, ``socketpair_seqpacket``;
    * ``sendto`` the listener from the handed-over socket
      (``sendto_address``) and from the channel (``sendto_channel_address``);
      ``sendmsg`` with the listener as ``msg_name`` on a stream and on a
      seqpacket pair (``sendmsg_name_*``: the kernel ignores or refuses it);
    * ``MSG_OOB``: sent on the channel (``oob_channel``), and with each of
      ``sendto``, ``sendmsg``, ``sendmmsg``, ``recvfrom``, ``recvmsg``,
      ``recvmmsg`` on a fresh stream pair (``oob_<call>``);
    * ``getcwd``;
    * the parent's CPU clock with ``clock_gettime``/``clock_getres``/
      ``clock_nanosleep`` (``clock_*_other_process``, raw system calls: the
      vDSO is not involved), a per-thread clock naming the parent's pid
      (``clock_foreign_thread``), this process's CPU clocks by pid 0 and by
      its pid (``clock_own_process``), this thread's
      (``clock_own_thread``), another of its threads'
      (``clock_other_own_thread``), the static clocks (``clock_static``)
      and this thread's clocks from a ``trio.to_thread`` thread
      (``trio_thread``);
    * ``sched_getaffinity``/``sched_getparam``/``sched_getscheduler`` on the
      parent (``sched_*_other``) and on pid 0 and itself (``sched_self``);
      ``prlimit64`` on the parent (``prlimit_other``) and on itself
      (``prlimit_self``);
    * ``runtime``: a thread, hashing, JSON, random bytes, a pipe.
    """
    async for message in channel:
        with message:
            request = json.loads(message.payload)
            target = _Target(
                pid=int(request["pid"]),
                listener=str(request["listener"]),
                dgram=message.handles[0] if message.handles else None,
            )
            results = {}
            for name in request.get("attempts", SYSCALL_ATTEMPTS):
                attempt = SYSCALL_ATTEMPTS[name]
                action = functools.partial(attempt, target)
                if name in _IN_A_TRIO_THREAD:
                    results[name] = await trio.to_thread.run_sync(_attempt, action)
                else:
                    results[name] = _attempt(action)
        await channel.send(Message(json.dumps(results).encode()))


async def flood_broker(channel: Channel) -> None:
    """A hostile worker that floods the file broker and never reads a reply.

    The first message names a file the broker serves.  The target takes the
    broker socket for itself (a duplicate of the fd named by
    ``--trio-mojo-broker-handle``; its broker channel is closed, cancelled,
    so nothing reads from the socket any more and no end of stream is sent),
    then writes open requests for that file as fast as the socket takes
    them.  It answers ``b"count"`` with how many it has sent, and on
    ``b"stop"`` exits at once (status 0), with every reply unread.
    """
    first = await channel.receive()
    first.close()
    request = encode_message(encode_request(first.payload.decode(), "r"))
    switch = BROKER_SWITCH + "="
    (fd,) = (int(arg[len(switch) :]) for arg in sys.argv if arg.startswith(switch))
    raw = trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(fd)))
    with trio.CancelScope() as scope:
        scope.cancel()
        await current_broker()._channel.aclose()  # cancelled: no flush, no EOF
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:
            view = memoryview(request)
            while view:
                view = view[await raw.send(view) :]
            sent += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        async for message in channel:
            message.close()
            if message.payload == b"stop":
                os._exit(0)
            await channel.send(Message(b"%d" % sent))


async def terminal_escapes(channel: Channel) -> None:
    """Write terminal escapes (ESC, CR, the C1 CSI) and bidi controls to
    stderr, then exit with status 3."""
    text = "\x1b[2J\x1b[31mred alert\x1b[0m\rrewritten\x9b1m \u202eevil\u2066\n"
    os.write(2, text.encode())
    os._exit(3)
