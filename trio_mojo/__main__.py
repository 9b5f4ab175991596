"""Command line: ``python -m trio_mojo {demo,bench,escapes} ...``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

_USAGE = """usage: python -m trio_mojo COMMAND [ARGS...]

commands:
  demo     hash files in sandboxed workers that receive them as fds (the main job)
  bench    benchmark trio_mojo against multiprocessing and other peers
  escapes  try every escape of the catalogue under each sandbox policy (reST table)

Run 'python -m trio_mojo COMMAND --help' for a command's options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from ._demo import main as demo

        return demo(rest)
    if command == "bench":
        from ._bench import main as bench

        return bench(rest)
    if command == "escapes":
        from ._escape_matrix import main as escapes

        return escapes(rest)
    print(f"unknown command {command!r}\n\n{_USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
