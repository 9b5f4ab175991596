"""Red team: hostile workers of a pool (``open_worker_pool``).

Each test runs a target of ``trio_mojo._hostile`` in a ``strict()`` pool;
findings are marked with the harm (``_redteam_support.finding``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pytest
import trio
from _fds import open_fds
from _redteam_support import STRICT, own_uid_policy

from trio_mojo import Message, WorkerError, open_worker_pool
from trio_mojo._workers import _spawn

LINGER: Final = "trio_mojo._hostile:linger"
REPLY_AFTER: Final = "trio_mojo._hostile:reply_after"
FD_HOARDER: Final = "trio_mojo._examples_pool:fd_hoarder"
UPPER: Final = "trio_mojo._examples_pool:upper"


def _live_workers() -> int:
    """Processes below this one that are pid 2 of their PID namespace: the
    workers, spawned or forked by a zygote (their inits are pid 1)."""
    found = 0
    below = [os.getpid()]
    while below:
        pid = below.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue  # gone meanwhile
        below += map(int, children)
        fields = dict(line.split(":", 1) for line in status.splitlines())
        if fields["NSpid"].split()[-1] == "2" and "zombie" not in fields["State"]:
            found += 1
    return found


async def test_recycled_workers_that_will_not_exit_do_not_pile_up() -> None:
    """At most ``workers`` recycled workers stay alive (they piled up, each
    for 2 x grace_period: 9 live workers after 8 requests)."""
    workers = 1
    async with open_worker_pool(
        LINGER, workers=workers, max_requests=1, sandbox=STRICT, grace_period=1.0
    ) as pool:
        for _ in range(8):
            (await pool.run(Message(b"work"))).close()
        alive = _live_workers()
    assert alive <= 2 * workers, f"{alive} worker processes for a pool of {workers}"


async def test_cancelling_a_pool_kills_its_workers_at_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zygote relays the exit statuses of the workers a cancelled pool
    kills (it took 10 s and logged false 'left unreaped' warnings)."""
    monkeypatch.setattr(_spawn, "_KILL_WAIT", 0.5)  # not 5 s per wait in a test
    with trio.CancelScope() as scope:
        async with open_worker_pool(UPPER, workers=2, sandbox=STRICT) as pool:
            (await pool.run(Message(b"work"))).close()
            scope.cancel()
    unreaped = [r.message for r in caplog.records if "left unreaped" in r.message]
    assert not unreaped, unreaped


async def test_request_timeout_bounds_how_long_a_request_waits_for_its_worker() -> None:
    """request_timeout counts from the oldest request's send (it restarted
    at every reply: the last of 32 waited 32 x the timeout)."""
    outcomes: list[str] = []
    async with open_worker_pool(
        REPLY_AFTER,
        workers=1,
        max_in_flight=8,
        request_timeout=1.2,
        sandbox=STRICT,
    ) as pool:

        async def one() -> None:
            try:
                (await pool.run(Message(b"0.3"))).close()
            except WorkerError:
                outcomes.append("failed")
            else:
                outcomes.append("answered")

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
    # Sent at once and answered 0.3 s apart, the last ones are answered
    # 2.1-2.4 s after they were sent, far past the timeout.
    assert outcomes.count("failed") >= 3, f"every request was answered: {outcomes}"


async def test_one_pool_worker_holds_well_under_a_default_fd_limit() -> None:
    """One fd budget per pool worker (it held 1,204 fds, past the usual soft
    RLIMIT_NOFILE of 1024, while a map's consumer was behind)."""
    before = len(open_fds())
    async with open_worker_pool(
        FD_HOARDER, workers=1, sandbox=own_uid_policy()
    ) as pool:
        messages = [Message(b"120") for _ in range(40)]
        async with pool.map(messages, window=40) as replies:
            (await replies.__anext__()).close()  # then a slow consumer
            await trio.sleep(1.5)
            held = len(open_fds()) - before
    assert held <= 512, f"one worker made this process hold {held} fds"
