"""Helpers for the zygote tests: an interpreter wrapper and a forked worker.

``interpreter(tmp_path)`` writes a shell script to pass as ``python=`` to
:func:`open_zygote` (or ``open_worker``): it runs the real interpreter in
isolated mode with this tests directory first on ``sys.path``, so that a
zygote can preload (and fork targets from) the test-only modules next to
this file.

``forked_worker`` forks a worker from a zygote and does what ``open_worker``
does around it: receive the sandbox report, verify it in ``/proc``, and on
the way out close the channel, wait for the worker (killing it after a
grace period) and read its stderr tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from trio_mojo import (
    CHANNEL_SWITCH,
    Channel,
    SandboxPolicy,
    SandboxReport,
    channel_pair,
    open_channel,
)
from trio_mojo._sandbox._verify import verify_report
from trio_mojo._workers._worker import _Tail
from trio_mojo._workers._zygote import ForkedProcess, Zygote

__all__ = ["Forked", "forked_worker", "interpreter"]

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


@attrs.define
class Forked:
    """A worker forked by a zygote, with what open_worker would keep."""

    process: ForkedProcess
    channel: Channel
    report: SandboxReport
    tail: _Tail


@asynccontextmanager
async def forked_worker(
    zygote: Zygote,
    target: str,
    *,
    policy: SandboxPolicy | None = None,
    stdout: int | None = subprocess.DEVNULL,
    cwd: str | os.PathLike[str] | None = None,
    grace_period: float = 10.0,
) -> AsyncIterator[Forked]:
    """Fork ``target``, check its report, yield it; close and reap on exit."""
    policy = zygote.sandbox if policy is None else policy
    local, remote = channel_pair()
    process = await zygote._start_worker(
        target, policy, {CHANNEL_SWITCH: remote}, stdout=stdout, cwd=cwd
    )
    tail = _Tail()
    try:
        async with open_channel(local) as channel:
            first = await channel.receive()
            with first:
                report = SandboxReport.from_bytes(first.payload)
            verify_report(process.pid, policy, report)
            yield Forked(process, channel, report, tail)
        with trio.move_on_after(grace_period):
            await process.wait()
    except BaseException as exc:
        failure: BaseException | None = exc
        raise
    else:
        failure = None
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            assert process.stderr is not None
            with trio.move_on_after(5):  # the worker is gone: its stderr ends
                await tail.drain(process.stderr)
            await process.stderr.aclose()
        local.close()
        if failure is not None and tail.text():
            failure.add_note(f"the worker's stderr:\n{tail.text()}")
