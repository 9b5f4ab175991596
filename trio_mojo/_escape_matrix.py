"""``python -m trio_mojo escapes``: the escape matrix, measured on this machine.

Runs every attempt of the catalogue (``_sandbox._escapes``) as a worker's
target under each policy of :data:`COLUMNS` (two of them for workers
forked from a zygote, which must be confined exactly like spawned ones,
with and without seccomp in front of the other layers)
and prints the outcomes as a reStructuredText table (the one in ``docs/security.rst``, which a test
compares with a fresh run).  The parent prepares what the attempts aim at:
a world-readable file in a world-traversable directory, a pathname unix
datagram socket anyone may write to (like ``/dev/log``), TCP and UDP
sockets and an abstract unix socket on this host, and a ``sleep`` process
to trace.  Shared attempts run in one worker per policy; each isolated one
(fatal, or changing the worker's state) in a worker of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from ._core._message import Message
from ._errors import WorkerError
from ._sandbox import SandboxPolicy
from ._sandbox._escapes import ATTEMPTS, Attempt
from ._workers._worker import open_worker
from ._workers._zygote import Zygote, open_zygote

__all__ = ["COLUMNS", "Column", "main", "measure", "render"]

_TARGET: Final = "trio_mojo._sandbox._escapes:run_attempts"


@attrs.frozen
class Column:
    """A column of the matrix: its label, the policy of its workers, and
    whether they are forked from a zygote (:func:`open_zygote`) rather than
    spawned."""

    label: str
    policy: SandboxPolicy
    forked: bool = False


_NO_SECCOMP: Final = attrs.evolve(
    SandboxPolicy.strict(), name="strict-no-seccomp", seccomp="off"
)
"""The layers under seccomp, which would otherwise hide them behind ``EPERM``."""

COLUMNS: Final = (
    Column("strict", SandboxPolicy.strict()),
    Column("strict (zygote)", SandboxPolicy.strict(), forked=True),
    Column("default", SandboxPolicy.default()),
    Column("basic", SandboxPolicy.basic()),
    Column("strict, no seccomp", _NO_SECCOMP),
    Column("strict, no seccomp (zygote)", _NO_SECCOMP, forked=True),
    Column("none", SandboxPolicy.none(i_understand_this_is_unsandboxed=True)),
)
"""The matrix's columns, in order."""


@contextlib.contextmanager
def _listeners(directory: Path) -> Iterator[dict[str, Any]]:
    """Sockets on this host for the attempts to reach; yields their addresses."""
    with contextlib.ExitStack() as stack:
        dgram = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        dgram.bind(str(directory / "dgram"))
        os.chmod(directory / "dgram", 0o666)
        tcp = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.bind(("127.0.0.1", 0))
        abstract = stack.enter_context(socket.socket(socket.AF_UNIX))
        name = f"trio-mojo-escapes-{secrets.token_hex(8)}"
        abstract.bind("\0" + name)
        abstract.listen()
        yield {
            "dgram": str(directory / "dgram"),
            "tcp": list(tcp.getsockname()),
            "udp": list(udp.getsockname()),
            "abstract": name,
        }


def _host_file(directory: Path) -> Path:
    """A world-readable file in a world-traversable directory, like /etc/passwd."""
    directory.chmod(0o755)
    path = directory / "host-file"
    path.write_bytes(b"a host file\n")
    path.chmod(0o644)
    return path


@contextlib.asynccontextmanager
async def _context() -> AsyncIterator[dict[str, Any]]:
    """Everything the attempts aim at, for the duration of a run."""
    with tempfile.TemporaryDirectory(prefix="trio-mojo-escapes-") as name:
        directory = Path(name)
        host_file = _host_file(directory)
        victim = await trio.lowlevel.open_process(
            ["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        try:
            with _listeners(directory) as sockets:
                yield {
                    "file": str(host_file),
                    "directory": str(directory),
                    "parent": os.getpid(),
                    "victim": victim.pid,
                    "cwd": os.getcwd(),
                    "hostname": socket.gethostname(),
                    **sockets,
                }
        finally:
            victim.kill()
            with trio.CancelScope(shield=True):
                await victim.wait()


async def _run(
    policy: SandboxPolicy,
    zygote: Zygote | None,
    attempts: Sequence[Attempt],
    context: Any,
) -> dict[str, str]:
    request = {"attempts": [entry.name for entry in attempts], "context": context}
    try:
        async with open_worker(_TARGET, sandbox=policy, zygote=zygote) as worker:
            await worker.channel.send(Message(json.dumps(request).encode()))
            with await worker.channel.receive() as reply:
                outcomes: dict[str, str] = json.loads(reply.payload)
                return outcomes
    except WorkerError as exc:
        code = exc.returncode
        if code is not None and code < 0:
            died = signal.Signals(-code).name
        else:
            died = f"exit {code}"
        return {entry.name: died for entry in attempts}


async def measure(columns: Sequence[Column] = COLUMNS) -> dict[str, dict[str, str]]:
    """Run the catalogue under each column: ``{attempt: {label: outcome}}``."""
    matrix: dict[str, dict[str, str]] = {entry.name: {} for entry in ATTEMPTS}
    shared = [entry for entry in ATTEMPTS if not entry.isolated]
    async with _context() as context:
        for column in columns:
            async with contextlib.AsyncExitStack() as stack:
                zygote = None
                if column.forked:
                    zygote = await stack.enter_async_context(
                        open_zygote(preload=[_TARGET], sandbox=column.policy)
                    )
                outcomes = await _run(column.policy, zygote, shared, context)
                for entry in ATTEMPTS:
                    if entry.isolated:
                        outcomes |= await _run(column.policy, zygote, [entry], context)
            for name, outcome in outcomes.items():
                matrix[name][column.label] = outcome
    return matrix


def render(matrix: dict[str, dict[str, str]], labels: Sequence[str]) -> str:
    """The matrix as a reStructuredText simple table."""
    header = ["attempt", *labels]
    rows = [
        [name, *(cells[label] for label in labels)] for name, cells in matrix.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * width for width in widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
        ).rstrip()

    return "\n".join([rule, line(header), rule, *map(line, rows), rule]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the escape matrix and print it; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_mojo escapes",
        description=(
            "Run every escape attempt of trio_mojo's catalogue as a worker's target "
            "under each sandbox policy and print the outcomes as a reST table."
        ),
    )
    parser.parse_args(argv)
    matrix = trio.run(measure)
    print(render(matrix, [column.label for column in COLUMNS]), end="")
    return 0
