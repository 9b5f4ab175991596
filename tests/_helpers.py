"""Helpers for the channel tests: raw-socket peers, pipes as tagged fds.

A *raw peer* is the far end of a real ``socketpair`` driven by hand through
a Trio socket, so a test can put any bytes and any ``SCM_RIGHTS`` on the
wire, or read exactly what the channel wrote, without blocking the event
loop.  Nothing here mocks the kernel.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import trio
import trio.testing
from _fds import fd_is_open, open_fds

from trio_mojo import Channel, Endpoint, Handle, Message, channel_pair, open_channel

__all__ = [
    "FILLER",
    "RawPeer",
    "WatchedPipe",
    "fd_is_open",
    "fill_until_queued",
    "open_fds",
    "open_pair",
    "pipe_tagged",
    "raw_pair",
    "read_tags",
    "recv_fds",
    "send_fds",
    "watched_pipe",
]

SCM_SPACE = socket.CMSG_SPACE(300 * 4)


class RawPeer:
    """The far end of a channel, as a bare Trio socket the test drives."""

    def __init__(self, sock: socket.socket) -> None:
        self.stdlib = sock
        self.sock = trio.socket.from_stdlib_socket(sock)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> int:
        """One ``sendmsg`` of ``data`` with ``fds`` as one ``SCM_RIGHTS``."""
        ancdata = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        return await self.sock.sendmsg([data], ancdata)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def recv_exactly(self, size: int) -> bytes:
        """Read exactly ``size`` bytes; fail on EOF (fds are not expected)."""
        chunks = []
        while size:
            data, ancdata, _, _ = await self.sock.recvmsg(size, SCM_SPACE)
            assert not ancdata, "unexpected control data"
            assert data, "unexpected end of stream"
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)

    async def recv_with_fds(self, size: int) -> tuple[bytes, list[Handle]]:
        """Read exactly ``size`` bytes and every fd that came with them."""
        chunks = []
        handles: list[Handle] = []
        while size:
            data, ancdata, _, _ = await self.sock.recvmsg(
                size, SCM_SPACE, socket.MSG_CMSG_CLOEXEC
            )
            handles.extend(recv_fds(ancdata))
            assert data, "unexpected end of stream"
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks), handles

    async def at_eof(self) -> bool:
        """True if the channel's end is shut down or closed (after draining).

        Reads and discards what is pending; returns once the stream ends
        (``b""`` or ``ECONNRESET``), or fails after 10 s rather than hang.
        """
        with trio.fail_after(10):
            while True:
                try:
                    data = await self.sock.recv(65536)
                except ConnectionResetError:
                    return True
                if not data:
                    return True

    def nothing_pending(self) -> bool:
        """True if no byte is waiting to be read right now."""
        try:
            self.stdlib.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def raw_pair() -> Iterator[tuple[Endpoint, RawPeer]]:
    """An endpoint for the channel under test and a raw peer on the other end."""
    ours, theirs = channel_pair()
    peer = RawPeer(socket.socket(fileno=theirs.detach()))
    try:
        with ours:
            yield ours, peer
    finally:
        peer.close()


@contextlib.asynccontextmanager
async def open_pair(**options: Any) -> AsyncIterator[tuple[Channel, Channel]]:
    """Two channels talking to each other over a fresh ``channel_pair()``."""
    a, b = channel_pair()
    with a, b:
        async with (
            open_channel(a, **options) as left,
            open_channel(b, **options) as right,
        ):
            yield left, right


def recv_fds(ancdata: list[tuple[int, int, bytes]]) -> list[Handle]:
    """Wrap every fd of ``SCM_RIGHTS`` control data in a :class:`Handle`."""
    handles: list[Handle] = []
    for level, kind, payload in ancdata:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds = array.array("i")
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        handles.extend(Handle(fd) for fd in fds)
    return handles


def send_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
    """A blocking raw ``sendmsg`` with ``fds`` (for stdlib-socket peers)."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    return sock.sendmsg([data], rights)


@contextlib.contextmanager
def pipe_tagged(count: int, first: int = 0) -> Iterator[list[Handle]]:
    """``count`` pipe read ends, the i-th holding the byte ``(first + i) % 256``.

    The write ends are closed at once, so each read end yields its tag and
    then EOF: a received fd can be identified by reading it.  Every handle
    still open on exit is closed.
    """
    handles: list[Handle] = []
    try:
        for i in range(count):
            r, w = os.pipe()
            handles.append(Handle(r))
            try:
                os.write(w, bytes([(first + i) % 256]))
            finally:
                os.close(w)
        yield handles
    finally:
        for handle in handles:
            handle.close()


def read_tags(handles: Sequence[Handle]) -> list[int]:
    """Read the tag byte of each pipe from :func:`pipe_tagged` (or -1)."""
    tags = []
    for handle in handles:
        data = os.read(handle.fileno(), 2)
        tags.append(data[0] if len(data) == 1 else -1)
    return tags


FILLER = b"F" * 65536
"""What :func:`fill_until_queued` sends."""


async def fill_until_queued(channel: Channel, payload: bytes = FILLER) -> int:
    """Send ``payload`` until the kernel is full and one waits in the queue.

    Returns how many were sent.  Settles (every task blocked) after each
    send, so a peer channel's reader has taken all it will take.
    """
    sent = 0
    while channel.statistics().send_queue_messages == 0:
        await channel.send(Message(payload))
        sent += 1
        await trio.testing.wait_all_tasks_blocked()
    return sent


class WatchedPipe:
    """A pipe whose write end is handed out; tells when every copy is closed.

    Give away ``write_end`` (the Handle itself, or its fd number to a raw
    peer, which duplicates it); :meth:`all_writers_closed` is true once no
    copy of the write end is open anywhere, ours included.
    """

    def __init__(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        self.read_end = Handle(r)
        self.write_end = Handle(w)

    def all_writers_closed(self) -> bool:
        try:
            return os.read(self.read_end.fileno(), 1) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.write_end.close()
        self.read_end.close()


@contextlib.contextmanager
def watched_pipe() -> Iterator[WatchedPipe]:
    pipe = WatchedPipe()
    try:
        yield pipe
    finally:
        pipe.close()
