"""Helpers for the zygote tests: an interpreter that finds the test modules.

``interpreter(tmp_path)`` writes a shell script to pass as ``python=`` to
:func:`open_zygote` (or ``open_worker``): it runs the real interpreter in
isolated mode with this tests directory first on ``sys.path``, so that a
zygote can preload (and fork targets from) the test-only modules next to
this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["interpreter"]

TESTS = Path(__file__).resolve().parent


def interpreter(directory: Path, module: str | None = None) -> str:
    """A ``python=`` for open_zygote or open_worker that finds the test modules.

    It is called as ``python -I -m MODULE ARGS...`` and runs ``MODULE`` (or
    ``module``, a fake, in its place) with this directory first on
    ``sys.path``.
    """
    script = directory / "python-with-test-modules"
    code = (
        "import runpy, sys; "
        f"sys.path.insert(0, {str(TESTS)!r}); "
        "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
    )
    chosen = '"$3"' if module is None else repr(module)
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "-I -m" ] || exit 64\n'
        f"module={chosen}\n"
        "shift 3\n"
        f'exec {sys.executable} -I -c "{code}" "$module" "$@"\n'
    )
    script.chmod(0o755)
    return str(script)
