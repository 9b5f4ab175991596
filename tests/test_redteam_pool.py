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
from _redteam_support import STRICT, finding, own_uid_policy

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


@finding(
    "a worker recycled after max_requests is closed normally (EOF, grace_period, "
    "SIGTERM, grace_period, SIGKILL) while its replacement starts at once: "
    "workers that ignore EOF and SIGTERM pile up, each for 2 x grace_period; "
    "measured 9 live workers for a pool of workers=1 after 8 requests in "
    "0.47 s (forked by the pool's zygote), 21 after 20 requests spawned"
)
async def test_recycled_workers_that_will_not_exit_do_not_pile_up() -> None:
    workers = 1
    async with open_worker_pool(
        LINGER, workers=workers, max_requests=1, sandbox=STRICT, grace_period=1.0
    ) as pool:
        for _ in range(8):
            (await pool.run(Message(b"work"))).close()
        alive = _live_workers()
    assert alive <= 2 * workers, f"{alive} worker processes for a pool of {workers}"


@finding(
    "the pool's zygote routes its workers' exit statuses from a task that a "
    "cancellation of the pool's block cancels too: each worker killed on the way "
    "out waits 5 s for a status that never comes, then again, and the log says "
    "'did not exit 5 s after SIGKILL (uninterruptible sleep?); it is left "
    "unreaped' for processes that are dead; cancelling a default pool takes 10 s"
)
async def test_cancelling_a_pool_kills_its_workers_at_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spawn, "_KILL_WAIT", 0.5)  # not 5 s per wait in a test
    with trio.CancelScope() as scope:
        async with open_worker_pool(UPPER, workers=2, sandbox=STRICT) as pool:
            (await pool.run(Message(b"work"))).close()
            scope.cancel()
    unreaped = [r.message for r in caplog.records if "left unreaped" in r.message]
    assert not unreaped, unreaped


@finding(
    "request_timeout restarts at every reply: a worker that answers each request "
    "just under the timeout is never killed, and the last of max_in_flight "
    "requests waits max_in_flight x request_timeout (32x by default) for its reply"
)
async def test_request_timeout_bounds_how_long_a_request_waits_for_its_worker() -> None:
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


@finding(
    "one pool worker can make the parent hold its channel's receive-queue bound "
    "(506 + 128 fds) plus the pool's held replies (506 + one reply): measured "
    "1,204 fds from one strict() worker whose replies a map's consumer has not "
    "taken yet, more than the soft RLIMIT_NOFILE most users get (1024): the "
    "parent's every open, accept and spawn then fails with EMFILE"
)
async def test_one_pool_worker_holds_well_under_a_default_fd_limit() -> None:
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
