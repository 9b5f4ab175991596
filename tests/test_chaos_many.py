"""Chaos: 100 channels in one process with traffic while half are torn down.

Every pair plays ping-pong with an fd in each message.  At a random moment
half of the pairs are torn down while the traffic runs, each in a random
way (both ends cancelled, one end aborted, one end leaving its block
normally, the socket of one end shut down under it); the other half must
finish every round exactly.  A torn-down pair may only end in a documented
way, and the whole run leaves no fd, task or process behind.
"""

from __future__ import annotations

import random
import socket

import pytest
import trio
import trio.lowlevel
from _chaos_support import (
    SourcePipes,
    chaos_seeds,
    nothing_left_behind,
    send_owned,
    source_pipes,
)

from trio_mojo import (
    Channel,
    DisconnectedError,
    Endpoint,
    Handle,
    channel_pair,
    open_channel,
)

PAIRS = 100
TEARDOWNS = ("cancel-both", "abort-one", "leave-one", "shutdown-socket")


class _Pair:
    """One ping-pong pair and the switches that tear it down."""

    def __init__(self, index: int, rounds: int, sizes: list[int]) -> None:
        self.index = index
        self.rounds = rounds
        self.sizes = sizes
        self.completed = 0
        self.scope = trio.CancelScope()  # both ends
        self.left_scope = trio.CancelScope()  # the pinging end only
        self.leave = trio.Event()
        # A dup of the pinging end's socket, closed with its channel:
        # shutting it down reaches the channel's socket without touching an
        # fd number the channel owns.
        self.spare: Handle | None = None
        self.outcome = "running"
        self.echo_outcome = "clean"

    def tear_down(self, how: str) -> None:
        if how == "cancel-both":
            self.scope.cancel()
        elif how == "abort-one":
            self.left_scope.cancel()
        elif how == "leave-one":
            self.leave.set()
        else:  # the pinging end's socket is shut down under the channel
            assert self.spare is not None
            sock = socket.socket(fileno=self.spare.fileno())
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()

    async def run(self, sources: SourcePipes) -> None:
        a, b = channel_pair()
        self.spare = Handle.dup(a)
        with self.spare, a, b, self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._echo, b)
                await self._ping(a, sources)
        if self.scope.cancelled_caught:
            self.outcome = "cancelled"
        elif self.outcome == "running":
            self.outcome = "finished"

    async def _ping(self, endpoint: Endpoint, sources: SourcePipes) -> None:
        source = self.index % 2
        with self.left_scope:
            try:
                async with open_channel(endpoint) as channel:
                    await self._rounds(channel, sources, source)
            except DisconnectedError:
                self.outcome = "disconnected"
            finally:
                assert self.spare is not None
                self.spare.close()  # else the socket outlives the channel
        if self.left_scope.cancelled_caught:
            self.outcome = "aborted"

    async def _rounds(
        self, channel: Channel, sources: SourcePipes, source: int
    ) -> None:
        for round_ in range(self.rounds):
            if self.leave.is_set():
                self.outcome = "left"
                return
            payload = bytes([round_ % 256]) * self.sizes[round_]
            await send_owned(channel, payload, sources.handles([source]))
            try:
                reply = await channel.receive()
            except trio.EndOfChannel:
                self.outcome = "end of channel"
                return
            with reply:
                assert reply.payload == payload, f"pair {self.index}"
                assert sources.matches(reply.handles, [source])
            self.completed += 1

    async def _echo(self, endpoint: Endpoint) -> None:
        try:
            async with open_channel(endpoint) as channel:
                async for message in channel:
                    await send_owned(channel, message.payload, list(message.handles))
        except DisconnectedError:
            self.echo_outcome = "disconnected"  # the other end went away


@pytest.mark.parametrize("seed", chaos_seeds(default=1, slow=8))
async def test_a_hundred_channels_with_half_torn_down_mid_traffic(seed: int) -> None:
    rng = random.Random(seed)
    rounds = 40
    pairs = [
        _Pair(i, rounds, [rng.choice((0, 100, 5000, 70000)) for _ in range(rounds)])
        for i in range(PAIRS)
    ]
    doomed = {
        pair.index: rng.choice(TEARDOWNS) for pair in rng.sample(pairs, PAIRS // 2)
    }
    delay = rng.uniform(0.005, 0.1)

    async def tear_down_half() -> None:
        await trio.sleep(delay)
        for index, how in doomed.items():
            pairs[index].tear_down(how)
            await trio.lowlevel.checkpoint()  # traffic goes on between two teardowns

    with source_pipes(2) as sources:
        async with nothing_left_behind(seed):
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for pair in pairs:
                        nursery.start_soon(pair.run, sources)
                    nursery.start_soon(tear_down_half)
    for pair in pairs:
        if pair.index in doomed:
            assert pair.outcome in (
                "finished",  # it was done before its teardown came
                "cancelled",
                "aborted",
                "left",
                "end of channel",
                "disconnected",
            ), f"seed={seed}: pair {pair.index}, {doomed[pair.index]}: {pair.outcome}"
        else:
            assert (pair.outcome, pair.echo_outcome, pair.completed) == (
                "finished",
                "clean",
                rounds,
            ), f"seed={seed}: surviving pair {pair.index}"
