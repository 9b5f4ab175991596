"""Requests of a worker pool: a one-shot reply slot, and the pool's bounded queue.

Theory of operation
-------------------

A :class:`Request` carries one :class:`Message` to a worker and brings its
reply (or an error) back to whoever waits for it::

    QUEUED ──sent──> SENT ──reply──> DONE ──result()──┐
      │                │               │              v
      └──── cancel ────┴──── cancel ───┴──────> CANCELLED

* ``QUEUED``: in the pool's :class:`RequestQueue` or in one worker's
  outbox (its *holder*); the request owns the message's handles.
  Cancelling takes it out of its holder and closes them: a request not yet
  sent is simply dropped.
* ``SENT``: the channel owns the handles.  A worker answers every request,
  in order, so the reply is still coming: cancelling only marks the
  request, and the reply is closed when it arrives.
* ``DONE``: the reply (or the error) waits for the waiter, who takes it
  with :meth:`Request.result`; cancelling closes an untaken reply.
  ``CANCELLED`` is also where a request ends once its result was taken:
  nothing is left in it.

Cancelling is synchronous and idempotent.  :meth:`Request.cancel` with
``unlink=False`` only marks the request and closes what it owns, without
touching its holder or waking any task, so it is safe from a finalizer;
holders skip cancelled requests when they take the next one.

The waiter parks on a :class:`Waker` (:func:`trio.lowlevel.wait_task_rescheduled`):
a reply costs one reschedule, with no ``Event`` or memory channel per
request.  A waker is fired at most once, so one task can wait for two
things at once (a map waits for its oldest reply *or* room in the queue).
Every request gets its own error instance, so no traceback is shared.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable, Iterable
from typing import Protocol

import trio

from trio_mojo._core._message import Message

__all__ = ["Request", "RequestQueue", "RequestState", "Waker", "fail_all"]


class RequestState(enum.Enum):
    """Where a :class:`Request` is in its life."""

    QUEUED = "queued"
    SENT = "sent"
    DONE = "done"
    CANCELLED = "cancelled"


_QUEUED = RequestState.QUEUED
_SENT = RequestState.SENT
_DONE = RequestState.DONE
_CANCELLED = RequestState.CANCELLED


class Waker:
    """One parked task, woken at most once, by whichever event comes first."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    async def park(self) -> None:
        """Wait until :meth:`fire` (or a cancellation)."""
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def fire(self) -> None:
        """Wake the parked task, if it still waits."""
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _abort(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _Holder(Protocol):
    """A queue that holds requests not yet sent."""

    def discard(self, request: Request) -> None: ...


class Request:
    """One request to a worker and, later, its reply or error."""

    __slots__ = (
        "_error",
        "_release",
        "_reply",
        "holder",
        "message",
        "sent_at",
        "state",
        "waker",
    )

    def __init__(self, message: Message) -> None:
        self.message: Message | None = message
        self.state = _QUEUED
        self.holder: _Holder | None = None
        self._reply: Message | None = None
        self._release: Callable[[Message], None] | None = None
        self._error: BaseException | None = None
        self.waker: Waker | None = None  # fired once the request is done
        self.sent_at = 0.0
        """When the pool sent it (:func:`trio.current_time`), if it times requests."""

    # ------------------------------------------------------------------
    # The pool's side

    def take_message(self) -> Message:
        """``QUEUED`` -> ``SENT``: the caller sends the message (and its handles)."""
        message = self.message
        assert message is not None
        self.message = None
        self.holder = None
        self.state = _SENT
        return message

    def resolve(self, reply: Message, release: Callable[[Message], None]) -> bool:
        """The worker answered: keep the reply for the waiter, or close it.

        Returns True if it was kept; ``release(reply)`` is called when the
        waiter takes it or it is discarded, so the pool can count what its
        workers have handed over and nobody has taken yet.
        """
        if self.state is not _SENT:
            reply.close()
            return False
        self.state = _DONE
        self._reply = reply
        self._release = release
        self._wake()
        return True

    def _let_go(self) -> Message | None:
        """Take the reply out (released, not closed), if there is one."""
        reply, self._reply = self._reply, None
        release, self._release = self._release, None
        if reply is not None and release is not None:
            release(reply)
        return reply

    def fail(self, error: BaseException) -> None:
        """The request will never be answered: hand ``error`` to the waiter."""
        if self.state is _CANCELLED or self.state is _DONE:
            return
        if self.message is not None:
            self.message.close()
            self.message = None
        self.holder = None
        self.state = _DONE
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self.waker is not None:
            self.waker.fire()

    # ------------------------------------------------------------------
    # The waiter's side

    @property
    def done(self) -> bool:
        """True once the reply or an error is there to take."""
        return self.state is _DONE

    async def wait(self, *, cancel_on_abort: bool) -> None:
        """Park until the request is done (or cancelled by someone else).

        If the wait is cancelled, the request is cancelled too when
        ``cancel_on_abort`` is true; otherwise it stays pending and can be
        waited for again.
        """
        if self.state is _DONE:
            return
        waker = self.waker = Waker()
        try:
            await waker.park()
        except BaseException:
            if cancel_on_abort:
                self.cancel()
            raise
        finally:
            self.waker = None

    def result(self) -> Message:
        """Take the reply (the caller owns its handles), or raise the error."""
        assert self.state is _DONE
        self.state = _CANCELLED  # nothing is left in it
        error, self._error = self._error, None
        if error is not None:
            raise error
        reply = self._let_go()
        assert reply is not None
        return reply

    def cancel(self, *, unlink: bool = True) -> None:
        """Drop the request, or discard its reply.  Synchronous, idempotent.

        With ``unlink=False`` a queued request stays in its holder (marked,
        its handles closed) and no task is woken: safe from a finalizer.
        """
        state = self.state
        self.state = _CANCELLED
        if state is _QUEUED:
            holder, self.holder = self.holder, None
            if unlink and holder is not None:
                holder.discard(self)
            if self.message is not None:
                self.message.close()
                self.message = None
        elif state is _DONE:
            self._error = None
            reply = self._let_go()
            if reply is not None:
                reply.close()
        self._wake()  # a waiter other than the canceller must see it


def fail_all(
    requests: Iterable[Request], make_error: Callable[[], BaseException]
) -> None:
    """Fail every request, each with an error of its own."""
    for request in requests:
        request.fail(make_error())


class RequestQueue:
    """Requests accepted by the pool and not yet given to a worker; bounded.

    Producers check :attr:`has_room` and :meth:`append`, or wait with
    :meth:`wait_for_room`; after :meth:`close` every waiting producer is
    woken (and must check why).  Cancelled requests are taken out at once by
    :meth:`discard`, or skipped by :meth:`take` if they were only marked.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.closed = False
        self._items: collections.deque[Request] = collections.deque()
        self._space = trio.lowlevel.ParkingLot()
        self._room_wakers: list[Waker] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def has_room(self) -> bool:
        """True when one more request fits."""
        return len(self._items) < self.capacity

    @property
    def waiting(self) -> int:
        """How many producers wait for room."""
        return len(self._space)

    def append(self, request: Request) -> None:
        """Queue ``request`` at the end (the caller checked :attr:`has_room`)."""
        request.holder = self
        self._items.append(request)

    def push_front(self, requests: Iterable[Request]) -> None:
        """Queue requests ahead of the others, in order: they were accepted
        earlier and given to a worker that died before sending them."""
        pending = [request for request in requests if request.state is _QUEUED]
        for request in reversed(pending):
            request.holder = self
            self._items.appendleft(request)

    async def wait_for_room(self) -> None:
        """Park until a request was taken out or the queue was closed."""
        if not self.closed and len(self._items) >= self.capacity:
            await self._space.park()
        else:
            await trio.lowlevel.checkpoint()

    def take(self, count: int) -> list[Request]:
        """Up to ``count`` of the oldest live requests."""
        items = self._items
        taken: list[Request] = []
        while items and len(taken) < count:
            request = items.popleft()
            if request.state is _QUEUED:
                request.holder = None
                taken.append(request)
        self._made_room()
        return taken

    def discard(self, request: Request) -> None:
        """Take out a cancelled request."""
        self._items.remove(request)
        self._made_room()

    def wake_on_room(self, waker: Waker) -> None:
        """Fire ``waker`` when room is made (or the queue is closed)."""
        self._room_wakers.append(waker)

    def forget(self, waker: Waker) -> None:
        """Undo :meth:`wake_on_room` (the waker may have fired already)."""
        if waker in self._room_wakers:
            self._room_wakers.remove(waker)

    def _made_room(self) -> None:
        room = self.capacity - len(self._items)
        if room > 0:
            if self._space:
                self._space.unpark(count=room)
            self._fire_room_wakers()

    def _fire_room_wakers(self) -> None:
        wakers, self._room_wakers = self._room_wakers, []
        for waker in wakers:
            waker.fire()

    def close(self) -> None:
        """Accept nothing more; wake every producer that waits for room."""
        self.closed = True
        self._space.unpark_all()
        self._fire_room_wakers()

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Fail and remove every queued request."""
        items, self._items = self._items, collections.deque()
        fail_all(items, make_error)
