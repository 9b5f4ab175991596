"""A worker target that writes to its stdout and stderr as it is told.

Not part of the package: the tests start it through
:func:`_zygote_support.interpreter`, which puts this directory on the
worker's ``sys.path``.
"""

from __future__ import annotations

import os

from trio_mojo import Channel, Message

__all__ = ["write_as_told"]


async def write_as_told(channel: Channel) -> None:
    """For each message ``b"<fd> <bytes>"``, write the bytes as they are
    (no newline added) to fd 1 or 2, then reply ``b"written"``;
    ``b"exit <status>"`` exits at once, in the middle of a line if one is
    open."""
    async for message in channel:
        with message:
            command, _, data = message.payload.partition(b" ")
        if command == b"exit":
            os._exit(int(data))
        fd = int(command)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        await channel.send(Message(b"written"))
