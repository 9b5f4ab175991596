"""The worker side of a request/response protocol: :func:`serve`.

A worker of a pool (see :func:`open_worker_pool`) answers each request with
exactly one reply, in order.  :func:`serve` is that loop, so a target is a
handler and one line::

    async def handle(request: trio_mojo.Message) -> bytes:
        return request.payload.upper()

    async def main(channel: trio_mojo.Channel) -> None:
        await trio_mojo.serve(channel, handle)

Each request's handles are closed once its reply was handed to the channel,
except those the handler put into the reply (the channel sends and then
closes them) and those it detached (:meth:`Handle.detach`): a handler that
only reads a received fd does not need to close it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from trio_mojo._channel import Channel
from trio_mojo._core._message import Message

__all__ = ["Handler", "serve"]

Handler = Callable[[Message], Awaitable[Message | bytes]]
"""What :func:`serve` calls for each request: an async function of the
request returning the reply (a :class:`Message`, or ``bytes`` for a reply
without handles)."""


async def serve(channel: Channel, handler: Handler) -> None:
    """Answer every request on ``channel`` with ``await handler(request)``.

    Requests are handled one at a time, in the order they arrive, and each
    gets exactly one reply; returns when the peer closes its end (the pool
    does so when the worker is recycled or the pool closes).

    The handles of a request are closed after its reply was sent, unless the
    handler put them into the reply or detached them.  If the handler
    raises, the request's handles are closed and the exception propagates:
    the worker exits, and the pool fails the requests this worker held
    with a :class:`WorkerError` that carries the traceback.  Cancelled, it
    stops at once; the request being handled gets no reply.

    Raises:
        TypeError: the handler returned something that is neither a
            :class:`Message` nor ``bytes``.
        ChannelError: the channel failed.
    """
    receive = channel.receive
    send = channel.send
    while True:
        try:
            request = await receive()
        except trio.EndOfChannel:
            return
        if not request.handles:  # the common case: only the reply to care for
            reply = _as_message(await handler(request))
            try:
                await send(reply)
            except BaseException:
                reply.close()  # refused or cancelled: the handles are still ours
                raise
            continue
        kept: Message | None = None
        sent = False
        try:
            kept = _as_message(await handler(request))
            await send(kept)
            sent = True
        finally:
            _close_leftovers(request, kept, sent=sent)


def _as_message(reply: object) -> Message:
    if isinstance(reply, Message):
        return reply
    if isinstance(reply, bytes):
        return Message(reply)
    raise TypeError(
        f"the handler returned {type(reply).__name__}, not a trio_mojo.Message or bytes"
    )


def _close_leftovers(request: Message, reply: Message | None, *, sent: bool) -> None:
    """Close the request's handles, except those the sent reply carried.

    A reply that was not sent (the handler or the send failed) is closed too.
    """
    if reply is not None and not sent:
        reply.close()
    kept = {id(handle) for handle in reply.handles} if reply is not None else set()
    for handle in request.handles:
        if id(handle) not in kept:
            handle.close()
