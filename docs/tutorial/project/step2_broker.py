"""Step 2: let the worker ask for files, and let the parent decide."""

import tempfile
from pathlib import Path

import trio

import trio_mojo


async def ask(tmp: str) -> None:
    uploads = f"{tmp}/uploads"
    async with trio_mojo.open_worker(
        "wordcount.workers:count_paths",
        file_access=[trio_mojo.FileAccess.read_only(uploads)],
    ) as worker:
        for path in [
            f"{uploads}/a.txt",  # inside the rule: served
            f"{uploads}/missing.txt",  # inside, but does not exist
            f"{tmp}/secret.txt",  # outside every rule
            f"{uploads}/../secret.txt",  # escapes the rule
        ]:
            await worker.channel.send(trio_mojo.Message(path.encode()))
            reply = await worker.channel.receive()
            print(path.removeprefix(tmp), "->", reply.payload.decode())


with tempfile.TemporaryDirectory() as tmp:
    Path(tmp, "uploads").mkdir()
    Path(tmp, "uploads", "a.txt").write_text("one two three\n")
    Path(tmp, "secret.txt").write_text("not for the worker\n")
    trio.run(ask, tmp)
