"""SandboxPolicy and SandboxReport: the named opt-out, refusing what cannot be
applied before anything is spawned, and checking a worker's claims in /proc.

Nothing here sandboxes the pytest process (the layers cannot be undone):
every layer is applied in a child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _process_support import children

from trio_mojo import (
    FileAccess,
    Handle,
    Message,
    Requirement,
    SandboxPolicy,
    SandboxReport,
    SandboxUnavailableError,
    WorkerError,
    open_worker,
)
from trio_mojo._sandbox import _landlock, _seccomp
from trio_mojo._sandbox._namespaces import NAMESPACES, differing_namespaces
from trio_mojo._sandbox._policy import LAYERS
from trio_mojo._sandbox._verify import verify_report


def _landlock_available() -> bool:
    try:
        _landlock.abi_version()
    except OSError:
        return False
    return True


LANDLOCK = _landlock_available()

UNSANDBOXED = SandboxPolicy.none(i_understand_this_is_unsandboxed=True)


def _only(*layers: str, **fields: Any) -> SandboxPolicy:
    """A policy that requires ``layers`` and turns every other layer off."""
    levels: dict[str, Any] = {
        layer: "required" if layer in layers else "off" for layer in LAYERS
    }
    levels["name"] = "only-" + "-".join(layers)
    return SandboxPolicy(**{**levels, **fields})


def _proc_status(pid: int | str) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _proc_limit(pid: int, label: str) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(label):
            soft, hard = line[len(label) :].split()[:2]
            return soft, hard
    raise AssertionError(f"no {label!r} in /proc/{pid}/limits")


# ----------------------------------------------------------------------
# The explicit opt-out


def test_none_needs_the_explicit_flag() -> None:
    with pytest.raises(ValueError, match="i_understand_this_is_unsandboxed=True"):
        SandboxPolicy.none()
    for almost in (False, 1, "yes", None):
        with pytest.raises(ValueError, match="without any sandbox"):
            SandboxPolicy.none(i_understand_this_is_unsandboxed=almost)  # type: ignore[arg-type]
    assert UNSANDBOXED.is_unsandboxed
    assert not SandboxPolicy.basic().is_unsandboxed


# ----------------------------------------------------------------------
# Refused before spawning


@pytest.fixture
def no_spawning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to start a process."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize(
    ("policy", "layer"),
    [
        (SandboxPolicy.strict(), "seccomp"),
        (SandboxPolicy.default(), "seccomp"),
        (None, "seccomp"),  # open_worker's default is strict()
    ],
)
async def test_unavailable_layers_are_refused_before_spawning(
    no_spawning: None,
    monkeypatch: pytest.MonkeyPatch,
    policy: SandboxPolicy | None,
    layer: str,
) -> None:
    # As on a machine without a syscall table for seccomp (not x86_64).
    monkeypatch.setattr(_seccomp, "SUPPORTED", False)
    before = children()
    with pytest.raises(SandboxUnavailableError) as info:
        async with open_worker("trio_mojo._examples:echo", sandbox=policy):
            pytest.fail("the block must not run")  # pragma: no cover
    assert info.value.layer == layer
    assert "no syscall table" in info.value.reason
    assert "SandboxPolicy.basic()" in str(info.value)  # the hint at a fix
    assert children() == before


def test_check_passes_when_nothing_missing_is_required() -> None:
    SandboxPolicy.basic().check()
    UNSANDBOXED.check()
    _only("rlimits", "no_new_privs", seccomp="if_available").check()


# ----------------------------------------------------------------------
# Applied in the child, verified from /proc


async def test_basic_applies_no_new_privs_and_rlimits() -> None:
    policy = SandboxPolicy.basic()
    async with open_worker("trio_mojo._examples:echo", sandbox=policy) as worker:
        report = worker.sandbox_report
        status = _proc_status(worker.pid)
        files = _proc_limit(worker.pid, "Max open files")
        core = _proc_limit(worker.pid, "Max core file size")
        separated = sorted(differing_namespaces(worker.pid))
    assert report.ok
    assert report.layers["no_new_privs"] == "applied"
    assert report.layers["rlimits"] == "applied"
    assert report.layers["fd_hygiene"] == "applied"
    assert report.layers["seccomp"] == "applied", report.layers
    assert status["Seccomp"] == "2"
    assert report.layers["namespaces"] == "applied", report.layers
    assert separated == sorted(NAMESPACES)
    if LANDLOCK:
        assert report.layers["landlock"] == "applied"
    else:
        assert report.layers["landlock"].startswith("unavailable: ")
    assert "basic" in report.describe()
    # Checked from outside, where the worker cannot lie.
    assert status["NoNewPrivs"] == "1"
    assert files == (str(policy.max_open_files),) * 2
    assert core == ("0", "0")


async def test_none_applies_nothing() -> None:
    if _proc_status("self")["NoNewPrivs"] == "1":
        pytest.skip("this test process already runs with no_new_privs")
    async with open_worker("trio_mojo._examples:echo", sandbox=UNSANDBOXED) as worker:
        report = worker.sandbox_report
        status = _proc_status(worker.pid)
    assert {layer for layer, state in report.layers.items() if state != "off"} == {
        "fd_hygiene"
    }
    assert status["NoNewPrivs"] == "0"  # the control: the check above can fail


async def test_a_layer_that_fails_in_the_worker_is_named() -> None:
    # More open files than the kernel allows (fs.nr_open): setrlimit fails.
    policy = _only(
        "rlimits", "no_new_privs", name="too-many-files", max_open_files=2**40
    )
    with pytest.raises(SandboxUnavailableError) as info:
        async with open_worker("trio_mojo._examples:echo", sandbox=policy):
            pytest.fail("the block must not run")  # pragma: no cover
    assert info.value.layer == "rlimits"
    assert "setrlimit" in info.value.reason


async def test_a_worker_that_cannot_start_its_loop_is_a_worker_error() -> None:
    # NOFILE=3 is applied (the channel, above it, stays usable), but then
    # Trio cannot create its epoll fd: a clear failure, not a hang.
    policy = _only("rlimits", "no_new_privs", max_open_files=3)
    with pytest.raises(WorkerError, match="exited before it was ready") as info:
        async with open_worker("trio_mojo._examples:echo", sandbox=policy):
            pytest.fail("the block must not run")  # pragma: no cover
    assert "Too many open files" in info.value.stderr_tail


# ----------------------------------------------------------------------
# verify_report: the parent does not take the worker's word


def _layers(**changes: str) -> dict[str, str]:
    layers = {
        "fd_hygiene": "applied",
        "credentials": "unavailable: x",
        "namespaces": "unavailable: x",
        "rootfs": "unavailable: x",
        "rlimits": "applied",
        "no_new_privs": "applied",
        "landlock": "unavailable: x",
        "seccomp": "unavailable: x",
    }
    layers.update(changes)
    return layers


def _report(pid: int, **changes: Any) -> SandboxReport:
    """A report claiming what ``basic()`` applies, for ``pid``."""
    fields: dict[str, Any] = {
        "policy": "basic",
        "pid": pid,
        "uid": 0,
        "layers": _layers(),
        "fds": (0, 1, 2, 3),
    }
    fields.update(changes)
    return SandboxReport(**fields)


async def test_verify_report_catches_claims_proc_contradicts() -> None:
    if _proc_status("self")["NoNewPrivs"] == "1":
        pytest.skip("this test process already runs with no_new_privs")
    basic = SandboxPolicy.basic()
    rlimits_only = _only("rlimits")
    async with open_worker("trio_mojo._examples:echo", sandbox=UNSANDBOXED) as worker:
        pid = worker.pid  # a live process with neither layer applied
        cases: dict[str, tuple[SandboxPolicy, SandboxReport]] = {
            "no_new_privs": (basic, _report(pid)),
            "rlimits": (rlimits_only, _report(pid, layers=_layers(no_new_privs="off"))),
            "report": (basic, _report(pid + 1)),
            "landlock": (_only("rlimits", "no_new_privs", "landlock"), _report(pid)),
            "credentials": (
                UNSANDBOXED,  # a root worker with every capability
                _report(pid, layers=_layers(credentials="applied", no_new_privs="off")),
            ),
            "rootfs": (
                UNSANDBOXED,  # a worker with the parent's root
                _report(pid, layers=_layers(rootfs="applied", no_new_privs="off")),
            ),
        }
        for layer, (policy, report) in cases.items():
            with pytest.raises(SandboxUnavailableError) as info:
                verify_report(pid, policy, report)
            assert info.value.layer == layer
        failed = _report(pid, failed="rlimits", reason="setrlimit: EPERM")
        with pytest.raises(SandboxUnavailableError, match="setrlimit: EPERM"):
            verify_report(pid, basic, failed)


# ----------------------------------------------------------------------
# Serialisation


@pytest.mark.parametrize(
    "policy",
    [
        SandboxPolicy.strict(),
        SandboxPolicy.default(),
        SandboxPolicy.basic(),
        UNSANDBOXED,
        SandboxPolicy(
            name="custom",
            rlimits=Requirement.IF_AVAILABLE,
            seccomp="off",
            max_open_files=None,
            max_file_size=1 << 20,
            max_address_space=1 << 32,
        ),
    ],
    ids=lambda policy: policy.name,
)
def test_policy_json_round_trip(policy: SandboxPolicy) -> None:
    text = policy.to_json()
    assert json.loads(text)["name"] == policy.name
    assert SandboxPolicy.from_json(text) == policy


def test_policy_fields_are_checked() -> None:
    with pytest.raises(TypeError, match="JSON object"):
        SandboxPolicy.from_json("[]")
    with pytest.raises(ValueError, match="is not a valid Requirement"):
        SandboxPolicy(seccomp="sometimes")
    for bad in (-1, 1.5, True, "256"):
        with pytest.raises(ValueError, match="non-negative int"):
            SandboxPolicy(max_open_files=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SandboxPolicy.from_json('{"no_such_field": 1}')


def test_report_round_trip() -> None:
    report = _report(1234, failed="rlimits", reason="why")
    assert SandboxReport.from_bytes(report.to_bytes()) == report
    assert not SandboxReport.from_bytes(report.to_bytes()).ok
    assert SandboxReport.from_bytes(_report(5).to_bytes()).ok


def _good() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_report(1234).to_bytes())
    return data


def _with(**changes: Any) -> bytes:
    data = _good()
    for key, value in changes.items():
        if value is KeyError:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[]", id="a-list"),
        pytest.param(b"null", id="null"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),
        pytest.param(_with(pid=KeyError), id="no-pid"),
        pytest.param(_with(pid="1234"), id="pid-string"),
        pytest.param(_with(pid=True), id="pid-bool"),
        pytest.param(_with(pid=1.0), id="pid-float"),
        pytest.param(_with(pid=-1), id="pid-negative"),
        pytest.param(_with(uid=None), id="uid-null"),
        pytest.param(_with(layers=["applied"]), id="layers-list"),
        pytest.param(_with(layers={"rlimits": {"nested": 1}}), id="layer-not-text"),
        pytest.param(_with(fds="0123"), id="fds-string"),
        pytest.param(_with(fds=[0, 1, "2"]), id="fd-string"),
        pytest.param(_with(fds=[0, -1]), id="fd-negative"),
        pytest.param(_with(policy=None), id="policy-null"),
        pytest.param(_with(policy=["basic"]), id="policy-list"),
        pytest.param(_with(failed=7), id="failed-number"),
        pytest.param(_with(reason={"x": 1}), id="reason-object"),
        pytest.param(_with(layers=KeyError), id="no-layers"),
        pytest.param(_with(reason="x" * (1 << 20)), id="huge"),
    ],
)
def test_malformed_reports_are_rejected(payload: bytes) -> None:
    with pytest.raises(ValueError, match="malformed sandbox report"):
        SandboxReport.from_bytes(payload)


@pytest.mark.skipif(not LANDLOCK, reason="this kernel has no Landlock")
async def test_landlock_takes_the_file_system_network_and_signals_away(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the worker")
    policy = _only("rlimits", "no_new_privs", "landlock")
    async with open_worker(
        "trio_mojo._examples:attempt_escapes", sandbox=policy
    ) as worker:
        assert worker.sandbox_report.layers["landlock"] == "applied"
        await worker.channel.send(Message(str(secret).encode()))
        confined = json.loads((await worker.channel.receive()).payload)
    assert confined == {
        "open": "EACCES",
        "create": "EACCES",
        "listdir": "EACCES",
        "exec": "EACCES",
        "tcp": "EACCES",
        "signal_parent": "EPERM",
    }
    assert not (tmp_path / "secret.new").exists()
    # The control: the same attempts succeed (or fail otherwise) without it.
    async with open_worker(
        "trio_mojo._examples:attempt_escapes", sandbox=UNSANDBOXED
    ) as worker:
        await worker.channel.send(Message(str(secret).encode()))
        free = json.loads((await worker.channel.receive()).payload)
    assert (
        free["open"] == free["create"] == free["listdir"] == free["exec"] == "ALLOWED"
    )
    assert free["signal_parent"] == "ALLOWED"
    assert free["tcp"] != "EACCES"


@pytest.mark.skipif(not LANDLOCK, reason="this kernel has no Landlock")
async def test_a_landlocked_worker_still_reads_files_through_the_broker(
    tmp_path: Path,
) -> None:
    (tmp_path / "data.txt").write_bytes(b"brokered bytes")
    async with open_worker(
        "trio_mojo._examples:broker_reader",
        sandbox=SandboxPolicy.basic(),
        file_access=[FileAccess.read_only(tmp_path)],
    ) as worker:
        assert worker.sandbox_report.layers["landlock"] == "applied"
        await worker.channel.send(Message(f"r {tmp_path / 'data.txt'}".encode()))
        assert (await worker.channel.receive()).payload == b"ok brokered bytes"


async def test_required_landlock_missing_is_refused_before_spawning(
    monkeypatch: pytest.MonkeyPatch, no_spawning: None
) -> None:
    def no_landlock() -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(_landlock, "abi_version", no_landlock)
    policy = _only("no_new_privs", "landlock")
    with pytest.raises(SandboxUnavailableError) as caught:
        async with open_worker("trio_mojo._examples:echo", sandbox=policy):
            raise AssertionError("unreachable")
    assert caught.value.layer == "landlock"
    assert "landlock_create_ruleset -> ENOSYS" in caught.value.reason


@pytest.mark.skipif(not LANDLOCK, reason="this kernel has no Landlock")
def test_landlock_refuses_a_multithreaded_process() -> None:
    # Below ABI 8 only the calling thread would be confined: refuse instead.
    script = (
        "import threading\n"
        "from trio_mojo._sandbox._apply import lock_down\n"
        "from trio_mojo._sandbox._policy import LAYERS, SandboxPolicy\n"
        "e = threading.Event(); t = threading.Thread(target=e.wait); t.start()\n"
        "levels = {layer: 'off' for layer in LAYERS}\n"
        "report = lock_down(SandboxPolicy(**{**levels, 'landlock': 'required'}), ())\n"
        "print(report.failed, report.reason)\n"
        "e.set(); t.join()\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout == (
        "landlock landlock needs a single-threaded process (2 threads)\n"
    )


async def test_namespaces_cut_the_worker_off_the_network(tmp_path: Path) -> None:
    policy = _only("namespaces")
    async with open_worker(
        "trio_mojo._examples:attempt_escapes", sandbox=policy
    ) as worker:
        assert worker.sandbox_report.layers["namespaces"] == "applied"
        assert sorted(differing_namespaces(worker.pid)) == sorted(NAMESPACES)
        await worker.channel.send(Message(str(tmp_path / "x").encode()))
        attempts = json.loads((await worker.channel.receive()).payload)
    assert attempts["tcp"] == "ENETUNREACH"  # a network namespace with no interface up


async def test_verify_report_catches_a_false_namespaces_claim() -> None:
    # A worker that claims namespaces it did not enter is caught from /proc.
    async with open_worker("trio_mojo._examples:echo", sandbox=UNSANDBOXED) as worker:
        report = worker.sandbox_report
        forged = SandboxReport(
            policy="forged",
            pid=report.pid,
            uid=report.uid,
            layers={**report.layers, "namespaces": "applied"},
            fds=report.fds,
        )
        with pytest.raises(SandboxUnavailableError, match="parent's"):
            verify_report(worker.pid, UNSANDBOXED, forged)


async def test_strict_runs_a_worker_with_every_layer() -> None:
    # open_worker's default policy: every layer required, and all of them
    # are available on this kind of machine.
    async with open_worker("trio_mojo._examples:echo") as worker:
        report = worker.sandbox_report
        status = _proc_status(worker.pid)
        r, w = os.pipe()
        os.write(w, b"through the sandbox")
        os.close(w)
        await worker.channel.send(Message(b"ping", (Handle(r),)))
        with await worker.channel.receive() as echoed:
            assert echoed.payload == b"ping"
            assert os.read(echoed.handles[0].fileno(), 64) == b"through the sandbox"
    assert report.ok
    assert report.policy == "strict"
    assert {k: v for k, v in report.layers.items() if v != "applied"} == {}
    assert status["Seccomp"] == "2"
    assert status["NoNewPrivs"] == "1"


async def test_seccomp_refuses_what_the_allowlist_does_not_name(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    policy = _only("rlimits", "no_new_privs", "seccomp")
    async with open_worker(
        "trio_mojo._examples:attempt_escapes", sandbox=policy
    ) as worker:
        await worker.channel.send(Message(str(secret).encode()))
        attempts = json.loads((await worker.channel.receive()).payload)
    assert attempts == {
        "open": "EPERM",
        "create": "EPERM",
        "listdir": "EPERM",
        "exec": "EPERM",
        "tcp": "EPERM",
        "signal_parent": "EPERM",
    }
