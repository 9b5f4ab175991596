"""Trio's clock for a run under valgrind (``bench instructions``).

Under ``valgrind --tool=callgrind`` a Python program runs about
:data:`VALGRIND_SLOWDOWN` times slower, but its timers keep real time: each
would fire that many times more often per message than at full speed (the
channel's 5 ms read-lending timer on every round trip instead of about
once in 80), and the instructions counted per message would be those of a
program that does not exist.  So a run under valgrind gives ``trio.run`` a
clock that slows down as much as the program does.
"""

from __future__ import annotations

import time
from typing import Final

import trio

from ._common import RunSpec

__all__ = ["VALGRIND_SLOWDOWN", "trio_clock"]

VALGRIND_SLOWDOWN: Final = 50
"""About how much slower a trio_mojo round trip runs under callgrind here
(about 60 us at full speed, 3 ms under callgrind)."""


class _SlowClock(trio.abc.Clock):
    """Trio time that passes :data:`VALGRIND_SLOWDOWN` times slower than real time."""

    def start_clock(self) -> None:
        """Nothing to start: the clock follows ``time.perf_counter``."""

    def current_time(self) -> float:
        """Real seconds, divided by :data:`VALGRIND_SLOWDOWN`."""
        return time.perf_counter() / VALGRIND_SLOWDOWN

    def deadline_to_sleep_time(self, deadline: float) -> float:
        """Real seconds until ``deadline`` on this clock."""
        return max(0.0, (deadline - self.current_time()) * VALGRIND_SLOWDOWN)


def trio_clock(spec: RunSpec) -> trio.abc.Clock | None:
    """The clock for ``trio.run`` in ``spec``'s process (None: Trio's own)."""
    return _SlowClock() if spec.valgrind else None
