"""Chaos: the peer process SIGKILLed mid-exchange; a worker killed any time.

Each run is seeded (the seed is in the test id; ``TRIO_MOJO_CHAOS_SEED=N``
replays one).  The peer is a real child process; it is killed at a random
point, and the parent must see only the documented outcomes of a vanished
peer (``trio.EndOfChannel`` at a message boundary, :class:`DisconnectedError`
otherwise; :class:`WorkerError` with ``-SIGKILL`` from ``open_worker``),
every message it did get back must be exactly one it sent, in order, with
its fds, and nothing may be left: fds (conftest), tasks, child processes.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import trio
from _chaos_support import (
    SourcePipes,
    chaos_seeds,
    nothing_left_behind,
    peer_command,
    send_owned,
    source_pipes,
)
from _process_support import assert_reaped, children

from trio_mojo import (
    Channel,
    ChannelError,
    DisconnectedError,
    FileAccess,
    Message,
    SandboxPolicy,
    Worker,
    WorkerError,
    open_channel,
    open_process_with_channel,
    open_worker,
)

EXCHANGE = 10_000
SOURCES = 4
"""Pipes whose dups the messages carry (see :class:`SourcePipes`)."""


def _plan(rng: random.Random) -> list[tuple[int, list[int]]]:
    """Per message: payload size and which source pipes its fds dup."""
    plan = []
    for _ in range(EXCHANGE):
        roll = rng.random()
        size = (
            rng.randrange(200)
            if roll < 0.9
            else rng.randrange(4096, 65536)
            if roll < 0.995
            else rng.randrange(256 * 1024, 1024 * 1024)
        )
        count = rng.choice((0, 0, 1, 2, 3)) if rng.random() < 0.995 else 200
        plan.append((size, [rng.randrange(SOURCES) for _ in range(count)]))
    return plan


def _payload(index: int, size: int) -> bytes:
    stamp = index.to_bytes(4, "little")
    return (stamp * (size // 4 + 1))[: max(size, 4)]


@pytest.mark.parametrize("seed", chaos_seeds(default=2, slow=20))
async def test_peer_killed_at_a_random_point_of_an_exchange_with_fds(
    seed: int,
) -> None:
    rng = random.Random(seed)
    plan = _plan(rng)
    kill_at = rng.randrange(1, EXCHANGE)
    kill_on = rng.choice(("sent", "received"))
    sent = received = 0
    ends: list[str] = []

    async def send_all(channel: Channel, sources: SourcePipes, pid: int) -> None:
        nonlocal sent
        try:
            for index, (size, fds) in enumerate(plan):
                if kill_on == "sent" and index == kill_at:
                    os.kill(pid, signal.SIGKILL)
                await send_owned(channel, _payload(index, size), sources.handles(fds))
                sent += 1
        except DisconnectedError:
            ends.append("send: disconnected")

    async def receive_all(channel: Channel, sources: SourcePipes, pid: int) -> None:
        nonlocal received
        try:
            while True:
                with await channel.receive() as message:
                    size, fds = plan[received]
                    assert message.payload == _payload(received, size), (
                        f"seed={seed}: message {received} differs"
                    )
                    assert sources.matches(message.handles, fds), (
                        f"seed={seed}: message {received}: wrong fds"
                    )
                received += 1
                if kill_on == "received" and received == kill_at:
                    os.kill(pid, signal.SIGKILL)
        except trio.EndOfChannel:
            ends.append("receive: end of channel")
        except DisconnectedError:
            ends.append("receive: disconnected")

    with source_pipes(SOURCES) as sources:
        async with nothing_left_behind(seed):
            with trio.fail_after(60):
                async with open_process_with_channel(peer_command("echo")) as child:
                    try:
                        async with (
                            open_channel(child.endpoint) as channel,
                            trio.open_nursery() as nursery,
                        ):
                            nursery.start_soon(send_all, channel, sources, child.pid)
                            await receive_all(channel, sources, child.pid)
                    except DisconnectedError:
                        # Leaving the block flushed into a dead peer: data
                        # was lost, which the exit reports (documented).
                        ends.append("exit: disconnected")
                assert child.returncode == -signal.SIGKILL
                assert_reaped(child.pid)
    assert received <= sent <= EXCHANGE, f"seed={seed}: {received=} {sent=}"
    assert any(end.startswith("receive") for end in ends), f"seed={seed}: {ends}"


@pytest.mark.parametrize("seed", chaos_seeds(default=2, slow=10))
async def test_worker_killed_while_its_broker_serves(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    root = tmp_path / "files"
    root.mkdir()
    names = []
    for i in range(20):
        (root / f"f{i}.txt").write_bytes(b"%d" % i * rng.randrange(1, 5000))
        names.append(f"f{i}.txt")
    os.mkfifo(root / "fifo")  # refused (not a regular file)
    names += ["fifo", "missing.txt", "../outside.txt"]
    requests = [f"r {root}/{rng.choice(names)}" for _ in range(300)]
    kill_after_reply = rng.randrange(len(requests)) if rng.random() < 0.5 else None
    kill_delay = rng.uniform(0, 0.05)
    replies = 0
    started: list[Worker] = []

    async def send_requests(worker: Worker) -> None:
        try:
            for request in requests:
                await worker.channel.send(Message(request.encode()))
        except ChannelError:
            return  # the worker is gone; the receiver reports it

    async def kill_later(worker: Worker) -> None:
        await trio.sleep(kill_delay)
        os.kill(worker.pid, signal.SIGKILL)

    async def exchange(worker: Worker) -> None:
        """Receive replies until the worker is gone; then raise why."""
        nonlocal replies
        ended: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_requests, worker)
            if kill_after_reply is None:
                nursery.start_soon(kill_later, worker)
            try:
                while True:
                    with await worker.channel.receive() as reply:
                        assert reply.payload.startswith((b"ok ", b"refused ")), (
                            f"seed={seed}: {reply.payload[:80]!r}"
                        )
                    replies += 1
                    if replies == kill_after_reply:
                        os.kill(worker.pid, signal.SIGKILL)
            except (trio.EndOfChannel, ChannelError) as exc:
                ended = exc
                nursery.cancel_scope.cancel()
        assert ended is not None
        raise ended  # outside the nursery: open_worker sees it bare

    async def run() -> None:
        async with open_worker(
            "trio_mojo._examples:broker_reader",
            sandbox=SandboxPolicy.basic(),
            file_access=FileAccess.read_only(root),
        ) as worker:
            started.append(worker)
            await exchange(worker)

    async with nothing_left_behind(seed):
        with trio.fail_after(60), pytest.raises(WorkerError) as info:
            await run()
    (worker,) = started
    assert info.value.returncode == -signal.SIGKILL, f"seed={seed}: {info.value}"
    assert worker.broker is not None
    answered = worker.broker.served + worker.broker.refused
    assert replies <= answered <= len(requests), f"seed={seed}: {replies}, {answered}"
    assert_reaped(worker.pid)


@pytest.mark.parametrize("seed", chaos_seeds(default=2, slow=10))
async def test_worker_killed_at_a_random_moment_of_its_life(seed: int) -> None:
    # From its start (before its sandbox report) to its traffic.
    delay = random.Random(seed).uniform(0, 0.6)

    async def kill_our_children_later() -> None:
        await trio.sleep(delay)
        for pid in children():
            os.kill(pid, signal.SIGKILL)

    async def run() -> None:
        async with open_worker(
            "trio_mojo._examples:echo", sandbox=SandboxPolicy.basic()
        ) as worker:
            while True:
                await worker.channel.send(Message(b"ping"))
                with await worker.channel.receive() as reply:
                    assert reply.payload == b"ping"

    async with nothing_left_behind(seed):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_our_children_later)
                with pytest.raises(WorkerError) as info:
                    await run()
    assert info.value.returncode == -signal.SIGKILL, f"seed={seed}: {info.value}"
