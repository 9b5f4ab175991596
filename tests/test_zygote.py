"""The zygote: real zygote processes forking real, fully sandboxed workers.

Each test starts a zygote (about 0.15 s) and forks workers from it (a few
ms each).  The autouse fixture of ``conftest.py`` checks that no fd is left
in this process; :func:`children` that no process is.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import attrs
import pytest
import trio
from _process_support import children, pidfds_from_a_parent, proc_status, wait_exited
from _zygote_support import interpreter

import trio_mojo
from trio_mojo import (
    CHANNEL_SWITCH,
    Handle,
    Message,
    SandboxPolicy,
    WorkerError,
    channel_pair,
    open_worker,
)
from trio_mojo._workers._worker import ENV_ALLOWLIST
from trio_mojo._workers._zygote import ForkedProcess, Zygote, open_zygote

STRICT = SandboxPolicy.strict()
NONE = SandboxPolicy.none(i_understand_this_is_unsandboxed=True)
EXAMPLES = "trio_mojo._examples"


def _gone(pid: int) -> bool:
    """``pid`` has exited (a zombie waiting for init counts as gone)."""
    try:
        return proc_status(pid)["State"].startswith("Z")
    except FileNotFoundError:
        return True


async def _wait_gone(pid: int) -> None:
    """Wait (at most 10 s) until ``pid`` has exited."""
    try:
        pidfd = Handle(os.pidfd_open(pid))
    except ProcessLookupError:
        return
    with pidfd, trio.fail_after(10):  # readable once the process has exited
        await trio.lowlevel.wait_readable(pidfd.fileno())
        trio.lowlevel.notify_closing(pidfd.fileno())


def _environment_names(pid: int) -> set[str]:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return {entry.partition(b"=")[0].decode() for entry in environ if entry}


async def _fork(zygote: Zygote) -> ForkedProcess:
    """A worker forked at the process level (its channel end is closed)."""
    local, remote = channel_pair()
    with local:
        return await zygote._start_worker(
            f"{EXAMPLES}:ignore_eof", STRICT, {CHANNEL_SWITCH: remote}
        )


def _fd_targets(pid: int) -> set[str]:
    """The sockets and pipes among the fds of ``pid`` (read as root)."""
    targets = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if target.startswith(("socket:", "pipe:")):
            targets.add(target)
    return targets


# ----------------------------------------------------------------------
# The zygote itself


async def test_the_zygote_is_launched_like_a_worker() -> None:
    async with open_zygote() as zygote:
        status = proc_status(zygote.pid)
        assert status["PPid"] == str(os.getpid())
        assert status["Threads"] == "1"
        assert os.getsid(zygote.pid) == zygote.pid
        assert _environment_names(zygote.pid) <= set(ENV_ALLOWLIST)
        fds = os.listdir(f"/proc/{zygote.pid}/fd")
        # stdio, its control socket, the two ends of its SIGCHLD wakeup
        # pipe, and (a root zygote forks workers into PID namespaces of
        # their own) its own PID namespace and a pidfd of itself.
        assert len(fds) == 8
        links = {os.readlink(f"/proc/{zygote.pid}/fd/{fd}") for fd in fds}
        assert "anon_inode:[pidfd]" in links
        assert os.readlink(f"/proc/{zygote.pid}/ns/pid") in links
        assert os.readlink(f"/proc/{zygote.pid}/fd/0") == "/dev/null"
    assert zygote.returncode == 0
    assert zygote.stderr_tail == ""  # not even a warning
    assert children() == {}


# A preload that is not importable, or raises: test_targets.py.


@pytest.mark.parametrize(
    ("preload", "error"),
    [
        (["not a module"], ValueError),
        (["pkg..mod"], ValueError),
        ("trio_mojo._examples", TypeError),
    ],
)
async def test_bad_preload_names_are_refused_before_starting(
    preload: list[str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        async with open_zygote(preload=preload):
            pytest.fail("the zygote must not start")
    assert children() == {}


async def test_a_zygote_with_a_thread_refuses_to_fork(tmp_path: Path) -> None:
    async with open_zygote(
        python=interpreter(tmp_path), preload=["zygote_thread_preload"]
    ) as zygote:
        local, remote = channel_pair()
        with local, pytest.raises(WorkerError, match="threads") as info:
            await zygote._start_worker(
                f"{EXAMPLES}:echo", STRICT, {CHANNEL_SWITCH: remote}
            )
        assert "refused" in str(info.value)
        assert zygote.running_workers == 0


@pytest.mark.parametrize("fault", ["unknown-exit", "second-ready", "wrong-id"])
async def test_a_zygote_that_breaks_the_protocol_is_killed(
    tmp_path: Path, fault: str
) -> None:
    async with open_zygote(
        python=interpreter(tmp_path, "zygote_fake"), env={"ZYGOTE_FAKE": fault}
    ) as zygote:
        for _ in range(2):  # the request that broke it, and any later one
            local, remote = channel_pair()
            with local, pytest.raises(WorkerError, match="broke its control channel"):
                await zygote._start_worker(
                    f"{EXAMPLES}:echo", STRICT, {CHANNEL_SWITCH: remote}
                )
        await _wait_gone(zygote.pid)
        assert zygote.returncode == -signal.SIGKILL
    assert children() == {}


@pytest.mark.parametrize(
    ("fault", "startup", "error"),
    [
        ("garbage", 30, "not JSON"),
        ("refused-first", 30, "sent Refused"),
        ("silent", 0.5, "not ready within 0.5 s"),
    ],
)
async def test_a_zygote_that_never_says_ready_fails_the_start(
    tmp_path: Path, fault: str, startup: float, error: str
) -> None:
    with pytest.raises(WorkerError, match=error):
        async with open_zygote(
            python=interpreter(tmp_path, "zygote_fake"),
            env={"ZYGOTE_FAKE": fault},
            startup_timeout=startup,
        ):
            pytest.fail("the zygote must not start")
    assert children() == {}


async def test_a_deadline_during_startup_leaves_no_process() -> None:
    with trio.move_on_after(0.05) as scope:
        async with open_zygote():
            pytest.fail("the zygote cannot be ready this soon")
    assert scope.cancelled_caught
    assert children() == {}


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_pending": 0}, ValueError),
        ({"sandbox": "strict"}, TypeError),
    ],
)
async def test_bad_options_are_refused_before_starting(
    options: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        async with open_zygote(**options):  # type: ignore[arg-type]
            pytest.fail("the zygote must not start")
    assert children() == {}


# ----------------------------------------------------------------------
# Hostile workers


async def test_a_worker_finds_nothing_of_the_zygote() -> None:
    async with open_zygote(preload=[EXAMPLES]) as zygote:
        # The worker holds none of the zygote's sockets and pipes...
        zygote_fds = _fd_targets(zygote.pid)
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
            assert _fd_targets(worker.pid).isdisjoint(zygote_fds)
            assert _fd_targets(zygote.pid) == zygote_fds


@pytest.mark.parametrize(
    ("policy", "signals", "paths"),
    [
        (STRICT, "EPERM", "EPERM"),  # seccomp answers first
        # Below it: the PID namespace and the empty root.
        (attrs.evolve(STRICT, seccomp="off"), "ESRCH", "ENOENT"),
    ],
    ids=["strict", "strict-no-seccomp"],
)
async def test_a_hostile_worker_cannot_reach_the_zygote(
    tmp_path: Path, policy: SandboxPolicy, signals: str, paths: str
) -> None:
    async with open_zygote(
        python=interpreter(tmp_path), preload=["zygote_targets"]
    ) as zygote:
        zygote_fds = _fd_targets(zygote.pid)
        async with open_worker(
            "zygote_targets:probe_zygote", zygote=zygote, sandbox=policy
        ) as worker:
            await worker.channel.send(Message(b"%d kill" % zygote.pid))
            reply = await worker.channel.receive()
        seen = json.loads(reply.payload)
        # What it finds in its own fd table (Trio's fds included) is its own.
        assert zygote_fds.isdisjoint(seen["fds"].values())
        assert seen["fds"]["3"].startswith("socket:")
        # Its parent lives outside its PID namespace.
        assert seen["ppid"] == 0
        for attempt in ("signal_zygote", "kill_zygote"):
            assert seen[attempt] == signals
        for attempt in ("open_zygote_mem", "list_zygote_fds"):
            assert seen[attempt] == paths
        # Still serving:
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
            await worker.channel.send(Message(b"still there?"))
            assert (await worker.channel.receive()).payload == b"still there?"


async def test_the_same_probe_unsandboxed_does_reach_the_zygote(tmp_path: Path) -> None:
    """Control: the probe's attempts do work when nothing stops them."""
    async with open_zygote(
        python=interpreter(tmp_path), preload=["zygote_targets"]
    ) as zygote:
        async with open_worker(
            "zygote_targets:probe_zygote", zygote=zygote, sandbox=NONE
        ) as worker:
            await worker.channel.send(Message(b"%d" % zygote.pid))
            reply = await worker.channel.receive()
        seen = json.loads(reply.payload)
        assert seen["signal_zygote"] == "ALLOWED"
        assert seen["open_zygote_mem"] == "ALLOWED"
        assert seen["list_zygote_fds"] == "ALLOWED"


async def _layout(worker_channel: trio_mojo.Channel) -> dict[str, int]:
    await worker_channel.send(Message(b"layout?"))
    reply = await worker_channel.receive()
    with reply:
        layout: dict[str, int] = json.loads(reply.payload)
    return layout


async def test_forked_workers_share_the_zygotes_layout_spawned_ones_do_not(
    tmp_path: Path,
) -> None:
    """What docs/security.rst says: ASLR and the hash secret are per exec."""
    python = interpreter(tmp_path)
    async with open_zygote(python=python, preload=["zygote_targets"]) as zygote:
        forked = []
        for _ in range(2):
            async with open_worker(
                "zygote_targets:report_layout", zygote=zygote
            ) as worker:
                forked.append(await _layout(worker.channel))
    spawned = []
    for _ in range(2):
        async with open_worker(
            "zygote_targets:report_layout", sandbox=STRICT, python=python
        ) as spawned_worker:
            spawned.append(await _layout(spawned_worker.channel))
    assert forked[0] == forked[1]
    for key in ("os", "libc", "hash"):
        assert spawned[0][key] != spawned[1][key]


# ----------------------------------------------------------------------
# Deaths: the zygote's, the parent's


async def test_killing_the_zygote_kills_its_workers_and_fails_new_requests() -> None:
    async with open_zygote(preload=[EXAMPLES]) as zygote:
        # Process level: these two wait for a go-ahead nobody sends.
        first = await _fork(zygote)
        second = await _fork(zygote)
        os.kill(zygote.pid, signal.SIGKILL)
        with trio.fail_after(10):
            assert await first.wait() == -signal.SIGKILL
        with pytest.raises(WorkerError, match="zygote") as info:
            await _fork(zygote)
        assert f"exited with status {-signal.SIGKILL}" in str(info.value)
        # Without waiting: the pidfd says it is gone.
        await _wait_gone(second.pid)
        assert second.returncode == -signal.SIGKILL
        for process in (first, second):
            assert process.stderr is not None
            await process.stderr.aclose()
    assert children() == {}


async def test_a_pending_request_fails_when_the_zygote_dies() -> None:
    async with open_zygote(preload=[EXAMPLES]) as zygote:
        os.kill(zygote.pid, signal.SIGSTOP)  # it will never answer
        local, remote = channel_pair()

        async def kill_soon() -> None:
            await trio.sleep(0.2)
            os.kill(zygote.pid, signal.SIGKILL)

        async def request() -> None:
            with local, pytest.raises(WorkerError, match="zygote"):
                await zygote._start_worker(
                    f"{EXAMPLES}:echo", STRICT, {CHANNEL_SWITCH: remote}
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon)
            nursery.start_soon(request)
    assert children() == {}


async def test_a_request_cancelled_before_its_reply_leaves_nothing() -> None:
    async with open_zygote(preload=[EXAMPLES]) as zygote:
        os.kill(zygote.pid, signal.SIGSTOP)  # holds the reply back
        local, remote = channel_pair()
        with local, trio.move_on_after(0.2) as scope:
            # ignore_eof: only a signal ends this one.
            await zygote._start_worker(
                f"{EXAMPLES}:ignore_eof", STRICT, {CHANNEL_SWITCH: remote}
            )
        assert scope.cancelled_caught
        os.kill(zygote.pid, signal.SIGCONT)
        async with open_worker(f"{EXAMPLES}:echo", zygote=zygote) as worker:
            await worker.channel.send(Message(b"still serving"))
            assert (await worker.channel.receive()).payload == b"still serving"
            assert zygote.forked == 2  # the cancelled request forked first
            # ... and that worker is killed and reaped.  Its state is in the
            # zygote (another process): nothing here to wait on but the count.
            with trio.fail_after(10):
                while zygote.running_workers > 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)


async def test_leaving_the_block_kills_a_worker_still_running() -> None:
    async with open_zygote(preload=[EXAMPLES]) as zygote:
        local, remote = channel_pair()
        with local:
            process = await zygote._start_worker(
                f"{EXAMPLES}:ignore_eof", NONE, {CHANNEL_SWITCH: remote}
            )
    assert process.returncode == -signal.SIGKILL
    assert process.stderr is None
    await _wait_gone(process.pid)


ORPHAN_MAKER = r"""
import contextlib, sys, trio, trio_mojo

async def main():
    async with (
        trio_mojo.open_zygote(preload=["trio_mojo._examples"]) as zygote,
        contextlib.AsyncExitStack() as stack,
    ):
        pids = [zygote.pid]
        for _ in range(3):
            worker = await stack.enter_async_context(
                trio_mojo.open_worker("trio_mojo._examples:ignore_eof", zygote=zygote)
            )
            pids.append(worker.pid)
        path = f"/proc/{zygote.pid}/task/{zygote.pid}/children"
        with open(path) as file:  # the workers and the inits of their namespaces
            pids += [int(pid) for pid in file.read().split() if int(pid) not in pids]
        sys.stdout.write(" ".join(map(str, pids)) + "\n")
        sys.stdout.flush()
        await trio.sleep_forever()

trio.run(main)
"""


async def test_killing_the_parent_leaves_no_zygote_and_no_worker() -> None:
    """The chain: parent -> zygote -> each worker and the init of its PID
    namespace; each has a parent-death signal towards the one above."""
    async with pidfds_from_a_parent(ORPHAN_MAKER) as pidfds:
        assert len(pidfds) == 1 + 3 + 3  # the zygote, 3 workers, their inits
        for pidfd in pidfds:
            await wait_exited(pidfd)
