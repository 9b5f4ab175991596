"""The main job, ``python -m trio_mojo demo``, end to end in real processes."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio_mojo

_WITHOUT_DAC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""
"""Run the rest of argv as root that obeys file modes like anyone: dropped
from the bounding set, the DAC capabilities are not in the exec'd program's
permitted set, so mode 000 means no access even for uid 0."""


def _run_demo(
    *args: str, as_root_without_dac: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "trio_mojo", "demo", *args]
    if as_root_without_dac:
        argv = [sys.executable, "-c", _WITHOUT_DAC, *argv[1:]]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False
    )


def _table(stdout: str, root: Path) -> dict[str, tuple[str, str]]:
    """``{path: (sha256, ok)}`` from the demo's table rows under ``root``."""
    rows = [line.split() for line in stdout.splitlines() if line.startswith(str(root))]
    return {row[0]: (row[2], row[3]) for row in rows if len(row) == 4}


def test_demo_hashes_the_installed_package_and_matches_hashlib() -> None:
    result = _run_demo()
    assert result.returncode == 0, result.stderr
    package = Path(trio_mojo.__file__).resolve().parent
    expected = {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in package.iterdir()
        if p.is_file() and p.suffix in (".py", ".typed")
    }
    table = _table(result.stdout, package)
    assert {path: digest for path, (digest, _) in table.items()} == expected
    assert all(ok == "yes" for _, ok in table.values())
    assert "sandbox reports:" in result.stdout
    assert result.stdout.count("policy=basic [ok]") == 2  # two workers started


def test_demo_on_given_paths_with_one_worker(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a" * 3_000_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "empty").write_bytes(b"")
    result = _run_demo("--workers", "1", str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = _table(result.stdout, tmp_path)
    assert table == {
        str(tmp_path / "a.bin"): (hashlib.sha256(b"a" * 3_000_000).hexdigest(), "yes"),
        str(tmp_path / "sub" / "empty"): (hashlib.sha256(b"").hexdigest(), "yes"),
    }
    assert "2 file(s) hashed by 1 worker(s)" in result.stdout
    assert "0 missing, 0 unreadable, 0 skipped" in result.stdout


def test_demo_works_under_strict(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"strict")
    (tmp_path / "b.txt").write_bytes(b"")
    result = _run_demo("--strict", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert _table(result.stdout, tmp_path) == {
        str(tmp_path / "a.txt"): (hashlib.sha256(b"strict").hexdigest(), "yes"),
        str(tmp_path / "b.txt"): (hashlib.sha256(b"").hexdigest(), "yes"),
    }
    assert result.stdout.count("policy=strict [ok]") == 2, result.stdout


def test_demo_prints_progress_and_caps_workers_at_the_files(tmp_path: Path) -> None:
    (tmp_path / "only").write_bytes(b"one file")
    result = _run_demo("--workers", "8", str(tmp_path / "only"))
    assert result.returncode == 0, result.stderr
    assert "1 file(s) hashed by 1 worker(s)" in result.stdout
    assert result.stdout.count("policy=basic [ok]") == 1
    assert "starting a zygote and 1 sandboxed worker(s) forked from it..." in (
        result.stderr
    )
    assert re.search(
        r"1 worker\(s\) forked from zygote pid \d+ ready; hashing 1 file\(s\)",
        result.stderr,
    )
    assert "[1/1] hashed" in result.stderr


def test_demo_skips_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "regular").write_bytes(b"data")
    started = time.monotonic()
    result = _run_demo(str(fifo), str(tmp_path / "regular"))
    assert time.monotonic() - started < 60
    assert result.returncode == 0, result.stderr
    assert f"skipped (1):\n  {fifo}: a FIFO" in result.stdout
    assert "1 file(s) hashed" in result.stdout
    # The FIFO inside a directory walk is skipped the same way.
    walked = _run_demo(str(tmp_path))
    assert walked.returncode == 0, walked.stderr
    assert f"{fifo}: a FIFO" in walked.stdout


def test_demo_fails_when_it_hashed_nothing(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = _run_demo(str(fifo))
    assert result.returncode == 1
    assert "0 file(s) hashed by 0 worker(s)" in result.stdout
    assert "nothing was hashed" in result.stderr
    assert "sandbox reports:" not in result.stdout  # no worker was started


def test_demo_reports_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "present").write_bytes(b"here")
    missing = tmp_path / "missing"
    result = _run_demo(str(missing), str(tmp_path / "present"))
    assert result.returncode == 1
    assert f"missing (1):\n  {missing}: no such file or directory" in result.stdout
    assert "1 file(s) hashed" in result.stdout
    assert str(missing) not in _table(result.stdout, tmp_path)


def test_demo_reports_unreadable_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"no")
    (tmp_path / "secret").chmod(0)
    (tmp_path / "closed").mkdir()
    (tmp_path / "closed" / "inside").write_bytes(b"unseen")
    (tmp_path / "closed").chmod(0)
    (tmp_path / "open").write_bytes(b"yes")
    try:
        result = _run_demo(str(tmp_path), as_root_without_dac=os.geteuid() == 0)
    finally:
        (tmp_path / "closed").chmod(0o700)
    assert result.returncode == 1, result.stdout
    assert "unreadable (2):" in result.stdout
    assert f"  {tmp_path / 'closed'}: Permission denied" in result.stdout
    assert f"  {tmp_path / 'secret'}: Permission denied" in result.stdout
    assert "1 file(s) hashed" in result.stdout
    assert "0 missing, 2 unreadable, 0 skipped" in result.stdout


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_exits_quietly_on_ctrl_c(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as file:
        file.truncate(64 << 30)  # sparse: hashing it takes far longer than the test
    demo = subprocess.Popen(
        [sys.executable, "-m", "trio_mojo", "demo", str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell starts a background job (nohup, &)
        # with SIGINT ignored, and Python then keeps it ignored.
        preexec_fn=_default_sigint,  # noqa: PLW1509 (only signal(), no locks)
    )
    try:
        assert demo.stderr is not None
        seen = []
        for line in demo.stderr:
            seen.append(line)
            if "ready; hashing" in line:
                break
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 130, "".join(seen) + stderr
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr


def test_cli_help_and_unknown_command() -> None:
    usage = subprocess.run(
        [sys.executable, "-m", "trio_mojo", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert usage.returncode == 0
    assert "demo" in usage.stdout
    assert "bench" in usage.stdout
    demo_help = _run_demo("--help")
    assert demo_help.returncode == 0
    assert "file descriptor" in demo_help.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "trio_mojo", "frobnicate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unknown.returncode == 2
    assert "unknown command" in unknown.stderr
