"""``python -m trio_mojo bench spawn`` runs end to end (tiny counts); no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trio_mojo._bench import main


def test_spawn_help_names_what_it_measures(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["spawn", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("Spawn-to-first-message", "forkserver", "--concurrent", "--reps"):
        assert words in text


def test_spawn_refuses_zero_repetitions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["spawn", "--reps", "0"])
    assert exit_info.value.code == 2
    assert "at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_spawn_bench_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "spawn.json"
    status = main(["spawn", "--reps", "2", "--concurrent", "3", "--json", str(out)])
    report = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert status == 0
    for key in ("zygote", "spawned", "mp_forkserver", "mp_spawn"):
        assert result[key]["n"] == 2
        assert result[key]["median_ms"] > 0
    assert result["zygote_concurrent_s"] > 0
    assert result["spawned_concurrent_s"] > 0
    assert set(result["zygote_steps"]) == {
        "request to pid",
        "sandbox, report, checks, go-ahead",
        "first round trip",
        "of which /proc checks",
    }
    assert result["mp_forkserver_concurrent_s"] > 0
    steps = list(result["child_steps"])
    assert steps[0] == "fork (and the namespace's init)"
    assert steps[-2:] == ["trio.run start", "channel, report, go-ahead"]
    # Every layer a strict() worker gets, in the order it gets them.
    layers = [name for name in steps if name.startswith("sandbox: ")]
    for earlier, later in [("namespaces", "rootfs"), ("landlock", "seccomp")]:
        assert layers.index(f"sandbox: {earlier}") < layers.index(f"sandbox: {later}")
    assert "3 workers started at once" in report
    assert "load average (1, 5, 15 min): before " in report
    assert "x mp_forkserver)" in report
