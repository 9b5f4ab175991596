"""Red team: what a hostile worker can make its parent do, hold, wait for or believe.

Each test runs a target of ``trio_mojo._hostile`` as a ``strict()`` worker
of this process; findings are marked with the harm
(``_redteam_support.finding``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any, Final

import pytest
import trio
from _redteam_support import PROBE, STRICT, ask, ask_once, require

from trio_mojo import (
    ChannelError,
    MalformedMessageError,
    Message,
    WorkerError,
    open_worker,
    open_worker_pool,
)

SHARE_A_PIPE: Final = "trio_mojo._hostile:share_a_pipe"
HAND_BACK: Final = "trio_mojo._hostile:hand_back_channel_and_die"
SEND_LARGE: Final = "trio_mojo._hostile:send_large"


# ----------------------------------------------------------------------
# Time


async def test_a_worker_cannot_make_the_parent_read_its_stderr_without_bound() -> None:
    """The parent reads a running worker's stderr at a bounded rate (it read
    2-3 GiB/s, 0.6 s of its CPU per second, to keep 8 KiB)."""
    result = await ask_once(STRICT, "flood_stderr", seconds=1.0)
    assert result["written_mib"] <= 16, f"the parent read {result} in 1 s"


async def test_a_worker_cannot_freeze_the_event_loop_through_a_pipe_it_handed_over() -> (
    None
):
    async with open_worker(SHARE_A_PIPE, sandbox=STRICT) as worker:
        await worker.channel.send(Message(b"a pipe, please"))
        with await worker.channel.receive() as reply:
            stream = trio.lowlevel.FdStream(reply.handles[0].detach())
        async with stream:
            await worker.channel.send(Message(json.dumps({"delay": 1.0}).encode()))
            (await worker.channel.receive()).close()
            ticked = trio.Event()

            async def tick() -> None:
                await trio.sleep(0.1)
                ticked.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                require(await stream.receive_some(1) == b"!", "nothing came")
                frozen = not ticked.is_set()
    assert not frozen, "no other task ran while the parent waited for the pipe"


# ----------------------------------------------------------------------
# Memory


async def test_a_worker_cannot_make_the_parent_hold_a_256_mib_message() -> None:
    # Cut off, the worker fails too (its send's write error), or not.
    with contextlib.suppress(WorkerError):
        async with open_worker(SEND_LARGE, sandbox=STRICT) as worker:
            await worker.channel.send(Message(b"32"))
            with pytest.raises(MalformedMessageError, match="max_message_size"):
                await worker.channel.receive()
            held = worker.channel.statistics().read_buffer_bytes
            assert held == 0, f"the parent holds {held} bytes of a refused message"


async def test_a_worker_channel_takes_larger_messages_when_asked_to() -> None:
    async with open_worker(
        SEND_LARGE, sandbox=STRICT, max_message_size=64 << 20
    ) as worker:
        await worker.channel.send(Message(b"32"))
        with await worker.channel.receive() as reply:
            assert len(reply.payload) == 32 << 20


@contextlib.contextmanager
def _stdout_is_a_pipe() -> Iterator[int]:
    """Make fd 1 a pipe's write end for the block (fd 1 is restored after);
    yields the pipe's read end."""
    saved = os.dup(1)
    read_end, write_end = os.pipe()
    try:
        os.dup2(write_end, 1)
        yield read_end
    finally:
        os.dup2(saved, 1)
        for fd in (saved, read_end, write_end):
            os.close(fd)


@pytest.mark.parametrize("stdout", [None, 1], ids=["None", "fd-1"])
async def test_a_worker_cannot_change_the_parent_s_stdout(stdout: Any) -> None:
    """The parent's own stdout is refused (with ``stdout=None`` the worker
    made it non-blocking, and the parent's next print to a slow pipe raised
    ``BlockingIOError``)."""
    with _stdout_is_a_pipe():
        require(os.get_blocking(1), "stdout was already non-blocking")
        try:
            async with open_worker(PROBE, sandbox=STRICT, stdout=stdout) as worker:
                result = await ask(worker, "set_blocking", fd=1, blocking=False)
        except ValueError:
            return  # refused before anything started
        require(result == {"blocking": False}, f"the worker failed: {result}")
        blocking = os.get_blocking(1)
    assert blocking, "the parent's stdout is non-blocking now"


# ----------------------------------------------------------------------
# Believing a dead worker alive


async def test_a_worker_that_exited_is_noticed_whatever_the_parent_holds() -> None:
    """The worker's exit ends its channel, even while the parent holds a
    copy of the worker's end (receive() waited for ever)."""
    async with open_worker(HAND_BACK, sandbox=STRICT) as worker:
        await worker.channel.send(Message(b"anything"))
        with await worker.channel.receive() as reply:
            require(len(reply.handles) == 1, "no fd came")
            with trio.move_on_after(2) as waited:
                with contextlib.suppress(trio.EndOfChannel, ChannelError):
                    await worker.channel.receive()
    assert not waited.cancelled_caught, "receive() still waited for a dead worker"


async def test_a_pool_fails_the_requests_of_a_worker_that_exited() -> None:
    """A pool worker's exit fails the requests it held, even while a caller
    holds a copy of the worker's end of its channel (they waited for ever)."""
    async with open_worker_pool(HAND_BACK, workers=1, sandbox=STRICT) as pool:
        with await pool.run(Message(b"first")) as reply:
            require(len(reply.handles) == 1, "no fd came")
            with trio.move_on_after(3) as waited:
                with contextlib.suppress(WorkerError):
                    await pool.run(Message(b"second"))
    assert not waited.cancelled_caught, "the request waited for a dead worker"
