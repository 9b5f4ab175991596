"""Layers missing from the machine: refused before spawning, or recorded.

A parent runs under an inherited seccomp filter that makes one kernel
feature look absent (``landlock_*`` -> ENOSYS, ``unshare`` -> EPERM, or
``seccomp`` -> ENOSYS), as a container or an old kernel would.  That parent
is a real child Python process (the filter cannot be undone, so never this
one); it tries ``open_worker`` under each policy and reports, as JSON,
whether the policy was refused and how many processes were spawned, or
what the worker's report says.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the faking filter uses x86_64 numbers"
)

PARENT = r"""
import errno, json, subprocess, sys
import trio, trio_mojo
from trio_mojo._sandbox import _seccomp

FAKES = {  # x86_64 system call numbers
    "landlock": {444: errno.ENOSYS, 445: errno.ENOSYS, 446: errno.ENOSYS},
    "unshare": {272: errno.EPERM},
    "seccomp": {317: errno.ENOSYS},
}


def install_fake(kind):
    asm = _seccomp._Assembler()
    asm.load(0)  # seccomp_data.nr
    for number in FAKES[kind]:
        asm.jump(0x15, number, f"fail-{number}")  # BPF_JEQ
    asm.ret(_seccomp.RET_ALLOW)
    for number, code in FAKES[kind].items():
        asm.label(f"fail-{number}")
        asm.ret(_seccomp.RET_ERRNO | code)
    _seccomp.install(asm.assemble())


spawned = 0


class CountingPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        global spawned
        spawned += 1
        super().__init__(*args, **kwargs)


subprocess.Popen = CountingPopen


async def attempt(policy):
    global spawned
    spawned = 0
    try:
        async with trio_mojo.open_worker("trio_mojo._examples:echo", sandbox=policy) as w:
            await w.channel.send(trio_mojo.Message(b"still works"))
            echoed = (await w.channel.receive()).payload.decode()
            result = {"layers": dict(w.sandbox_report.layers), "echoed": echoed}
    except trio_mojo.SandboxUnavailableError as exc:
        result = {"refused": exc.layer, "reason": exc.reason}
    result["spawned"] = spawned
    return result


async def main():
    results = {}
    for name in ("strict", "default", "basic"):
        results[name] = await attempt(getattr(trio_mojo.SandboxPolicy, name)())
    print(json.dumps(results))


install_fake(sys.argv[1])
trio.run(main)
"""


def _under_fake(kind: str) -> dict[str, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-I", "-c", PARENT, kind],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    results: dict[str, dict[str, Any]] = json.loads(result.stdout)
    return results


def _gaps(result: dict[str, Any]) -> dict[str, str]:
    """The layers a started worker reports as not applied."""
    return {
        layer: state for layer, state in result["layers"].items() if state != "applied"
    }


def test_no_landlock() -> None:
    results = _under_fake("landlock")
    assert results["strict"]["refused"] == "landlock"
    assert "landlock_create_ruleset -> ENOSYS" in results["strict"]["reason"]
    assert results["strict"]["spawned"] == 0  # refused before spawning
    for name in ("default", "basic"):
        gaps = _gaps(results[name])
        assert list(gaps) == ["landlock"], name
        assert gaps["landlock"].startswith("unavailable: [Errno 38]")
        assert "Function not implemented" in gaps["landlock"]
        assert results[name]["echoed"] == "still works"


def test_no_unshare() -> None:
    results = _under_fake("unshare")
    assert results["strict"]["refused"] == "namespaces"
    assert "unshare -> EPERM" in results["strict"]["reason"]
    assert results["strict"]["spawned"] == 0
    for name in ("default", "basic"):
        gaps = _gaps(results[name])
        assert sorted(gaps) == ["namespaces", "rootfs"], name
        assert "unshare(): Operation not permitted" in gaps["namespaces"]
        assert "needs the namespaces layer" in gaps["rootfs"]
        # The uid drop works without a user namespace; so does the rest.
        assert results[name]["layers"]["credentials"] == "applied"
        assert results[name]["echoed"] == "still works"


def test_no_seccomp() -> None:
    results = _under_fake("seccomp")
    for name in ("strict", "default"):  # both require seccomp
        assert results[name]["refused"] == "seccomp", name
        assert "seccomp(SECCOMP_GET_ACTION_AVAIL) -> ENOSYS" in results[name]["reason"]
        assert results[name]["spawned"] == 0
    gaps = _gaps(results["basic"])
    assert list(gaps) == ["seccomp"]
    assert gaps["seccomp"].startswith("unavailable: [Errno 38]")
    assert results["basic"]["echoed"] == "still works"
