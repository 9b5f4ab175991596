"""serve(): the worker side of request/response, over a real socketpair in-process."""

from __future__ import annotations

import os

import pytest
import trio
from _helpers import open_pair, watched_pipe

from trio_mojo import Message, serve


async def test_each_request_gets_one_reply_in_order() -> None:
    async def handle(request: Message) -> bytes:
        return request.payload[::-1]

    async with open_pair() as (client, worker), trio.open_nursery() as nursery:
        nursery.start_soon(serve, worker, handle)
        for word in (b"abc", b"hello", b""):
            await client.send(Message(word))
        replies = [(await client.receive()).payload for _ in range(3)]
        await client.aclose()  # serve() returns at the end of the channel
    assert replies == [b"cba", b"olleh", b""]


async def test_request_handles_are_closed_unless_the_reply_carries_them() -> None:
    async def ignore_handles(request: Message) -> bytes:
        return b"done"

    async def echo(request: Message) -> Message:
        return request

    with watched_pipe() as ignored, watched_pipe() as echoed:
        async with open_pair() as (client, worker):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, worker, ignore_handles)
                await client.send(Message(b"x", [ignored.write_end]))
                assert (await client.receive()).payload == b"done"
                nursery.cancel_scope.cancel()
            # serve() closed the worker side's copy after replying.
            assert ignored.all_writers_closed()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, worker, echo)
                await client.send(Message(b"y", [echoed.write_end]))
                reply = await client.receive()
                nursery.cancel_scope.cancel()
            with reply:
                (handle,) = reply.handles
                os.write(handle.fileno(), b"!")  # it came back open
            assert os.read(echoed.read_end.fileno(), 1) == b"!"
            assert echoed.all_writers_closed()


async def test_a_detached_handle_is_left_to_the_handler() -> None:
    kept: list[int] = []

    async def keep(request: Message) -> bytes:
        kept.append(request.handles[0].detach())
        return b"kept"

    with watched_pipe() as pipe:
        async with open_pair() as (client, worker), trio.open_nursery() as nursery:
            nursery.start_soon(serve, worker, keep)
            await client.send(Message(b"x", [pipe.write_end]))
            assert (await client.receive()).payload == b"kept"
            nursery.cancel_scope.cancel()
        assert not pipe.all_writers_closed()
        os.close(kept[0])
        assert pipe.all_writers_closed()


async def test_a_failing_handler_closes_the_handles_and_raises() -> None:
    async def broken(request: Message) -> bytes:
        raise KeyError("no such record")

    async def wrong_type(request: Message) -> bytes:
        return "text"  # type: ignore[return-value]

    with watched_pipe() as pipe, watched_pipe() as other:
        async with open_pair() as (client, worker):
            await client.send(Message(b"x", [pipe.write_end]))
            with pytest.raises(KeyError, match="no such record"):
                await serve(worker, broken)
            assert pipe.all_writers_closed()
            await client.send(Message(b"x", [other.write_end]))
            with pytest.raises(
                TypeError, match=r"returned str, not a trio_mojo\.Message"
            ):
                await serve(worker, wrong_type)
            assert other.all_writers_closed()


async def test_serve_returns_at_end_of_channel() -> None:
    async def handle(request: Message) -> bytes:
        return request.payload

    async with open_pair() as (client, worker):
        await client.send(Message(b"last"))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, worker, handle)
                assert (await client.receive()).payload == b"last"
                await client.aclose()


async def test_a_reply_the_channel_refuses_is_closed() -> None:
    with watched_pipe() as pipe:

        async def too_big(request: Message) -> Message:
            return Message(b"x" * 4096, [pipe.write_end])

        async with open_pair(max_message_size=1024) as (client, worker):
            await client.send(Message(b"go"))
            with pytest.raises(ValueError, match="1024"):
                await serve(worker, too_big)
        assert pipe.all_writers_closed()
