"""docs/security.rst shows the escape matrix of a real run, not a typed one."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from trio_mojo._escape_matrix import COLUMNS, measure, render
from trio_mojo._sandbox._escapes import ATTEMPTS

SECURITY_RST = Path(__file__).resolve().parents[1] / "docs" / "security.rst"
BEGIN = ".. escape-matrix-begin\n\n"
END = "\n.. escape-matrix-end"
LABELS = [column.label for column in COLUMNS]


def _documented_matrix() -> str:
    text = SECURITY_RST.read_text()
    start = text.index(BEGIN) + len(BEGIN)
    return text[start : text.index(END, start)]


def test_the_documented_matrix_has_every_attempt_and_every_policy() -> None:
    rule, header, _, *rows, _ = _documented_matrix().splitlines()
    # A simple table: each column starts where a run of "=" starts.
    starts = [
        i for i, char in enumerate(rule) if char == "=" and rule[i - 1 : i] != "="
    ]
    ends = [*starts[1:], None]
    cells = [
        [line[start:end].strip() for start, end in zip(starts, ends, strict=True)]
        for line in (header, *rows)
    ]
    assert cells[0] == ["attempt", *LABELS]
    assert [row[0] for row in cells[1:]] == [entry.name for entry in ATTEMPTS]
    assert all(all(row) for row in cells), "every cell has an outcome"


@pytest.mark.skipif(
    os.geteuid() != 0 or platform.machine() != "x86_64",
    reason="the documented matrix was measured with a root parent on x86_64",
)
async def test_the_documented_matrix_is_a_fresh_run() -> None:
    fresh = render(await measure(), LABELS)
    assert _documented_matrix() == fresh
