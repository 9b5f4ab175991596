"""Bounds in action: a slow consumer, an oversized message, a hung worker."""

import trio

import trio_mojo


async def slow_consumer() -> None:
    left, right = trio_mojo.channel_pair()
    async with (
        trio_mojo.open_channel(left) as producer,
        trio_mojo.open_channel(right, receive_queue_messages=8) as consumer,
    ):

        async def produce() -> None:
            for n in range(200):
                await producer.send(trio_mojo.Message(b"%d" % n))
            await producer.send_eof()

        deepest = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async for _message in consumer:
                await trio.sleep(0.001)  # a slow consumer
                queued = consumer.statistics().receive_queue_messages
                deepest = max(deepest, queued)
        print("received", consumer.statistics().messages_received, "messages")
        print("at most 8 waited in the receive queue:", deepest <= 8)


async def oversized() -> None:
    left, right = trio_mojo.channel_pair()
    try:
        async with (
            trio_mojo.open_channel(left) as sender,
            trio_mojo.open_channel(right, max_message_size=1024) as small,
        ):
            try:  # too big to send: refused at once, nothing queued
                await small.send(trio_mojo.Message(bytes(2048)))
            except ValueError as exc:
                print("ValueError:", exc)
            await sender.send(trio_mojo.Message(bytes(2048)))
            await small.receive()  # too big to receive: the channel fails
    except trio_mojo.MalformedMessageError as exc:
        print("MalformedMessageError:", exc)


async def hung_worker() -> None:
    async with trio_mojo.open_worker_pool(
        "trio_mojo._examples_pool:faulty", workers=1, request_timeout=0.5
    ) as pool:
        try:
            await pool.run(trio_mojo.Message(b"hang"))
        except trio_mojo.WorkerError as exc:
            print("WorkerError:", str(exc).splitlines()[0])
        print("then:", (await pool.run(trio_mojo.Message(b"hello"))).payload)


async def main() -> None:
    await slow_consumer()
    await oversized()
    await hung_worker()


trio.run(main)
