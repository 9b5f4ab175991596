"""The start-up handshake: the worker's report, the parent's checks, the go-ahead.

Theory of operation
-------------------

A worker must not run a single line of its target before the parent has
checked, in ``/proc``, that the sandbox the worker reports is really there.
Otherwise a target that dies at once races the checks (the parent then
reads the ``/proc`` of a dying or vanished process) and one that does not
die runs unverified.  So, on the main channel, before any application
message:

1. the locked-down worker sends its :class:`SandboxReport`, which carries a
   fresh random ``nonce`` (:func:`with_nonce`);
2. it then waits, at most the parent's ``startup_timeout`` (passed on its
   command line; :data:`GO_AHEAD_TIMEOUT` when absent), for exactly one
   message: the go-ahead, whose payload is :data:`GO_AHEAD_PREFIX` followed
   by that nonce, with no handle (:func:`wait_for_go_ahead`);
3. the parent receives the report (within its ``startup_timeout``), checks
   ``/proc`` and sends :func:`go_ahead` only if every check passed.  It
   yields the ``Worker``, and so lets the application send anything, only
   after the go-ahead is queued; the channel keeps order.

Application data cannot pass for the go-ahead: it cannot come first, and
it would have to repeat the nonce of this worker's own report.  A worker
that gets anything else (another payload, a handle, end of channel, or
nothing in time) exits with :data:`NO_GO_AHEAD_EXIT` without calling its
target.  Both waits are bounded by ``startup_timeout``: past it, the parent
has given up on the worker anyway.  The parent's send of a small message
on a fresh channel never waits.

A forked worker (a zygote's child) runs exactly this handshake too.
"""

from __future__ import annotations

import secrets
from typing import Final

import attrs
import trio

from trio_mojo._channel import Channel
from trio_mojo._core._message import Message
from trio_mojo._sandbox import SandboxReport

__all__ = [
    "GO_AHEAD_PREFIX",
    "GO_AHEAD_TIMEOUT",
    "NO_GO_AHEAD_EXIT",
    "SANDBOX_FAILED_EXIT",
    "go_ahead",
    "wait_for_go_ahead",
    "with_nonce",
]

GO_AHEAD_PREFIX: Final = b"trio-mojo go-ahead "
GO_AHEAD_TIMEOUT: Final = 30.0
"""Seconds a worker waits for its go-ahead when not told (``open_worker``'s
default ``startup_timeout``)."""
SANDBOX_FAILED_EXIT: Final = 71
"""The worker's exit status when a required sandbox layer failed."""
NO_GO_AHEAD_EXIT: Final = 72
"""The worker's exit status when no valid go-ahead came."""


def with_nonce(report: SandboxReport) -> SandboxReport:
    """``report`` with a fresh random nonce for this handshake."""
    return attrs.evolve(report, nonce=secrets.token_hex(16))


def go_ahead(report: SandboxReport) -> Message:
    """The go-ahead for the worker that sent ``report`` (parent side)."""
    return Message(GO_AHEAD_PREFIX + report.nonce.encode())


async def wait_for_go_ahead(
    channel: Channel, report: SandboxReport, limit: float = GO_AHEAD_TIMEOUT
) -> bool:
    """Wait for the go-ahead matching ``report`` (worker side); True if it came.

    Gives up after ``limit`` seconds.
    """
    expected = go_ahead(report).payload
    with trio.move_on_after(limit):
        try:
            message = await channel.receive()
        except trio.EndOfChannel:
            return False
        with message:
            return message.payload == expected and not message.handles
    return False
