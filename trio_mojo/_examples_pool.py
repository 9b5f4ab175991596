"""Worker targets for pools, shipped so that any install can run them.

A pool's target answers each request with exactly one reply, in order;
each of these is written with :func:`trio_mojo.serve`.  The documentation
and the test suite start pools with them
(``open_worker_pool("trio_mojo._examples_pool:upper", ...)``): a worker's
target must be importable by an isolated interpreter, so it lives in the
installed package.
"""

from __future__ import annotations

import os
import secrets

import trio

from ._channel import Channel
from ._core._message import Message
from ._handles import Handle
from ._workers._serve import serve

__all__ = [
    "echo",
    "faulty",
    "fd_hoarder",
    "flood_at_once",
    "gated",
    "never_serves",
    "upper",
    "whoami",
]


async def upper(channel: Channel) -> None:
    """Reply to each request with its payload in upper case."""

    async def handle(request: Message) -> bytes:
        return request.payload.upper()

    await serve(channel, handle)


async def echo(channel: Channel) -> None:
    """Reply to each request with itself: its payload and its handles."""

    async def handle(request: Message) -> Message:
        return request

    await serve(channel, handle)


async def whoami(channel: Channel) -> None:
    """Reply ``b"<id> <n>"``: this worker's identity and how many requests it
    served before.

    The identity is random, drawn when the target starts (not at import: a
    zygote imports once for all its workers), because a pid says nothing here:
    every worker is pid 2 in its own PID namespace.
    """
    identity = secrets.token_hex(8)
    served = 0

    async def handle(request: Message) -> bytes:
        nonlocal served
        served += 1
        return f"{identity} {served - 1}".encode()

    await serve(channel, handle)


async def gated(channel: Channel) -> None:
    """Echo each payload; a request with a handle is answered only once a
    byte can be read from it (a pipe the parent writes to: a gate)."""

    async def handle(request: Message) -> bytes:
        for handle in request.handles:
            await trio.lowlevel.wait_readable(handle.fileno())
            os.read(handle.fileno(), 1)
        return request.payload

    await serve(channel, handle)


async def faulty(channel: Channel) -> None:
    """Echo each payload, except for commands that misbehave on purpose.

    * ``b"crash N"``: exit at once with status N (after a line on stderr);
    * ``b"hang"``: never answer;
    * ``b"flood"``: answer twice;
    * ``b"return"``: return without answering (the worker exits with 0).
    """
    async for request in channel:
        request.close()
        command, _, argument = request.payload.partition(b" ")
        if command == b"crash":
            os.write(2, b"faulty: crashing as asked\n")
            os._exit(int(argument))
        if command == b"hang":
            await trio.sleep_forever()
        if command == b"return":
            return
        await channel.send(Message(request.payload))
        if command == b"flood":
            await channel.send(Message(b"unsolicited"))


async def never_serves(channel: Channel) -> None:
    """Close the channel and return: a target that does not serve requests."""
    await channel.aclose()


async def flood_at_once(channel: Channel) -> None:
    """Send a reply before any request, then serve like :func:`upper`."""
    await channel.send(Message(b"unsolicited"))
    await upper(channel)


async def fd_hoarder(channel: Channel) -> None:
    """Hostile: answer each request with many fds (the payload says how many;
    copies of stdin), to make the parent hold them."""

    async def handle(request: Message) -> Message:
        # Let the writer send the last reply (and close this process's
        # copies) before making more.  fds in flight count against this
        # process's RLIMIT_NOFILE (ETOOMANYREFS): give it a high one.
        await trio.sleep(0.001)
        count = int(request.payload)
        return Message(b"fds", [Handle(os.dup(0)) for _ in range(count)])

    await serve(channel, handle)
