"""Red team: what a hostile target can take from the machine and from other workers.

Every test runs a target of ``trio_mojo._hostile`` as a ``strict()``
worker.  Findings are marked (``_redteam_support.finding``) with the harm;
the tests without a mark show a bound that holds and that no other test
covered (each of the fixed findings says what it measured before).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import attrs
import pytest
import trio
from _redteam_support import (
    PROBE,
    STRICT,
    ask,
    ask_once,
    own_uid_policy,
    require,
)

from trio_mojo import SandboxPolicy, Worker, open_worker
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


async def test_rlimit_data_bounds_every_anonymous_mapping() -> None:
    """RLIMIT_DATA counts only private, writable, non-stack mappings: before
    RLIMIT_AS, a strict() worker mapped 16 GiB (twice its 8 GiB limit)
    shared (shmem) or grows-down, and with max_data=128 MiB filled 256 MiB
    of each.  RLIMIT_AS (16 GiB) counts every mapping."""
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


async def test_socket_buffers_hold_less_than_the_memory_limit() -> None:
    """setsockopt(SO_SNDBUF) was allowed: a strict() worker parked 266 MiB of
    unswappable kernel memory in 17 socket pairs (8 MiB each way, twice
    net.core.wmem_max here), about 2 GiB in the pairs RLIMIT_NOFILE allows;
    max_data was 128 MiB.  Now setsockopt is refused and each socket keeps
    net.core.wmem_default."""
    result = await ask_once(
        SMALL_DATA,
        "park_in_socket_buffers",
        mib=2 * LIMIT_MIB,
        pairs=120,
        sndbuf=64 * MIB,
    )
    assert result["sndbuf"] == "EPERM", result
    assert result["parked_mib"] < LIMIT_MIB, result


async def test_kernel_buffers_a_worker_fills_are_bounded_by_its_fd_limit() -> None:
    """The worst case, documented in docs/security.rst: every fd a full
    socket pair end, and as many more kept in flight (the kernel's limit on
    in-flight fds is the sender's RLIMIT_NOFILE, per uid: per worker now).
    Each socket holds at most net.core.wmem_default and one more message."""
    result = await ask_once(STRICT, "park_everywhere")
    assert result["in_flight_stopped_by"] == "ETOOMANYREFS", result
    assert result["held_stopped_by"] == "EMFILE", result
    assert STRICT.max_open_files is not None
    sockets = result["in_flight"] + result["held"]
    assert sockets <= 2 * STRICT.max_open_files + 4  # stdio, channel, one more
    default = int(await trio.Path("/proc/sys/net/core/wmem_default").read_text())
    per_socket = default + 64 * 1024  # one 64 KiB write past the limit
    assert result["parked_mib"] <= sockets * per_socket // MIB, result


# ----------------------------------------------------------------------
# Kernel surface


async def test_socket_options_give_no_kernel_surface_and_no_parent_pidfd() -> None:
    """Any option was allowed: a strict() worker loaded classic BPF into the
    kernel (SO_ATTACH_FILTER: verifier, JIT) and got a pidfd of its parent
    from its channel (SO_PEERPIDFD)."""
    result = await ask_once(STRICT, "socket_options")
    assert result == {"SO_ATTACH_FILTER": "EPERM", "SO_PEERPIDFD": "EPERM"}


# ----------------------------------------------------------------------
# Counts the kernel keeps per uid: shared by the workers of one uid


@contextlib.asynccontextmanager
async def _two_workers(
    policy: SandboxPolicy = STRICT,
) -> AsyncIterator[tuple[Worker, Worker]]:
    """A hostile worker and another, both under ``policy``."""
    async with (
        open_worker(PROBE, sandbox=policy) as hostile,
        open_worker(PROBE, sandbox=policy) as other,
    ):
        yield hostile, other


async def _pass_an_fd_past_a_hoard(policy: SandboxPolicy) -> str:
    """Whether a worker passes an fd while another of ``policy`` keeps as
    many fds in flight as it can."""
    async with _two_workers(policy) as (hostile, other):
        before = await ask(other, "pass_an_fd")
        require(before["outcome"] == "ALLOWED", f"no fd passed at all: {before}")
        hoard = await ask(hostile, "hoard_fds_in_flight", count=1000)
        require(hoard["sent"] >= 256, f"the hoard failed: {hoard}")
        after: str = (await ask(other, "pass_an_fd"))["outcome"]
    return after


async def test_one_worker_cannot_stop_another_from_passing_fds() -> None:
    """The kernel counts fds in flight per user (user->unix_inflight) and
    refuses SCM_RIGHTS past the sender's RLIMIT_NOFILE: when every worker ran
    as nobody, one that parked 506 fds in a socket pair of its own made every
    other worker fail to pass any fd (ETOOMANYREFS).  Each has a uid of its
    own now; a fixed worker_uid still shares the count (the control)."""
    shared = await _pass_an_fd_past_a_hoard(own_uid_policy())
    require(shared == "ETOOMANYREFS", f"one shared uid, and yet: {shared}")
    assert await _pass_an_fd_past_a_hoard(STRICT) == "ALLOWED"


def _queued_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigQ:"):
            return int(line.split()[1].split("/")[0])
    raise LookupError(f"no SigQ in /proc/{pid}/status")


async def _signals_queued_past_a_flood(policy: SandboxPolicy) -> int:
    """How many of 5 real-time signals a worker queues while another of
    ``policy`` has queued as many as the kernel takes."""
    async with _two_workers(policy) as (hostile, other):
        await ask(other, "queue_signals", count=5)
        require(_queued_signals(other.pid) == 5, "signals are not queued")
        await ask(hostile, "queue_signals", count=200_000)
        await ask(other, "queue_signals", count=5)
        return _queued_signals(other.pid) - 5


async def test_one_worker_cannot_use_up_the_signal_queue_of_another() -> None:
    """Queued signals are counted per uid against RLIMIT_SIGPENDING (96365
    here): when every worker ran as nobody, one that queued real-time
    signals to itself made those of every other worker be dropped (0 of 5
    queued).  Each has a uid of its own now; a fixed one still shares."""
    shared = await _signals_queued_past_a_flood(own_uid_policy())
    require(shared == 0, f"one shared uid, and yet {shared} of 5 were queued")
    assert await _signals_queued_past_a_flood(STRICT) == 5
