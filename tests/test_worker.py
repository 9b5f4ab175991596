"""open_worker: real worker processes running the targets of ``trio_mojo._examples``.

Every test starts at least one ``python -I -m trio_mojo._workers._bootstrap`` child
(about 0.12 s each).  The autouse fixture of ``conftest.py`` checks that no
fd is left behind in this process; :func:`assert_reaped` and
:func:`children` check that no process is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
from _process_support import (
    assert_reaped,
    children,
    echo_a_pipe,
    inheritable_fds,
    pidfds_from_a_parent,
    pipe_with,
    wait_exited,
    worker_block_error,
)

from trio_mojo import (
    CHANNEL_SWITCH,
    Channel,
    DisconnectedError,
    Handle,
    Message,
    SandboxPolicy,
    SandboxReport,
    Worker,
    WorkerError,
    channel_pair,
    open_channel,
    open_worker,
)
from trio_mojo._workers._handshake import go_ahead
from trio_mojo._workers._output import escape_controls

NONE = SandboxPolicy.none(i_understand_this_is_unsandboxed=True)
BASIC = SandboxPolicy.basic()
POLICIES = [pytest.param(BASIC, id="basic"), pytest.param(NONE, id="none")]
WITH_PROC = attrs.evolve(BASIC, name="basic-with-proc", rootfs="off")
"""``basic()`` but with the host's root, so ``describe_self`` can read /proc."""


def _own_pid(host_pid: int) -> int:
    """The pid process ``host_pid`` sees itself as (the last ``NSpid``)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid in /proc/{host_pid}/status")


async def _describe(worker_channel: Channel, *handles: Handle) -> dict[str, Any]:
    await worker_channel.send(Message(b"describe", handles))
    reply = await worker_channel.receive()
    with reply:
        info: dict[str, Any] = json.loads(reply.payload)
    return info


# ----------------------------------------------------------------------
# Messages with fds both ways


@pytest.mark.parametrize("policy", POLICIES)
async def test_worker_exchanges_framed_messages_with_fds(policy: SandboxPolicy) -> None:
    async with open_worker("trio_mojo._examples:echo", sandbox=policy) as worker:
        assert worker.sandbox_report.policy == policy.name
        assert worker.sandbox_report.pid == _own_pid(worker.pid)
        await echo_a_pipe(worker)
        running = worker.returncode
    assert running is None
    assert worker.returncode == 0
    assert_reaped(worker.pid)


@pytest.mark.parametrize(
    "policy", [pytest.param(WITH_PROC, id="basic"), pytest.param(NONE, id="none")]
)
async def test_worker_receives_fds_close_on_exec(policy: SandboxPolicy) -> None:
    async with open_worker(
        "trio_mojo._examples:describe_self", sandbox=policy
    ) as worker:
        info = await _describe(worker.channel, pipe_with(b"one"), pipe_with(b"two"))
        assert info["pid"] == _own_pid(worker.pid)
    assert info["received"] == ["one", "two"]
    assert info["cloexec"] == [True, True]


# ----------------------------------------------------------------------
# fd hygiene in the child


async def test_worker_fd_table_is_stdio_and_the_channel(tmp_path: Path) -> None:
    with inheritable_fds(tmp_path) as leaky:
        async with open_worker(
            "trio_mojo._examples:describe_self", sandbox=WITH_PROC
        ) as worker:
            info = await _describe(worker.channel)
    # Before trio.run: taken by the bootstrap just before the target's loop.
    fds = worker.sandbox_report.fds
    assert fds[:3] == (0, 1, 2)
    assert len(fds) == 4
    channel_fd = fds[3]
    table = {int(fd): target for fd, target in info["fds"].items()}
    creators = {int(fd): pid for fd, pid in info["socket_creators"].items()}
    # The channel is the socket pair end the parent (this process) made:
    # outside the worker's PID namespace, so its pid shows as 0 there.
    assert table[channel_fd].startswith("socket:")
    assert creators[channel_fd] == 0
    assert table[0] == "/dev/null"
    assert table[2].startswith("pipe:")
    # Everything else was made inside the worker after the report, by
    # trio.run: one epoll fd and Trio's wakeup socket pairs.  None of it
    # came from this process.
    extra = {fd: target for fd, target in table.items() if fd not in fds}
    epolls = [fd for fd, target in extra.items() if target == "anon_inode:[eventpoll]"]
    assert len(epolls) == 1
    own_sockets = {fd for fd in extra if fd not in epolls}
    assert own_sockets, "Trio makes wakeup socket pairs"
    assert {creators.get(fd) for fd in own_sockets} == {info["pid"]}
    assert not set(leaky.values()) & set(table.values())


async def test_bootstrap_closes_what_a_careless_launcher_leaks(tmp_path: Path) -> None:
    """Defence in depth: the child closes fds even when the launcher did not."""
    local, remote = channel_pair()
    with local, remote, inheritable_fds(tmp_path) as leaky:
        os.set_inheritable(remote.fileno(), True)
        argv = [
            sys.executable,
            "-I",
            "-m",
            "trio_mojo._workers._bootstrap",
            "--target=trio_mojo._examples:describe_self",
            f"--parent-pid={os.getpid()}",
            f"--sandbox={NONE.to_json()}",
            f"{CHANNEL_SWITCH}={remote.fileno()}",
        ]
        process = await trio.lowlevel.open_process(
            argv, close_fds=False, stdin=subprocess.DEVNULL
        )
        remote.close()
        try:
            async with open_channel(local) as channel:
                first = await channel.receive()
                report = SandboxReport.from_bytes(first.payload)
                await channel.send(go_ahead(report))
                info = await _describe(channel)
        finally:
            with trio.fail_after(10):
                await process.wait()
    assert report.fds == (0, 1, 2, int(argv[-1].rpartition("=")[2]))
    assert not set(leaky.values()) & set(info["fds"].values())
    assert process.returncode == 0


async def test_bootstrap_without_arguments_prints_usage() -> None:
    result = await trio.run_process(
        [sys.executable, "-I", "-m", "trio_mojo._workers._bootstrap"],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"start it with trio_mojo.open_worker()" in result.stderr


# ----------------------------------------------------------------------
# Workers that die


E = TypeVar("E", bound=BaseException)


async def _failing_worker(
    expected: type[E], target: str, body: Callable[[Worker], Awaitable[object]]
) -> tuple[Worker, E]:
    """Run ``body`` in an ``open_worker`` block that must raise ``expected``."""
    worker, error = await worker_block_error(
        expected, lambda: open_worker(target, sandbox=BASIC), body
    )
    assert_reaped(worker.pid)
    return worker, error


async def test_killing_the_worker_while_the_parent_sends_a_large_message() -> None:
    size = 16 * 1024 * 1024

    async def body(worker: Worker) -> None:
        assert (await worker.channel.receive()).payload == b"ready"
        # ignore_eof never reads: the kernel takes a few hundred KiB of the
        # message and the rest waits in our send queue.
        await worker.channel.send(Message(bytes(size)))
        stats = worker.channel.statistics()
        assert 0 < stats.bytes_sent < size
        assert stats.send_queue_bytes > 0
        os.kill(worker.pid, signal.SIGKILL)
        await worker.channel.receive()

    _, error = await _failing_worker(
        WorkerError, "trio_mojo._examples:ignore_eof", body
    )
    assert error.returncode == -signal.SIGKILL
    # It died with our message half-read in its socket: the kernel resets.
    assert isinstance(error.__cause__, DisconnectedError)


async def test_killing_the_worker_while_the_parent_receives_a_large_message() -> None:
    async def body(worker: Worker) -> None:
        await worker.channel.send(Message(bytes(64 * 1024 * 1024)))
        # Wait until part of the echo has arrived (the reader takes at most
        # 256 KiB per turn, so this task runs between two reads).
        with trio.fail_after(30):
            while worker.channel.statistics().read_buffer_bytes == 0:
                await trio.lowlevel.checkpoint()
        os.kill(worker.pid, signal.SIGKILL)
        await worker.channel.receive()

    _, error = await _failing_worker(WorkerError, "trio_mojo._examples:echo", body)
    assert error.returncode == -signal.SIGKILL
    assert isinstance(error.__cause__, DisconnectedError)  # EOF inside the message


async def test_a_worker_that_exits_nonzero_raises_worker_error() -> None:
    async def body(worker: Worker) -> None:
        await worker.channel.send(Message(b"5"))
        await worker.channel.receive()

    _, error = await _failing_worker(WorkerError, "trio_mojo._examples:crash", body)
    assert error.returncode == 5
    assert "crash: exiting with status 5" in error.stderr_tail
    assert error.__cause__ is None  # a clean end of channel explains nothing
    assert "exit status 5" in str(error)


@pytest.mark.parametrize("status", [1, 7, 100, 255])
async def test_a_nonzero_exit_is_reported_when_leaving_normally(status: int) -> None:
    # The body never sees the death; the exit status is checked on the way
    # out.  (Several statuses: the last stderr line used to be lost about
    # one time in five, when the exit was noticed before the pipe was read.)
    async def body(worker: Worker) -> None:
        await worker.channel.send(Message(b"%d" % status))

    worker, error = await _failing_worker(
        WorkerError, "trio_mojo._examples:crash", body
    )
    assert error.returncode == status
    assert f"crash: exiting with status {status}\n" in error.stderr_tail
    assert worker.stderr_tail == error.stderr_tail


async def test_a_clean_exit_lets_end_of_channel_through() -> None:
    async def body(worker: Worker) -> None:
        await worker.channel.send(Message(b"0"))
        await worker.channel.receive()

    worker, error = await _failing_worker(
        trio.EndOfChannel, "trio_mojo._examples:crash", body
    )
    assert worker.returncode == 0
    assert error.__cause__ is not error  # not chained to itself


async def test_a_target_that_raises_gives_its_traceback() -> None:
    async def body(worker: Worker) -> None:
        await worker.channel.send(Message(b"marker 7f3a"))
        await worker.channel.receive()

    _, error = await _failing_worker(WorkerError, "trio_mojo._examples:fail", body)
    assert error.returncode == 1
    assert "Traceback (most recent call last)" in error.stderr_tail
    assert "RuntimeError: marker 7f3a" in error.stderr_tail


@pytest.mark.parametrize(
    "target", ["", "module", "module:", ":function", "module:f-g", "a..b:f", "m:f:g"]
)
async def test_a_malformed_target_is_refused_before_spawning(target: str) -> None:
    # The messages, and every other target error: test_targets.py.
    with pytest.raises(ValueError, match=r"^worker target "):
        async with open_worker(target, sandbox=NONE):
            pytest.fail("the block must not run")  # pragma: no cover


# ----------------------------------------------------------------------
# Leaving the block


async def test_cancelling_the_parent_scope_reaps_the_worker() -> None:
    before = children()
    with trio.move_on_after(30) as scope:
        async with open_worker(
            "trio_mojo._examples:ignore_eof", sandbox=BASIC, grace_period=30
        ) as worker:
            assert (await worker.channel.receive()).payload == b"ready"
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert worker.returncode == -signal.SIGKILL
    assert_reaped(worker.pid)
    assert children() == before


async def test_a_deadline_during_startup_leaves_no_process() -> None:
    before = children()
    with trio.move_on_after(0.01) as scope:  # starting takes ~0.12 s
        async with open_worker("trio_mojo._examples:echo", sandbox=BASIC):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert children() == before


async def test_a_worker_that_ignores_eof_gets_sigterm_after_the_grace_period() -> None:
    start = trio.current_time()
    async with open_worker(
        "trio_mojo._examples:ignore_eof", sandbox=BASIC, grace_period=0.3
    ) as worker:
        assert (await worker.channel.receive()).payload == b"ready"
        left = trio.current_time()
    assert worker.returncode == -signal.SIGTERM
    assert 0.3 <= trio.current_time() - left < 5  # SIGTERM, not SIGKILL
    assert trio.current_time() - start < 10
    assert_reaped(worker.pid)


async def test_twenty_workers_in_a_loop_leave_nothing_behind() -> None:
    before = children()
    fds_before = set(os.listdir("/proc/self/fd"))
    pids = []
    for _ in range(20):
        async with open_worker("trio_mojo._examples:echo", sandbox=BASIC) as worker:
            await worker.channel.send(Message(b"x"))
            (await worker.channel.receive()).close()
        assert worker.returncode == 0
        pids.append(worker.pid)
    assert len(set(pids)) == 20
    for pid in pids:
        assert_reaped(pid)
    assert children() == before
    assert set(os.listdir("/proc/self/fd")) <= fds_before


# ----------------------------------------------------------------------
# The parent dies


ORPHAN_MAKER = r"""
import os, sys, trio, trio_mojo

async def main():
    async with trio_mojo.open_worker(
        "trio_mojo._examples:ignore_eof", sandbox=trio_mojo.SandboxPolicy.basic()
    ) as worker:
        await worker.channel.receive()
        # The worker, and in a PID namespace its supervisor and init.
        supervisor = worker._process.pid
        children = open(f"/proc/{supervisor}/task/{supervisor}/children").read()
        print(supervisor, *children.split(), flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_a_worker_dies_with_its_parent() -> None:
    """PR_SET_PDEATHSIG: a parent killed outright leaves no orphan: not the
    worker, nor its init and supervisor in a PID namespace."""
    async with pidfds_from_a_parent(ORPHAN_MAKER) as pidfds:
        assert len(pidfds) == 3  # basic() gets a PID namespace on this machine
        for pidfd in pidfds:
            await wait_exited(pidfd)


@pytest.mark.slow
async def test_a_worker_outlives_trios_idle_thread_timeout() -> None:
    """Regression: workers were SIGKILLed ~10 s after they started.

    trio.lowlevel.open_process forks from a cached thread; PDEATHSIG fires
    when *that thread* exits, which Trio does after 10 s idle.
    """
    async with open_worker("trio_mojo._examples:echo", sandbox=BASIC) as worker:
        await trio.sleep(10.5)
        await worker.channel.send(Message(b"still there?"))
        reply = await worker.channel.receive()
        assert reply.payload == b"still there?"
    assert worker.returncode == 0


async def test_body_error_during_an_outer_cancellation_is_not_swallowed() -> None:
    async def body() -> None:
        with trio.move_on_after(1):
            async with open_worker("trio_mojo._examples:echo", sandbox=NONE):
                try:
                    await trio.sleep_forever()
                finally:
                    raise KeyError("cleanup failed")

    with pytest.raises(KeyError, match="cleanup failed"):
        await body()


# ----------------------------------------------------------------------
# The stderr tail is hostile text


async def test_terminal_escapes_in_the_stderr_tail_are_escaped() -> None:
    async def body(worker: Worker) -> None:
        await worker.channel.receive()

    worker, error = await _failing_worker(
        WorkerError, "trio_mojo._examples:terminal_escapes", body
    )
    text = str(error)
    assert error.returncode == 3
    for raw in ("\x1b", "\r", "\x9b", "\u202e", "\u2066"):
        assert raw not in text
        assert raw not in worker.stderr_tail
    assert (
        "\\x1b[2J\\x1b[31mred alert\\x1b[0m\\rrewritten\\x9b1m \\u202eevil\\u2066\n"
        in text
    )
    assert "--- worker stderr (tail) ---\n" in text  # newlines stay newlines


def test_escape_controls_keeps_newlines_tabs_and_printable_text() -> None:
    text = "tab\there\nnext line: naïve ünïcödé, 漢字, emoji 🐍\n"
    assert escape_controls(text) == text
    assert escape_controls("\x00\x07\x7f\u0085\u00ad\u200b\u2028\ufeff") == (
        "\\x00\\x07\\x7f\\x85\\xad\\u200b\\u2028\\ufeff"
    )
