"""Fuzz every target with atheris for a bounded time; report; measure coverage.

``nox -s fuzz -- --minutes N`` runs this.  The time is split over the
targets (``--jobs 2`` runs two at once, each getting twice the share).  Each
target runs in its own process (libFuzzer ends the process when it is
done), starting from its committed corpus ``tests/corpus/<target>/`` and
writing what it finds new to ``<workdir>/corpus/<target>/``.  Then every
input of both corpora is replayed under ``coverage`` to measure the branch
coverage of ``trio_mojo/_core/`` reached under fuzzing.

A finding (an input that breaks a target's rule, crashes or hangs) is saved
in ``<workdir>/findings/<target>/`` and fails the session; it belongs in
``tests/corpus/<target>/`` next to the fix.  ``--merge`` adds the new inputs
that reach new coverage to the committed corpus (libFuzzer ``-merge=1``).

Internal modes: ``--worker NAME`` (one target under atheris, given
libFuzzer's arguments after ``--``) and ``--replay`` (run corpora without
atheris, under coverage).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:  # so that ``fuzz`` and ``_fds`` import (not trio_mojo)
    sys.path.insert(0, str(TESTS))

from fuzz.targets import TARGETS, Target  # noqa: E402

HERE = Path(__file__).resolve()
PROJECT = TESTS.parent
CORE = "*/trio_mojo/_core/*"
_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")
_EXECUTED = re.compile(rb"stat::number_of_executed_units: (\d+)")


@dataclass
class Outcome:
    """What one target's fuzzing run did."""

    target: Target
    seconds: float
    executions: int
    new_entries: int
    findings: list[Path]
    status: int
    log: Path


def _entries(directory: Path) -> set[str]:
    return set(os.listdir(directory)) if directory.is_dir() else set()


def _worker_command(name: str, workdir: Path) -> list[str]:
    return [sys.executable, str(HERE), "--worker", name, "--workdir", str(workdir)]


def fuzz_target(target: Target, seconds: int, workdir: Path) -> Outcome:
    """Run one target for ``seconds``; collect executions and findings."""
    corpus = workdir / "corpus" / target.name
    findings = workdir / "findings" / target.name
    log = workdir / "logs" / f"{target.name}.log"
    for directory in (corpus, findings, log.parent):
        directory.mkdir(parents=True, exist_ok=True)
    target.corpus.mkdir(parents=True, exist_ok=True)
    before = _entries(corpus)
    options = [
        f"-max_total_time={seconds}",
        f"-max_len={target.max_len}",
        "-timeout=30",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={findings}/",
        "-print_final_stats=1",
    ]
    if target.dictionary:
        options.append(f"-dict={HERE.parent / target.dictionary}")
    command = [
        *_worker_command(target.name, workdir),
        "--",
        *options,
        str(corpus),
        str(target.corpus),
    ]
    started = time.monotonic()
    with log.open("wb") as output:
        status = subprocess.run(
            command, stdout=output, stderr=subprocess.STDOUT, check=False
        ).returncode
    elapsed = time.monotonic() - started
    text = log.read_bytes()
    counts = _EXECUTED.findall(text) or [m[0] for m in _DONE.findall(text)]
    executions = int(counts[-1]) if counts else 0
    return Outcome(
        target=target,
        seconds=elapsed,
        executions=executions,
        new_entries=len(_entries(corpus) - before),
        findings=sorted(findings.iterdir()),
        status=status,
        log=log,
    )


def merge_into_corpus(target: Target, workdir: Path) -> int:
    """Add the new inputs that reach new coverage to ``tests/corpus/``."""
    before = _entries(target.corpus)
    command = [
        *_worker_command(target.name, workdir),
        "--",
        "-merge=1",
        f"-max_len={target.max_len}",
        str(target.corpus),
        str(workdir / "corpus" / target.name),
    ]
    subprocess.run(command, capture_output=True, check=True)
    return len(_entries(target.corpus) - before)


def replay(directories: dict[str, list[Path]]) -> int:
    """Run every input through its target (no atheris); return failures."""
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        for name, dirs in directories.items():
            workdir = Path(scratch, name)
            workdir.mkdir()
            count = 0
            with TARGETS[name].load().open_target(workdir) as one_input:
                for directory in dirs:
                    for path in sorted(directory.iterdir()):
                        count += 1
                        try:
                            one_input(path.read_bytes())
                        except Exception as exc:
                            failures += 1
                            print(f"  {name}: {path}: {exc!r}", file=sys.stderr)
            print(f"replayed {count} inputs through {name}")
    return failures


def core_coverage(workdir: Path, names: list[str]) -> str:
    """Replay both corpora under coverage; the report for ``trio_mojo/_core``."""
    data = workdir / ".coverage.fuzz"
    args = [
        f"{name}={target.corpus}{os.pathsep}{workdir / 'corpus' / name}"
        for name, target in TARGETS.items()
        if name in names
    ]
    rcfile = f"--rcfile={PROJECT / 'pyproject.toml'}"
    coverage = [sys.executable, "-m", "coverage"]
    subprocess.run(
        [*coverage, "run", rcfile, f"--data-file={data}", str(HERE), "--replay", *args],
        check=True,
    )
    report = subprocess.run(
        [*coverage, "report", rcfile, f"--data-file={data}", f"--include={CORE}"],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = subprocess.run(
        [*coverage, "json", rcfile, f"--data-file={data}", f"--include={CORE}", "-o-"],
        capture_output=True,
        text=True,
        check=True,
    )
    totals = json.loads(summary.stdout)["totals"]
    return (
        f"{report.stdout}\nstatements {totals['covered_lines']}/"
        f"{totals['num_statements']}, branches {totals['covered_branches']}/"
        f"{totals['num_branches']}\n"
    )


def _fuzz_worker(name: str, workdir: Path, libfuzzer_args: list[str]) -> None:
    import atheris  # only the fuzz session installs it

    with atheris.instrument_imports(include=["trio_mojo"]):
        module = TARGETS[name].load()
    (workdir / "scratch").mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir / "scratch"))
    with module.open_target(scratch) as one_input:
        # libFuzzer starts argv[0] again for -merge=1: give it a command line.
        argv0 = " ".join(_worker_command(name, workdir))
        atheris.Setup([argv0, *libfuzzer_args], one_input)
        atheris.Fuzz()  # never returns: libFuzzer exits the process


def _print_summary(outcomes: list[Outcome], merged: dict[str, int]) -> None:
    print()
    print(
        f"{'target':<9} {'seconds':>7} {'executions':>11} {'exec/s':>7} "
        f"{'new entries':>11} {'findings':>8}"
    )
    for o in outcomes:
        rate = o.executions / o.seconds if o.seconds else 0.0
        print(
            f"{o.target.name:<9} {o.seconds:>7.0f} {o.executions:>11} {rate:>7.0f} "
            f"{o.new_entries:>11} {len(o.findings):>8}"
        )
    for name, count in merged.items():
        print(f"merged into tests/corpus/{name}: {count} input(s)")
    print()
    for o in outcomes:
        print(f"{o.target.name}: {o.target.rule()}")
        for finding in o.findings:
            print(f"  FINDING: {finding} (log: {o.log})")
        if o.status and not o.findings:
            print(f"  the fuzzer exited with status {o.status} (log: {o.log})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=4.0,
        help="total time, split over the targets (default 4)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated target names (default: all)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="targets fuzzed at once (default 1)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where corpora, findings and logs go (default: a temp dir)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add new coverage-increasing inputs to tests/corpus/",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--replay", nargs="*", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        _fuzz_worker(args.worker, args.workdir, [a for a in rest if a != "--"])
        return 0
    if args.replay is not None:
        dirs = {}
        for spec in args.replay:
            name, _, paths = spec.partition("=")
            dirs[name] = [Path(p) for p in paths.split(os.pathsep) if Path(p).is_dir()]
        return 1 if replay(dirs) else 0
    names = [name for name in args.targets.split(",") if name]
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; known: {list(TARGETS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trio-mojo-fuzz-"))
    workdir = workdir.resolve()
    for stale in ("corpus", "findings", "logs", "scratch"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    seconds = max(1, round(args.minutes * 60 * args.jobs / len(names)))
    print(f"fuzzing {names} for {seconds} s each ({args.jobs} at a time) in {workdir}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(
            pool.map(lambda n: fuzz_target(TARGETS[n], seconds, workdir), names)
        )
    merged = (
        {name: merge_into_corpus(TARGETS[name], workdir) for name in names}
        if args.merge
        else {}
    )
    _print_summary(outcomes, merged)
    print()
    print("branch coverage of trio_mojo/_core reached by the corpora:")
    print(core_coverage(workdir, names))
    failed = any(o.findings or o.status for o in outcomes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
