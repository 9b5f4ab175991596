"""The child process of the chaos tests: ``python _chaos_peer.py MODE [ARGS]``.

Started by :func:`trio_mojo.open_process_with_channel`, it recovers its
endpoint from ``--mojo-platform-channel-handle=N`` and runs one mode:

``echo``
    Send every message back with its fds until the end of the channel.
``nofile LIMIT [chromium]``
    Lower its own ``RLIMIT_NOFILE`` to ``LIMIT``, say ``b"ready"``, then
    receive until the channel ends or fails; print one JSON line: the
    handle counts received, the error (type and text), and the fds open
    before and after (which must be the same: nothing leaked).  With
    ``chromium`` the channel tolerates ``MSG_CTRUNC`` as Chromium does.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import trio

import trio_mojo

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _fds, not trio_mojo
from _fds import open_fds


async def echo() -> None:
    async with trio_mojo.open_channel(trio_mojo.recover_endpoint()) as channel:
        async for message in channel:
            await channel.send(message)


async def nofile(limit: int, chromium: bool) -> None:
    received: list[int] = []
    result: dict[str, object] = {"received": received}
    async with trio_mojo.open_channel(
        trio_mojo.recover_endpoint(), fail_on_truncated_handles=not chromium
    ) as channel:
        result["before"] = sorted(open_fds())
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            await channel.send(trio_mojo.Message(b"ready"))
            while True:
                with await channel.receive() as message:
                    received.append(len(message.handles))
        except (trio.EndOfChannel, trio_mojo.ChannelError) as exc:
            result["error"] = type(exc).__name__
            result["message"] = str(exc)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        result["after"] = sorted(open_fds())
    print(json.dumps(result), flush=True)


def main(argv: list[str]) -> None:
    mode, *args = [arg for arg in argv if not arg.startswith("--")]
    if mode == "echo":
        trio.run(echo)
    elif mode == "nofile":
        trio.run(nofile, int(args[0]), args[1:] == ["chromium"])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
