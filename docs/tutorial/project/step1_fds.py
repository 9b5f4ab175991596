"""Step 1: start a worker, send it fds, read its replies."""

import os
import tempfile
from pathlib import Path

import trio

import trio_mojo

POEM = "The Owl and the Pussy-cat went to sea\nIn a beautiful pea-green boat\n"


async def count(poem: Path) -> None:
    async with trio_mojo.open_worker("wordcount.workers:count_fds") as worker:
        # A file the parent opened: the worker gets the fd, not the path.
        request = trio_mojo.Message(b"", [trio_mojo.Handle.open(poem)])
        await worker.channel.send(request)
        reply = await worker.channel.receive()
        print("poem.txt:", reply.payload.decode())

        # Any fd will do: here the read end of a pipe.
        read_end, write_end = os.pipe()
        await worker.channel.send(trio_mojo.Message(b"", [trio_mojo.Handle(read_end)]))
        os.write(write_end, b"words through a pipe\n")
        os.close(write_end)
        reply = await worker.channel.receive()
        print("pipe:", reply.payload.decode())


with tempfile.TemporaryDirectory() as tmp:
    poem = Path(tmp, "poem.txt")
    poem.write_text(POEM)
    trio.run(count, poem)
