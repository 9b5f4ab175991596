"""The benchmark suite runs end to end (tiny counts); no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trio_mojo._bench import main
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
    for name in names:
        cells = result["summary"][name]
        for system in ("trio_mojo", "mp", "raw"):  # always installed
            cell = cells[system]
            assert cell["reps"] == 1
            assert cell["median"] > 0
        assert cells["mp"]["vs_mp"] == pytest.approx(1.0)
        assert name in report

    assert len(result["targets"]) == 8
    extras = result["extras"]
    assert "error" not in extras["idle"]
    assert extras["slow_consumer"]["passed"]
    assert extras["trickle"]["passed"]
    assert extras["trickle"]["outcome"] == "DisconnectedError"
    assert extras["spawn"]["python_import_trio_median_ms"] > 0
