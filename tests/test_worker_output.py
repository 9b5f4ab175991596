"""A worker's output: forwarded line by line with ``forward_output=True``.

Each line of the worker's stderr (stdout) reaches this process's
``sys.stderr`` (``sys.stdout``) as ``[worker PID] text``, control
characters escaped, a long line cut at :data:`MAX_LINE_BYTES` (and the
rest of it dropped), a last line without a newline written when the worker
ends; spawned and forked workers alike.  By default nothing is forwarded.
The line splitting is pure and checked against a model.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest
from _process_support import shown_chain, worker_block_error
from _zygote_support import interpreter
from hypothesis import given
from hypothesis import strategies as st

from trio_mojo import (
    Message,
    SandboxPolicy,
    Worker,
    WorkerError,
    open_worker,
    open_worker_pool,
    open_zygote,
)
from trio_mojo._workers import _pool as _pool_module
from trio_mojo._workers import _worker as _worker_module
from trio_mojo._workers._output import (
    MAX_LINE_BYTES,
    LineSplitter,
    ReadBudget,
    format_line,
)

BASIC = SandboxPolicy.basic()
TARGET = "output_targets:write_as_told"
CUT = f" [line cut at {MAX_LINE_BYTES} bytes]"


# ----------------------------------------------------------------------
# The line splitter and the format of a line (pure)


def test_lines_are_split_across_chunks_and_the_last_one_ends_with_the_stream() -> None:
    lines = LineSplitter()
    assert lines.feed(b"one\ntw") == [(b"one", False)]
    assert lines.feed(b"o\n\nthr") == [(b"two", False), (b"", False)]
    assert lines.feed(b"ee") == []
    assert lines.end() == [(b"three", False)]
    assert lines.end() == []


def test_a_long_line_is_cut_at_once_and_the_rest_dropped_to_its_newline() -> None:
    lines = LineSplitter(max_line=4)
    assert lines.feed(b"abc") == []
    assert lines.feed(b"d") == []  # exactly the limit: not cut yet
    assert lines.feed(b"\n") == [(b"abcd", False)]
    assert lines.feed(b"efghij") == [(b"efgh", True)]
    assert lines.feed(b"k" * 10_000) == []  # dropped, not held
    assert lines.feed(b"l\nmn\n") == [(b"mn", False)]
    assert lines.feed(b"opqrstuvwxyz") == [(b"opqr", True)]
    assert lines.end() == []  # what was dropped is not a last line


def test_the_read_budget_allows_a_burst_then_the_rate() -> None:
    budget = ReadBudget(100, now=0.0)
    assert budget.spend(100, now=0.0) == 0.0  # the first burst
    assert budget.spend(50, now=0.0) == pytest.approx(0.5)
    assert budget.spend(50, now=1.0) == 0.0  # the wait paid, 50 bytes saved
    assert budget.spend(60, now=1.0) == pytest.approx(0.6)
    assert budget.spend(0, now=60.0) == 0.0
    assert budget.spend(100, now=60.0) == 0.0  # saves up one burst, no more
    assert budget.spend(1, now=60.0) == pytest.approx(0.01)


@given(
    reads=st.lists(
        st.tuples(st.integers(0, 500), st.floats(0, 2, allow_nan=False)), max_size=50
    )
)
def test_reads_that_wait_as_told_average_the_rate(
    reads: list[tuple[int, float]],
) -> None:
    budget = ReadBudget(100, now=0.0)
    now = total = 0.0
    for nbytes, pause in reads:
        total += nbytes
        now += pause + budget.spend(nbytes, now)
        assert total <= 100 + 100 * now + 1e-6


def _model(data: bytes, max_line: int) -> list[tuple[bytes, bool]]:
    """What the splitter must say about ``data``, all at once."""
    *complete, last = data.split(b"\n")
    lines = [(line[:max_line], len(line) > max_line) for line in complete]
    if last:
        lines.append((last[:max_line], len(last) > max_line))
    return lines


@given(
    data=st.binary(max_size=300).map(lambda raw: raw.replace(b"\x00", b"\n")),
    cuts=st.lists(st.integers(0, 300), max_size=10),
    max_line=st.integers(1, 20),
)
def test_the_splitter_holds_little_whatever_the_chunks(
    data: bytes, cuts: list[int], max_line: int
) -> None:
    lines = LineSplitter(max_line=max_line)
    got = []
    offsets = [0, *sorted(cut for cut in cuts if cut <= len(data)), len(data)]
    for start, end in itertools.pairwise(offsets):
        got += lines.feed(data[start:end])
        assert len(lines._partial) <= max_line
    got += lines.end()
    assert got == _model(data, max_line)


def test_a_forwarded_line_is_prefixed_and_escaped() -> None:
    bidi = "\u202ereversed\u202c".encode()
    raw = b"a \x1b[2Jcleared\r, " + bidi + b", a\ttab and \xff"
    assert format_line(42, raw, False) == (
        "[worker 42] a \\x1b[2Jcleared\\r, \\u202ereversed\\u202c, a\ttab and \ufffd\n"
    )
    assert format_line(7, b"x" * MAX_LINE_BYTES, True) == (
        f"[worker 7] {'x' * MAX_LINE_BYTES}{CUT}\n"
    )


# ----------------------------------------------------------------------
# Real workers, spawned and forked


@asynccontextmanager
async def _worker(
    tmp_path: Path, forked: bool, *, forward_output: bool = False
) -> AsyncIterator[Worker]:
    python = interpreter(tmp_path)  # finds output_targets
    if not forked:
        async with open_worker(
            TARGET, sandbox=BASIC, python=python, forward_output=forward_output
        ) as worker:
            yield worker
        return
    async with (
        open_zygote(python=python, sandbox=BASIC) as zygote,
        open_worker(TARGET, zygote=zygote, forward_output=forward_output) as worker,
    ):
        yield worker


async def _write(worker: Worker, fd: int, data: bytes) -> None:
    await worker.channel.send(Message(b"%d " % fd + data))
    assert (await worker.channel.receive()).payload == b"written"


FORKED = pytest.mark.parametrize("forked", [False, True], ids=["spawned", "forked"])


@FORKED
async def test_each_line_is_forwarded_with_the_worker_pid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], forked: bool
) -> None:
    async with _worker(tmp_path, forked, forward_output=True) as worker:
        await _write(worker, 1, b"one\ntwo\n")
        await _write(worker, 2, b"warn \x1b[31mred\x1b[0m\r\n")
        await _write(worker, 2, b"a\ttab\n")
        await _write(worker, 1, b"\xff\xfe not UTF-8\n")
        await _write(worker, 2, b"x" * (1 << 20) + b"\nafter the long one\n")
        await _write(worker, 1, b"no newline at the end")
    # Leaving the block waited for the last lines.
    out, err = capsys.readouterr()
    prefix = f"[worker {worker.pid}] "
    assert out == (
        f"{prefix}one\n{prefix}two\n{prefix}\ufffd\ufffd not UTF-8\n"
        f"{prefix}no newline at the end\n"
    )
    assert err == (
        f"{prefix}warn \\x1b[31mred\\x1b[0m\\r\n{prefix}a\ttab\n"
        f"{prefix}{'x' * MAX_LINE_BYTES}{CUT}\n{prefix}after the long one\n"
    )
    assert worker.stderr_tail.endswith("x\nafter the long one\n")  # kept too


@FORKED
async def test_a_worker_that_dies_mid_line_has_its_last_line_forwarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], forked: bool
) -> None:
    async def body(worker: Worker) -> None:
        await _write(worker, 2, b"first\nhalf a li")
        await worker.channel.send(Message(b"exit 3"))
        await worker.channel.receive()

    worker, error = await worker_block_error(
        WorkerError, lambda: _worker(tmp_path, forked, forward_output=True), body
    )
    assert error.returncode == 3
    assert shown_chain(error) == [error]
    prefix = f"[worker {worker.pid}] "
    assert capsys.readouterr().err == f"{prefix}first\n{prefix}half a li\n"


@FORKED
async def test_by_default_nothing_is_forwarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], forked: bool
) -> None:
    async with _worker(tmp_path, forked) as worker:
        await _write(worker, 1, b"to /dev/null\n")
        await _write(worker, 2, b"to the tail\n")
    assert capsys.readouterr() == ("", "")
    assert worker.stderr_tail == "to the tail\n"


async def test_stdout_and_forwarding_exclude_each_other() -> None:
    with pytest.raises(ValueError, match=re.escape("leave stdout= unset")):
        async with open_worker(
            "trio_mojo._examples:echo",
            sandbox=BASIC,
            stdout=None,  # type: ignore[arg-type]
            forward_output=True,
        ):
            pytest.fail("the block must not run")


async def test_a_pool_forwards_the_output_of_its_workers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with open_worker_pool(
        "trio_mojo._examples_pool:faulty", workers=1, sandbox=BASIC, forward_output=True
    ) as pool:
        (worker,) = pool.workers
        with pytest.raises(WorkerError):
            await pool.run(Message(b"crash 3"))
        # The request failed once its worker's block had ended, and with it
        # the forwarding of the worker's last lines.
        err = capsys.readouterr().err
        assert err == f"[worker {worker.pid}] faulty: crashing as asked\n"


@pytest.mark.parametrize(
    ("option", "hint"),
    [
        ("stderr", "Worker.stderr_tail"),
        ("max_mesage_size", "open_channel, which takes"),
    ],
)
async def test_an_option_open_channel_lacks_is_refused_before_spawning(
    monkeypatch: pytest.MonkeyPatch, option: str, hint: str
) -> None:
    def no_spawn(*args: object, **kwargs: object) -> NoReturn:
        pytest.fail("nothing may be spawned for a call that is refused")

    monkeypatch.setattr(_worker_module, "start_with_endpoints", no_spawn)
    monkeypatch.setattr(_worker_module, "check_target", no_spawn)
    options: dict[str, Any] = {option: subprocess.PIPE}
    with pytest.raises(TypeError, match=f"{option!r}: .*{re.escape(hint)}"):
        async with open_worker("trio_mojo._examples:echo", sandbox=BASIC, **options):
            pytest.fail("the block must not run")


async def test_a_pool_refuses_an_option_open_channel_lacks_before_spawning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_spawn(*args: object, **kwargs: object) -> NoReturn:
        pytest.fail("nothing may be spawned for a call that is refused")

    monkeypatch.setattr(_pool_module, "open_zygote", no_spawn)
    monkeypatch.setattr(_pool_module, "check_target", no_spawn)
    options: dict[str, Any] = {"stderr": subprocess.PIPE}
    with pytest.raises(TypeError, match=r"open_worker_pool.*'stderr'.*stderr_tail"):
        async with open_worker_pool("trio_mojo._examples:echo", **options):
            pytest.fail("the block must not run")
    # open_worker's own options and open_channel's pass the check.
    monkeypatch.undo()
    async with open_worker_pool(
        "trio_mojo._examples:echo",
        workers=1,
        zygote=False,
        sandbox=BASIC,
        grace_period=2.0,
        max_message_size=1 << 20,
    ) as pool:
        assert (await pool.run(Message(b"ok"))).payload == b"ok"
