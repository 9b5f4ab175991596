"""``open_worker(..., zygote=z)``: a forked worker passes what a spawned one passes.

The checks ``test_worker`` and ``test_broker`` make for spawned workers, on
``strict()`` workers forked from one zygote per test: messages and fds both
ways, the broker, the report and ``/proc``, exit statuses, signals, the
stderr tail, stdout and cwd, many at once, and the zygote's death.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
from _process_support import (
    children,
    echo_a_pipe,
    proc_status,
    shown_chain,
    worker_block_error,
)
from _zygote_support import interpreter

from trio_mojo import (
    DisconnectedError,
    FileAccess,
    Handle,
    Message,
    SandboxPolicy,
    Worker,
    WorkerError,
    WorkerTargetError,
    Zygote,
    open_worker,
    open_zygote,
)
from trio_mojo._sandbox import _namespaces
from trio_mojo._workers._handshake import TARGET_FAILED_EXIT

EXAMPLES = "trio_mojo._examples"
STRICT = SandboxPolicy.strict()
NONE = SandboxPolicy.none(i_understand_this_is_unsandboxed=True)


@pytest.fixture
async def zygote() -> AsyncIterator[Zygote]:
    async with open_zygote(preload=[EXAMPLES]) as started:
        yield started
    assert children() == {}


def _zygote_children(zygote: Zygote) -> list[int]:
    path = f"/proc/{zygote.pid}/task/{zygote.pid}/children"
    return [int(pid) for pid in Path(path).read_text().split()]


async def _worker_error(
    zygote: Zygote, target: str, body: Callable[[Worker], Awaitable[object]]
) -> tuple[Worker, WorkerError]:
    """Run ``body`` in an ``open_worker`` block that must raise WorkerError."""
    return await worker_block_error(
        WorkerError, lambda: open_worker(target, zygote=zygote), body
    )


# ----------------------------------------------------------------------
# What a spawned worker does


async def test_echo_with_fds_both_ways(zygote: Zygote) -> None:
    async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
        await echo_a_pipe(worker)
    assert worker.returncode == 0
    assert zygote.forked == 1


async def test_the_report_and_proc_show_the_full_sandbox(zygote: Zygote) -> None:
    async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
        report = worker.sandbox_report
        assert report.ok
        assert report.policy == "strict"
        assert set(report.layers.values()) == {"applied"}
        # Stdin, stdout, its stderr pipe and its channel: nothing else.
        assert report.fds == (0, 1, 2, 3)
        # The zygote forked it straight into a PID namespace of its own, as
        # pid 2, next to an init (pid 1) that dropped to the worker's uid:
        # no supervisor in between.
        assert worker._process.pid == worker.pid
        status = proc_status(worker.pid)
        assert status["PPid"] == str(zygote.pid)
        assert status["NSpid"].split() == [str(worker.pid), "2"]
        (init,) = set(_zygote_children(zygote)) - {worker.pid}
        init_status = proc_status(init)
        assert init_status["NSpid"].split() == [str(init), "1"]
        assert init_status["Uid"].split() == [str(STRICT.worker_uid)] * 4
        assert init_status["CapEff"] == "0" * 16
        # It holds nothing but stdio: not the worker's channel nor the zygote's.
        assert sorted(os.listdir(f"/proc/{init}/fd")) == ["0", "1", "2"]
        for name in ("pid", "user"):  # its namespace; the worker's own userns
            same = (
                os.stat(f"/proc/{init}/ns/{name}").st_ino
                == os.stat(f"/proc/{worker.pid}/ns/{name}").st_ino
            )
            assert same == (name == "pid")
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"
        # Namespaces of its own, made after the fork: neither the parent's
        # nor the zygote's.
        assert sorted(_namespaces.differing_namespaces(worker.pid)) == sorted(
            _namespaces.NAMESPACES
        )
        for name in _namespaces.NAMESPACES:
            ours = os.stat(f"/proc/{worker.pid}/ns/{name}").st_ino
            assert ours != os.stat(f"/proc/{zygote.pid}/ns/{name}").st_ino
        assert os.getsid(worker.pid) == worker.pid  # a session of its own
        await worker.channel.send(Message(b"still echoing"))
        assert (await worker.channel.receive()).payload == b"still echoing"
    # Its exit was reported once its namespace was empty: both reaped.
    for pid in (worker.pid, init):
        with pytest.raises(FileNotFoundError):
            proc_status(pid)


async def test_the_broker_serves_a_forked_worker(
    zygote: Zygote, tmp_path: Path
) -> None:
    (tmp_path / "input.txt").write_bytes(b"brokered bytes")
    async with open_worker(
        f"{EXAMPLES}:broker_reader",
        zygote=zygote,
        file_access=[FileAccess.read_only(tmp_path)],
    ) as worker:
        assert worker.sandbox_report.fds == (0, 1, 2, 3, 4)
        await worker.channel.send(Message(f"r {tmp_path}/input.txt".encode()))
        assert (await worker.channel.receive()).payload == b"ok brokered bytes"
        await worker.channel.send(Message(b"r /etc/passwd"))
        reply = await worker.channel.receive()
        assert reply.payload.startswith(b"refused 13 ")
    assert worker.returncode == 0


async def test_a_target_that_was_not_preloaded_is_imported_after_the_fork() -> None:
    async with open_zygote() as zygote:
        assert zygote.preloaded == ()
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
            await worker.channel.send(Message(b"imported late"))
            assert (await worker.channel.receive()).payload == b"imported late"


async def test_a_target_the_zygote_did_not_preload_is_checked(zygote: Zygote) -> None:
    # Checked before the fork, against the zygote's interpreter; and a
    # missing function is reported by the forked worker (test_targets.py).
    with pytest.raises(WorkerTargetError, match=r"is not importable by .* -I: "):
        async with open_worker("trio_mojo.no_such_module:main", zygote=zygote):
            pytest.fail("the block must not run")
    assert zygote.forked == 0
    with pytest.raises(WorkerTargetError, match="does not exist") as info:
        async with open_worker(f"{EXAMPLES}:no_such_target", zygote=zygote):
            pytest.fail("the block must not run")
    assert zygote.forked == 1
    assert info.value.returncode == TARGET_FAILED_EXIT


async def test_a_thread_bomb_stops_at_rlimit_nproc(zygote: Zygote) -> None:
    async with open_worker(
        "trio_mojo._sandbox._escapes:hold_threads", zygote=zygote
    ) as bomb:
        await bomb.channel.send(Message(b"go"))
        with await bomb.channel.receive() as reply:
            held = json.loads(reply.payload)
        # Its user namespace holds its own tasks only (no supervisor; its
        # init was forked before it and lives in the zygote's): its main
        # thread and 63 more (fewer if Trio ever starts one of its own).
        assert held["error"] == "can't start new thread"
        assert STRICT.max_processes == 64
        assert 48 <= held["started"] <= 64 - 1
        # Another forked worker's thread pool works meanwhile.
        async with open_worker(
            "trio_mojo._sandbox._escapes:use_threads", zygote=zygote
        ) as other:
            await other.channel.send(Message(b"40"))
            with await other.channel.receive() as reply:
                assert reply.payload == b"40 done"
        await bomb.channel.send(Message(b"release"))
        with await bomb.channel.receive() as reply:
            assert reply.payload == b"released"


# ----------------------------------------------------------------------
# Exit status, signals, stderr


@pytest.mark.parametrize("status", [3, 77])
async def test_a_nonzero_exit_raises_worker_error_with_the_tail(
    zygote: Zygote, status: int
) -> None:
    async def exit_with_status(worker: Worker) -> None:
        await worker.channel.send(Message(b"%d" % status))
        await worker.channel.receive()

    worker, error = await _worker_error(zygote, f"{EXAMPLES}:crash", exit_with_status)
    assert error.returncode == worker.returncode == status
    assert f"crash: exiting with status {status}" in error.stderr_tail
    with pytest.raises(FileNotFoundError):  # the zygote reaped its child
        proc_status(worker._process.pid)
    assert zygote.running_workers == 0


async def test_a_clean_exit_is_relayed_as_zero(zygote: Zygote) -> None:
    async with open_worker(f"{EXAMPLES}:crash", zygote=zygote) as worker:
        await worker.channel.send(Message(b"0"))
        with pytest.raises(trio.EndOfChannel):
            await worker.channel.receive()
    assert worker.returncode == 0


async def test_a_target_that_raises_gives_its_traceback(zygote: Zygote) -> None:
    async def raise_marker(worker: Worker) -> None:
        await worker.channel.send(Message(b"marker 7f3a"))
        await worker.channel.receive()

    _, error = await _worker_error(zygote, f"{EXAMPLES}:fail", raise_marker)
    assert error.returncode == 1
    assert "RuntimeError: marker 7f3a" in error.stderr_tail


async def test_a_worker_killed_by_a_signal(zygote: Zygote) -> None:
    async def kill_the_worker(worker: Worker) -> None:
        os.kill(worker.pid, signal.SIGKILL)
        await worker.channel.receive()

    _, error = await _worker_error(zygote, f"{EXAMPLES}:echo", kill_the_worker)
    assert error.returncode == -signal.SIGKILL
    # A clean end of channel is not chained; a broken channel is.
    assert error.__cause__ is None or isinstance(error.__cause__, DisconnectedError)
    assert all(type(exc) is not trio.EndOfChannel for exc in shown_chain(error))


async def test_signals_reach_the_worker_through_pidfds(zygote: Zygote) -> None:
    async def terminate(worker: Worker) -> None:
        worker._process.send_signal(signal.SIGTERM)  # forwarded to the worker
        assert await worker._process.wait() == -signal.SIGTERM
        worker._process.send_signal(signal.SIGKILL)  # reaped: goes nowhere
        await worker.channel.receive()

    _, error = await _worker_error(zygote, f"{EXAMPLES}:echo", terminate)
    assert error.returncode == -signal.SIGTERM


async def test_cancelling_kills_and_reaps_the_worker(zygote: Zygote) -> None:
    with trio.move_on_after(0.5):
        async with open_worker(f"{EXAMPLES}:ignore_eof", zygote=zygote) as worker:
            await trio.sleep_forever()
    assert worker.returncode == -signal.SIGKILL
    assert zygote.running_workers == 0


async def test_stdout_goes_where_it_is_asked_and_cwd_is_set(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    with Handle(read_end) as out, Handle(write_end) as into:
        async with open_zygote(
            python=interpreter(tmp_path), preload=["zygote_targets"]
        ) as zygote:
            async with open_worker(
                "zygote_targets:print_to_stdout", zygote=zygote, stdout=into.fileno()
            ) as worker:
                await worker.channel.send(Message(b"print"))
                assert (await worker.channel.receive()).payload == b"done"
            # getcwd is not for strict() workers (seccomp).
            async with open_worker(
                "zygote_targets:report_cwd", zygote=zygote, sandbox=NONE, cwd=tmp_path
            ) as worker:
                await worker.channel.send(Message(b"where?"))
                assert (await worker.channel.receive()).payload == bytes(tmp_path)
        into.close()
        assert os.read(out.fileno(), 100) == b"a line on the worker's stdout\n"


# ----------------------------------------------------------------------
# Many at once


async def test_twenty_concurrent_workers(zygote: Zygote) -> None:
    replies: dict[int, bytes] = {}

    async def one(index: int) -> None:
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
            await worker.channel.send(Message(b"%d" % index))
            replies[worker.pid] = (await worker.channel.receive()).payload
        assert worker.returncode == 0

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(one, index)
    assert sorted(replies.values()) == sorted(b"%d" % i for i in range(20))
    assert zygote.forked == 20
    assert zygote.running_workers == 0


async def test_one_pending_request_at_a_time_still_serves_everyone() -> None:
    async def one(zygote: Zygote) -> None:
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
            await worker.channel.send(Message(b"hi"))
            assert (await worker.channel.receive()).payload == b"hi"

    async with open_zygote(preload=[EXAMPLES], max_pending=1) as zygote:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one, zygote)
        assert zygote.forked == 5


# ----------------------------------------------------------------------
# Options and the zygote's death


async def test_the_zygote_dying_is_a_worker_error(zygote: Zygote) -> None:
    async def kill_the_zygote(worker: Worker) -> None:
        os.kill(zygote.pid, signal.SIGKILL)
        await worker.channel.receive()

    _, error = await _worker_error(zygote, f"{EXAMPLES}:echo", kill_the_zygote)
    assert error.returncode == -signal.SIGKILL
    with pytest.raises(WorkerError, match="zygote"):
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote):
            pytest.fail("the block must not run")


async def test_the_zygotes_sandbox_is_the_default() -> None:
    async with open_zygote(sandbox=SandboxPolicy.basic()) as zygote:
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
            assert worker.sandbox_report.policy == "basic"
        async with open_worker(
            f"{EXAMPLES}:echo", zygote=zygote, sandbox=STRICT
        ) as worker:
            assert worker.sandbox_report.policy == "strict"


@pytest.mark.parametrize("option", [{"python": "/usr/bin/python3"}, {"env": {}}])
async def test_interpreter_and_environment_belong_to_the_zygote(
    zygote: Zygote, option: dict[str, object]
) -> None:
    with pytest.raises(ValueError, match="open_zygote"):
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote, **option):  # type: ignore[arg-type]
            pytest.fail("the block must not run")
    assert zygote.forked == 0
