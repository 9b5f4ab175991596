"""Red team: what a hostile target can take from the machine and from other workers.

Every test runs a target of ``trio_mojo._hostile`` as a ``strict()``
worker.  Findings are marked (``_redteam_support.finding``) with the harm;
the tests without a mark show a bound that holds and that no other test
covered.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import attrs
import pytest
from _redteam_support import (
    PROBE,
    STRICT,
    ask,
    ask_once,
    finding,
    own_uid_policy,
    require,
)

from trio_mojo import Worker, open_worker
from trio_mojo._sandbox._policy import DEFAULT_MAX_DATA

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="measured with a root parent (the uid drop needs one)"
)

MIB: Final = 1024 * 1024
LIMIT_MIB: Final = 128
SMALL_DATA: Final = attrs.evolve(STRICT, max_data=LIMIT_MIB * MIB)
"""``strict()`` with an ``RLIMIT_DATA`` small enough to cross cheaply."""


# ----------------------------------------------------------------------
# Memory past RLIMIT_DATA


@finding(
    "RLIMIT_DATA counts only private, writable, non-stack mappings, and seccomp "
    "allows any mmap: a strict() worker maps 16 GiB (twice its 8 GiB limit) "
    "shared (MAP_SHARED|MAP_ANONYMOUS: shmem) or grows-down (a stack to the "
    "kernel) and fills what it likes of it: with max_data=128 MiB it filled "
    "256 MiB of each; nothing bounds it but the machine's memory"
)
async def test_rlimit_data_bounds_every_anonymous_mapping() -> None:
    size = 2 * DEFAULT_MAX_DATA // MIB
    outcomes = {}
    async with open_worker(PROBE, sandbox=STRICT) as worker:
        for kind in ("private", "shared", "growsdown"):
            result = await ask(worker, "map_memory", kind=kind, mib=size, touch_mib=64)
            outcomes[kind] = result["mapped"]
    require(outcomes["private"] == "ENOMEM", f"RLIMIT_DATA is not set: {outcomes}")
    assert set(outcomes.values()) <= {"ENOMEM", "EPERM"}, f"{size} MiB: {outcomes}"


async def test_no_file_of_shared_memory_can_be_made() -> None:
    result = await ask_once(STRICT, "shared_memory_files")
    assert result == {"memfd_create": "EPERM", "/dev/shm": "EPERM"}


@finding(
    "setsockopt(SO_SNDBUF) is allowed and socketpair() makes up to "
    "RLIMIT_NOFILE/2 pairs: a strict() worker parks about 2 GiB of unswappable "
    "kernel memory in their buffers (8 MiB each way), not counted by RLIMIT_DATA"
)
async def test_socket_buffers_hold_less_than_the_memory_limit() -> None:
    result = await ask_once(
        SMALL_DATA,
        "park_in_socket_buffers",
        mib=2 * LIMIT_MIB,
        pairs=120,
        sndbuf=64 * MIB,
    )
    assert result["parked_mib"] < LIMIT_MIB, result


# ----------------------------------------------------------------------
# Kernel surface


@finding(
    "setsockopt and getsockopt are allowed with any option: a strict() worker "
    "loads classic BPF into the kernel (SO_ATTACH_FILTER: verifier, JIT) and gets "
    "a pidfd of its parent from its channel (SO_PEERPIDFD); Chromium allows only "
    "SOL_SOCKET/SO_PEEK_OFF"
)
async def test_socket_options_give_no_kernel_surface_and_no_parent_pidfd() -> None:
    result = await ask_once(STRICT, "socket_options")
    assert "ALLOWED" not in result.values(), result


# ----------------------------------------------------------------------
# Counts the kernel keeps per uid: shared by every worker of that uid


@contextlib.asynccontextmanager
async def _two_workers_of_one_uid() -> AsyncIterator[tuple[Worker, Worker]]:
    """A hostile worker and another, both of one uid (not ``nobody``: the
    attack would reach every ``nobody`` process of the machine)."""
    policy = own_uid_policy()
    async with (
        open_worker(PROBE, sandbox=policy) as hostile,
        open_worker(PROBE, sandbox=policy) as other,
    ):
        yield hostile, other


@finding(
    "the kernel counts fds in flight per user (user->unix_inflight) and refuses "
    "SCM_RIGHTS past the sender's RLIMIT_NOFILE: one worker that parks 506 fds in "
    "a socket pair of its own makes every other process of its uid (every worker: "
    "all run as nobody by default) fail to pass any fd, ETOOMANYREFS"
)
async def test_one_worker_cannot_stop_another_from_passing_fds() -> None:
    async with _two_workers_of_one_uid() as (hostile, other):
        before = await ask(other, "pass_an_fd")
        require(before["outcome"] == "ALLOWED", f"no fd passed at all: {before}")
        hoard = await ask(hostile, "hoard_fds_in_flight", count=1000)
        require(hoard["sent"] >= 256, f"the hoard failed: {hoard}")
        after = await ask(other, "pass_an_fd")
    assert after["outcome"] == "ALLOWED", f"{hoard['sent']} fds in flight: {after}"


def _queued_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigQ:"):
            return int(line.split()[1].split("/")[0])
    raise LookupError(f"no SigQ in /proc/{pid}/status")


@finding(
    "queued signals are counted per uid against RLIMIT_SIGPENDING (96365 here): "
    "one worker that queues real-time signals to itself makes the real-time "
    "signals of every other process of its uid be dropped"
)
async def test_one_worker_cannot_use_up_the_signal_queue_of_another() -> None:
    async with _two_workers_of_one_uid() as (hostile, other):
        await ask(other, "queue_signals", count=5)
        require(_queued_signals(other.pid) == 5, "signals are not queued")
        await ask(hostile, "queue_signals", count=200_000)
        await ask(other, "queue_signals", count=5)
        queued = _queued_signals(other.pid)
    assert queued == 10, f"{queued - 5} of 5 more signals were queued"
