"""A non-root parent: its worker keeps its uid, drops every capability and
gets every other layer, and the parent still verifies it in /proc.

The parent runs as ``nobody`` (``setpriv``) on Debian's interpreter, with
the installed packages on ``sys.path``: the usual interpreter lives under
``/root``, mode 0700.  Its workers (and its zygote) run through a small
wrapper that does the same (isolated mode would ignore ``PYTHONPATH``).

A non-root zygote may not make PID namespaces itself, so each of its
workers gets the spawned worker's tree: the process the zygote forked
becomes the supervisor of the worker proper.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import trio_mojo

SYSTEM_PYTHON = Path("/usr/bin/python3.11")
PATHS = sorted(
    {str(Path(trio_mojo.__file__).parents[1]), str(Path(trio.__file__).parents[1])}
)


def _readable_by_others(path: str) -> bool:
    return all(
        os.stat(part).st_mode & 0o005 == 0o005
        for part in [path, *map(str, Path(path).parents)]
    )


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not SYSTEM_PYTHON.exists()
    or shutil.which("setpriv") is None
    or not all(map(_readable_by_others, PATHS)),
    reason="needs root (to become nobody), setpriv, /usr/bin/python3.11 and "
    "installed packages that nobody can read",
)

WRAPPER = """#!/bin/sh
# open_worker and open_zygote run: <this> -I -m MODULE ARGS...
module="$3"
shift 3
exec {python} -c "import runpy, sys; sys.path[:0] = {paths!r}; \\
runpy.run_module(sys.argv.pop(1), run_name='__main__')" "$module" "$@"
"""

PARENT = """
import contextlib, json, os, sys
sys.path[:0] = {paths!r}
import trio, trio_mojo

async def main():
    async with contextlib.AsyncExitStack() as stack:
        options = dict(python={wrapper!r})
        if {zygote!r}:
            options = dict(zygote=await stack.enter_async_context(
                trio_mojo.open_zygote(python={wrapper!r})
            ))
        worker = await stack.enter_async_context(trio_mojo.open_worker(
            "trio_mojo._examples:echo", sandbox=trio_mojo.SandboxPolicy.strict(),
            **options,
        ))
        await worker.channel.send(trio_mojo.Message(b"as nobody"))
        echoed = (await worker.channel.receive()).payload.decode()
        status = dict(
            line.split(":", 1) for line in open(f"/proc/{{worker.pid}}/status")
        )
        print(json.dumps({{
            "echoed": echoed,
            "layers": worker.sandbox_report.layers,
            "status": {{k: v.split() for k, v in status.items()}},
            "parent_uid": os.getuid(),
            "supervised": worker._process.pid != worker.pid,
        }}))

trio.run(main)
"""


@pytest.fixture
def shared_directory() -> Iterator[Path]:
    """A directory ``nobody`` can read (pytest's tmp_path is root's, 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="trio-mojo-nobody-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize("zygote", [False, True], ids=["spawned", "zygote"])
def test_a_nobody_parent_gets_a_fully_sandboxed_worker(
    shared_directory: Path, zygote: bool
) -> None:
    wrapper = shared_directory / "python"
    wrapper.write_text(WRAPPER.format(python=SYSTEM_PYTHON, paths=PATHS))
    wrapper.chmod(0o755)
    program = PARENT.format(paths=PATHS, wrapper=str(wrapper), zygote=zygote)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run(
        [*as_nobody, str(SYSTEM_PYTHON), "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=shared_directory,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parent_uid"] == 65534
    assert info["echoed"] == "as nobody"
    assert set(info["layers"].values()) == {"applied"}
    status = info["status"]
    assert status["Uid"] == ["65534"] * 4  # the parent's own uid, kept
    for field in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert status[field] == ["0000000000000000"], field
    assert status["NSpid"][-1] == "2"
    assert status["Seccomp"] == ["2"]
    assert info["supervised"]  # below a supervisor, forked or spawned
