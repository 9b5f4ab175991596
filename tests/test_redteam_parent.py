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
from typing import Final

import trio
from _redteam_support import PROBE, STRICT, ask, ask_once, finding, require

from trio_mojo import (
    ChannelError,
    Message,
    WorkerError,
    open_worker,
    open_worker_pool,
)

SHARE_A_PIPE: Final = "trio_mojo._hostile:share_a_pipe"
HAND_BACK: Final = "trio_mojo._hostile:hand_back_channel_and_die"


# ----------------------------------------------------------------------
# Time


@finding(
    "the parent drains a worker's stderr as fast as the worker writes and keeps "
    "only its last 8 KiB: a worker makes the parent read gigabytes per second "
    "(measured 2.1-2.9 GiB/s, 0.6 s of the parent's CPU per second) for as long as "
    "it likes"
)
async def test_a_worker_cannot_make_the_parent_read_its_stderr_without_bound() -> None:
    result = await ask_once(STRICT, "flood_stderr", seconds=1.0)
    assert result["written_mib"] <= 16, f"the parent read {result} in 1 s"


@finding(
    "an fd a worker hands over shares its open file description with the copy "
    "the worker keeps: the worker clears O_NONBLOCK on a pipe the parent reads "
    "with trio.lowlevel.FdStream, and the parent's read blocks its whole event "
    "loop (no task, timeout or cancellation runs) until the worker writes"
)
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


@finding(
    "with open_worker(stdout=None) the worker's fd 1 is the parent's own stdout, "
    "the same open file description: the worker makes it non-blocking, and the "
    "parent's next print to a pipe or terminal that is not read fast enough "
    "raises BlockingIOError"
)
async def test_a_worker_cannot_change_the_parent_s_stdout() -> None:
    with _stdout_is_a_pipe():
        require(os.get_blocking(1), "stdout was already non-blocking")
        async with open_worker(PROBE, sandbox=STRICT, stdout=None) as worker:
            result = await ask(worker, "set_blocking", fd=1, blocking=False)
        require(result == {"blocking": False}, f"the worker failed: {result}")
        blocking = os.get_blocking(1)
    assert blocking, "the parent's stdout is non-blocking now"


# ----------------------------------------------------------------------
# Believing a dead worker alive


@finding(
    "the parent learns that a worker died only from the end of its channel: a "
    "worker that hands the parent a copy of its own end of the channel, then "
    "exits, leaves receive() waiting for ever while the parent holds that fd"
)
async def test_a_worker_that_exited_is_noticed_whatever_the_parent_holds() -> None:
    async with open_worker(HAND_BACK, sandbox=STRICT) as worker:
        await worker.channel.send(Message(b"anything"))
        with await worker.channel.receive() as reply:
            require(len(reply.handles) == 1, "no fd came")
            with trio.move_on_after(2) as waited:
                with contextlib.suppress(trio.EndOfChannel, ChannelError):
                    await worker.channel.receive()
    assert not waited.cancelled_caught, "receive() still waited for a dead worker"


@finding(
    "a pool worker that answers one request with a copy of its own end of the "
    "channel, then exits: while the caller holds the reply's fd, the pool sees "
    "no end of the channel, and the requests the dead worker held never fail "
    "(nor end, without request_timeout)"
)
async def test_a_pool_fails_the_requests_of_a_worker_that_exited() -> None:
    async with open_worker_pool(HAND_BACK, workers=1, sandbox=STRICT) as pool:
        with await pool.run(Message(b"first")) as reply:
            require(len(reply.handles) == 1, "no fd came")
            with trio.move_on_after(3) as waited:
                with contextlib.suppress(WorkerError):
                    await pool.run(Message(b"second"))
    assert not waited.cancelled_caught, "the request waited for a dead worker"
