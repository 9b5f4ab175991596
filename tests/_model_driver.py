"""Drive one Trio run from a synchronous test, one settled step at a time.

A hypothesis ``RuleBasedStateMachine`` calls its rules synchronously, while
the channels under test must stay open across rules, inside one
``trio.run``.  :class:`Driver` runs that ``trio.run`` on a thread of its own;
each rule hands it a step (an async function) and waits for the result.

Determinism.  The run uses a :class:`trio.testing.MockClock` that only
moves when the driver moves it, and every step ends by *settling*: wait
until every task is blocked, then jump the clock to the next deadline and
wait again, until no deadline is left.  Between two steps the run is
therefore quiescent (every task blocked on something only another step can
provide), so a step's outcome depends only on the steps before it, and a
shrunk failure replays.  Timers inside the library (a flush timeout, the
reader's idle timer) fire in virtual time, exactly when nothing else can
happen.  Hypothesis seeds Trio's scheduler, so even the order of tasks
within a step is fixed by the example.

Hangs.  A step that never settles (a task spinning without blocking, or a
deadlock inside a step's own ``await``) is caught by a real-time watchdog:
after :data:`WATCHDOG_SECONDS` the run is cancelled and the step fails
with :class:`StepHungError`.  An operation that blocks *legitimately* (a
``receive`` with nothing to receive) is started with :meth:`Driver.start`
as its own task: the step returns while it waits, and the model decides
whether it may still be waiting.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Generic, TypeVar

import trio
import trio.testing

__all__ = ["STEP_TASK", "WATCHDOG_SECONDS", "Driver", "Op", "StepHungError"]

T = TypeVar("T")

STEP_TASK = "model step"
"""The name of the task that runs a step (not an operation)."""
WATCHDOG_SECONDS = 60.0
"""Real seconds a step may take before it counts as hung."""
_MAX_JUMPS = 10_000
"""Clock jumps within one settle before the timers count as never settling."""


class StepHungError(AssertionError):
    """A step did not settle within the watchdog's time."""


class Op(Generic[T]):
    """One operation running as its own task, and its outcome once it ended.

    ``cancel()`` cancels it; once ``done``, exactly one of ``value``,
    ``error`` (anything it raised, ``Cancelled`` from elsewhere excepted)
    or ``cancelled`` (it ended by our cancellation) describes the outcome.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.scope = trio.CancelScope()
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.scope.cancel()

    def __repr__(self) -> str:
        if not self.done:
            state = "pending"
        elif self.cancelled:
            state = "cancelled"
        elif self.error is not None:
            state = f"raised {self.error!r}"
        else:
            state = f"returned {self.value!r}"
        return f"<Op {self.name} {state}>"


class Driver:
    """A ``trio.run`` on its own thread, fed steps by a synchronous caller.

    Use :meth:`step` from the caller's thread; inside a step, use
    :meth:`start` and :meth:`settle`.  :meth:`stop` ends the run (cancelling
    every operation still running) and joins the thread.
    """

    def __init__(self) -> None:
        self.clock = trio.testing.MockClock()
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping: trio.Event | None = None
        self._crash: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name="model-trio", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._crash is not None:
            raise self._crash

    def _run(self) -> None:
        try:
            trio.run(self._main, clock=self.clock)
        except BaseException as exc:
            self._crash = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stopping.wait()
            nursery.cancel_scope.cancel()

    # -- from the caller's thread ---------------------------------------

    def step(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` in the Trio run, settle, and return what it returned.

        Raises what ``fn`` raised, or :class:`StepHungError`.
        """
        assert self._token is not None
        assert self._nursery is not None
        results: queue.Queue[tuple[T | None, BaseException | None]] = queue.Queue(1)
        nursery = self._nursery

        async def run() -> None:
            try:
                value = await fn()
                await self.settle()
            except BaseException as exc:  # handed to the caller's thread
                results.put((None, exc))
            else:
                results.put((value, None))

        self._token.run_sync_soon(partial(nursery.start_soon, run, name=STEP_TASK))
        try:
            value, error = results.get(timeout=WATCHDOG_SECONDS)
        except queue.Empty:
            self._abandon()
            raise StepHungError(
                f"a step did not settle within {WATCHDOG_SECONDS} s (hang or livelock)"
            ) from None
        if error is not None:
            raise error
        return value  # type: ignore[return-value]  # None only with an error

    def stop(self) -> None:
        """Cancel whatever still runs, end the run and join its thread."""
        if self._thread.is_alive() and self._token is not None:
            stopping = self._stopping
            assert stopping is not None
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(stopping.set)
            self._thread.join(WATCHDOG_SECONDS)
        if self._thread.is_alive():
            raise StepHungError("the Trio run did not end when stopped")
        if self._crash is not None:
            raise self._crash

    def _abandon(self) -> None:
        """After a hang: cancel everything so the thread can end."""
        nursery = self._nursery
        if self._token is not None and nursery is not None:
            try:
                self._token.run_sync_soon(nursery.cancel_scope.cancel)
            except trio.RunFinishedError:
                return
            self._thread.join(WATCHDOG_SECONDS)

    # -- inside a step --------------------------------------------------

    def start(self, name: str, fn: Callable[[], Awaitable[T]]) -> Op[T]:
        """Start ``fn`` as an operation of its own; it may outlive the step."""
        assert self._nursery is not None
        op: Op[T] = Op(name)

        async def run() -> None:
            with op.scope:
                try:
                    op.value = await fn()
                except trio.Cancelled:
                    raise
                except BaseException as exc:
                    op.error = exc
            op.cancelled = op.scope.cancelled_caught
            op.done = True

        self._nursery.start_soon(run, name=name)
        return op

    async def settle(self) -> None:
        """Wait until every task is blocked and no timer is left to fire."""
        for _ in range(_MAX_JUMPS):
            await trio.testing.wait_all_tasks_blocked()
            wait = trio.lowlevel.current_statistics().seconds_to_next_deadline
            if wait == math.inf:
                return
            self.clock.jump(wait)
        raise AssertionError(f"timers still firing after {_MAX_JUMPS} clock jumps")

    def running(self) -> list[str]:
        """Names of the operations still running (call inside a step)."""
        assert self._nursery is not None
        return [
            task.name for task in self._nursery.child_tasks if task.name != STEP_TASK
        ]
