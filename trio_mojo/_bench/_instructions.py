"""``python -m trio_mojo bench instructions``: what a message costs, counted.

Timings on a shared machine swing two or three times with the load; the
number of instructions a program executes does not.  This runs each
(system, workload) of the benchmark under ``valgrind --tool=callgrind``,
which counts every user-space instruction of the sender process and of the
receiver it starts, twice: with N messages and with 3N.  The figure is
``(instructions(3N) - instructions(N)) / 2N``: both processes per message
(per round trip for W4), start-up, imports and warm-up subtracted.

What it counts: user-space instructions only.  The kernel's share (system
calls, the copies into and out of socket buffers, page faults) is not in
it, and a large ``memcpy`` counts about one instruction per byte (``rep
movsb``).  Read it as the work the interpreter does per message, which is
what differs most between the Python peers; wall-clock ratios come from
the main benchmark.  Trio runs on a clock slowed down as much as the
program is (see ``_clock``), so that timers fire as often per message as
they do at full speed.  Honesty checks apply as in the main benchmark.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

from ._common import RunSpec
from ._harness import run
from ._workloads import SYSTEMS, WORKLOADS, Workload

__all__ = ["main"]

COUNTS: Final = {
    "W1": 20_000,
    "W2": 4_000,
    "W3": 30,
    "W4": 1_000,
    "W4c10": 1_000,
    "W5": 10_000,
    "W5x8": 2_000,
}
"""N for each workload (the runs use N and 3N): enough that one message's
cost stands well above the noise of start-up (a few instructions)."""
DEFAULT_SYSTEMS: Final = ("trio_mojo", "trio_floor", "mp", "raw", "raw_bytes")
_CALLGRIND: Final = (
    "valgrind",
    "--tool=callgrind",
    "--trace-children=yes",
    "--dump-instr=no",
    "--collect-jumps=no",
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trio_mojo bench instructions",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    systems = [s.name for s in SYSTEMS]
    workloads = list(COUNTS)
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated (default: %(default)s; known: {', '.join(systems)})",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(workloads),
        help="comma-separated (default: %(default)s; W4w is not measured: "
        "a sandboxed worker does not run under valgrind)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every N by this (default: %(default)s)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    for option, known in (("systems", systems), ("workloads", workloads)):
        chosen = [item.strip() for item in getattr(args, option).split(",")]
        unknown = [item for item in chosen if item not in known]
        if unknown:
            parser.error(f"unknown: {', '.join(unknown)} (known: {', '.join(known)})")
        setattr(args, option, chosen)
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt install valgrind)")
    return args


def _spec(system: str, workload: Workload, count: int) -> RunSpec:
    return RunSpec(
        system=system,
        workload=workload.name,
        count=count,
        payload_size=workload.payload_size,
        fds_per_message=workload.fds_per_message,
        pingpong=workload.pingpong,
        concurrency=workload.concurrency,
        timeout=3600.0,
        valgrind=True,
    )


def _count(spec: RunSpec, directory: Path) -> tuple[int, list[str]]:
    """Instructions of every process of one run (and its honesty errors)."""
    out = directory / "callgrind.%p"
    record = run(spec, prefix=[*_CALLGRIND, f"--callgrind-out-file={out}"])
    total = 0
    for path in directory.glob("callgrind.*"):
        with path.open(encoding="ascii", errors="replace") as dump:
            for line in dump:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    errors: list[str] = record["errors"]
    return total, errors


def measure(system: str, workload: Workload, count: int) -> dict[str, Any]:
    """One (system, workload): instructions per message, from N and 3N."""
    totals = []
    errors: list[str] = []
    for n in (count, 3 * count):
        with tempfile.TemporaryDirectory(prefix="trio_mojo-callgrind-") as tmp:
            total, problems = _count(_spec(system, workload, n), Path(tmp))
        totals.append(total)
        errors += problems
    per_message = (totals[1] - totals[0]) / (2 * count)
    return {
        "count": count,
        "totals": totals,
        "per_message": per_message,
        "errors": errors,
    }


def render(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The table: thousands of instructions per message, and trio_mojo's ratio."""
    systems = [s.name for s in SYSTEMS if any(s.name in r for r in results.values())]
    head = ["workload", *systems]
    rows = [head, ["---"] * len(head)]
    for workload, row in results.items():
        cells = [workload]
        mine = row.get("trio_mojo", {}).get("per_message")
        for system in systems:
            cell = row.get(system)
            if cell is None:
                cells.append("n/a")
                continue
            text = f"{cell['per_message'] / 1000:,.1f}k"
            if cell["errors"]:
                text += " (failed)"
            elif system != "trio_mojo" and mine:
                text += f" ({mine / cell['per_message']:.2f}x)"
            cells.append(text)
        rows.append(cells)
    lines = ["| " + " | ".join(cells) + " |" for cells in rows]
    return (
        "Instructions per message, both processes (W4: per round trip); in\n"
        "brackets trio_mojo's count relative to the peer's (below 1: fewer).\n\n"
        + "\n".join(lines)
    )


def main(argv: list[str]) -> int:
    """Count and print; returns 0 when every honesty check passed."""
    args = _parse(argv)
    known = {w.name: w for w in WORKLOADS}
    by_name = {s.name: s for s in SYSTEMS}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    failed = False
    for name in args.workloads:
        workload = known[name]
        count = max(
            1 if not workload.pingpong else 200, round(COUNTS[name] * args.scale)
        )
        for system in args.systems:
            if not (by_name[system].available() and by_name[system].runs(workload)):
                continue
            print(
                f"[instructions] {system} {name} x {count}, 3 x {count}",
                file=sys.stderr,
            )
            cell = measure(system, workload, count)
            failed = failed or bool(cell["errors"])
            results.setdefault(name, {})[system] = cell
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0
