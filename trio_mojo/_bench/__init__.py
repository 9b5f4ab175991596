"""The benchmark suite (private; run it as ``python -m trio_mojo bench``).

Modules: ``_cli`` (command line, driver loop), ``_report`` (medians,
ratios, tables), ``_plot`` (``--plot``), ``_workloads`` (W1-W5x8 and the
systems),
``_harness`` (the sender/receiver processes and the honesty checks),
``_common`` (what both processes share: spec, meter, control pipe),
``_extras`` (idle, spawn, memory bounds), one ``_sys_*`` module per peer
system, and ``_runner`` (the child processes' entry point).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv``; return the exit status."""
    from ._cli import main as cli_main  # lazily: keeps `import trio_mojo._bench` light

    return cli_main(argv)
