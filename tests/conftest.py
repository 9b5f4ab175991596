"""Shared test configuration: fd-leak detection, install check, hypothesis profiles."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _fds import open_fds
from hypothesis import HealthCheck, settings

pytest_plugins = ["pytester"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_PACKAGE = REPO_ROOT / "trio_mojo"

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _describe_fd(fd: int) -> str:
    try:
        return f"fd {fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError as exc:  # closed in the meantime
        return f"fd {fd} -> <unreadable: {exc}>"


@pytest.fixture(autouse=True)
def _no_fd_leaks() -> Iterator[None]:
    """Fail any test that leaves new file descriptors open.

    This is a *sync* fixture, so it wraps the whole ``trio.run`` that pytest-trio
    performs for an async test: Trio's own epoll and wakeup fds are closed by the
    time the "after" snapshot is taken.  No ``gc.collect()`` is done first on
    purpose: an fd that is only closed by a finalizer is a leak.
    """
    before = open_fds()
    yield
    leaked = sorted(open_fds() - before)
    if not leaked:
        return
    details = [_describe_fd(fd) for fd in leaked]
    # Keep one leak from cascading into later tests without closing the
    # numbers: an owner still alive (a task, a Handle in a cycle) would later
    # close whatever file had meanwhile reused its number.  So let finalizers
    # run now, then point each number still open at /dev/null: it stays
    # allocated (and harmless) until its owner, if any, closes it.
    gc.collect()
    still_open = sorted(open_fds() & set(leaked))
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in still_open:
            with contextlib.suppress(OSError):
                os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)
    pytest.fail(
        f"test leaked {len(leaked)} file descriptor(s):\n  " + "\n  ".join(details),
        pytrace=False,
    )


@pytest.fixture(scope="session", autouse=True)
def _require_installed_package() -> None:
    """With TRIO_MOJO_REQUIRE_INSTALLED=1, refuse to test the source tree."""
    if os.environ.get("TRIO_MOJO_REQUIRE_INSTALLED") != "1":
        return
    import trio_mojo  # imported lazily: collection must not depend on it

    # Compare against the source package directory, not the whole repository:
    # nox's virtualenvs (and so their site-packages) live in <repo>/.nox/.
    location = Path(trio_mojo.__file__ or "").resolve()
    if location.is_relative_to(SOURCE_PACKAGE):
        pytest.fail(
            f"TRIO_MOJO_REQUIRE_INSTALLED=1 but trio_mojo was imported from the "
            f"source tree ({location}) instead of the installed package. Run the "
            "tests through `nox -s tests` (which installs the package and sets "
            "PYTHONSAFEPATH=1 so the working directory is not on sys.path), or "
            "unset TRIO_MOJO_REQUIRE_INSTALLED to test the source tree directly.",
            pytrace=False,
        )
