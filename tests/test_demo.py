"""The main job, ``python -m trio_mojo demo``, end to end in real processes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import trio_mojo


def _run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_mojo", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_hashes_the_installed_package_and_matches_hashlib() -> None:
    result = _run_demo()
    assert result.returncode == 0, result.stderr
    package = Path(trio_mojo.__file__).resolve().parent
    rows = [
        line.split()
        for line in result.stdout.splitlines()
        if line.startswith(str(package))
    ]
    expected = {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in package.iterdir()
        if p.is_file() and p.suffix in (".py", ".typed")
    }
    assert {row[0]: row[2] for row in rows} == expected
    assert all(row[-1] == "yes" for row in rows)
    pids = {row[3] for row in rows}
    assert len(pids) <= 2
    assert "sandbox reports:" in result.stdout
    # Two workers start; one may have hashed every file before the other was ready.
    assert result.stdout.count("policy=basic [ok]") == 2


def test_demo_on_given_paths_with_one_worker(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a" * 3_000_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "empty").write_bytes(b"")
    result = _run_demo("--workers", "1", str(tmp_path))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert hashlib.sha256(b"a" * 3_000_000).hexdigest() in text
    assert hashlib.sha256(b"").hexdigest() in text
    assert "2 file(s) hashed by 1 worker(s)" in text


def test_demo_reports_a_file_the_parent_cannot_open(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = _run_demo(str(missing))
    assert result.returncode == 1
    assert "parent cannot open it" in result.stdout
    assert "1 file(s) failed" in result.stderr


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
