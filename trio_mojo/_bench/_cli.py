"""``python -m trio_mojo bench``: the command line and the driver loop."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import _extras
from ._common import RunSpec
from ._harness import run
from ._report import render, summarise, versus_peers
from ._workloads import REFERENCE, SYSTEMS, WORKLOADS

__all__ = ["main"]

_DESCRIPTION = """\
Benchmark trio_mojo against what a Python program would use instead to talk
to a child process, on this machine.

Each run starts a fresh sender process; the sender starts the receiver as
its child over a socket pair; both run the system's own event loop.  Every
peer implements the same framing honestly (the receiver reads every byte
and closes every fd it gets; the sender checks the receiver's counts).

Workloads (full counts; --quick uses about 1/10 to 1/50 of them):
  W1     1,000,000 x 64 B one way                  [messages/s]
  W2     65,536 x 16 KiB one way (1 GiB)           [MB/s]
  W3     256 x 4 MiB one way                       [MB/s]
  W4     50,000 x 64 B ping-pong                   [round trip p50, us]
  W4c10  50,000 x 64 B requests, 10 in flight on one connection, each
         client waiting for its own reply          [round trip p50, us]
  W4w    50,000 x 64 B ping-pong with a worker from open_worker under
         SandboxPolicy.strict() (trio_mojo only; set against the peers' W4)
  W5     100,000 x (8 B + 1 fd) one way            [fds/s]
  W5x8   12,500 x (8 B + 8 fds) one way            [fds/s]

Systems: trio_mojo; mp (multiprocessing.connection + reduction.sendfds,
the reference of the "vs mp" ratios); raw (blocking sockets, batched: about
the fastest Python can go); raw_bytes (W2, W3 only: raw with every payload
copied into bytes, the least a receiver of bytes payloads pays); trio_floor
(not W4c10: one Trio task on a plain socket, the least any Trio program
pays per round trip, and per message through an awaited, cancellable
send/receive of a Message with its fds in Handles, never allocating a
payload at its announced size); trio_floor_api (W4 only: trio_floor's
round trip through awaited send() and receive() of Message objects, the
least trio_mojo's API costs); trio_tasks (the one-way workloads:
trio_floor in trio_mojo's task shape, a writer task and a reader task per
side, with its bounds and yields and nothing else); and when installed
anyio_trio, anyio_asyncio
(anyio UNIX streams), asyncio, uvloop (asyncio streams; no fd API, so no
W5/W5x8).

`python -m trio_mojo bench pool --help`: the JSON job through a worker pool
vs multiprocessing.Pool, trio-parallel and anyio.to_process.

`python -m trio_mojo bench spawn --help`: worker start-up (zygote, spawn,
multiprocessing) on its own.

`python -m trio_mojo bench instructions --help`: instructions per message
(both processes) under valgrind's callgrind, which the load of a shared
machine does not change.

The report ends with trio_mojo's speed relative to each peer.  Also
measured: CPU us per message (both processes, getrusage), the receiver's
peak RSS, the CPU of an idle open channel, worker start-up time against
`python -I -c "import trio"`, memory under a 10x slower consumer and
under a header announcing a huge message followed by a trickle, and W4
again with the receiver forked from the sender instead of started fresh
(the interpreters then share their pages).  Each
figure is the median of the repetitions; spread is (max - min) / median.
Timings are noisy on a shared machine: compare ratios within one run.
"""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trio_mojo bench",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="scaled-down counts and 2 repetitions (well under a minute)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions per (system, workload) (default: 3, --quick: 2)",
    )
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw each system's speed relative to mp as a bar chart "
        "(needs matplotlib: pip install matplotlib)",
    )
    parser.add_argument(
        "--systems",
        metavar="LIST",
        help="comma-separated systems (default: all installed; "
        + ", ".join(s.name for s in SYSTEMS)
        + ")",
    )
    parser.add_argument(
        "--workloads",
        metavar="LIST",
        help="comma-separated workloads (default: all; "
        + ", ".join(w.name for w in WORKLOADS)
        + ")",
    )
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the idle, spawn, memory and forked-receiver measurements",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="run both processes of every run under cProfile, "
        "writing DIR/<system>-<workload>-<rep>-{sender,receiver}.prof",
    )
    parser.add_argument("--seed", type=int, default=None, help="run-order shuffle seed")
    # Hidden: multiply every count (the test suite runs the whole bench tiny).
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if not args.scale > 0:
        parser.error("--scale must be positive")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib")
    args.selected_systems = _select(parser, args.systems, [s.name for s in SYSTEMS])
    args.selected_workloads = _select(
        parser, args.workloads, [w.name for w in WORKLOADS]
    )
    return args


def _select(
    parser: argparse.ArgumentParser, text: str | None, known: list[str]
) -> list[str]:
    if text is None:
        return known
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (known: {', '.join(known)})")
    return [item for item in known if item in chosen]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _environment() -> str:
    return " | ".join(
        [
            f"Python {platform.python_version()}",
            f"trio {_version('trio')}",
            f"anyio {_version('anyio')}",
            f"uvloop {_version('uvloop')}",
            f"{platform.system()} {platform.release()} {platform.machine()}",
            f"{os.cpu_count()} CPUs",
        ]
    )


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every honesty check passed."""
    if argv and argv[0] == "pool":  # the JSON job through worker pools: _pool.py
        from ._pool import main as pool_main

        return pool_main(argv[1:])
    if argv and argv[0] == "spawn":  # worker start-up on its own: _spawn.py
        from ._spawn import main as spawn_main

        return spawn_main(argv[1:])
    if argv and argv[0] == "instructions":  # counted under callgrind
        from ._instructions import main as instructions_main

        return instructions_main(argv[1:])
    args = _parse(argv)
    quick = args.quick
    reps = args.reps if args.reps is not None else (2 if quick else 3)
    systems = [s for s in SYSTEMS if s.name in args.selected_systems and s.available()]
    skipped = [
        s.name for s in SYSTEMS if s.name in args.selected_systems and not s.available()
    ]
    if skipped:
        _progress(f"[bench] not installed, skipped: {', '.join(skipped)}")
    workloads = [w for w in WORKLOADS if w.name in args.selected_workloads]
    counts = {w.name: w.count(quick=quick, scale=args.scale) for w in workloads}
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    timeout = 120.0 if quick else 900.0
    plan = [(s, w) for s in systems for w in workloads if s.runs(w)]
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    total = len(plan) * reps
    for rep in range(reps):
        order = plan[:]
        rng.shuffle(order)  # slow drifts of a shared machine hit every system
        for system, workload in order:
            profile_path = None
            if profile_dir is not None:
                profile_path = str(profile_dir / f"{system.name}-{workload.name}-{rep}")
            spec = RunSpec(
                system=system.name,
                workload=workload.name,
                count=counts[workload.name],
                payload_size=workload.payload_size,
                fds_per_message=workload.fds_per_message,
                pingpong=workload.pingpong,
                concurrency=workload.concurrency,
                worker=workload.worker,
                profile_path=profile_path,
                timeout=timeout,
            )
            record = run(spec)
            record["rep"] = rep
            records.append(record)
            _progress(_describe(len(records), total, record))
    summary = summarise(records)
    result: dict[str, Any] = {
        "meta": {
            "mode": "quick" if quick else "full",
            "scale": args.scale,
            "reps": reps,
            "environment": _environment(),
            "counts": counts,
            "systems": [s.name for s in systems],
            "skipped_systems": skipped,
            "workloads": [w.name for w in workloads],
            "reference": REFERENCE,
            "seconds": 0.0,
        },
        "summary": summary,
        "versus_peers": versus_peers(summary),
        "runs": records,
    }
    failures = [
        f"{r['spec']['system']} {r['spec']['workload']} rep {r['rep']}: "
        + "; ".join(r["errors"])
        for r in records
        if r["errors"]
    ]
    result["honesty"] = {
        "runs": len(records),
        "passed": len(records) - len(failures),
        "failures": failures,
    }
    if not args.no_extras:
        result["extras"] = _run_extras(args, quick, summary)
    result["meta"]["seconds"] = time.monotonic() - started
    print(render(result), end="")
    print(f"({result['meta']['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    if args.plot:
        from ._plot import plot  # matplotlib is imported only when asked for

        plot(result, Path(args.plot))
        print(f"plot written to {args.plot}")
    extras_failed = any(
        not extra.get("passed", True)
        for extra in result.get("extras", {}).values()
        if isinstance(extra, dict)
    )
    return 1 if failures or extras_failed else 0


def _describe(index: int, total: int, record: dict[str, Any]) -> str:
    spec = record["spec"]
    prefix = f"[{index}/{total}] {spec['system']:<14} {spec['workload']:<5}"
    if record["errors"]:
        return f"{prefix} FAILED: {record['errors'][0][:300]}"
    elapsed = record["receiver"]["t_end"] - record["sender"]["t0"]
    return f"{prefix} {elapsed:8.3f} s"


def _run_extras(
    args: argparse.Namespace, quick: bool, summary: dict[str, Any]
) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    scale = args.scale
    idle_seconds = 1.0 if quick or scale < 1 else 2.0
    _progress(f"[bench] idle channel, {idle_seconds:.0f} s")
    extras["idle"] = _extras.measure_idle(idle_seconds)
    spawns = 3 if quick or scale < 1 else 5
    _progress(f"[bench] worker spawn x {spawns}")
    extras["spawn"] = _extras.measure_spawn(spawns)
    # The producer's pace: trio_mojo's W1 rate from this run, else a guess.
    w1 = summary.get("W1", {}).get("trio_mojo", {}).get("median", math.nan)
    producer_rate = w1 if w1 > 0 else 100_000.0
    count = max(1000, round((100_000 if quick else 1_000_000) * scale))
    consumer_rate = producer_rate / 10
    _progress(
        f"[bench] slow consumer: {count:,} messages at {consumer_rate:,.0f} msg/s"
    )
    extras["slow_consumer"] = _extras.measure_slow_consumer(
        count, consumer_rate, timeout=count / consumer_rate * 3 + 60
    )
    total = max(1 << 20, round((8 << 20 if quick else 32 << 20) * scale))
    _progress(f"[bench] trickle: {total / 2**20:.0f} MiB")
    extras["trickle"] = _extras.measure_trickle(total, 16 * 1024, 0.001)
    pingpongs = max(1000, round((2_000 if quick else 20_000) * scale))
    _progress(f"[bench] W4 with a forked receiver: {pingpongs:,} round trips")
    extras["forked"] = _extras.measure_forked(pingpongs)
    return extras
