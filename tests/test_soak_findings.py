"""Findings of the soak (``tests/soak/run.py``), one test each.

Each was ``xfail(strict=True)`` until the owner of the code fixed it; all
are fixed now and stay as regression tests (the zygote registers a fork
request before sending it; ``ETOOMANYREFS`` is back-pressure; a worker
reads ahead no more fds than its limit leaves).
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import trio

from trio_mojo import Handle, Message, SandboxPolicy, open_worker, open_zygote
from trio_mojo._channel import _YIELD_EVERY
from trio_mojo._workers._bootstrap import read_ahead_handles

BASIC = SandboxPolicy.basic()
MODULE = "trio_mojo._examples_pool"
TARGET = f"{MODULE}:echo"


class _SlowAfterEachStep(trio.abc.Instrument):
    """Stall the run after each step of one task: what a busy process does.

    The zygote's reply to a fork request then arrives before that task runs
    again.
    """

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            time.sleep(0.05)


async def test_a_fork_reply_routed_before_its_request_is_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was a finding: the reply was "not pending" and the zygote was killed
    (``WorkerError: the zygote ... broke its control channel``)."""
    # Trio runs a batch of runnable tasks last-woken first, or (half the
    # time, at random) in reverse.  Never reversed: of two tasks woken for
    # the same batch, the later one (here: the zygote's dispatcher, woken by
    # the reply) runs first.  The soak hit that order after 128 forks.
    monkeypatch.setattr(trio._core._run, "_ALLOW_DETERMINISTIC_SCHEDULING", False)
    monkeypatch.setattr(trio._core._run._r, "random", lambda: 1.0)
    async with open_zygote(preload=[MODULE], sandbox=BASIC) as zygote:
        for _ in range(_YIELD_EVERY - 1):
            async with open_worker(TARGET, zygote=zygote, sandbox=BASIC):
                pass
        # The next request is the control channel's _YIELD_EVERY-th send.
        instrument = _SlowAfterEachStep(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(instrument)
        try:
            async with open_worker(TARGET, zygote=zygote, sandbox=BASIC):
                pass
        finally:
            trio.lowlevel.remove_instrument(instrument)
        assert zygote.forked == _YIELD_EVERY


FDS_PER_MESSAGE = 16
ECHOES = 24
"""384 fds echoed in all: more than a ``strict()`` worker's 256 open files."""


@pytest.mark.skipif(
    os.geteuid() != 0, reason="measured with a root parent (the uid drop needs one)"
)
async def test_a_worker_answering_with_fds_waits_while_too_many_are_in_flight() -> None:
    # The parent's channel reads ahead at most 16 fds: the rest of the
    # worker's replies wait in the socket, their fds in flight.  strict(),
    # whose worker has ids of its own: nothing else counts against them.
    async with open_worker(
        "trio_mojo._examples_pool:echo", receive_queue_handles=FDS_PER_MESSAGE
    ) as worker:
        for serial in range(ECHOES):
            handles = [
                Handle(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
                for _ in range(FDS_PER_MESSAGE)
            ]
            await worker.channel.send(Message(serial.to_bytes(4, "little"), handles))
            await trio.sleep(0.01)  # time to echo it before the next one comes
        for serial in range(ECHOES):
            with trio.fail_after(10):
                reply = await worker.channel.receive()
            with reply:
                assert reply.payload == serial.to_bytes(4, "little")
                assert len(reply.handles) == FDS_PER_MESSAGE


@pytest.mark.skipif(
    os.geteuid() != 0, reason="measured with a root parent (the uid drop needs one)"
)
async def test_a_strict_worker_reads_ahead_no_more_fds_than_it_may_open() -> None:
    gates: list[int] = []
    try:
        async with open_worker("trio_mojo._examples_pool:gated") as worker:
            for serial in range(ECHOES):
                handles = []
                for _ in range(FDS_PER_MESSAGE):
                    read_end, write_end = os.pipe2(os.O_CLOEXEC)
                    handles.append(Handle(read_end))
                    gates.append(write_end)
                await worker.channel.send(Message(b"%d" % serial, handles))
            # The target waits at the first request's gate; its channel reads on.
            await trio.sleep(0.5)
            for gate in gates:
                with contextlib.suppress(BrokenPipeError):  # the worker died
                    os.write(gate, b"x")
            for serial in range(ECHOES):
                with trio.fail_after(10):
                    reply = await worker.channel.receive()
                with reply:
                    assert reply.payload == b"%d" % serial
    finally:
        for gate in gates:
            os.close(gate)


def test_a_worker_reads_ahead_what_its_fd_limit_leaves() -> None:
    assert read_ahead_handles(256) == 64  # strict(): 256 - 128 - 64
    assert read_ahead_handles(1024) == 506  # the channel's own default
    assert read_ahead_handles(100) == 1  # always room for one message's fds
