"""The benchmark suite runs end to end (tiny counts); no timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trio_mojo._bench import main
from trio_mojo._bench._extras import FORKED_SYSTEMS, helper_main
from trio_mojo._bench._instructions import render as render_instructions
from trio_mojo._bench._report import forked_line, render, versus_peers
from trio_mojo._bench._workloads import WORKLOADS


def test_help_explains_the_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for workload in WORKLOADS:
        assert workload.name in text
    assert "--quick" in text
    assert "--json" in text


def test_help_and_output_speak_to_users_not_to_the_tracker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--plot" in text
    assert not re.search(r"issue|#\d", text, re.IGNORECASE)
    report = render(fake_result())
    assert not re.search(r"issue|#\d|MISSED", report, re.IGNORECASE)


def fake_result() -> dict[str, Any]:
    """A bench result with made-up medians (no process is started)."""
    figures = {
        "W1": {"trio_mojo": 400e3, "mp": 200e3, "uvloop": 800e3},
        "W4": {"trio_mojo": 30.0, "mp": 15.0, "uvloop": 60.0},
        "W4w": {"trio_mojo": 45.0},
    }
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for workload, cells in figures.items():
        summary[workload] = {
            system: {
                "median": value,
                "spread": 0.0,
                "reps": 1,
                "failed_reps": 0,
                "cpu_us_per_msg": 1.0,
                "sender_cpu_us_per_msg": 0.5,
                "receiver_cpu_us_per_msg": 0.5,
                "receiver_hwm_kib": 1024,
                "receiver_rss_growth_kib": 0,
                "rtt_p99_us": value * 2,
            }
            for system, value in cells.items()
        }
    for workload, row in summary.items():
        reference = figures.get(workload, {}).get("mp") or figures["W4"]["mp"]
        for cell in row.values():
            faster = workload.startswith("W4")
            cell["vs_mp"] = (
                reference / cell["median"] if faster else cell["median"] / reference
            )
    return {
        "meta": {
            "mode": "quick",
            "reps": 1,
            "environment": "test",
            "counts": {"W1": 10, "W4": 10, "W4w": 10},
        },
        "summary": summary,
        "versus_peers": versus_peers(summary),
        "honesty": {"runs": 6, "passed": 6, "failures": []},
    }


def test_the_report_ends_with_trio_mojo_against_each_peer() -> None:
    result = fake_result()
    assert result["versus_peers"]["W1"] == {"mp": 2.0, "uvloop": 0.5}
    assert result["versus_peers"]["W4"] == {"mp": 0.5, "uvloop": 2.0}
    # W4w has no peer of its own: it is set against the peers' W4.
    assert result["versus_peers"]["W4w"] == {"mp": 15 / 45, "uvloop": 60 / 45}
    report = render(result)
    table = report[report.index("trio_mojo against each peer") :]
    assert "| W1" in table
    assert "| W4w (peers: W4)" in table
    assert "2x" in table
    assert "0.333x" in table


def test_plot_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs the bench extra")
    path = tmp_path / "bench.png"
    # In a child process: matplotlib keeps its font files open for good.
    script = (
        "import json, pathlib, sys\n"
        "from trio_mojo._bench._plot import plot\n"
        "plot(json.loads(sys.argv[1]), pathlib.Path(sys.argv[2]))\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(fake_result()), str(path)],
        check=True,
        timeout=120,
    )
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "matplotlib" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit) as exit_info:
        main(["--plot", "out.png"])
    assert exit_info.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_unknown_system_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--systems", "nonesuch"])
    assert exit_info.value.code == 2
    assert "nonesuch" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    status = main(["--quick", "--reps", "1", "--scale", "0.03", "--json", str(out)])
    report = capsys.readouterr().out
    result = json.loads(out.read_text())

    # Every run's honesty checks passed: each receiver counted every message,
    # payload byte and fd, and nothing more.
    honesty = result["honesty"]
    assert honesty["failures"] == []
    assert honesty["passed"] == honesty["runs"] > 0
    assert status == 0

    names = [workload.name for workload in WORKLOADS]
    assert result["meta"]["workloads"] == names
    for workload in WORKLOADS:
        cells = result["summary"][workload.name]
        systems = ("trio_mojo",) if workload.worker else ("trio_mojo", "mp")
        for system in systems:
            cell = cells[system]
            assert cell["reps"] == 1
            assert cell["median"] > 0
        if not workload.worker:
            assert cells["mp"]["vs_mp"] == pytest.approx(1.0)
        assert result["versus_peers"][workload.name]["mp"] > 0
        assert workload.name in report
    assert "trio_mojo against each peer" in report
    assert not re.search(r"issue|#\d|MISSED", report, re.IGNORECASE)
    extras = result["extras"]
    assert "error" not in extras["idle"]
    assert extras["slow_consumer"]["passed"]
    assert extras["trickle"]["passed"]
    assert extras["trickle"]["outcome"] == "DisconnectedError"
    assert extras["spawn"]["python_import_trio_median_ms"] > 0
    assert all("error" not in extras["forked"][name] for name in FORKED_SYSTEMS)


@pytest.mark.parametrize("floor", ["trio_floor", "trio_tasks"])
def test_the_floors_pass_the_honesty_checks_of_every_one_way_workload(
    floor: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The floors that the performance docs set trio_mojo against must move
    # the same messages, bytes and fds (a payload spanning reads, fds
    # batched up to 128 per sendmsg) as every other peer.
    out = tmp_path / "floor.json"
    workloads = ("W1", "W2", "W3", "W5", "W5x8")
    status = main(
        [
            "--quick",
            "--reps",
            "1",
            "--scale",
            "0.05",
            "--no-extras",
            "--systems",
            floor,
            "--workloads",
            ",".join(workloads),
            "--json",
            str(out),
        ]
    )
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert status == 0
    assert result["honesty"]["failures"] == []
    assert result["honesty"]["passed"] == len(workloads)
    for name in workloads:
        assert result["summary"][name][floor]["median"] > 0


def test_trio_floor_api_passes_the_honesty_checks_of_w4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "floor_api.json"
    options = ["--quick", "--reps", "1", "--scale", "0.05", "--no-extras"]
    status = main(
        [
            *options,
            "--systems",
            "trio_floor_api",
            "--workloads",
            "W4",
            "--json",
            str(out),
        ]
    )
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert status == 0
    assert result["honesty"] == {**result["honesty"], "failures": [], "passed": 1}
    assert result["summary"]["W4"]["trio_floor_api"]["median"] > 0


def test_w4_with_a_forked_receiver_passes_the_honesty_checks() -> None:
    # The forked variant runs the same sender and receiver functions; only
    # how the receiver's process starts differs.
    result = helper_main("forked", ["300"])
    assert result["count"] == 300
    for system in FORKED_SYSTEMS:
        assert "error" not in result[system], result[system]
        assert result[system]["p50_us"] > 0
    line = forked_line(result, {"mp": {"median": 20.0}})
    assert line.startswith("* W4 with the receiver forked from the sender")
    assert "mp " in line
    assert "(fresh receiver: 20.0 us)" in line


def test_instructions_help_says_what_is_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["instructions", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "callgrind" in text
    assert "user-space" in text
    assert not re.search(r"issue|#\d", text, re.IGNORECASE)


def test_instructions_table_sets_trio_mojo_against_each_peer() -> None:
    cell = {"count": 10, "totals": [0, 0], "errors": []}
    results = {
        "W4": {
            "trio_mojo": {
                **cell,
                "per_message": 180_000.0,
                "by_role": {"sender": 100_000.0, "receiver": 80_000.0},
            },
            "trio_floor": {**cell, "per_message": 120_000.0},
        },
        "W1": {
            "trio_mojo": {**cell, "per_message": 30_000.0},
            "mp": {**cell, "per_message": 20_000.0, "errors": ["short count"]},
        },
    }
    table = render_instructions(results)
    assert "| W4 | 180.0k | n/a | 120.0k (1.50x) |" in table
    assert "| W1 | 30.0k | 20.0k (failed) | n/a |" in table
    by_role = table.split("sender + receiver:")[1]
    assert "| W4 | 100.0k + 80.0k | n/a | n/a |" in by_role


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_instructions_counts_a_workload_under_callgrind(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    options = ["--systems", "trio_mojo", "--workloads", "W1", "--scale", "0.05"]
    status = main(["instructions", *options, "--json", str(out)])
    assert status == 0
    cell = json.loads(out.read_text())["W1"]["trio_mojo"]
    assert cell["errors"] == []
    low, high = cell["totals"]
    assert high > low > 0
    assert cell["per_message"] > 1000  # instructions: a message is not free
    split = cell["by_role"]
    assert split["sender"] > 0
    assert split["receiver"] > 0
    assert split["sender"] + split["receiver"] <= cell["per_message"] * 1.01
    assert json.loads(out.read_text())["scheduler_pass"] > 1000
