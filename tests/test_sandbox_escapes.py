"""Hostile targets against the sandbox's second round (issue #9).

Each test runs attempts from the catalogue (``trio_mojo._sandbox._escapes``)
as a worker's target and asserts the safe outcome, next to a control that
shows the same attempt succeeding without the layer under test, so that a
pass is never due to a broken attempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from _process_support import assert_reaped, proc_status

from trio_mojo import Message, SandboxPolicy, WorkerError, open_worker
from trio_mojo._sandbox._namespaces import HOSTNAME

STRICT = SandboxPolicy.strict()
RUN_ATTEMPTS = "trio_mojo._sandbox._escapes:run_attempts"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="measured with a root parent (the uid drop needs one)"
)


async def _attempts(
    policy: SandboxPolicy, context: dict[str, Any], *names: str
) -> dict[str, str]:
    """Run the named attempts in one worker under ``policy``."""
    request = {"attempts": list(names), "context": context}
    async with open_worker(RUN_ATTEMPTS, sandbox=policy) as worker:
        await worker.channel.send(Message(json.dumps(request).encode()))
        with await worker.channel.receive() as reply:
            outcomes: dict[str, str] = json.loads(reply.payload)
    return outcomes


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _limits(pid: int) -> str:
    return Path(f"/proc/{pid}/limits").read_text()


def _children(pid: int) -> list[int]:
    return [
        int(child)
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ]


# ----------------------------------------------------------------------
# Item 1: an empty root, so that no path resolves


SENDTO = "sendto a pathname unix socket (from a socketpair)"
CONNECT = "connect to a pathname unix socket"
# Only the empty root stands between the worker and the socket: no seccomp,
# no uid drop (the identity-mapped root may enter root's 0700 directories).
ROOTFS_ALONE = attrs.evolve(
    STRICT, name="rootfs-alone", seccomp="off", credentials="off"
)


@contextlib.contextmanager
def _host_log_socket(directory: Path) -> Iterator[socket.socket]:
    """A datagram socket bound under ``directory``, like ``/dev/log``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(directory / "log"))
        listener.setblocking(False)
        yield listener


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (STRICT, {SENDTO: "EPERM", CONNECT: "EPERM"}),
        (ROOTFS_ALONE, {SENDTO: "ENOENT", CONNECT: "ENOENT"}),
    ],
    ids=["strict", "rootfs-alone"],
)
async def test_a_host_datagram_socket_receives_nothing(
    tmp_path: Path, policy: SandboxPolicy, expected: dict[str, str]
) -> None:
    with _host_log_socket(tmp_path) as listener:
        context = {"dgram": str(tmp_path / "log")}
        assert await _attempts(policy, context, SENDTO, CONNECT) == expected
        with pytest.raises(BlockingIOError):
            listener.recv(64)


async def test_with_the_host_s_root_the_host_socket_is_reached(tmp_path: Path) -> None:
    """The control: the same policy with the host's root lets both through."""
    with_host_root = attrs.evolve(ROOTFS_ALONE, name="host-root", rootfs="off")
    with _host_log_socket(tmp_path) as listener:
        context = {"dgram": str(tmp_path / "log")}
        outcomes = await _attempts(with_host_root, context, SENDTO, CONNECT)
        assert outcomes == {SENDTO: "ALLOWED", CONNECT: "ALLOWED"}
        assert [listener.recv(64), listener.recv(64)] == [b"escaped"] * 2


async def test_the_parent_sees_an_empty_read_only_root() -> None:
    async with open_worker("trio_mojo._examples:echo", sandbox=STRICT) as worker:
        root = f"/proc/{worker.pid}/root"
        assert os.listdir(root) == []
        assert os.statvfs(root).f_flag & os.ST_RDONLY
        assert os.stat(root + "/").st_dev != os.stat("/").st_dev
    assert worker.returncode == 0


# ----------------------------------------------------------------------
# Item 4: what a target can read: other pids, CPU clocks, the host name


HOST_PROBES = (
    "probe a host pid (sched_getaffinity)",
    "read another process's CPU clock",
    "read the host name",
)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # The seccomp filter refuses a foreign pid or CPU clock outright ...
        (STRICT, ("EPERM", "EPERM", "hidden")),
        # ... and without it the PID namespace has no such process.
        (
            attrs.evolve(STRICT, name="no-seccomp", seccomp="off"),
            ("ESRCH", "EINVAL", "hidden"),
        ),
    ],
    ids=["strict", "strict-no-seccomp"],
)
async def test_a_worker_sees_no_host_process_and_its_own_host_name(
    policy: SandboxPolicy, expected: tuple[str, ...]
) -> None:
    context = {"parent": os.getpid(), "hostname": socket.gethostname()}
    results = await _attempts(policy, context, *HOST_PROBES)
    assert results == dict(zip(HOST_PROBES, expected, strict=True))
    unsandboxed = SandboxPolicy.none(i_understand_this_is_unsandboxed=True)
    results = await _attempts(unsandboxed, context, *HOST_PROBES)
    assert set(results.values()) == {"ALLOWED"}


async def test_the_worker_pid_is_its_host_pid_in_a_pid_namespace() -> None:
    async with open_worker("trio_mojo._examples:echo", sandbox=STRICT) as worker:
        status = proc_status(worker.pid)
        supervisor = int(status["PPid"])
        (init,) = set(_children(supervisor)) - {worker.pid}
        init_status = proc_status(init)
        hostname = os.readlink(f"/proc/{worker.pid}/ns/uts")
    assert status["NSpid"].split() == [str(worker.pid), "2"]
    assert init_status["NSpid"].split() == [str(init), "1"]
    assert worker.sandbox_report.pid == 2
    assert supervisor == worker._process.pid
    assert hostname != os.readlink("/proc/self/ns/uts")
    assert HOSTNAME == "trio-mojo-worker"
    assert_reaped(supervisor)
    assert _gone(worker.pid)  # reaped by the supervisor
    assert _gone(init)  # killed and reaped by the supervisor


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
async def test_the_worker_s_own_exit_status_reaches_the_parent(sig: int) -> None:
    pids: list[int] = []

    async def run() -> None:
        async with open_worker(
            "trio_mojo._examples:ignore_eof", sandbox=STRICT
        ) as worker:
            assert (await worker.channel.receive()).payload == b"ready"
            supervisor = worker._process.pid
            (init,) = set(_children(supervisor)) - {worker.pid}
            pids.extend((worker.pid, init, supervisor))
            os.kill(worker.pid, sig)
            with trio.fail_after(10):
                await worker.channel.receive()

    with pytest.raises(WorkerError) as info:
        await run()
    assert info.value.returncode == -sig
    worker, init, supervisor = pids
    assert _gone(worker)
    assert _gone(init)  # no zombie left in the namespace
    assert_reaped(supervisor)


# ----------------------------------------------------------------------
# Item 7: RLIMIT_DATA


ALLOCATE = "allocate 12 GiB (past RLIMIT_DATA)"


async def test_allocating_past_rlimit_data_is_a_memory_error() -> None:
    small = attrs.evolve(STRICT, name="1-gib", max_data=1024**3)
    async with open_worker(RUN_ATTEMPTS, sandbox=small) as worker:
        limits = _limits(worker.pid)
        request = {"attempts": [ALLOCATE, ALLOCATE], "context": {}}
        await worker.channel.send(Message(json.dumps(request).encode()))
        with await worker.channel.receive() as reply:
            outcome = json.loads(reply.payload)
    assert outcome == {ALLOCATE: "ENOMEM"}  # MemoryError, and the worker went on
    assert "Max data size             1073741824           1073741824" in limits
    assert worker.returncode == 0
    assert await _attempts(STRICT, {}, ALLOCATE) == {ALLOCATE: "ENOMEM"}  # 8 GiB
    assert STRICT.max_data == SandboxPolicy.default().max_data == 8 * 1024**3
    no_limit = attrs.evolve(STRICT, name="no-data-limit", max_data=None)
    assert await _attempts(no_limit, {}, ALLOCATE) == {ALLOCATE: "ALLOWED"}


# ----------------------------------------------------------------------
# Item 8: RLIMIT_NPROC


async def test_a_thread_bomb_stops_at_rlimit_nproc_and_spares_the_others() -> None:
    async with open_worker(
        "trio_mojo._sandbox._escapes:hold_threads", sandbox=STRICT
    ) as bomb:
        limits = _limits(bomb.pid)
        await bomb.channel.send(Message(b"go"))
        with await bomb.channel.receive() as reply:
            held = json.loads(reply.payload)
        # The kernel counts the tasks of the worker's user namespace: its
        # supervisor, its init, its main thread and the threads it started
        # (61 today; fewer if Trio or the channel ever start one of theirs).
        assert held["error"] == "can't start new thread"
        assert 48 <= held["started"] <= 64 - 3
        assert "Max processes             64                   64" in limits
        # Another worker, same uid, while the bomb holds every thread it got:
        # its thread pool works (each worker counts in its own namespace).
        async with open_worker(
            "trio_mojo._sandbox._escapes:use_threads", sandbox=STRICT
        ) as other:
            await other.channel.send(Message(b"40"))
            with await other.channel.receive() as reply:
                assert reply.payload == b"40 done"
        # And so does the parent's.
        assert await trio.to_thread.run_sync(lambda: "parent ok") == "parent ok"
        await bomb.channel.send(Message(b"release"))
        with await bomb.channel.receive() as reply:
            assert reply.payload == b"released"
    assert bomb.returncode == 0


# ----------------------------------------------------------------------
# Item 9: not root


async def test_a_root_parent_s_worker_is_nobody_with_no_capability() -> None:
    async with open_worker("trio_mojo._examples:echo", sandbox=STRICT) as worker:
        status = proc_status(worker.pid)
        owner = os.stat(f"/proc/{worker.pid}/status").st_uid
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""
    for field in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert status[field] == "0000000000000000", field
    assert owner == 0  # not dumpable: its /proc files belong to root


async def test_the_uid_is_configurable() -> None:
    policy = attrs.evolve(STRICT, name="uid-4242", worker_uid=4242, worker_gid=4343)
    async with open_worker("trio_mojo._examples:echo", sandbox=policy) as worker:
        status = proc_status(worker.pid)
    assert status["Uid"].split() == ["4242"] * 4
    assert status["Gid"].split() == ["4343"] * 4
    bad_ids: list[Any] = [0, -1, 2**32, "65534"]
    for bad in bad_ids:
        with pytest.raises(ValueError, match="unprivileged id"):
            attrs.evolve(STRICT, worker_uid=bad)


async def test_without_the_uid_drop_root_owned_files_stay_writable(
    tmp_path: Path,
) -> None:
    """The trap of A4: identity-mapped root keeps owner access outside."""
    secret = tmp_path / "root-only"
    secret.write_bytes(b"root's")
    secret.chmod(0o600)
    context = {"file": str(secret)}
    write = "open a host file for writing"
    namespaces_only = attrs.evolve(
        STRICT, name="ns", seccomp="off", landlock="off", rootfs="off"
    )
    assert await _attempts(namespaces_only, context, write) == {write: "EACCES"}
    identity_root = attrs.evolve(namespaces_only, name="ns-root", credentials="off")
    assert await _attempts(identity_root, context, write) == {write: "ALLOWED"}
