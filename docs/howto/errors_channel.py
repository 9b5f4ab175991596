"""Every error a channel raises, provoked on purpose and caught.

The peer is a plain socket here, so it can break the rules.
"""

import socket
import struct

import trio

import trio_mojo


def raw_peer() -> tuple[trio_mojo.Endpoint, socket.socket]:
    """A channel endpoint, and its peer as a plain blocking socket."""
    ours, theirs = trio_mojo.channel_pair()
    peer = socket.socket(fileno=theirs.detach())
    peer.setblocking(True)
    return ours, peer


async def end_of_channel() -> None:
    ours, peer = raw_peer()
    with peer:
        peer.sendall(trio_mojo.encode_message(b"last words"))
        peer.shutdown(socket.SHUT_WR)  # a clean end, at a message boundary
        async with trio_mojo.open_channel(ours) as channel:
            print((await channel.receive()).payload)
            try:
                await channel.receive()
            except trio.EndOfChannel:
                print("EndOfChannel: the peer is done, and so are we")


async def malformed() -> None:
    ours, peer = raw_peer()
    with peer:
        # num_bytes=20 but num_header_bytes=8: a Header is at least 16 bytes.
        peer.sendall(struct.pack("<IHHH6x", 20, 8, 1, 0) + b"oops")
        try:
            async with trio_mojo.open_channel(ours) as channel:
                await channel.receive()
        except trio_mojo.MalformedMessageError as exc:
            print("MalformedMessageError:", exc)


async def disconnected() -> None:
    ours, peer = raw_peer()
    with peer:
        peer.sendall(trio_mojo.encode_message(b"0123456789")[:20])  # 6 bytes short
    try:
        async with trio_mojo.open_channel(ours) as channel:
            await channel.receive()
    except trio_mojo.DisconnectedError as exc:
        print("DisconnectedError:", exc)


async def flush_timeout() -> None:
    ours, peer = raw_peer()
    with peer:  # never reads
        try:
            async with trio_mojo.open_channel(ours, flush_timeout=0.1) as channel:
                for _ in range(64):
                    await channel.send(trio_mojo.Message(bytes(64 * 1024)))
        except trio_mojo.FlushTimeoutError as exc:
            print("FlushTimeoutError:", exc)


async def misuse() -> None:
    try:
        trio_mojo.Message("text")  # type: ignore[arg-type]
    except TypeError as exc:
        print("TypeError:", exc)
    left, right = trio_mojo.channel_pair()
    right.close()
    async with trio_mojo.open_channel(left) as channel:
        await channel.aclose()
        try:
            await channel.send(trio_mojo.Message(b"too late"))
        except trio.ClosedResourceError:
            print("ClosedResourceError: this side closed the channel")


async def main() -> None:
    await end_of_channel()
    await malformed()
    await disconnected()
    await flush_timeout()
    await misuse()


trio.run(main)
