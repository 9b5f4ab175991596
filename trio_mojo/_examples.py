"""Small worker targets, shipped so that any install can run them.

The tutorial, the demo and the test suite start workers with these
(``open_worker("trio_mojo._examples:echo", ...)``): a worker's target must
be importable by an isolated interpreter, so it has to live in an installed
package.  Each one is a complete, honest worker; none is a stub.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import Callable

import trio

from ._channel import Channel
from ._core._message import Message
from ._core._wire import encode_message
from ._errors import BrokerError
from ._workers._broker import BROKER_SWITCH, current_broker, encode_request

__all__ = [
    "attempt_escapes",
    "broker_reader",
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
