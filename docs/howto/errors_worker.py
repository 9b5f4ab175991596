"""What a failing worker looks like from the parent, and how to carry on."""

import trio

import trio_mojo


async def targets_that_cannot_run() -> None:
    async def defined_here(channel: trio_mojo.Channel) -> None:
        await channel.aclose()

    for target in (
        "wordcount_typo:count",  # not installed: refused before anything starts
        defined_here,  # a worker could not import it by name
        "trio_mojo._examples:no_such_target",  # only the worker's import tells
    ):
        try:
            async with trio_mojo.open_worker(target):
                pass
        except trio_mojo.WorkerTargetError as exc:
            print("WorkerTargetError:", exc)


async def worker_crashes() -> None:
    try:
        async with trio_mojo.open_worker("trio_mojo._examples:crash") as worker:
            await worker.channel.send(trio_mojo.Message(b"7"))  # "exit with 7"
            await worker.channel.receive()
    except trio_mojo.WorkerError as exc:
        print("WorkerError: exit status", exc.returncode)
        print("  its stderr:", exc.stderr_tail.strip())


async def worker_cancelled() -> None:
    with trio.move_on_after(0.5):
        async with trio_mojo.open_worker("trio_mojo._examples:ignore_eof") as worker:
            await worker.channel.receive()  # b"ready"
            await worker.channel.receive()  # never comes: cancelled
    print("cancelled: the worker was killed and reaped:", worker.returncode)


async def pool_worker_crashes() -> None:
    async with trio_mojo.open_worker_pool(
        "trio_mojo._examples_pool:faulty", workers=1
    ) as pool:
        try:
            await pool.run(trio_mojo.Message(b"crash 3"))
        except trio_mojo.WorkerError as exc:
            print("pool request failed:", str(exc).splitlines()[0])
        reply = await pool.run(trio_mojo.Message(b"still serving?"))
        print("pool:", reply.payload, pool.statistics().workers_replaced, "replaced")


async def main() -> None:
    await targets_that_cannot_run()
    await worker_crashes()
    await worker_cancelled()
    await pool_worker_crashes()


trio.run(main)
