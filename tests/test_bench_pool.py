"""``python -m trio_mojo bench pool``: the JSON job runs end to end (tiny counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trio_mojo._bench import main
from trio_mojo._bench._pool import make_documents, profile_pool, summarize


def test_documents_are_about_3_6_kb_and_summaries_small() -> None:
    documents = make_documents(200)
    mean = sum(map(len, documents)) / len(documents)
    assert 3300 < mean < 3900
    assert documents == make_documents(200)  # the same for every system
    summary = json.loads(summarize(documents[7]))
    assert summary["id"] == 7
    assert set(summary) == {"id", "items", "skus", "total"}
    assert len(summarize(documents[7])) < 100


def test_help_names_the_systems(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["pool", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for system in ("trio_mojo", "mp_chunk1", "mp_chunk64", "trio_parallel", "anyio"):
        assert system in text


def test_pool_bench_runs_and_checks_every_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pool.json"
    argv = ["pool", "--count", "300", "--workers", "2", "--reps", "1"]
    argv += ["--systems", "trio_mojo,mp_chunk64", "--json", str(out)]
    status = main(argv)
    report = capsys.readouterr().out
    assert status == 0
    result = json.loads(out.read_text())
    assert [run["errors"] for run in result["runs"]] == [[], []]
    summary = result["summary"]
    assert summary["trio_mojo"]["trio_mojo_vs_this"] == pytest.approx(1.0)
    assert summary["mp_chunk64"]["docs_per_s"] > 0
    assert "mp_chunk64" in report
    assert "trio_mojo / system" in report


def test_the_profile_splits_a_request_by_layer() -> None:
    text = profile_pool(200, 1)
    for layer in ("pool:", "channel:", "trio:", "kernel:"):
        assert layer in text
    assert "us/request" in text
