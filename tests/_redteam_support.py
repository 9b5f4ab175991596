"""Helpers for the red-team tests: ask a hostile worker, mark findings.

A *finding* is an attack that succeeds today.  Its test asserts the safe
outcome and is decorated with :func:`finding`: ``xfail(strict=True)`` for
an ``AssertionError`` only, so it fails the suite the day the hole is
closed (and the mark must go), while a test that breaks for any other
reason (a control that did not hold, a worker that did not start) is a
plain failure.  Controls say so with :func:`require`.  A finding's test
body is async and runs under its own ``trio.run``: pytest-trio would wrap
the ``AssertionError`` in an ``ExceptionGroup``, which ``raises=`` cannot
match.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final, ParamSpec

import attrs
import pytest
import trio

from trio_mojo import Message, SandboxPolicy, Worker, open_worker

__all__ = [
    "PROBE",
    "STRICT",
    "ControlError",
    "ask",
    "ask_once",
    "finding",
    "own_uid_policy",
    "request",
    "require",
]

PROBE: Final = "trio_mojo._hostile:probe"
STRICT: Final = SandboxPolicy.strict()


class ControlError(Exception):
    """A precondition of an attack did not hold: the test proves nothing."""


def require(condition: object, what: str) -> None:
    """Raise :class:`ControlError` (not an ``AssertionError``) unless ``condition``."""
    if not condition:
        raise ControlError(what)


P = ParamSpec("P")


def finding(
    harm: str,
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, None]]:
    """Make an async attack a test that is expected to fail: ``harm`` says
    what the attack does today."""

    def decorate(attack: Callable[P, Awaitable[None]]) -> Callable[P, None]:
        @functools.wraps(attack)
        def test(*args: P.args, **kwargs: P.kwargs) -> None:
            trio.run(functools.partial(attack, *args, **kwargs))

        mark = pytest.mark.xfail(strict=True, raises=AssertionError, reason=harm)
        return mark(test)

    return decorate


async def request(worker: Worker, payload: dict[str, Any]) -> Any:
    """Send ``payload`` as JSON, return the JSON reply."""
    await worker.channel.send(Message(json.dumps(payload).encode()))
    with await worker.channel.receive() as reply:
        return json.loads(reply.payload)


async def ask(worker: Worker, probe: str, **args: Any) -> Any:
    """Run ``probe`` (of ``trio_mojo._hostile.PROBES``) in ``worker``."""
    return await request(worker, {"probe": probe, "args": args})


async def ask_once(policy: SandboxPolicy, probe: str, **args: Any) -> Any:
    """Run ``probe`` in a fresh worker of :data:`PROBE` under ``policy``."""
    async with open_worker(PROBE, sandbox=policy) as worker:
        return await ask(worker, probe, **args)


def own_uid_policy(policy: SandboxPolicy = STRICT) -> SandboxPolicy:
    """``policy`` with a uid and gid no other test or user shares.

    The attacks on per-uid kernel counts would otherwise reach every
    ``nobody`` process on the machine, other test sessions included.
    """
    uid = 0x7E000000 + os.getpid() % 0x10000
    return attrs.evolve(policy, worker_uid=uid, worker_gid=uid)
