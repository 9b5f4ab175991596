"""The fuzz targets: names, where their corpus lives, their input limits.

Importing this module imports no target (and so no trio_mojo): the fuzz
runner must import the targets under atheris' instrumentation.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["CORPUS", "TARGETS", "Target"]

TESTS = Path(__file__).resolve().parent.parent
CORPUS = TESTS / "corpus"
"""``tests/corpus/<target>/``: the inputs replayed by every default test run."""


class _TargetModule(Protocol):
    def open_target(
        self, workdir: Path
    ) -> contextlib.AbstractContextManager[Callable[[bytes], None]]: ...


@dataclass(frozen=True)
class Target:
    """One fuzz target: the module ``fuzz.<name>`` and how to fuzz it."""

    name: str
    max_len: int
    """libFuzzer's ``-max_len``: the longest input it makes."""
    dictionary: str | None = None
    """A libFuzzer dictionary file next to this module, if any."""

    @property
    def corpus(self) -> Path:
        return CORPUS / self.name

    def load(self) -> _TargetModule:
        module: _TargetModule = importlib.import_module(f"fuzz.{self.name}")
        return module

    def rule(self) -> str:
        """The first line of the target's docstring."""
        doc = importlib.import_module(f"fuzz.{self.name}").__doc__ or ""
        return doc.strip().splitlines()[0]


TARGETS = {
    target.name: target
    for target in (
        Target("decoder", max_len=16384),
        Target("encoder", max_len=4096),
        Target("broker", max_len=512),
        Target("report", max_len=8192, dictionary="report.dict"),
    )
}
