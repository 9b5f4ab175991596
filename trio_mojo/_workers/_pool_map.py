"""``WorkerPool.map``: a stream of requests in, their replies out, in order.

Theory of operation
-------------------

A :class:`WorkerPoolMap` has no task of its own: each ``__anext__`` tops
up the window (takes messages from the source and hands them to the pool
while fewer than ``window`` are outstanding and the pool has room), then
returns the oldest request's reply.  While it waits for that reply it
also wakes when the pool makes room, and tops up again, so a slow request
at the head does not leave the other workers idle.  So the workers have
up to ``window`` requests ahead of the consumer, and nothing more is sent
once the consumer stops asking.  The source is read in the consumer's
task: an async source that blocks delays the replies.

Order: replies come back in the order of the messages.  A request that
failed raises its error at its position; the map stays usable (call
``__anext__`` again to go on past it).  An error raised by the source
itself (or an item that is not a :class:`Message`) is raised after the
replies to every message before it, and ends the map.

Stopping early: closing the map (:meth:`~WorkerPoolMap.aclose`, leaving
``async with``, or the pool's block ending) cancels what is outstanding:
requests not yet sent are dropped, replies of sent ones are discarded
when they arrive, their handles closed.  A map dropped without being
closed (a ``break`` out of ``async for``) is cancelled the same way when
it is garbage collected, and at the latest when the pool's block ends.
The source is never closed by the map: it belongs to the caller.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Final, Self

import trio

from trio_mojo._core._message import Message

from ._requests import Request, Waker

if TYPE_CHECKING:
    from types import TracebackType

    from ._pool import WorkerPool

__all__ = ["WorkerPoolMap"]

_YIELD_EVERY: Final = 64
"""Replies returned without blocking between two schedule points."""


class WorkerPoolMap:
    """The replies to a stream of requests, in order; from :meth:`WorkerPool.map`.

    An async iterator and an async context manager::

        async with pool.map(messages) as replies:
            async for reply in replies:
                with reply:
                    ...

    Each reply (and its handles) belongs to the consumer.
    """

    def __init__(
        self,
        pool: WorkerPool,
        messages: Iterable[Message] | AsyncIterable[Message],
        window: int,
    ) -> None:
        self._pool = pool
        self._window = window
        self._pending: collections.deque[Request] = collections.deque()
        self._held: Request | None = None  # taken from the source, not yet accepted
        self._taken = 0
        self._source_done = False
        self._source_error: BaseException | None = None
        self._closed = False
        self._streak = 0
        self._token = trio.lowlevel.current_trio_token()
        self._async_source: AsyncIterator[Message] | None = None
        self._source: Iterator[Message] | None = None
        if isinstance(messages, AsyncIterable):
            self._async_source = aiter(messages)
        elif isinstance(messages, Iterable):
            self._source = iter(messages)
        else:
            raise TypeError(
                f"map() takes an iterable or async iterable of Message, not {messages!r}"
            )

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        """The next reply, in order.

        Raises:
            StopAsyncIteration: every reply was returned, or the map was closed.
            trio.ClosedResourceError: the map was closed (by another task, or
                by the pool's block ending) while this call waited.
            WorkerError, ValueError: that request failed (see
                :meth:`WorkerPool.run`); the map goes on.
            trio.ClosedResourceError: the pool is closed.
            Exception: what the source raised, after the replies before it.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise StopAsyncIteration
        await self._top_up()
        pending = self._pending
        if not pending:
            self._closed = True
            error, self._source_error = self._source_error, None
            if error is not None:
                raise error
            raise StopAsyncIteration
        head = pending[0]
        if head.done:
            self._streak += 1
            if self._streak >= _YIELD_EVERY:
                self._streak = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            self._streak = 0
            while not head.done:
                await self._wait(head)
                if self._closed:
                    raise trio.ClosedResourceError(
                        "the map was closed while waiting for a reply"
                    )
                await self._top_up()
        pending.popleft()
        return head.result()

    async def _wait(self, head: Request) -> None:
        """Park until ``head`` is done, or the pool has room for what we hold."""
        if self._held is None:
            await head.wait(cancel_on_abort=False)
            return
        queue = self._pool._queue
        waker = head.waker = Waker()
        queue.wake_on_room(waker)
        try:
            await waker.park()
        finally:
            head.waker = None
            queue.forget(waker)

    async def _top_up(self) -> None:
        """Hand messages to the pool while the window and the pool have room."""
        pool = self._pool
        pending = self._pending
        while len(pending) < self._window:
            request = self._held
            if request is None:
                if self._source_done:
                    return
                if self._source is not None:
                    message = self._next_of(self._source)
                elif pending and pending[0].done:
                    return  # a reply is ready: do not wait on the source first
                else:
                    message = await self._next_message()
                if message is None:
                    return
                request = Request(message)
                self._held = request
            if not pool._submit_nowait(request):
                if pending:
                    return  # the pool is full: deliver what is outstanding first
                await pool._submit(request)
            self._held = None
            pending.append(request)

    async def _next_message(self) -> Message | None:
        """The source's next message; ``None`` once it ended or failed."""
        if self._source is not None:
            return self._next_of(self._source)
        assert self._async_source is not None
        try:
            message = await anext(self._async_source)
        except StopAsyncIteration:
            self._ended(None)
            return None
        except Exception as exc:
            self._ended(exc)
            return None
        return self._checked(message)

    def _next_of(self, source: Iterator[Message]) -> Message | None:
        try:
            message = next(source)
        except StopIteration:
            self._ended(None)
            return None
        except Exception as exc:
            self._ended(exc)
            return None
        return self._checked(message)

    def _checked(self, message: object) -> Message | None:
        if not isinstance(message, Message):
            self._ended(
                TypeError(
                    f"map(): item {self._taken} of the messages is "
                    f"{type(message).__name__}, not a trio_mojo.Message"
                )
            )
            return None
        self._taken += 1
        return message

    def _ended(self, error: Exception | None) -> None:
        """The source is done; ``error`` is raised after the replies before it."""
        self._source_done = True
        self._source_error = error

    def close(self) -> None:
        """Cancel what is outstanding; the map returns nothing more.  Idempotent."""
        self._cancel(unlink=True)

    async def aclose(self) -> None:
        """:meth:`close`, as an async method (a checkpoint)."""
        self.close()
        await trio.lowlevel.checkpoint()

    def _cancel(self, *, unlink: bool) -> None:
        self._closed = True
        self._source_error = None
        pending, self._pending = self._pending, collections.deque()
        for request in pending:
            request.cancel(unlink=unlink)
        held, self._held = self._held, None
        if held is not None:
            held.cancel(unlink=unlink)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without close(): a finalizer may run inside the scheduler,
        # so the close that wakes tasks is scheduled on the run loop.  After
        # the run, nothing is left to wake: only mark and close.
        if self._closed and not self._pending and self._held is None:
            return
        try:
            self._token.run_sync_soon(self.close)
        except trio.RunFinishedError:
            self._cancel(unlink=False)
