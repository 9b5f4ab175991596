"""``--plot FILE.png``: the run's speed ratios as a bar chart (needs matplotlib).

One group of bars per workload, one bar per system: its speed relative to
``multiprocessing.connection`` in the same run (log scale; above 1 is
faster, for round trips mp's RTT / the system's).  matplotlib is a
``bench`` extra, never a dependency of trio_mojo: this module is imported
only when a plot is asked for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._workloads import REFERENCE, SYSTEMS, WORKLOADS

__all__ = ["plot"]


def plot(result: dict[str, Any], path: Path) -> None:
    """Draw ``result`` (as the bench returns it) into the PNG file ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    summary: dict[str, dict[str, dict[str, Any]]] = result["summary"]
    workloads = [w.name for w in WORKLOADS if w.name in summary]
    present = {system for cells in summary.values() for system in cells}
    systems = [s.name for s in SYSTEMS if s.name in present]
    width = 0.8 / max(1, len(systems))
    figure, axes = pyplot.subplots(figsize=(max(8, 1.4 * len(workloads)), 5))
    for index, system in enumerate(systems):
        heights = []
        for workload in workloads:
            ratio = summary[workload].get(system, {}).get("vs_mp", math.nan)
            heights.append(ratio if ratio > 0 else math.nan)
        offsets = [
            i + (index - (len(systems) - 1) / 2) * width for i in range(len(workloads))
        ]
        axes.bar(offsets, heights, width, label=system)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xticks(range(len(workloads)), workloads)
    axes.set_ylabel(f"speed relative to {REFERENCE} (log; >1 is faster)")
    meta = result["meta"]
    axes.set_title(
        f"trio_mojo bench, {meta['mode']} mode, medians of {meta['reps']}",
        fontsize=10,
    )
    axes.legend(fontsize=8, ncols=min(4, len(systems)))
    figure.text(0.01, 0.01, meta["environment"], fontsize=7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
