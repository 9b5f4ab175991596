"""Step 4: a pool of workers, each request with its own fd."""

import tempfile
from pathlib import Path

import trio

import trio_mojo


def request(path: Path) -> trio_mojo.Message:
    return trio_mojo.Message(b"", [trio_mojo.Handle.open(path)])


async def count(paths: list[Path]) -> None:
    async with trio_mojo.open_worker_pool(
        "wordcount.workers:count_served", workers=2
    ) as pool:
        # One request, one reply:
        reply = await pool.run(request(paths[0]))
        print("run:", reply.payload.decode())

        # Many requests, replies in order, spread over both workers:
        names = iter(paths)
        async with pool.map(request(path) for path in paths) as replies:
            async for reply in replies:
                print(next(names).name, reply.payload.decode())

        stats = pool.statistics()
        print("answered:", stats.answered, "started:", stats.workers_started)


with tempfile.TemporaryDirectory() as tmp:
    paths = [Path(tmp, f"file{n}.txt") for n in range(1, 7)]
    for n, path in enumerate(paths, start=1):
        path.write_text("word " * n + "\n")
    trio.run(count, paths)
