"""Red team: a well-meaning user's mistakes that hang or fail unclearly.

Not attacks: arguments a user may plausibly pass, and what they get.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import trio
from _redteam_support import PROBE, STRICT, ask, finding

import trio_mojo._examples
from trio_mojo import open_worker


@finding(
    "open_worker(stdout=subprocess.PIPE) is accepted, but nothing reads the pipe "
    "and the Worker does not expose it: a worker that prints 64 KiB blocks for "
    "ever in write(), and its requests never get an answer"
)
async def test_a_stdout_pipe_is_refused_or_drained() -> None:
    try:
        async with open_worker(
            PROBE, sandbox=STRICT, stdout=subprocess.PIPE, grace_period=0.5
        ) as worker:
            with trio.move_on_after(3) as waited:
                await ask(worker, "write_stdout", kib=256)
    except ValueError:
        return  # refused before spawning: the user is told
    assert not waited.cancelled_caught, "the worker hangs writing its stdout"


async def test_a_function_object_is_a_working_target() -> None:
    """Issue #11: a function importable by its qualified name is accepted."""
    async with open_worker(trio_mojo._examples.echo, sandbox=STRICT):
        pass


@pytest.mark.parametrize(
    ("target", "options"),
    [("trio_mojo._examples:echo", {"stdout": subprocess.STDOUT})],
    ids=["stdout-STDOUT"],
)
@finding("stdout=subprocess.STDOUT raises a bare OSError(EBADF) from the spawn")
async def test_a_plausible_argument_works_or_gets_a_clear_error(
    target: Any, options: dict[str, Any]
) -> None:
    try:
        async with open_worker(target, sandbox=STRICT, **options):
            pass
    except (TypeError, ValueError):
        return  # a clear refusal
    except Exception as exc:
        raise AssertionError(f"unclear error: {exc!r}") from exc
