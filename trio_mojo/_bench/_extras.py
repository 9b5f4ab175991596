"""Measurements beside the workloads: idle cost, worker start-up, memory bounds.

* **Idle**: CPU time and context switches of a process holding an open
  trio_mojo channel pair (a task blocked in ``receive()`` on each end) over
  a few seconds, next to a bare ``trio.sleep``.  Must be ~0: nothing polls.
* **Spawn**: ``open_worker(...)`` until the Worker is yielded (the child's
  first message, its sandbox report, has arrived and been checked) against
  the wall time of ``python -I -c "import trio"``.
* **Slow consumer**: 1,000,000 messages of 64 B into a
  receiver that consumes 10x slower than trio_mojo's own W1 rate; its
  peak RSS growth must stay under 32 MiB (backpressure, not buffering).
* **Trickle**: a raw writer announces a message of
  ``max_message_size`` (256 MiB) and then trickles its bytes; the
  receiver's memory must grow with the bytes received, not the size
  announced.
* **Forked**: W4 again for ``trio_mojo``, ``trio_floor`` and ``mp``, with
  the receiver forked from the sender (``_harness.run_forked``) instead
  of started as a fresh interpreter as in every other run.  Forked, the
  two interpreters share their heap's pages until they write them; the
  difference shows how much of a round trip is the memory traffic of the
  interpreter's own code and data, which the workloads' numbers include.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any, Final

import trio

import trio_mojo

from ._common import Meter, RunSpec, monotonic
from ._harness import run, run_forked, run_helper
from ._workloads import WORKLOADS

__all__ = [
    "RSS_LIMIT_KIB",
    "helper_main",
    "measure_forked",
    "measure_idle",
    "measure_slow_consumer",
    "measure_spawn",
    "measure_trickle",
]

RSS_LIMIT_KIB: Final = 32 * 1024
SPAWN_TARGET: Final = "trio_mojo._examples:echo"


# ---------------------------------------------------------------- helpers (child side)


FORKED_SYSTEMS: Final = ("trio_mojo", "trio_floor", "mp")


def helper_main(role: str, args: list[str]) -> dict[str, Any]:
    if role == "idle":
        return trio.run(_idle, float(args[0]))
    if role == "forked":
        return _forked(int(args[0]))
    return trio.run(_spawn, int(args[0]))


def _forked(count: int) -> dict[str, Any]:
    """W4's RTT p50 (us) per system, the receiver forked from the sender."""
    (w4,) = (workload for workload in WORKLOADS if workload.name == "W4")
    result: dict[str, Any] = {"count": count}
    for system in FORKED_SYSTEMS:
        spec = RunSpec(
            system=system,
            workload=w4.name,
            count=count,
            payload_size=w4.payload_size,
            pingpong=True,
        )
        record = run_forked(spec)
        if record["errors"]:
            result[system] = {"error": record["errors"][0]}
        else:
            result[system] = {
                "p50_us": w4.figure(count, 0.0, record["sender"]["rtts_ns"])
            }
    return result


async def _idle(seconds: float) -> dict[str, Any]:
    meter = Meter()
    await trio.sleep(0.1)  # warm up: the first pass of a fresh run loop is costly
    meter.start()
    await trio.sleep(seconds)
    meter.stop()
    bare = {"cpu_us": meter.cpu * 1e6, "ctx_switches": meter.ctx_switches}
    left, right = trio_mojo.channel_pair()

    async def wait(channel: trio_mojo.Channel) -> None:
        try:
            message = await channel.receive()
            message.close()
        except trio.EndOfChannel:
            pass

    async with (
        trio_mojo.open_channel(left) as a,
        trio_mojo.open_channel(right) as b,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(wait, a)
        nursery.start_soon(wait, b)
        await trio.sleep(0.05)  # both tasks blocked, both readers parked
        meter.start()
        t0 = monotonic()
        await trio.sleep(seconds)
        meter.stop()
        elapsed = monotonic() - t0
        nursery.cancel_scope.cancel()
    return {
        "seconds": elapsed,
        "cpu_us": meter.cpu * 1e6,
        "ctx_switches": meter.ctx_switches,
        "bare_trio_sleep": bare,
    }


async def _spawn(count: int) -> dict[str, Any]:
    open_worker = getattr(trio_mojo, "open_worker", None)
    policy_cls = getattr(trio_mojo, "SandboxPolicy", None)
    if open_worker is None or policy_cls is None:
        return {"error": "trio_mojo.open_worker is not available in this version"}
    policies = {"none": policy_cls.none(i_understand_this_is_unsandboxed=True)}
    result: dict[str, Any] = {}
    for name in ("basic", "default"):  # sandboxed, where this machine allows it
        factory = getattr(policy_cls, name, None)
        if factory is None:
            continue
        try:
            policies[name] = factory()
        except Exception as exc:  # reported, not fatal
            result[f"{name}_error"] = repr(exc)
    for name, policy in policies.items():
        times = []
        try:
            for _ in range(count):
                t0 = monotonic()
                async with open_worker(SPAWN_TARGET, sandbox=policy):
                    times.append(monotonic() - t0)
        except Exception as exc:  # reported, not fatal
            result[f"{name}_error"] = repr(exc)
            continue
        result[name] = times
    return result


# ---------------------------------------------------------------- driver side


def measure_forked(count: int) -> dict[str, Any]:
    return run_helper(["forked", str(count)], timeout=count * 0.01 + 60)


def measure_idle(seconds: float) -> dict[str, Any]:
    return run_helper(["idle", str(seconds)], timeout=seconds * 3 + 30)


def measure_spawn(count: int) -> dict[str, Any]:
    baseline = []
    bare = []
    for _ in range(count):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-I", "-c", "import trio"], check=True)
        baseline.append(time.monotonic() - t0)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
        bare.append(time.monotonic() - t0)
    result = run_helper(["spawn", str(count)], timeout=count * 40 + 30)
    result["python_import_trio"] = baseline
    result["python_bare"] = bare
    for key in ("none", "basic", "default", "python_import_trio", "python_bare"):
        if isinstance(result.get(key), list) and result[key]:
            result[key + "_median_ms"] = statistics.median(result[key]) * 1000
    return result


def measure_slow_consumer(
    count: int, consumer_rate: float, timeout: float
) -> dict[str, Any]:
    spec = RunSpec(
        system="trio_mojo",
        workload="slow-consumer",
        count=count,
        payload_size=64,
        mode="slow",
        consumer_rate=consumer_rate,
        timeout=timeout,
    )
    record = run(spec)
    receiver = record.get("receiver") or {}
    sender = record.get("sender") or {}
    growth = receiver.get("rss_growth_kib")
    elapsed = (receiver.get("t_end", 0.0) - sender.get("t0", 0.0)) if sender else 0.0
    return {
        "count": count,
        "consumer_rate": consumer_rate,
        "elapsed": elapsed,
        "achieved_rate": count / elapsed if elapsed > 0 else None,
        "rss_growth_kib": growth,
        "hwm_end_kib": receiver.get("hwm_end_kib"),
        "peaks": receiver.get("info", {}),
        "passed": (not record["errors"])
        and growth is not None
        and growth < RSS_LIMIT_KIB,
        "errors": record["errors"],
    }


def measure_trickle(total: int, chunk: int, interval: float) -> dict[str, Any]:
    spec = RunSpec(
        system="trio_mojo",
        workload="trickle",
        count=0,
        payload_size=0,
        mode="trickle",
        trickle_bytes=total,
        trickle_chunk=chunk,
        trickle_interval=interval,
        timeout=total / chunk * interval * 4 + 60,
    )
    record = run(spec)
    receiver = record.get("receiver") or {}
    info = receiver.get("info", {})
    samples: list[dict[str, Any]] = info.get("samples", [])
    announced = trio_mojo.DEFAULT_MAX_MESSAGE_SIZE
    received = max((s["bytes_received"] for s in samples), default=0)
    peak_growth = receiver.get("rss_growth_kib")
    # Proportional: growth within 2x the bytes received (+4 MiB of slack for
    # the 256 KiB read chunks and the allocator), far below the announcement.
    passed = (
        not record["errors"]
        and peak_growth is not None
        and received > 0
        and peak_growth * 1024 <= 2 * received + (4 << 20)
        and info.get("outcome") == "DisconnectedError"
    )
    return {
        "announced": announced,
        "bytes_received": received,
        "rss_growth_kib": peak_growth,
        "outcome": info.get("outcome"),
        "samples": _quartiles(samples),
        "passed": passed,
        "errors": record["errors"],
    }


def _quartiles(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples where about 1/4, 1/2, 3/4 and all of the bytes had arrived."""
    if not samples:
        return []
    final = samples[-1]["bytes_received"]
    picked = []
    for fraction in (0.25, 0.5, 0.75, 1.0):
        goal = final * fraction
        picked.append(next(s for s in samples if s["bytes_received"] >= goal))
    return picked
