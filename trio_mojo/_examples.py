"""Small worker targets, shipped so that any install can run them.

The tutorial, the demo and the test suite start workers with these
(``open_worker("trio_mojo._examples:echo", ...)``): a worker's target must
be importable by an isolated interpreter, so it has to live in an installed
package.  Each one is a complete, honest worker; none is a stub.
"""

from __future__ import annotations

import json
import os
import socket
import struct

import trio

from ._broker import current_broker
from ._channel import Channel
from ._errors import BrokerError
from ._message import Message

__all__ = ["broker_reader", "crash", "describe_self", "echo", "fail", "ignore_eof"]


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
        for name in os.listdir("/proc/self/fd"):
            try:
                fds[name] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue  # listdir's own fd, closed by now
            if fds[name].startswith("socket:"):
                creators[name] = _socket_creator(int(name))
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
