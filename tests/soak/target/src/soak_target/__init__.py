"""The worker target of the soak (``tests/soak/run.py``): digest what arrives.

A worker's target must be importable by an isolated interpreter, so the soak
session installs this small package next to trio_mojo.  :func:`digest`
answers each request with SHA-256 digests of what it read: the payload, and
the whole content of every fd (read with ``pread``, so the file is left as
it came), and hands the fds back in the reply, so that the parent checks
every byte and every fd both ways.
"""

from __future__ import annotations

import hashlib
import os

from trio_mojo import Channel, Message, serve

__all__ = ["ECHO", "digest", "digests"]

ECHO = 0x45
"""A request whose payload starts with this byte also gets its payload back."""


def _content(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)


def digests(payload: bytes, contents: list[bytes]) -> bytes:
    """The reply's digests: SHA-256 of the payload, then of each fd's content."""
    return b"".join(hashlib.sha256(data).digest() for data in [payload, *contents])


async def digest(channel: Channel) -> None:
    """Reply to each request with :func:`digests` of it and its own fds.

    A request whose payload starts with :data:`ECHO` gets its payload back
    after the digests.
    """

    async def handle(request: Message) -> Message:
        contents = [_content(handle.fileno()) for handle in request.handles]
        reply = digests(request.payload, contents)
        if request.payload[:1] == bytes([ECHO]):
            reply += request.payload
        return Message(reply, request.handles)

    await serve(channel, handle)
