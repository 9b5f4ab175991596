"""Developer and CI task runner: ``nox`` runs lint, typing and tests.

Extra sessions (not run by default): ``nox -s slow``, ``nox -s bench`` and
``nox -s docs``, ``nox -s fuzz -- --minutes N`` and ``nox -s soak -- --minutes N``.
"""

from __future__ import annotations

import nox

nox.needs_version = ">=2024.10"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "typing", "tests"]

PYPROJECT = nox.project.load_toml("pyproject.toml")

# The pure sans-I/O core: 100% branch coverage is enforced on these files.
CORE_MODULES = ("_wire.py", "_decoder.py", "_encoder.py")
CORE_INCLUDE = ",".join(f"*/trio_mojo/_core/{name}" for name in CORE_MODULES)

# Tests run against the *installed* (non-editable) package. ``python -m`` and
# ``coverage run -m`` would put the current directory first on sys.path, so the
# source tree would shadow the installed copy; PYTHONSAFEPATH=1 prevents that, and
# tests/conftest.py checks it when TRIO_MOJO_REQUIRE_INSTALLED=1.
INSTALLED_ENV = {"PYTHONSAFEPATH": "1", "TRIO_MOJO_REQUIRE_INSTALLED": "1"}

# The tutorial's example project: tests/test_docs_examples.py runs the
# tutorial's programs, whose workers (``python -I``) import it.
TUTORIAL_PROJECT = "./docs/tutorial/project"

# The soak's worker target, installed so that isolated workers import it.
SOAK_TARGET = "./tests/soak/target"


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def lint(session: nox.Session) -> None:
    """Run ruff (lint rules and formatting check)."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """Run mypy --strict over the package and the tests."""
    session.install(".", *_group("typing"))
    session.run("mypy", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite under coverage; the sans-I/O core must be 100% covered."""
    session.install(".", TUTORIAL_PROJECT, *_group("test"))
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs, env=INSTALLED_ENV)
    # Paths in the data file point into this venv's site-packages; the
    # ``*/trio_mojo/...`` patterns match them.
    session.run("coverage", "report")
    session.run("coverage", "report", "--fail-under=100", f"--include={CORE_INCLUDE}")


@nox.session
def slow(session: nox.Session) -> None:
    """Run only the tests marked ``slow`` (no coverage gate)."""
    session.install(".", TUTORIAL_PROJECT, *_group("test"))
    session.run("pytest", "-m", "slow", *session.posargs, env=INSTALLED_ENV)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmark suite shipped with the package."""
    session.install(".", *_group("bench"))
    session.run(
        "python", "-m", "trio_mojo", "bench", *session.posargs, env=INSTALLED_ENV
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation: every warning is an error, every reference
    must resolve (nitpicky), and nothing is fetched from the network."""
    session.install(".", *_group("docs"))
    session.run(
        "sphinx-build",
        "-E",  # read every page: a saved environment hides old warnings
        "-W",
        "-n",
        "--keep-going",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        *session.posargs,
    )


@nox.session
def fuzz(session: nox.Session) -> None:
    """Fuzz the parsers with atheris, bounded by time: ``nox -s fuzz -- --minutes N``.

    The time is split over the targets in ``tests/fuzz/``; per target it
    prints executions and new corpus entries, then the branch coverage of
    ``trio_mojo/_core`` that the corpora reach.  Any finding fails the
    session.  ``-- --merge`` adds new coverage to ``tests/corpus/``; see
    ``tests/fuzz/run.py --help`` for the rest.
    """
    session.install(".", *_group("fuzz"))
    workdir = session.create_tmp()
    session.run(
        "python",
        "tests/fuzz/run.py",
        "--workdir",
        workdir,
        *session.posargs,
        env=INSTALLED_ENV,
    )


@nox.session
def soak(session: nox.Session) -> None:
    """Soak the parent and its sandboxed workers: ``nox -s soak -- --minutes N``.

    Mixed traffic (0 B to 1 MiB, 0 to 16 fds, random cancellations) between
    the parent and ``strict()`` workers, a recycling pool and ``open_worker`` churn; every reply checked against
    digests, every fd by identity.  The
    parent's RSS, fds and tasks are sampled at quiet points every few
    seconds; after a warm-up (the first half), a least-squares slope over
    the second half whose implied growth exceeds a tolerance (RSS 16 MiB +
    5%, fds 8, tasks 8) fails the session, as does any bad reply, a child
    process left behind, or an fd or task left once the workers are closed.
    Table, CSV, plot (PNG) and log go to ``build/soak/`` (``--output``); see
    ``tests/soak/run.py --help`` for the rest.
    """
    session.install(".", SOAK_TARGET, *_group("soak"))
    session.run("python", "tests/soak/run.py", *session.posargs, env=INSTALLED_ENV)
