"""Start plain_child.py with a channel and talk to it."""

import os
import sys
from pathlib import Path

import trio

import trio_mojo

CHILD = Path(__file__).with_name("plain_child.py")


async def main() -> None:
    argv = [sys.executable, str(CHILD)]  # the switch is appended to argv
    async with (
        trio_mojo.open_process_with_channel(argv) as child,
        trio_mojo.open_channel(child.endpoint) as channel,
    ):
        read_end, write_end = os.pipe()
        os.write(write_end, b"shout this")
        os.close(write_end)
        await channel.send(trio_mojo.Message(b"upper", [trio_mojo.Handle(read_end)]))
        print((await channel.receive()).payload)

        await channel.send(trio_mojo.Message(b"pipe"))
        with await channel.receive() as reply:
            print(reply.payload, os.read(reply.handles[0].fileno(), 100))
    # Leaving the block closes the channel first: the child reads a clean end
    # of stream and returns.  Then it waits for the child and reaps it.
    print("child exited with", child.process.returncode)


trio.run(main)
