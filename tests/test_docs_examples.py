"""Every Python example in README.md and docs/ runs, and prints what it shows.

Each complete program is run as a script (``python program.py``) in a
temporary directory, with a timeout; when the documentation shows its
output, the output must match (``...`` matches anything).  A block marked
``.. part-of: PROGRAM`` is a fragment: it must really come from a program
these tests run.  The tutorial's programs import the ``wordcount`` package
of ``docs/tutorial/project``, which ``nox -s tests`` installs.
"""

from __future__ import annotations

import doctest
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _docs_support import DOCS, README, ROOT, Snippet, all_snippets, rst_pages

import trio_mojo

SNIPPETS = all_snippets()
PROGRAMS = [s for s in SNIPPETS if s.part_of is None]
FRAGMENTS = [s for s in SNIPPETS if s.part_of is not None]
TIMEOUT = 120


def _program_files() -> set[Path]:
    return {s.path for s in PROGRAMS if s.path is not None}


def _run(snippet: Snippet, tmp_path: Path) -> str:
    if snippet.path is not None:
        program = snippet.path
    else:
        assert snippet.code is not None
        program = tmp_path / "example.py"
        program.write_text(snippet.code)
    result = subprocess.run(
        [sys.executable, str(program)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (
        f"{snippet.where} exited with {result.returncode}:\n{result.stderr}"
    )
    return result.stdout


def _matches(expected: str, got: str) -> bool:
    checker = doctest.OutputChecker()
    return checker.check_output(expected, got, doctest.ELLIPSIS)


@pytest.mark.parametrize("snippet", PROGRAMS, ids=[s.where for s in PROGRAMS])
def test_the_example_runs_and_prints_what_the_docs_show(
    snippet: Snippet, tmp_path: Path
) -> None:
    output = _run(snippet, tmp_path)
    if snippet.output is not None:
        assert _matches(snippet.output, output), (
            f"{snippet.where} printed:\n{output}\nthe docs show:\n{snippet.output}"
        )


def _fragment_target(snippet: Snippet) -> Path:
    assert snippet.part_of is not None
    for base in (DOCS, ROOT):
        candidate = (base / snippet.part_of).resolve()
        if candidate.is_file():
            return candidate
    raise AssertionError(f"{snippet.where}: part-of names {snippet.part_of!r}, no file")


def _is_executed(path: Path) -> bool:
    """A program the tests run, or a module such a program's workers import."""
    modules = (ROOT / "trio_mojo", DOCS / "tutorial" / "project" / "src")
    return path in _program_files() or any(path.is_relative_to(m) for m in modules)


@pytest.mark.parametrize("snippet", FRAGMENTS, ids=[s.where for s in FRAGMENTS])
def test_a_fragment_comes_from_a_program_that_runs(snippet: Snippet) -> None:
    target = _fragment_target(snippet)
    assert _is_executed(target), f"{snippet.where}: {target} is never run"
    text = target.read_text()
    if snippet.code is not None:
        assert snippet.code.strip() in text, f"{snippet.where} is not in {target}"
    else:
        assert snippet.path is not None
        assert snippet.path == target or snippet.path.stem in text, (
            f"{snippet.where}: {target} does not use {snippet.path.name}"
        )


def test_the_examples_are_found() -> None:
    wheres = [s.where for s in SNIPPETS]
    assert any(w.startswith("README.md") for w in wheres)
    assert any(w.startswith("docs/index.rst") for w in wheres)
    assert any(w.startswith("docs/tutorial.rst") for w in wheres)
    assert sum(s.output is not None for s in PROGRAMS) >= 10


def test_every_example_file_is_shown_in_the_docs() -> None:
    """A program under docs/ that no page includes would be tested by nothing."""
    shown = {s.path for s in SNIPPETS if s.path is not None}
    tooling = {DOCS / "conf.py"}
    examples = {
        path
        for path in DOCS.rglob("*.py")
        if path not in tooling
        and not {"_ext", "inventories", "_build"} & set(path.parts)
        and path.name != "__init__.py"
    }
    assert examples <= shown, f"never included: {sorted(examples - shown)}"


_PYTHON_LINE = re.compile(r"^\s*(import |from \S+ import |async def |await )")


def test_no_python_hides_in_a_literal_block() -> None:
    """Python code must be in a python block, where these tests find it."""
    for page in rst_pages():
        lines = page.read_text().splitlines()
        for index, line in enumerate(lines):
            if not line.rstrip().endswith("::") or line.lstrip().startswith(".."):
                continue
            block = []
            for following in lines[index + 1 :]:
                if following.strip() and not following.startswith((" ", "\t")):
                    break
                block.append(following)
            code = [b for b in block if _PYTHON_LINE.match(b)]
            assert not code, f"{page.name}:{index + 1} has Python in a literal block"


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = README.read_text()
    command = "python3 -m pip install nox && nox"
    assert f"```sh\n{command}\n```" in readme
    assert ci[-1] == command


def _public_objects() -> list[tuple[str, object]]:
    return [(name, getattr(trio_mojo, name)) for name in trio_mojo.__all__]


def test_docstring_examples_hold() -> None:
    """Examples in docstrings (shown by the API reference) run as doctests."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name, obj in _public_objects():
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        for test in finder.find(obj, name, module=False, globs=vars(trio_mojo).copy()):
            runner.run(test, out=lambda _: None)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 1
    assert result.failed == 0
