"""Step 3: what the worker got, and what it cannot do."""

import trio

import trio_mojo


async def main() -> None:
    async with trio_mojo.open_worker("wordcount.workers:try_open") as worker:
        report = worker.sandbox_report
        print("policy:", report.policy, "ok:", report.ok)
        for layer, state in report.layers.items():
            print(f"  {layer}: {state}")
        print("host pid:", worker.pid, "pid inside:", report.pid)

        for path in [b"/etc/passwd", b"/proc/self/status", b"relative.txt"]:
            await worker.channel.send(trio_mojo.Message(path))
            reply = await worker.channel.receive()
            print(path.decode(), "->", reply.payload.decode())


trio.run(main)
