"""Worker pools: requests spread over several sandboxed workers.

Theory of operation
-------------------

:func:`open_worker_pool` starts ``workers`` workers with
:func:`open_worker` (through its local ``start_worker()``, the one place a
worker process is started) and yields a :class:`WorkerPool`.  By default
(``zygote=True``) it first starts a zygote for the pool
(:func:`open_zygote`, preloading the target's module) and every worker,
the first ones, replacements and recycled ones alike, is forked from it:
a few milliseconds instead of an interpreter start.  The zygote lives as
long as the pool's block.  A worker's
target answers each request with exactly one message, in order
(:func:`serve` is that loop), so the pool matches replies to requests by
position: no request id travels on the wire.

Each live worker is a *lane*: an outbox (requests given to it, not yet
sent), an in-flight queue (sent, not yet answered), and two tasks.  The
**sender** moves the outbox into the channel; the **receiver** pops the
oldest in-flight request for each reply.  A lane holds at most
``max_in_flight`` requests, so requests leave several per ``sendmsg``
when callers outpace the workers (the channel corks a burst of sends into
one write) and replies come back batched the same way, while a worker's
death costs at most ``max_in_flight`` requests.

Dispatch.  :meth:`WorkerPool.run` gives its request straight to the
least-loaded lane if that holds fewer than half of ``max_in_flight``;
otherwise the request waits in the pool's :class:`RequestQueue`
(``queue_size``), and when that is full, ``run`` waits: back-pressure.  A
lane takes from the queue (oldest first, up to ``max_in_flight``) once it
holds half or fewer, so requests leave in batches rather than one per
reply; a full queue lets a lane above its half take more before ``run``
waits.  So the pool holds at most ``workers * max_in_flight + queue_size``
requests, whatever the number of callers.

Held replies.  A reply waits in its request until the caller takes it (a
map's consumer may be behind).  Each lane counts the payload bytes and
fds of such replies, and stops reading from its worker while they exceed
:data:`HELD_REPLY_BYTES` or :data:`HELD_REPLY_HANDLES`, so a worker cannot
make this process hold more than that, plus one reply and what its
channel queues, however large the window: the kernel then holds the
rest, charged to the worker.  fds are the scarce kind (a process has
1024 by default), so a pool's worker channels read no fd ahead of the
pool (:data:`WORKER_CHANNEL_OPTIONS`): one worker makes this process hold
at most :data:`WORKER_FD_BUDGET` fds.

Faults.  A lane whose worker dies (the channel ends or breaks), sends no
reply within ``request_timeout`` of sending its oldest request in flight
(the worker is killed), or sends a reply
nobody asked for (killed) is replaced by a fresh worker.  The requests it
had *sent* fail with :class:`WorkerError` (the pool cannot know whether the
worker started them, and never sends a request twice); those it held but
had not sent go back to the front of the queue.  A worker that could not
start fails the pool: at :func:`open_worker_pool`'s start, one clear error
and no retry; later, the block is cancelled and that error raised.  So is
a worker that exits on its own before it answered anything with no
request in flight: its target does not serve requests, and replacing it
would only loop.  A dead zygote is the same: its workers die with it, and
the first replacement fails (the zygote is gone), which fails the pool
with that error rather than respawning.

Recycling.  With ``max_requests``, a lane that was given that many
requests stops taking more; a replacement starts at once, and the old
worker answers what it holds and is closed normally (fresh process and
sandbox, as Chromium recycles renderers).  No request fails.  At most
``workers`` recycled workers live at once: beyond that, the oldest that
has answered everything is killed instead of given its grace period, and
a replacement waits until one has gone (``_bound_retiring``), so the
pool runs at most twice ``workers`` processes.

Closing.  Leaving the block normally stops accepting requests, lets every
accepted one be answered, and closes the workers normally.  Leaving it by
an exception or a cancellation kills them at once; requests still waiting
fail with :class:`trio.ClosedResourceError`.  The workers live in the
pool's nursery, so no task or process outlives the block, and each worker
has ``PR_SET_PDEATHSIG``, so none outlives the parent either.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import os
import signal
import subprocess
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Final

import attrs
import trio

from trio_mojo._channel import Channel
from trio_mojo._core._message import Message
from trio_mojo._core._wire import MAX_ATTACHED_HANDLES, MAX_SENDMSG_HANDLES
from trio_mojo._errors import WorkerError
from trio_mojo._sandbox import SandboxPolicy

from ._broker import FileAccess
from ._pool_map import WorkerPoolMap
from ._requests import Request, RequestQueue, RequestState, fail_all
from ._target import target_spec
from ._worker import (
    Worker,
    check_stdout,
    check_target,
    check_worker_options,
    open_worker,
)
from ._zygote import Zygote, open_zygote

__all__ = ["WorkerPool", "WorkerPoolStatistics", "open_worker_pool"]

_log = logging.getLogger("trio_mojo")

DEFAULT_MAX_IN_FLIGHT: Final = 32
"""Requests one worker holds (sent or about to be) by default."""
HELD_REPLY_BYTES: Final = 8 * 1024 * 1024
HELD_REPLY_HANDLES: Final = MAX_SENDMSG_HANDLES
"""Per worker: payload bytes and fds of replies it sent that nobody has
taken yet, beyond which the pool stops reading from it."""
WORKER_CHANNEL_OPTIONS: Final = {
    "max_queued_handles": MAX_ATTACHED_HANDLES,
    "receive_queue_handles": 1,
}
"""The :func:`open_channel` options of a pool's workers, unless given: fds
that wait for their message are bounded by one message's worth, and no
message with fds is read ahead of one already queued."""
_HELD_AT_MOST: Final = HELD_REPLY_HANDLES + MAX_ATTACHED_HANDLES
"""The held replies: the bound, and the reply that went past it."""
_QUEUED_AT_MOST: Final = MAX_ATTACHED_HANDLES + MAX_SENDMSG_HANDLES
"""The channel: one message's worth queued or waiting, and one read more."""
WORKER_FD_BUDGET: Final = _HELD_AT_MOST + _QUEUED_AT_MOST
"""The most fds one worker of a pool can make this process hold (762)."""

_QUEUED = RequestState.QUEUED
_SENT = RequestState.SENT


class _State(enum.Enum):
    OPEN = "open"  # accepting requests
    DRAINING = "draining"  # the block was left normally: answer what was accepted
    CLOSED = "closed"  # aborted or failed: nothing more is answered


class _NoReplyError(Exception):
    """A lane's worker held a request longer than ``request_timeout``."""


class _UnsolicitedReplyError(Exception):
    """A lane's worker sent a reply with no request in flight."""


@attrs.frozen
class WorkerPoolStatistics:
    """A snapshot of a pool, from :meth:`WorkerPool.statistics`.

    * ``workers``: worker processes serving now (a recycled one counts
      until it has answered its last request).
    * ``queued``: requests accepted and waiting in the pool's queue.
    * ``in_flight``: requests given to a worker and not yet answered.
    * ``waiting_callers``: ``run`` calls (and maps) waiting for room.
    * ``answered``, ``failed``: replies received; requests failed by a
      worker's death, hang or flood.
    * ``workers_started``, ``workers_replaced``, ``workers_recycled``:
      processes started in all; replaced after a fault; closed after
      ``max_requests``.
    """

    workers: int
    queued: int
    in_flight: int
    waiting_callers: int
    answered: int
    failed: int
    workers_started: int
    workers_replaced: int
    workers_recycled: int


class _Lane:
    """One live worker of the pool and the requests it holds."""

    __slots__ = (
        "answered",
        "assigned",
        "done_sending",
        "error",
        "finished",
        "held_bytes",
        "held_handles",
        "in_flight",
        "killed",
        "outbox",
        "recycled",
        "retired",
        "room",
        "scope",
        "timer",
        "wakeup",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.outbox: collections.deque[Request] = collections.deque()
        self.in_flight: collections.deque[Request] = collections.deque()
        self.wakeup = trio.lowlevel.ParkingLot()
        self.scope = trio.CancelScope()
        self.timer = trio.CancelScope()
        self.assigned = 0
        self.answered = 0
        self.retired = False  # takes no more requests
        self.recycled = False  # retired after max_requests: replaced already
        self.done_sending = False
        self.finished = False  # answered all it was given and was closed normally
        self.killed = False  # finished, then killed to bound the retiring workers
        self.error: Exception | None = None
        # Replies handed to requests and not yet taken (see HELD_REPLY_*).
        self.held_bytes = 0
        self.held_handles = 0
        self.room = trio.lowlevel.ParkingLot()

    @property
    def load(self) -> int:
        return len(self.outbox) + len(self.in_flight)

    @property
    def holds_too_much(self) -> bool:
        return (
            self.held_bytes > HELD_REPLY_BYTES or self.held_handles > HELD_REPLY_HANDLES
        )

    def release(self, reply: Message) -> None:
        self.held_bytes -= len(reply.payload)
        self.held_handles -= len(reply.handles)
        if self.room and not self.holds_too_much:
            self.room.unpark_all()

    def discard(self, request: Request) -> None:
        self.outbox.remove(request)


class WorkerPool:
    """Several workers running one target, answering requests; from
    :func:`open_worker_pool`.

    Any number of tasks may call :meth:`run` and :meth:`map` at once.
    """

    def __init__(
        self,
        start_worker: Callable[[], AbstractAsyncContextManager[Worker]],
        *,
        size: int,
        max_in_flight: int,
        queue_size: int,
        max_requests: int | None,
        request_timeout: float | None,
    ) -> None:
        self._start_worker = start_worker
        self._size = size
        self._max_in_flight = max_in_flight
        # A lane is refilled from the queue once it holds this few, so that
        # requests leave in batches rather than one per reply.
        self._low_water = max(1, max_in_flight // 2)
        self._max_requests = max_requests
        self._timeout = math.inf if request_timeout is None else request_timeout
        self._queue = RequestQueue(queue_size)
        self._lanes: list[_Lane] = []  # live and taking requests
        self._live: list[_Lane] = []  # every live worker, in start order
        # A recycled lane finished or ended: _bound_retiring looks again.
        self._retiring_moved = trio.lowlevel.ParkingLot()
        self._state = _State.OPEN
        self._fatal: BaseException | None = None
        self._nursery: trio.Nursery | None = None
        self._maps: weakref.WeakSet[WorkerPoolMap] = weakref.WeakSet()
        self._answered = 0
        self._failed = 0
        self._started = 0
        self._replaced = 0
        self._recycled = 0
        self.zygote: Zygote | None = None
        """The zygote the workers are forked from, if any (``zygote=``)."""

    # ------------------------------------------------------------------
    # Public API

    async def run(self, message: Message) -> Message:
        """Send ``message`` to a worker and return its reply.

        Waits while the pool's queue is full.  The pool takes the message's
        handles in every case: they are sent, or closed if the request
        fails or is cancelled.  The reply's handles belong to the caller.

        Cancellation: a request not yet sent is dropped; one already sent
        is still answered by its worker, which goes on with its other
        requests, and the reply is discarded (its handles closed).

        Raises:
            TypeError: ``message`` is not a :class:`Message`.
            ValueError: the channel refused the message (see
                :meth:`Channel.send`); the worker is unaffected.
            WorkerError: the worker died, hung past ``request_timeout`` or
                flooded before answering; it was replaced.
            trio.ClosedResourceError: the pool is closing or closed.
        """
        if not isinstance(message, Message):
            raise TypeError(f"run() takes a trio_mojo.Message, not {message!r}")
        request = Request(message)
        try:
            await self._submit(request)
        except BaseException:
            message.close()
            raise
        await request.wait(cancel_on_abort=True)
        return request.result()

    def map(
        self,
        messages: Iterable[Message] | AsyncIterable[Message],
        *,
        window: int | None = None,
    ) -> WorkerPoolMap:
        """Send each of ``messages`` to the pool; iterate over the replies, in order.

        At most ``window`` requests are outstanding at once (default: as
        many as the workers and the queue hold).  Use it as ``async for
        reply in pool.map(messages)``, or as ``async with pool.map(...) as
        replies`` to stop early: see :class:`WorkerPoolMap`.  The messages
        are read, and the requests sent, while the consumer iterates.

        Returns:
            A :class:`WorkerPoolMap` of the replies, in the order of
            ``messages``.

        Raises:
            TypeError: ``messages`` is neither an iterable nor an async
                iterable.
        """
        if window is None:
            window = self._size * self._max_in_flight + self._queue.capacity
        elif type(window) is not int or window < 1:
            raise ValueError(f"window={window!r} must be a positive int")
        replies = WorkerPoolMap(self, messages, window)
        self._maps.add(replies)
        return replies

    def statistics(self) -> WorkerPoolStatistics:
        """Return a snapshot of the pool's queues and counters."""
        return WorkerPoolStatistics(
            workers=len(self._live),
            queued=len(self._queue),
            in_flight=sum(lane.load for lane in self._live),
            waiting_callers=self._queue.waiting,
            answered=self._answered,
            failed=self._failed,
            workers_started=self._started,
            workers_replaced=self._replaced,
            workers_recycled=self._recycled,
        )

    @property
    def workers(self) -> tuple[Worker, ...]:
        """The live workers, for inspection (``pid``, ``sandbox_report``,
        ``stderr_tail``).  Their channels belong to the pool: do not use them."""
        return tuple(lane.worker for lane in self._live)

    # ------------------------------------------------------------------
    # Accepting requests (also used by WorkerPoolMap)

    async def _submit(self, request: Request) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._submit_nowait(request):
            await self._queue.wait_for_room()

    def _submit_nowait(self, request: Request) -> bool:
        """Accept ``request`` if there is room; False if the queue is full."""
        if self._state is not _State.OPEN:
            raise self._closed_error()
        queue = self._queue
        if not queue:
            lane = self._least_loaded(self._low_water)
            if lane is not None:
                self._assign(lane, request)
                lane.wakeup.unpark()
                return True
        if not queue.has_room:
            # Full: a lane above its low-water mark may still take some.
            lane = self._least_loaded(self._max_in_flight)
            if lane is None:
                return False
            self._refill(lane)
            lane.wakeup.unpark()
            if not queue.has_room:
                return False
        queue.append(request)
        return True

    def _least_loaded(self, below: int) -> _Lane | None:
        """The taking lane with the fewest requests, if it holds fewer than ``below``."""
        best = None
        best_load = below
        for lane in self._lanes:
            load = len(lane.outbox) + len(lane.in_flight)
            if load < best_load:
                best, best_load = lane, load
                if not load:
                    break
        return best

    def _assign(self, lane: _Lane, request: Request) -> None:
        request.holder = lane
        lane.outbox.append(request)
        lane.assigned += 1
        if lane.assigned == self._max_requests:
            self._retire(lane)
            lane.recycled = True
            self._recycled += 1
            self._start_replacement(recycled=True)

    def _refill(self, lane: _Lane) -> None:
        """Give ``lane`` queued requests while it has room."""
        room = self._max_in_flight - lane.load
        if self._max_requests is not None:
            room = min(room, self._max_requests - lane.assigned)
        if room > 0 and self._queue and not lane.retired:
            for request in self._queue.take(room):
                self._assign(lane, request)

    def _closed_error(self) -> trio.ClosedResourceError:
        error = trio.ClosedResourceError(
            "the worker pool is closed"
            if self._fatal is None
            else f"the worker pool stopped: {self._fatal}"
        )
        error.__cause__ = self._fatal
        return error

    # ------------------------------------------------------------------
    # Lanes

    async def _open(self, nursery: trio.Nursery) -> None:
        """Start the first workers concurrently; raise the first failure."""
        self._nursery = nursery
        failures: list[Exception] = []

        async def start_one(starters: trio.CancelScope) -> None:
            try:
                await nursery.start(self._run_lane)
            except Exception as exc:
                failures.append(exc)
                starters.cancel()

        async with trio.open_nursery() as starters:
            for _ in range(self._size):
                starters.start_soon(start_one, starters.cancel_scope)
        if failures:
            raise failures[0]

    async def _run_lane(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One worker's life: start, serve, close or fail."""
        lane: _Lane | None = None
        try:
            async with self._start_worker() as worker:
                lane = _Lane(worker)
                self._lanes.append(lane)
                self._live.append(lane)
                self._started += 1
                task_status.started()
                await self._serve(lane)
                lane.finished = True
                if lane.recycled:
                    self._retiring_moved.unpark_all()  # it may be killed now
        except Exception as exc:
            if lane is None:
                raise  # it never started
            self._lane_failed(lane, exc)
        finally:
            if lane is not None:
                self._lane_ended(lane)

    async def _serve(self, lane: _Lane) -> None:
        """Run the lane's two loops until it is done (its scope cancelled)."""
        with lane.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, lane, self._send_loop)
                nursery.start_soon(self._guard, lane, self._receive_loop)
        if lane.error is not None:
            raise lane.error

    async def _guard(
        self, lane: _Lane, loop: Callable[[_Lane], Awaitable[None]]
    ) -> None:
        """Run ``loop``; a failure ends the lane and is raised once, bare."""
        try:
            await loop(lane)
        except Exception as exc:
            if lane.error is None:
                lane.error = exc
            self._retire(lane)
            lane.scope.cancel()

    async def _send_loop(self, lane: _Lane) -> None:
        channel = lane.worker.channel
        outbox = lane.outbox
        in_flight = lane.in_flight
        while True:
            self._refill(lane)
            while outbox:
                request = outbox.popleft()
                if request.state is not _QUEUED:
                    continue  # cancelled by a finalizer
                message = request.take_message()
                in_flight.append(request)
                if self._timeout != math.inf:
                    request.sent_at = trio.current_time()
                    if len(in_flight) == 1:
                        lane.timer.deadline = request.sent_at + self._timeout
                try:
                    await channel.send(message)
                except (TypeError, ValueError) as exc:
                    # Refused before anything was queued: the worker is fine.
                    in_flight.remove(request)
                    message.close()
                    request.fail(exc)
            if lane.retired or (self._state is not _State.OPEN and not self._queue):
                lane.done_sending = True
                if not in_flight:
                    lane.scope.cancel()
                return
            await lane.wakeup.park()

    async def _receive_loop(self, lane: _Lane) -> None:
        with lane.timer:
            await self._receive_replies(lane)
        if lane.timer.cancelled_caught:
            raise _NoReplyError

    async def _receive_replies(self, lane: _Lane) -> None:
        channel = lane.worker.channel
        in_flight = lane.in_flight
        queue = self._queue
        timer = lane.timer
        timeout = self._timeout
        low_water = self._low_water
        release = lane.release
        while True:
            reply = await channel.receive()
            if not in_flight:
                reply.close()
                raise _UnsolicitedReplyError
            if in_flight.popleft().resolve(reply, release):
                lane.held_bytes += len(reply.payload)
                lane.held_handles += len(reply.handles)
                if lane.holds_too_much:
                    await self._wait_for_takers(lane)
            lane.answered += 1
            self._answered += 1
            if in_flight:
                if timeout != math.inf:  # the oldest request sets the deadline
                    timer.deadline = in_flight[0].sent_at + timeout
            else:
                timer.deadline = math.inf
                if lane.done_sending:
                    lane.scope.cancel()
                    return
                if self._state is not _State.OPEN:
                    lane.wakeup.unpark()  # draining: the sender may be done
            if queue and len(in_flight) <= low_water:
                lane.wakeup.unpark()

    async def _wait_for_takers(self, lane: _Lane) -> None:
        """Stop reading from ``lane`` until its untaken replies fit again.

        A worker that answers with large replies, or many fds, faster than
        the callers take them would otherwise make this process hold any
        amount; the request timer is suspended meanwhile (the worker is
        not late, the callers are).
        """
        deadline, lane.timer.deadline = lane.timer.deadline, math.inf
        while lane.holds_too_much:
            await lane.room.park()
        if lane.in_flight and self._timeout != math.inf:
            lane.timer.deadline = max(deadline, trio.current_time() + self._timeout)

    def _retire(self, lane: _Lane) -> None:
        """``lane`` takes no more requests."""
        if not lane.retired:
            lane.retired = True
            self._lanes.remove(lane)
            lane.wakeup.unpark()

    def _start_replacement(self, *, recycled: bool = False) -> None:
        if self._nursery is None or self._state is _State.CLOSED:
            return
        if self._state is _State.DRAINING and not self._queue:
            return
        self._nursery.start_soon(self._run_replacement, recycled)

    async def _run_replacement(self, recycled: bool) -> None:
        try:
            if recycled:
                await self._bound_retiring()
            await self._run_lane()
        except Exception as exc:
            self._fail(exc)

    async def _bound_retiring(self) -> None:
        """Wait until at most ``size`` recycled workers are still alive.

        A recycled worker answers what it holds, then is closed normally
        (end of channel, ``grace_period``, ``SIGTERM``, ``grace_period``):
        workers that ignore all that would pile up, one per
        ``max_requests`` requests.  So beyond ``size`` of them, the oldest
        one that has answered everything is killed at once, and a
        replacement starts only once one has gone.
        """
        while True:
            retiring = [lane for lane in self._live if lane.recycled]
            if len(retiring) <= self._size:
                return
            closing = [lane for lane in retiring if lane.finished and not lane.killed]
            if closing:
                closing[0].killed = True
                closing[0].worker._process.send_signal(signal.SIGKILL)
            await self._retiring_moved.park()

    def _lane_failed(self, lane: _Lane, exc: Exception) -> None:
        worker = lane.worker
        if lane.killed:
            _log.debug("recycled worker pid %d was killed: %s", worker.pid, exc)
            return
        if lane.finished:
            # It answered everything it was given; only its exit failed.
            _log.warning("worker pid %d failed when it was closed: %s", worker.pid, exc)
            return
        if self._state is _State.CLOSED:
            return  # the pool is going away: _lane_ended fails what it held
        zygote_failure = None if self.zygote is None else self.zygote._failure()
        if zygote_failure is not None:
            # Its workers died with it, and no replacement can be forked.
            self._fail(zygote_failure)
            return
        what = _what_happened(exc, self._timeout)
        sent = list(lane.in_flight)
        lane.in_flight.clear()
        self._queue.push_front(lane.outbox)
        lane.outbox.clear()
        if not sent and not lane.answered:
            self._fail(
                _worker_error(worker, f"{what} before it answered any request", exc)
            )
            return
        self._failed += sum(1 for request in sent if request.state is _SENT)
        fail_all(
            sent,
            lambda: _worker_error(worker, f"{what} before answering this request", exc),
        )
        _log.warning("worker pid %d %s; replacing it", worker.pid, what)
        self._replaced += 1
        if not lane.recycled:  # a recycled one was replaced already
            self._start_replacement()
        for other in self._lanes:  # requeued requests: let idle lanes see them
            other.wakeup.unpark()

    def _lane_ended(self, lane: _Lane) -> None:
        self._retire(lane)
        self._live.remove(lane)
        self._retiring_moved.unpark_all()
        fail_all(lane.in_flight, self._closed_error)
        fail_all(lane.outbox, self._closed_error)
        lane.in_flight.clear()
        lane.outbox.clear()

    # ------------------------------------------------------------------
    # Closing

    def _drain(self) -> None:
        """The block was left normally: answer what was accepted, then close."""
        self._state = _State.DRAINING
        self._close_maps()
        self._queue.close()
        for lane in self._live:
            lane.wakeup.unpark()

    def _abort(self) -> None:
        """Stop at once: kill the workers, fail every waiting request."""
        if self._state is not _State.CLOSED:
            self._state = _State.CLOSED
            self._close_maps()
            self._queue.close()
            self._queue.fail_all(self._closed_error)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _fail(self, error: BaseException) -> None:
        """A fault the pool cannot serve past: raise ``error`` from the block."""
        if self._fatal is None and self._state is not _State.CLOSED:
            self._fatal = error
        self._abort()

    def _close_maps(self) -> None:
        for replies in list(self._maps):
            replies.close()


def _what_happened(exc: Exception, timeout: float) -> str:
    if isinstance(exc, _NoReplyError):
        return f"sent no reply within {timeout:g} s and was killed"
    if isinstance(exc, _UnsolicitedReplyError):
        return "sent a reply nobody asked for and was killed"
    if isinstance(exc, WorkerError):
        return "died"
    if isinstance(exc, trio.EndOfChannel):
        return "closed its channel"
    return f"failed ({exc!r})"


def _worker_error(worker: Worker, what: str, cause: BaseException) -> WorkerError:
    error = WorkerError(
        f"worker pid {worker.pid} {what}",
        returncode=worker.returncode,
        stderr_tail=worker.stderr_tail,
    )
    # What the message says already (a hang, a flood, a clean end of the
    # channel) is no cause worth a traceback; a worker's or channel's error is.
    internal = (_NoReplyError, _UnsolicitedReplyError, trio.EndOfChannel)
    error.__cause__ = None if isinstance(cause, internal) else cause
    error.__suppress_context__ = True
    return error


def _positive_int(name: str, value: object) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


@asynccontextmanager
async def open_worker_pool(
    target: str | Callable[[Channel], Awaitable[object]],
    *,
    workers: int | None = None,
    sandbox: SandboxPolicy | None = None,
    file_access: Sequence[FileAccess] | FileAccess = (),
    max_requests: int | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    queue_size: int | None = None,
    request_timeout: float | None = None,
    zygote: Zygote | bool = True,
    **worker_options: Any,
) -> AsyncIterator[WorkerPool]:
    """Start a pool of ``workers`` workers running ``target``; yield a :class:`WorkerPool`.

    Every worker is started as :func:`open_worker` starts one, with the
    same ``target``, ``sandbox``, ``file_access`` and ``worker_options``.
    The target must answer each request with exactly one message, in
    order: use :func:`serve`.

    Args:
        target: ``"package.module:function"`` or the function itself, as
            for :func:`open_worker`; checked before anything starts.
        workers: worker processes (default: the CPUs this process may use).
        sandbox: the :class:`SandboxPolicy` of every worker (default
            :meth:`SandboxPolicy.strict`).
        file_access: :class:`FileAccess` rules; each worker gets its own
            file broker.
        max_requests: recycle a worker after it was given this many
            requests: it answers them, exits, and a fresh one (new process,
            new sandbox) takes its place.  At most ``workers`` recycled
            workers stay alive meanwhile; the oldest that answered
            everything is killed beyond that.  ``None`` (default): never.
        max_in_flight: requests one worker holds at a time.  More lets
            requests and replies travel several per ``sendmsg``; fewer
            fail fewer requests when a worker dies.  Default 32.
        queue_size: requests the pool queues when every worker is full,
            before ``run`` waits (default ``workers * max_in_flight``).
        request_timeout: seconds a worker may take over its oldest
            request, counted from when that request was sent; a worker
            that takes longer is killed and replaced,
            and the requests it held fail with :class:`WorkerError`.
            ``None`` (default): wait for ever.
        zygote: ``True`` (default): start a zygote for the pool
            (:func:`open_zygote` with the target's module preloaded, the
            pool's ``sandbox``, and ``python``, ``env`` and
            ``startup_timeout`` from ``worker_options``) and fork every
            worker from it; a :class:`Zygote`: fork them from that one
            (``python`` and ``env`` are then its own); ``False``: start
            each worker as an interpreter of its own.
        worker_options: passed to :func:`open_worker` (``python``,
            ``env``, ``cwd``, ``forward_output``, ``startup_timeout``,
            ``grace_period``, channel options...).  The channel options
            ``receive_queue_handles`` and ``max_queued_handles`` default
            to 1 and 253 here, so that one worker makes this process hold
            at most 762 fds.

    Leaving the block normally waits until every accepted request was
    answered, then closes the workers as :func:`open_worker` does.  Leaving
    it by an exception or a cancellation kills them; requests still
    waiting fail with :class:`trio.ClosedResourceError`.

    Raises:
        WorkerTargetError: the target cannot run (see :func:`open_worker`):
            raised before anything starts, or by the first worker (or the
            zygote) that imports it.
        WorkerError: a worker could not start (raised at once, no retry),
            or a replacement could not start, or a worker exited before
            answering any request with none in flight (its target does
            not serve requests): the block is cancelled and this raised.
            With a zygote: the zygote could not start, or died.
        SandboxUnavailableError: the policy requires a layer this machine
            cannot apply.
        ValueError: an argument is out of range, ``python`` or ``env``
            with a :class:`Zygote` (they are the zygote's), or a ``stdout``
            that :func:`open_worker` refuses.
        TypeError: a keyword argument that neither :func:`open_worker` nor
            :func:`open_channel` takes, before anything is spawned.
    """
    spec = target_spec(target)
    size = _positive_int(
        "workers", len(os.sched_getaffinity(0)) if workers is None else workers
    )
    depth = _positive_int("max_in_flight", max_in_flight)
    capacity = _positive_int(
        "queue_size", size * depth if queue_size is None else queue_size
    )
    if max_requests is not None:
        _positive_int("max_requests", max_requests)
    check_stdout(worker_options.get("stdout", subprocess.DEVNULL))
    check_worker_options(worker_options, "open_worker_pool")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(
            f"request_timeout={request_timeout!r} must be positive or None"
        )
    if not isinstance(zygote, Zygote | bool):
        raise TypeError(f"zygote must be True, False or a Zygote, not {zygote!r}")
    if isinstance(zygote, Zygote) and (
        "python" in worker_options or "env" in worker_options
    ):
        raise ValueError(
            "python= and env= belong to the zygote given: pass them to open_zygote()"
        )
    forked_from = zygote if isinstance(zygote, Zygote) else None
    if zygote is not True:  # else the zygote's preload checks it
        await check_target(
            spec,
            zygote=forked_from,
            python=worker_options.get("python"),
            env=worker_options.get("env"),
            startup_timeout=worker_options.get("startup_timeout", 30.0),
        )
    async with AsyncExitStack() as stack:
        if zygote is True:
            launch = {
                key: worker_options.pop(key)
                for key in ("python", "env", "startup_timeout")
                if key in worker_options
            }
            forked_from = await stack.enter_async_context(
                open_zygote(preload=[spec], sandbox=sandbox, **launch)
            )
            if "startup_timeout" in launch:
                worker_options["startup_timeout"] = launch["startup_timeout"]
        for option, value in WORKER_CHANNEL_OPTIONS.items():
            worker_options.setdefault(option, value)
        async with _open_pool(
            spec,
            size=size,
            max_in_flight=depth,
            queue_size=capacity,
            max_requests=max_requests,
            request_timeout=request_timeout,
            zygote=forked_from,
            worker_options={
                "sandbox": sandbox,
                "file_access": file_access,
                **worker_options,
            },
        ) as pool:
            yield pool


@asynccontextmanager
async def _open_pool(
    target: str,
    *,
    size: int,
    max_in_flight: int,
    queue_size: int,
    max_requests: int | None,
    request_timeout: float | None,
    zygote: Zygote | None,
    worker_options: dict[str, Any],
) -> AsyncIterator[WorkerPool]:
    """The pool proper, once its arguments are checked (and its zygote runs)."""

    def start_worker() -> AbstractAsyncContextManager[Worker]:
        return open_worker(target, zygote=zygote, **worker_options)

    pool = WorkerPool(
        start_worker,
        size=size,
        max_in_flight=max_in_flight,
        queue_size=queue_size,
        max_requests=max_requests,
        request_timeout=request_timeout,
    )
    pool.zygote = zygote
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                await pool._open(nursery)
                yield pool
            except BaseException as exc:  # the body's error: kill, re-raise bare
                raised = exc
                pool._abort()
            else:
                pool._drain()
    except BaseException:
        # The lanes saw an outer cancellation too: the nursery raises a group
        # of Cancelled that must not replace the body's own error.
        if raised is None:
            raise
    finally:
        pool._abort()
    if pool._fatal is not None:
        raise pool._fatal
    if raised is not None:
        raise raised
