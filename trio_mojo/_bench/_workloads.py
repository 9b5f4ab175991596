"""What is measured: the workloads W1-W5x8 and the systems (peers) compared.

The workloads and their full counts are those of
``performance_baseline.md``; ``--quick`` uses smaller counts (chosen so
that the slowest peer, anyio on Trio, spends about a second per run).
"""

from __future__ import annotations

import importlib.util
import statistics
from dataclasses import dataclass
from typing import Final

__all__ = ["SYSTEMS", "WORKLOADS", "System", "Workload"]


@dataclass(frozen=True)
class Workload:
    """One traffic pattern: ``count`` messages of ``payload_size`` bytes."""

    name: str
    title: str
    payload_size: int
    fds_per_message: int
    pingpong: bool
    full_count: int
    quick_count: int
    unit: str
    concurrency: int = 1
    """Request/response pairs in flight at once on the one channel."""
    worker: bool = False
    """The peer is a ``strict()`` sandboxed worker from ``open_worker``."""
    compare_with: str = ""
    """Another workload whose peers' figures this one's ratios use (W4w:
    the peers have no sandboxed worker, so W4w is set against their W4)."""

    @property
    def higher_is_better(self) -> bool:
        return not self.pingpong

    def count(self, *, quick: bool, scale: float) -> int:
        base = self.quick_count if quick else self.full_count
        floor = 200 if self.pingpong else 2  # W4 drops its first 100 round trips
        return max(floor, round(base * scale))

    def figure(self, count: int, elapsed: float, rtts_ns: list[int]) -> float:
        """The headline figure of one run (for W4: RTT p50 in microseconds)."""
        if self.pingpong:
            return percentile(rtts_ns[100:], 50) / 1000
        if self.fds_per_message:
            return count * self.fds_per_message / elapsed
        if self.unit == "MB/s":
            return count * self.payload_size / elapsed / 1e6
        return count / elapsed


def percentile(values: list[int], pct: float) -> float:
    """The ``pct`` percentile (nearest rank on the sorted values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return float(ordered[rank])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


WORKLOADS: Final = (
    Workload("W1", "64 B messages one way", 64, 0, False, 1_000_000, 20_000, "msg/s"),
    Workload("W2", "16 KiB messages one way", 16384, 0, False, 65_536, 4_096, "MB/s"),
    Workload("W3", "4 MiB messages one way", 4 << 20, 0, False, 256, 24, "MB/s"),
    Workload("W4", "64 B ping-pong", 64, 0, True, 50_000, 1_000, "RTT p50 us"),
    Workload(
        "W4c10",
        "64 B request/response, 10 in flight on one channel",
        64,
        0,
        True,
        50_000,
        2_000,
        "RTT p50 us",
        concurrency=10,
    ),
    Workload(
        "W4w",
        "64 B ping-pong with a strict() sandboxed worker",
        64,
        0,
        True,
        50_000,
        1_000,
        "RTT p50 us",
        worker=True,
        compare_with="W4",
    ),
    Workload("W5", "8 B + 1 fd per message", 8, 1, False, 100_000, 10_000, "fds/s"),
    Workload("W5x8", "8 B + 8 fds per message", 8, 8, False, 12_500, 1_250, "fds/s"),
)


@dataclass(frozen=True)
class System:
    """One peer implementation of the same framing, in ``module``."""

    name: str
    label: str
    module: str
    passes_fds: bool
    requires: tuple[str, ...] = ()
    is_async: bool = True
    concurrent: bool = False
    """It implements W4c10 (many requests in flight on one connection)."""
    workers: bool = False
    """It can start a sandboxed worker (W4w)."""
    only: tuple[str, ...] = ()
    """If set, the only workloads it runs."""

    def available(self) -> bool:
        return all(importlib.util.find_spec(name) is not None for name in self.requires)

    def runs(self, workload: Workload) -> bool:
        if self.only:
            return workload.name in self.only
        if workload.worker:
            return self.workers
        if workload.concurrency > 1 and not self.concurrent:
            return False
        return self.passes_fds or not workload.fds_per_message


SYSTEMS: Final = (
    System(
        "trio_mojo",
        "trio_mojo Channel",
        "_sys_trio_mojo",
        True,
        concurrent=True,
        workers=True,
    ),
    System(
        "mp",
        "multiprocessing.connection + reduction.sendfds",
        "_sys_mp",
        True,
        is_async=False,
        concurrent=True,
    ),
    System("raw", "blocking Python socket, batched", "_sys_raw", True, is_async=False),
    System("anyio_trio", "anyio UNIX stream on trio", "_sys_anyio", True, ("anyio",)),
    System(
        "anyio_asyncio", "anyio UNIX stream on asyncio", "_sys_anyio", True, ("anyio",)
    ),
    System(
        "raw_bytes",
        "blocking Python socket, batched, payloads copied into bytes",
        "_sys_raw",
        False,
        is_async=False,
        only=("W2", "W3"),
    ),
    System(
        "trio_floor",
        "one Trio task on a plain socket (the Trio floor)",
        "_sys_trio_floor",
        True,
        only=("W1", "W2", "W3", "W4", "W5", "W5x8"),
    ),
    System(
        "trio_floor_api",
        "trio_floor's W4 through trio_mojo's API: awaited send() and receive() of Messages",
        "_sys_trio_floor",
        False,
        only=("W4",),
    ),
    System(
        "trio_tasks",
        "a reader and a writer Trio task per side on a plain socket (the shape's floor)",
        "_sys_trio_tasks",
        True,
        only=("W1", "W2", "W3", "W5", "W5x8"),
    ),
    System("asyncio", "asyncio streams", "_sys_asyncio", False, concurrent=True),
    System(
        "uvloop",
        "asyncio streams + uvloop",
        "_sys_asyncio",
        False,
        ("uvloop",),
        concurrent=True,
    ),
)

REFERENCE: Final = "mp"
"""Every ratio in the report is against this system, measured in the same run."""
