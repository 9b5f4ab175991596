"""``python -m trio_mojo bench instructions``: what a message costs, counted.

Timings on a shared machine swing two or three times with the load; the
number of instructions a program executes does not.  This runs each
(system, workload) of the benchmark under ``valgrind --tool=callgrind``,
which counts every user-space instruction of the sender process and of the
receiver it starts, twice: with N messages and with 3N.  The figure is
``(instructions(3N) - instructions(N)) / 2N``: both processes per message
(per round trip for W4), start-up, imports and warm-up subtracted; a
second table splits it into the sender's and the receiver's share.  Last,
the same for one pass of Trio's scheduler (a task awaiting
``trio.lowlevel.checkpoint()`` in a loop): what a task parked by one side
and woken by the other pays at the least.

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
import subprocess
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
ROLES: Final = ("sender", "receiver")
_PASSES: Final = 20_000
_SCHEDULER_PASSES: Final = """
import sys, trio
async def passes(n):
    for _ in range(n):
        await trio.lowlevel.checkpoint()
trio.run(passes, int(sys.argv[1]))
"""
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


def _role(command: str) -> str:
    """Which process of a run a callgrind dump's ``cmd:`` line names."""
    for role in ROLES:
        if f"_runner {role} " in command:
            return role
    return "other"  # (e.g. the ``ldconfig`` that ``ctypes.util`` runs)


def _count(spec: RunSpec, directory: Path) -> tuple[dict[str, int], list[str]]:
    """Instructions of each process of one run, by role (and its honesty errors)."""
    out = directory / "callgrind.%p"
    record = run(spec, prefix=[*_CALLGRIND, f"--callgrind-out-file={out}"])
    totals = dict.fromkeys((*ROLES, "other"), 0)
    for path in directory.glob("callgrind.*"):
        role = "other"
        with path.open(encoding="ascii", errors="replace") as dump:
            for line in dump:
                if line.startswith("cmd:"):
                    role = _role(line)
                elif line.startswith(("summary:", "totals:")):
                    totals[role] += int(line.split()[1])
                    break
    errors: list[str] = record["errors"]
    return totals, errors


def measure(system: str, workload: Workload, count: int) -> dict[str, Any]:
    """One (system, workload): instructions per message, from N and 3N.

    ``per_message`` counts every process of the run; ``by_role`` the
    sender's and the receiver's share of it.
    """
    runs = []
    errors: list[str] = []
    for n in (count, 3 * count):
        with tempfile.TemporaryDirectory(prefix="trio_mojo-callgrind-") as tmp:
            totals, problems = _count(_spec(system, workload, n), Path(tmp))
        runs.append(totals)
        errors += problems
    by_role = {role: (runs[1][role] - runs[0][role]) / (2 * count) for role in ROLES}
    return {
        "count": count,
        "totals": [sum(totals.values()) for totals in runs],
        "per_message": (sum(runs[1].values()) - sum(runs[0].values())) / (2 * count),
        "by_role": by_role,
        "errors": errors,
    }


def measure_scheduler_pass(count: int = 20_000) -> float:
    """Instructions of one pass of Trio's scheduler, from N and 3N.

    One task awaiting ``trio.lowlevel.checkpoint()`` in a loop: each await
    yields to the scheduler, which polls for I/O and runs the task again,
    what a task woken by another pays at the least.
    """
    totals = []
    for n in (count, 3 * count):
        with tempfile.TemporaryDirectory(prefix="trio_mojo-callgrind-") as tmp:
            out = Path(tmp) / "callgrind.out"
            subprocess.run(
                [
                    *_CALLGRIND,
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    "-c",
                    _SCHEDULER_PASSES,
                    str(n),
                ],
                check=True,
                capture_output=True,
            )
            with out.open(encoding="ascii", errors="replace") as dump:
                totals.append(
                    next(
                        int(line.split()[1])
                        for line in dump
                        if line.startswith(("summary:", "totals:"))
                    )
                )
    return (totals[1] - totals[0]) / (2 * count)


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
    by_role = [head, ["---"] * len(head)]
    for workload, row in results.items():
        cells = [workload]
        for system in systems:
            split = row.get(system, {}).get("by_role")
            cells.append(
                "n/a"
                if split is None
                else " + ".join(f"{split[role] / 1000:,.1f}k" for role in ROLES)
            )
        by_role.append(cells)
    return (
        "Instructions per message, both processes (W4: per round trip); in\n"
        "brackets trio_mojo's count relative to the peer's (below 1: fewer).\n\n"
        + _markdown(rows)
        + "\n\nThe same, sender + receiver:\n\n"
        + _markdown(by_role)
    )


def _markdown(rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


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
    print(
        f"[instructions] a Trio scheduler pass, x {_PASSES}, 3 x {_PASSES}",
        file=sys.stderr,
    )
    scheduler_pass = measure_scheduler_pass(_PASSES)
    print(
        "\nOne pass of Trio's scheduler (a task awaiting "
        "trio.lowlevel.checkpoint() in a loop): "
        f"{scheduler_pass / 1000:,.1f}k instructions; each time a task parks "
        "and another wakes it, at least that much is paid."
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({**results, "scheduler_pass": scheduler_pass}, indent=1)
        )
    return 1 if failed else 0
