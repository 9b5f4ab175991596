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

A worker whose target cannot be loaded (its module raises on import, has
no such function, or the function is not an ``async def``: what only the
import can tell, ``_target``) sends, in place of its report, a *target
failure*: :data:`TARGET_FAILED_PREFIX` followed by a JSON object
``{"target": "pkg.mod:func", "error": "<one line>"}`` (:func:`target_failed`),
and exits with :data:`TARGET_FAILED_EXIT`.  It comes from the bootstrap,
before any target code ran, and the parent reads it with
:func:`parse_target_failed`: a target it did not ask for, or anything but
one line of at most :data:`MAX_TARGET_ERROR` characters, is malformed, and
the line is escaped (a module's exception message is text from the worker).

A forked worker (a zygote's child) runs exactly this handshake too.
"""

from __future__ import annotations

import json
import secrets
from typing import Final

import attrs
import trio

from trio_mojo._channel import Channel
from trio_mojo._core._message import Message
from trio_mojo._sandbox import SandboxReport

from ._output import escape_controls

__all__ = [
    "GO_AHEAD_PREFIX",
    "GO_AHEAD_TIMEOUT",
    "MAX_TARGET_ERROR",
    "NO_GO_AHEAD_EXIT",
    "SANDBOX_FAILED_EXIT",
    "TARGET_FAILED_EXIT",
    "TARGET_FAILED_PREFIX",
    "go_ahead",
    "parse_target_failed",
    "target_failed",
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
TARGET_FAILED_EXIT: Final = 73
"""The worker's exit status when its target could not be loaded."""
TARGET_FAILED_PREFIX: Final = b"trio-mojo target-failed "
MAX_TARGET_ERROR: Final = 2000
"""The longest error text of a target failure, in characters."""


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


def target_failed(target: str, error: str) -> bytes:
    """The payload a worker sends in place of its report (worker side).

    ``error`` is cut to :data:`MAX_TARGET_ERROR` characters.
    """
    body = {"target": target, "error": error[:MAX_TARGET_ERROR]}
    return TARGET_FAILED_PREFIX + json.dumps(body).encode()


def parse_target_failed(payload: bytes, target: str) -> str | None:
    """The error line of a target failure, or None for any other payload.

    The line is escaped and stays one line, whatever the worker sent.

    Raises:
        ValueError: a malformed target failure, or one for another target.
    """
    if not payload.startswith(TARGET_FAILED_PREFIX):
        return None
    try:
        body = json.loads(payload[len(TARGET_FAILED_PREFIX) :])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"a target failure that is not JSON: {exc!r:.100}") from None
    if not isinstance(body, dict) or set(body) != {"target", "error"}:
        raise ValueError("a target failure is an object with target and error")
    error = body["error"]
    if body["target"] != target:
        raise ValueError(f"a target failure for {body['target']!r:.100}")
    if not isinstance(error, str) or len(error) > MAX_TARGET_ERROR:
        raise ValueError("a target failure's error is a string of bounded length")
    return escape_controls(error, keep=frozenset())
