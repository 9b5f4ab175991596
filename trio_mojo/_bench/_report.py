"""Turning run records into medians, ratios, target checks and printed tables."""

from __future__ import annotations

import math
from typing import Any

from ._workloads import REFERENCE, SYSTEMS, WORKLOADS, Workload, median, percentile

__all__ = ["forked_line", "render", "summarise", "versus_peers"]


def _workload(name: str) -> Workload:
    for workload in WORKLOADS:
        if workload.name == name:
            return workload
    raise KeyError(name)


def _run_figures(record: dict[str, Any]) -> dict[str, float]:
    spec, sender, receiver = record["spec"], record["sender"], record["receiver"]
    workload = _workload(spec["workload"])
    count = spec["count"]
    elapsed = receiver["t_end"] - sender["t0"]
    rtts = sender["rtts_ns"]
    cpu = (
        sender["cpu_user"]
        + sender["cpu_system"]
        + receiver["cpu_user"]
        + receiver["cpu_system"]
    )
    figures = {
        "figure": workload.figure(count, elapsed, rtts),
        "elapsed": elapsed,
        "cpu_us_per_msg": cpu / count * 1e6,
        "sender_cpu_us_per_msg": (sender["cpu_user"] + sender["cpu_system"])
        / count
        * 1e6,
        "receiver_cpu_us_per_msg": (receiver["cpu_user"] + receiver["cpu_system"])
        / count
        * 1e6,
        "receiver_hwm_kib": receiver["hwm_end_kib"],
        "receiver_rss_growth_kib": receiver["rss_growth_kib"],
    }
    if rtts:
        figures["rtt_p99_us"] = percentile(rtts[100:], 99) / 1000
    return figures


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{workload: {system: cell}}`` with medians, spread and ratio to mp."""
    grouped: dict[tuple[str, str], list[dict[str, float]]] = {}
    failed: dict[tuple[str, str], int] = {}
    for record in records:
        key = (record["spec"]["workload"], record["spec"]["system"])
        if record["errors"]:
            failed[key] = failed.get(key, 0) + 1
            continue
        grouped.setdefault(key, []).append(_run_figures(record))
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for (workload_name, system), runs in grouped.items():
        figures = [run["figure"] for run in runs]
        mid = median(figures)
        cell: dict[str, Any] = {
            "median": mid,
            "min": min(figures),
            "max": max(figures),
            "spread": (max(figures) - min(figures)) / mid if mid else math.nan,
            "reps": len(figures),
            "failed_reps": failed.get((workload_name, system), 0),
            "runs": figures,
        }
        for name in runs[0]:
            if name != "figure":
                cell[name] = median([run[name] for run in runs])
        summary.setdefault(workload_name, {})[system] = cell
    for (workload_name, system), count in failed.items():
        if system not in summary.get(workload_name, {}):
            summary.setdefault(workload_name, {})[system] = {
                "median": math.nan,
                "reps": 0,
                "failed_reps": count,
            }
    for workload_name, cells in summary.items():
        workload = _workload(workload_name)
        reference = _reference_cells(summary, workload).get(REFERENCE, {})
        for cell in cells.values():
            cell["vs_mp"] = _speed(workload, cell["median"], reference.get("median"))
    return summary


def _reference_cells(
    summary: dict[str, dict[str, dict[str, Any]]], workload: Workload
) -> dict[str, dict[str, Any]]:
    """The cells a workload's ratios are taken against (W4w: those of W4)."""
    return summary.get(workload.compare_with or workload.name, {})


def _speed(workload: Workload, value: float, reference: float | None) -> float:
    """Speed relative to ``reference``: >1 is faster (for RTTs: reference / RTT)."""
    if reference is None or not (value > 0 and reference > 0):
        return math.nan
    return reference / value if workload.pingpong else value / reference


def versus_peers(
    summary: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, dict[str, float]]:
    """``{workload: {peer: trio_mojo's speed relative to that peer}}``."""
    table: dict[str, dict[str, float]] = {}
    for workload_name, cells in summary.items():
        ours = cells.get("trio_mojo", {}).get("median", math.nan)
        workload = _workload(workload_name)
        peers = _reference_cells(summary, workload)
        table[workload_name] = {
            peer: _speed(workload, ours, cell.get("median"))
            for peer, cell in peers.items()
            if peer != "trio_mojo"
        }
    return table


# ---------------------------------------------------------------- formatting


def fmt_rate(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def fmt_figure(workload: Workload, value: float) -> str:
    if math.isnan(value):
        return "failed"
    if workload.pingpong:
        return f"{value:.1f}"
    if workload.unit == "MB/s":
        return f"{value:,.0f}"
    return fmt_rate(value)


def fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)
        )
        + "|"
    )
    return [line(header), rule, *(line(row) for row in rows)]


def _systems_in(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    present = {system for cells in summary.values() for system in cells}
    return [system.name for system in SYSTEMS if system.name in present]


def render(result: dict[str, Any]) -> str:
    """The human-readable report of a bench run."""
    meta = result["meta"]
    summary = result["summary"]
    honesty = result["honesty"]
    out = [
        (
            f"trio_mojo bench: {meta['mode']} mode, {meta['reps']} repetition(s); "
            f"{meta['environment']}"
        ),
        (
            f"honesty checks: {honesty['passed']}/{honesty['runs']} runs passed "
            "(every message, byte and fd counted by the receiver)"
        ),
    ]
    out += [f"  FAILED {failure}" for failure in honesty["failures"][:10]]
    systems = _systems_in(summary)
    labels = {system.name: system.label for system in SYSTEMS}
    out += [
        "",
        (
            "## Headline: medians, and in brackets the speed relative to "
            f"{labels[REFERENCE]} (>1 = faster; W4: its RTT / this RTT)"
        ),
        "",
    ]
    workloads = [w for w in WORKLOADS if w.name in summary]
    header = ["system"] + [f"{w.name} {w.unit}" for w in workloads]
    rows = []
    for system in systems:
        row = [system]
        for workload in workloads:
            cell = summary[workload.name].get(system)
            if cell is None:
                row.append("n/a")
            else:
                row.append(
                    f"{fmt_figure(workload, cell['median'])} ({fmt_ratio(cell['vs_mp'])})"
                )
        rows.append(row)
    out += _table(header, rows)
    for workload in workloads:
        cells = summary[workload.name]
        count = result["meta"]["counts"].get(workload.name)
        out += [
            "",
            f"### {workload.name}: {workload.title}, {count:,} messages  [{workload.unit}]",
            "",
        ]
        header = [
            "system",
            workload.unit,
            *(["p99 us"] if workload.pingpong else []),
            "spread",
            "vs mp",
            "CPU us/msg (S+R)",
            "recv peak RSS MiB (growth)",
            "reps",
        ]
        rows = []
        for system in systems:
            cell = cells.get(system)
            if cell is None:
                continue
            if not cell["reps"]:
                rows.append(
                    [system, "failed"]
                    + ["-"] * (len(header) - 3)
                    + [f"0 ({cell['failed_reps']} failed)"]
                )
                continue
            reps = str(cell["reps"])
            if cell["failed_reps"]:
                reps += f" ({cell['failed_reps']} failed)"
            rows.append(
                [
                    system,
                    fmt_figure(workload, cell["median"]),
                    *([f"{cell['rtt_p99_us']:.1f}"] if workload.pingpong else []),
                    f"{cell['spread']:.0%}",
                    fmt_ratio(cell["vs_mp"]),
                    (
                        f"{cell['cpu_us_per_msg']:.2f} "
                        f"({cell['sender_cpu_us_per_msg']:.2f}+"
                        f"{cell['receiver_cpu_us_per_msg']:.2f})"
                    ),
                    (
                        f"{cell['receiver_hwm_kib'] / 1024:.1f} "
                        f"(+{cell['receiver_rss_growth_kib'] / 1024:.1f})"
                    ),
                    reps,
                ]
            )
        out += _table(header, rows)
    out += _render_versus(summary, systems)
    out += _render_extras(result.get("extras", {}), summary)
    return "\n".join(out) + "\n"


def _render_versus(
    summary: dict[str, dict[str, dict[str, Any]]], systems: list[str]
) -> list[str]:
    """The table users look for: trio_mojo against each peer, per workload."""
    if "trio_mojo" not in systems:
        return []
    peers = [system for system in systems if system != "trio_mojo"]
    if not peers:
        return []
    table = versus_peers(summary)
    rows = []
    for workload in WORKLOADS:
        if workload.name not in table:
            continue
        label = workload.name
        if workload.compare_with:
            label += f" (peers: {workload.compare_with})"
        row = [label]
        row += [fmt_ratio(table[workload.name].get(peer, math.nan)) for peer in peers]
        rows.append(row)
    return [
        "",
        (
            "## trio_mojo against each peer: its speed relative to the peer "
            "(>1: trio_mojo is faster; for round trips: the peer's RTT / ours)"
        ),
        "",
        *_table(["workload", *peers], rows),
    ]


def _render_extras(
    extras: dict[str, Any], summary: dict[str, dict[str, dict[str, Any]]]
) -> list[str]:
    out: list[str] = []
    if not extras:
        return out
    out += ["", "## Beside the workloads", ""]
    idle = extras.get("idle")
    if idle:
        if "error" in idle:
            out.append(f"* idle channel: ERROR {idle['error']}")
        else:
            bare = idle["bare_trio_sleep"]
            out.append(
                f"* idle open trio_mojo channel pair (a receive() pending on each "
                f"end) for {idle['seconds']:.1f} s: {idle['cpu_us']:.0f} us CPU, "
                f"{idle['ctx_switches']} context switches "
                f"(a bare trio.sleep: {bare['cpu_us']:.0f} us, "
                f"{bare['ctx_switches']} switches)"
            )
    spawn = extras.get("spawn")
    if spawn:
        base = spawn.get("python_import_trio_median_ms", math.nan)
        bare = spawn.get("python_bare_median_ms", math.nan)
        if "none_median_ms" in spawn:
            none = spawn["none_median_ms"]
            line = (
                f"* worker spawn to first message (open_worker, SandboxPolicy.none()): "
                f"{none:.0f} ms median of {len(spawn['none'])}, vs "
                f'`python -I -c "import trio"` {base:.0f} ms '
                f"({none / base:.2f}x; bare `python -I -c pass` {bare:.0f} ms)"
            )
            for name in ("basic", "default"):
                if f"{name}_median_ms" in spawn:
                    line += (
                        f"; SandboxPolicy.{name}(): {spawn[f'{name}_median_ms']:.0f} ms"
                    )
                elif f"{name}_error" in spawn:
                    line += f"; SandboxPolicy.{name}(): unavailable here"
            out.append(line)
        else:
            error = spawn.get("error") or spawn.get("none_error")
            out.append(
                f"* worker spawn: NOT MEASURED ({error}); "
                f'`python -I -c "import trio"` {base:.0f} ms'
            )
    slow = extras.get("slow_consumer")
    if slow:
        growth = slow.get("rss_growth_kib")
        peaks = slow.get("peaks", {})
        growth_text = "n/a" if growth is None else f"{growth / 1024:.1f} MiB"
        out.append(
            f"* slow consumer: {slow['count']:,} x 64 B into a receiver throttled to "
            f"{slow['consumer_rate']:,.0f} msg/s (10x below trio_mojo's W1): "
            f"receiver peak RSS growth {growth_text} (limit 32 MiB): "
            f"{'PASS' if slow['passed'] else 'FAIL'}; max queued "
            f"{peaks.get('max_receive_queue_messages', '?')} messages / "
            f"{peaks.get('max_receive_queue_bytes', '?')} bytes"
            + (f"; errors: {slow['errors']}" if slow["errors"] else "")
        )
    trickle = extras.get("trickle")
    if trickle:
        growth = trickle.get("rss_growth_kib")
        growth_text = "n/a" if growth is None else f"{growth / 1024:.1f} MiB"
        out.append(
            f"* trickle: header announcing {trickle['announced'] / 2**20:.0f} MiB, "
            f"then {trickle['bytes_received'] / 2**20:.1f} MiB trickled in: receiver "
            f"peak RSS growth {growth_text}, ended with {trickle['outcome']}: "
            f"{'PASS' if trickle['passed'] else 'FAIL'} (growth must follow the bytes "
            "received, not the size announced)"
            + (f"; errors: {trickle['errors']}" if trickle["errors"] else "")
        )
        for sample in trickle["samples"]:
            out.append(
                f"    after {sample['bytes_received'] / 2**20:6.2f} MiB received: "
                f"read buffer {sample['read_buffer_bytes'] / 2**20:6.2f} MiB, "
                f"RSS +{sample['rss_growth_kib'] / 1024:6.2f} MiB "
                f"(peak +{sample['peak_growth_kib'] / 1024:.2f})"
            )
    forked = extras.get("forked")
    if forked:
        out.append(forked_line(forked, summary.get("W4", {})))
    return out


def forked_line(forked: dict[str, Any], w4: dict[str, Any]) -> str:
    """W4 p50 with the receiver forked, beside this run's W4 (a fresh receiver)."""
    if "error" in forked:
        return f"* W4 with a forked receiver: ERROR {forked['error']}"
    parts = []
    for system, cell in forked.items():
        if system == "count":
            continue
        if "error" in cell:
            parts.append(f"{system} FAILED ({cell['error'][:200]})")
            continue
        fresh = w4.get(system, {}).get("median")
        parts.append(
            f"{system} {cell['p50_us']:.1f} us"
            + (f" (fresh receiver: {fresh:.1f} us)" if fresh else "")
        )
    return (
        f"* W4 with the receiver forked from the sender instead of started fresh "
        f"({forked['count']:,} round trips, RTT p50): " + "; ".join(parts)
    )
