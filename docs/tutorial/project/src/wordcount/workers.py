"""Worker targets: each one is an async function that gets its channel.

A worker runs ``python -I``, which sees only installed packages: install
this project (``pip install -e .``) so that the worker can import it.
"""

import os

import trio_mojo

MAX_BYTES = 1 << 20  # read at most 1 MiB of a file: the input is untrusted


def read_fd(fd: int) -> bytes:
    """Read up to MAX_BYTES from fd."""
    chunks = []
    size = 0
    while size < MAX_BYTES:
        chunk = os.read(fd, MAX_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def summary(data: bytes) -> bytes:
    """The reply: lines, words and bytes, like wc."""
    return b"%d %d %d" % (data.count(b"\n"), len(data.split()), len(data))


# Step 1: the parent opens the file and sends it as an fd.
async def count_fds(channel: trio_mojo.Channel) -> None:
    """Answer each request, a message with one fd to read, with its counts."""
    async for request in channel:
        with request:  # closes the request's handles at the end of the block
            if len(request.handles) != 1:
                await channel.send(trio_mojo.Message(b"error: send one fd"))
                continue
            data = read_fd(request.handles[0].fileno())
        await channel.send(trio_mojo.Message(summary(data)))


# Step 2: the worker asks the parent's file broker to open a path.
async def count_paths(channel: trio_mojo.Channel) -> None:
    """Answer each request, a path, with its counts or the broker's refusal."""
    broker = trio_mojo.current_broker()
    async for request in channel:
        request.close()
        path = request.payload.decode()
        try:
            handle = await broker.open(path, "r")
        except trio_mojo.BrokerError as exc:
            await channel.send(trio_mojo.Message(f"refused: {exc.strerror}".encode()))
            continue
        with handle:
            data = read_fd(handle.fileno())
        await channel.send(trio_mojo.Message(summary(data)))


# Step 3: what the sandbox stops.
async def try_open(channel: trio_mojo.Channel) -> None:
    """Answer each request, a path, with what open() did with it here."""
    async for request in channel:
        request.close()
        try:
            os.close(os.open(request.payload, os.O_RDONLY))
            reply = b"opened it"
        except OSError as exc:
            reply = f"{type(exc).__name__}: {exc.strerror}".encode()
        await channel.send(trio_mojo.Message(reply))


# Step 4: a pool's target answers each request with exactly one reply.
async def count_request(request: trio_mojo.Message) -> bytes:
    """A handler for trio_mojo.serve: one request (one fd) in, one reply out."""
    if len(request.handles) != 1:
        return b"error: send one fd"
    return summary(read_fd(request.handles[0].fileno()))


async def count_served(channel: trio_mojo.Channel) -> None:
    """The pool's target: serve() calls count_request for every request."""
    await trio_mojo.serve(channel, count_request)
