"""Endpoints: ``channel_pair()``, ``Endpoint.from_fd`` and consumption."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import trio

from trio_mojo import Endpoint, Message, channel_pair, open_channel


def _socket_info(fd: int) -> tuple[int, int]:
    probe = socket.socket(fileno=fd)
    try:
        return probe.family, probe.type
    finally:
        probe.detach()


def test_channel_pair_is_connected_nonblocking_cloexec_unix_stream() -> None:
    a, b = channel_pair()
    with a, b:
        for endpoint in (a, b):
            fd = endpoint.fileno()
            assert os.get_blocking(fd) is False
            assert os.get_inheritable(fd) is False
            assert _socket_info(fd) == (socket.AF_UNIX, socket.SOCK_STREAM)
        os.write(a.fileno(), b"ping")
        assert os.read(b.fileno(), 4) == b"ping"
    assert a.closed
    assert b.closed


def test_from_fd_adopts_the_fd_and_fixes_its_flags() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        fd = ours.detach()
        os.set_blocking(fd, True)
        os.set_inheritable(fd, True)
        endpoint = Endpoint.from_fd(fd)
        with endpoint:
            assert endpoint.fileno() == fd
            assert os.get_blocking(fd) is False
            assert os.get_inheritable(fd) is False
        assert endpoint.closed
        assert theirs.recv(1) == b""  # our end really was closed


def test_from_fd_accepts_a_socket_whose_peer_is_gone() -> None:
    # A child may adopt its end after the parent died: it must then see EOF
    # through the channel, not fail to adopt.
    ours, theirs = socket.socketpair()
    theirs.close()
    with Endpoint.from_fd(ours.detach()) as endpoint:
        assert not endpoint.closed


@contextlib.contextmanager
def _pipe() -> Iterator[int]:
    r, w = os.pipe()
    try:
        yield r
    finally:
        os.close(r)
        os.close(w)


@contextlib.contextmanager
def _regular_file() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        yield f.fileno()


@contextlib.contextmanager
def _socket(family: int, kind: int) -> Iterator[int]:
    with socket.socket(family, kind) as s:
        yield s.fileno()


@contextlib.contextmanager
def _listening_unix_socket() -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX) as s:
        s.bind(os.path.join(tmp, "sock"))
        s.listen()
        yield s.fileno()


@contextlib.contextmanager
def _connected_tcp_socket() -> Iterator[int]:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        conn, _ = server.accept()
        with conn:
            yield client.fileno()


@contextlib.contextmanager
def _unix_dgram_pair() -> Iterator[int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        yield a.fileno()


@contextlib.contextmanager
def _unix_seqpacket_pair() -> Iterator[int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a.fileno()


BAD_FDS: dict[str, tuple[Callable[[], AbstractContextManager[int]], str]] = {
    "pipe": (_pipe, "not a socket"),
    "regular-file": (_regular_file, "not a socket"),
    "inet-stream-unconnected": (
        lambda: _socket(socket.AF_INET, socket.SOCK_STREAM),
        "not an AF_UNIX socket",
    ),
    "inet-stream-connected": (_connected_tcp_socket, "not an AF_UNIX socket"),
    "unix-dgram": (_unix_dgram_pair, "not a SOCK_STREAM socket"),
    "unix-seqpacket": (_unix_seqpacket_pair, "not a SOCK_STREAM socket"),
    "unix-stream-unconnected": (
        lambda: _socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "not a connected socket",
    ),
    "unix-stream-listening": (_listening_unix_socket, "not a connected socket"),
}


@pytest.mark.parametrize("kind", list(BAD_FDS))
def test_from_fd_rejects_what_is_not_a_connected_unix_stream(kind: str) -> None:
    make, reason = BAD_FDS[kind]
    with make() as fd:
        blocking = os.get_blocking(fd)
        with pytest.raises(ValueError, match=reason):
            Endpoint.from_fd(fd)
        # Rejected: still open, still the caller's, flags untouched.
        os.fstat(fd)
        assert os.get_blocking(fd) is blocking


@pytest.mark.parametrize("bad", [-1, True, 3.0, "3"])
def test_from_fd_rejects_non_fd_values(bad: object) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        Endpoint.from_fd(bad)  # type: ignore[arg-type]


def test_from_fd_of_a_closed_fd_raises_oserror() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError, match="Bad file descriptor"):
        Endpoint.from_fd(r)


def test_detach_gives_the_fd_back() -> None:
    a, b = channel_pair()
    with b:
        fd = a.detach()
        assert a.closed
        with pytest.raises(ValueError, match="closed"):
            a.fileno()
        a.close()  # idempotent, and must not close the detached fd
        os.fstat(fd)
        os.close(fd)


async def test_open_channel_consumes_the_endpoint() -> None:
    a, b = channel_pair()
    with a, b:
        async with open_channel(a) as channel:
            assert a.closed
            with pytest.raises(ValueError, match="already consumed"):
                async with open_channel(a):
                    pytest.fail("a consumed endpoint opened a second channel")
            await channel.send(Message(b"still works"))
            # b was not consumed: read what the channel wrote to it.
            data = b""
            while len(data) < 16 + 11:
                await trio.lowlevel.wait_readable(b.fileno())
                data += os.read(b.fileno(), 100)
            assert data.endswith(b"still works")


@pytest.mark.parametrize("how", ["closed", "detached"])
async def test_open_channel_refuses_a_closed_or_detached_endpoint(how: str) -> None:
    a, b = channel_pair()
    with b:
        if how == "closed":
            a.close()
        else:
            os.close(a.detach())
        with pytest.raises(ValueError, match="already consumed, detached or closed"):
            async with open_channel(a):
                pytest.fail("opened a channel on a dead endpoint")


async def test_open_channel_with_a_bad_option_closes_the_socket() -> None:
    a, b = channel_pair()
    with b:
        with pytest.raises(ValueError, match="send_queue_messages=0"):
            async with open_channel(a, send_queue_messages=0):
                pytest.fail("opened a channel with a bad option")
        # The endpoint was consumed and its socket closed (no leak): the peer
        # sees end of stream.
        assert a.closed
        assert os.read(b.fileno(), 1) == b""


def test_endpoint_repr() -> None:
    a, b = channel_pair()
    with a, b:
        assert repr(a) == f"<trio_mojo.Endpoint fd={a.fileno()}>"
    assert repr(a) == "<trio_mojo.Endpoint closed>"
