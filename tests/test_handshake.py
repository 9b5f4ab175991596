"""The go-ahead handshake: no target code runs before the parent's /proc checks.

A target that dies at once used to race the parent's checks: the parent
read the /proc of a dying process (``Seccomp: 3``, a sandboxed worker
reported as unsandboxed) or of a vanished one (a bare ``FileNotFoundError``).
Now the worker waits for the go-ahead, and a worker that dies during the
checks (killed from outside) is a ``WorkerError``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from _process_support import children

from trio_mojo import (
    CHANNEL_SWITCH,
    DisconnectedError,
    Handle,
    Message,
    SandboxPolicy,
    SandboxReport,
    SandboxUnavailableError,
    WorkerError,
    channel_pair,
    open_channel,
    open_worker,
)
from trio_mojo._sandbox import _pidns, _verify
from trio_mojo._workers import _worker
from trio_mojo._workers._handshake import (
    MAX_TARGET_ERROR,
    NO_GO_AHEAD_EXIT,
    TARGET_FAILED_PREFIX,
    go_ahead,
    parse_target_failed,
    target_failed,
)

STRICT = SandboxPolicy.strict()
RUNS = 5


@pytest.mark.parametrize(
    ("target", "returncode"),
    [
        ("x32_at_once", -signal.SIGSYS),
        ("int80_at_once", -signal.SIGSYS),
        ("sigkill_at_once", -signal.SIGKILL),
    ],
)
async def test_a_target_that_dies_at_once_is_always_a_worker_error(
    target: str, returncode: int
) -> None:
    async def run() -> None:
        async with open_worker(
            f"trio_mojo._sandbox._escapes:{target}", sandbox=STRICT
        ) as worker:
            assert worker.sandbox_report.ok  # verified before it ran
            await worker.channel.receive()

    for _ in range(RUNS):
        with pytest.raises(WorkerError) as info:
            await run()
        assert info.value.returncode == returncode


def _wait_exited(pid: int) -> None:
    """Until ``pid`` has exited (it may still be a zombie)."""
    with Handle(os.pidfd_open(pid)) as pidfd:
        select.select([pidfd.fileno()], [], [], 10)


def _wait_gone(pid: int) -> None:
    """Until ``pid`` has been reaped (its /proc entry is gone)."""
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("moment", ["exited", "vanished"])
async def test_a_worker_killed_during_the_checks_is_a_worker_error(
    monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    real_verify = _verify.verify_report
    killed = []

    def kill_then_verify(pid: int, *args: object) -> None:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        if moment == "exited":
            _wait_exited(pid)  # a zombie, or already reaped by its init
        else:
            _wait_gone(pid)  # reaped: every /proc read fails with ENOENT
        real_verify(pid, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_worker, "verify_report", kill_then_verify)
    before = children()
    for _ in range(RUNS):
        with pytest.raises(
            WorkerError, match="died before its sandbox was verified"
        ) as info:
            async with open_worker("trio_mojo._examples:echo", sandbox=STRICT):
                pytest.fail("the block must not run")  # pragma: no cover
        assert info.value.returncode == -signal.SIGKILL
        # What the checks saw: a half torn down process, or none at all.
        assert isinstance(info.value.__cause__, SandboxUnavailableError | OSError)
    assert len(killed) == RUNS
    assert children() == before


async def test_a_worker_gone_before_it_was_located_is_a_worker_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_worker_pid = _pidns.worker_pid

    def kill_then_locate(supervisor: int) -> int:
        worker = real_worker_pid(supervisor)
        os.kill(worker, signal.SIGKILL)
        _wait_gone(worker)
        return real_worker_pid(supervisor)  # the init is gone, or has no child

    monkeypatch.setattr(_worker, "worker_pid", kill_then_locate)
    with pytest.raises(WorkerError, match="died before") as info:
        async with open_worker("trio_mojo._examples:echo", sandbox=STRICT):
            pytest.fail("the block must not run")  # pragma: no cover
    assert info.value.returncode == -signal.SIGKILL
    assert isinstance(info.value.__cause__, OSError)


Answer = Callable[[SandboxReport], Message | None]


def _with_a_handle(report: SandboxReport) -> Message:
    """The right go-ahead payload, but with an fd attached."""
    r, w = os.pipe()
    os.close(w)
    return Message(go_ahead(report).payload, (Handle(r),))


ANSWERS: dict[str, Answer] = {
    "application data": lambda report: Message(b"hello"),
    "wrong nonce": lambda report: Message(b"trio-mojo go-ahead " + b"0" * 32),
    "with a handle": _with_a_handle,
    "nothing": lambda report: None,
}


async def _bootstrap(answer: Answer, limit: float) -> tuple[bytes | None, int]:
    """Start a bare bootstrap (echo target) and answer its report with ``answer``.

    Then sends ``b"echo this"``; returns what came back (None: the target
    never ran) and the exit status.
    """
    local, remote = channel_pair()
    with local, remote:
        argv = [
            sys.executable,
            "-I",
            "-m",
            "trio_mojo._workers._bootstrap",
            "--target=trio_mojo._examples:echo",
            f"--parent-pid={os.getpid()}",
            f"--sandbox={STRICT.to_json()}",
            f"--startup-timeout={limit}",
            f"{CHANNEL_SWITCH}={remote.fileno()}",
        ]
        process = await trio.lowlevel.open_process(
            argv, pass_fds=(remote.fileno(),), stdin=subprocess.DEVNULL
        )
        remote.close()
        echoed = None
        try:
            # A worker that refuses exits: our last send may meet EPIPE.
            with contextlib.suppress(DisconnectedError):
                async with open_channel(local) as channel:
                    with await channel.receive() as first:
                        report = SandboxReport.from_bytes(first.payload)
                    message = answer(report)
                    if message is not None:
                        await channel.send(message)
                    await channel.send(Message(b"echo this"))
                    with contextlib.suppress(trio.EndOfChannel):
                        reply = await channel.receive()
                        echoed = reply.payload
        finally:
            with trio.fail_after(30):
                status = await process.wait()
    return echoed, status


@pytest.mark.parametrize("answer", list(ANSWERS))
async def test_a_worker_without_its_go_ahead_never_runs_its_target(answer: str) -> None:
    started = time.monotonic()
    echoed, status = await _bootstrap(ANSWERS[answer], limit=1.0)
    assert echoed is None  # the echo target never ran
    assert status == NO_GO_AHEAD_EXIT
    assert time.monotonic() - started < 20  # bounded by --startup-timeout


async def test_the_go_ahead_lets_the_target_run() -> None:
    # The control for the test above.
    echoed, status = await _bootstrap(go_ahead, limit=30.0)
    assert echoed == b"echo this"
    assert status == 0


async def test_a_worker_that_never_reports_is_given_up_in_time(tmp_path: Path) -> None:
    silent = tmp_path / "silent-python"
    silent.write_text(  # says what it imports, but never runs a worker
        "#!/bin/sh\n"
        f'case "$*" in *--find-module=*) exec {sys.executable} "$@";; esac\n'
        "exec sleep 60\n"
    )
    silent.chmod(stat.S_IRWXU)
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"sent no sandbox report within 0\.5 s"):
        async with open_worker(
            "trio_mojo._examples:echo",
            sandbox=STRICT,
            python=silent,
            startup_timeout=0.5,
        ):
            pytest.fail("the block must not run")  # pragma: no cover
    assert time.monotonic() - started < 10


# ----------------------------------------------------------------------
# A target failure, in place of the report


def test_a_target_failure_is_one_escaped_line() -> None:
    payload = target_failed("m:f", "raised \x1b[2JError: a\nb\u202e")
    assert parse_target_failed(payload, "m:f") == ("raised \\x1b[2JError: a\\nb\\u202e")
    assert parse_target_failed(b'{"policy": "strict"}', "m:f") is None  # a report
    cut = target_failed("m:f", "x" * (MAX_TARGET_ERROR + 100))
    assert parse_target_failed(cut, "m:f") == "x" * MAX_TARGET_ERROR


@pytest.mark.parametrize(
    "body",
    [
        b"not JSON",
        b"[]",
        b'{"target": "m:f"}',
        b'{"target": "m:f", "error": "e", "more": 1}',
        b'{"target": "other:f", "error": "e"}',
        b'{"target": "m:f", "error": 7}',
        b'{"target": "m:f", "error": "' + b"x" * (MAX_TARGET_ERROR + 1) + b'"}',
        b"[" * 100_000,
    ],
    ids=["text", "list", "no error", "more", "other target", "int", "long", "deep"],
)
def test_a_malformed_target_failure_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="target failure"):
        parse_target_failed(TARGET_FAILED_PREFIX + body, "m:f")
