"""Tests of the test tooling itself (fd-leak detection in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _fds import fd_is_open

CONFTEST = Path(__file__).with_name("conftest.py")
FDS_MODULE = Path(__file__).with_name("_fds.py")


def proc_self_fd() -> set[int]:
    """Test-local reader of /proc/self/fd, dropping listdir's own (closed) fd."""
    listed = {int(name) for name in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if fd_is_open(fd)}


def test_listdir_reports_its_own_closed_fd() -> None:
    # os.listdir's directory fd shows up in the raw listing but is already closed
    # on return: the lowest free fd is listed and not open.  If this ever stops
    # being true the filtering in conftest.open_fds can be simplified.
    lowest_free = os.dup(0)
    os.close(lowest_free)
    raw = {int(name) for name in os.listdir("/proc/self/fd")}
    assert lowest_free in raw
    assert not fd_is_open(lowest_free)
    assert proc_self_fd() == proc_self_fd()
    assert lowest_free not in proc_self_fd()


def test_open_fds_sees_a_pipe_open_and_close() -> None:
    before = proc_self_fd()
    r, w = os.pipe()
    try:
        during = proc_self_fd()
        assert {r, w} <= during
        assert {r, w}.isdisjoint(before)
    finally:
        os.close(r)
        os.close(w)
    after = proc_self_fd()
    assert r not in after
    assert w not in after
    assert after == before


def test_fd_leak_fixture_fails_a_leaking_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(_fds=FDS_MODULE.read_text())
    pytester.makeini(
        """
        [pytest]
        trio_mode = true
        filterwarnings = error
        """
    )
    pytester.makepyfile(
        test_leaky="""
        import os
        import trio

        def test_leaks_a_pipe():
            os.pipe()

        def test_clean_after_leak():
            r, w = os.pipe()
            os.close(r)
            os.close(w)

        async def test_trio_own_fds_are_not_leaks():
            a, b = trio.socket.socketpair()
            with a, b:
                await a.send(b"x")
                assert await b.recv(1) == b"x"

        async def test_trio_test_leaks_a_pipe():
            await trio.sleep(0)
            os.pipe()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_pipe*",
            "test leaked 2 file descriptor(s):",
            "  fd * -> pipe:*",
            "  fd * -> pipe:*",
            "*ERROR at teardown of test_trio_test_leaks_a_pipe*",
            "test leaked 2 file descriptor(s):",
            "  fd * -> pipe:*",
            "  fd * -> pipe:*",
        ]
    )


def test_a_leak_whose_owner_closes_it_later_does_not_cascade(
    pytester: pytest.Pytester,
) -> None:
    # A leaked fd whose owner is still alive is closed by that owner later.
    # Had the fixture closed the number, the next test's file would reuse it
    # and the owner's late close would hit that file instead.
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(_fds=FDS_MODULE.read_text())
    pytester.makeini(
        """
        [pytest]
        filterwarnings = error
        """
    )
    pytester.makepyfile(
        test_late_owner="""
        import os

        class Owner:
            def __init__(self):
                self.r, self.w = os.pipe()

            def close_late(self):
                os.close(self.r)
                os.close(self.w)

        OWNERS = []

        def test_leaks_with_a_live_owner():
            OWNERS.append(Owner())

        def test_next_file_survives_the_late_close(tmp_path):
            fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
            try:
                OWNERS.pop().close_late()
                os.fstat(fd)  # still ours
            finally:
                os.close(fd)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_with_a_live_owner*"])
