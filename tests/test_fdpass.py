"""The syscall layer (``_fdpass``): sendmsg/recvmsg, errno translation, fds.

Real ``socketpair`` s throughout; the hostile cases (``MSG_CTRUNC``, foreign
control messages) are produced by the kernel itself.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from _helpers import open_fds, pipe_tagged, read_tags, send_fds

from trio_mojo import (
    DisconnectedError,
    Handle,
    MalformedMessageError,
    Message,
    _fdpass,
    channel_pair,
    open_channel,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.setblocking(False)
        b.setblocking(False)
        yield a, b


def test_receive_returns_none_when_nothing_is_there(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    _, b = pair
    assert _fdpass.receive(b, 100) is None


def test_receive_returns_empty_data_at_end_of_stream(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert _fdpass.receive(b, 100) == (b"", [])


def test_send_and_receive_bytes_and_fds_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    with pipe_tagged(5) as pipes:
        sent = _fdpass.send(a, [b"he", memoryview(b"llo")], [h.fileno() for h in pipes])
        assert sent == 5
        # The caller still owns what it sent.
        assert not any(h.closed for h in pipes)
    received = _fdpass.receive(b, 100)
    assert received is not None
    data, handles = received
    try:
        assert data == b"hello"
        assert all(isinstance(h, Handle) for h in handles)
        assert read_tags(handles) == [0, 1, 2, 3, 4]
        # MSG_CMSG_CLOEXEC: never inherited by a child we spawn.
        assert not any(os.get_inheritable(h.fileno()) for h in handles)
    finally:
        for h in handles:
            h.close()


def _send_one_buffer(sock: socket.socket, data: bytes) -> int | None:
    return _fdpass.send(sock, [data], [])


def _send_inline(sock: socket.socket, data: bytes) -> int | None:
    """What the channel's inline write does: ``send`` with SEND_FLAGS, a
    failure through failure()."""
    try:
        return sock.send(data, _fdpass.SEND_FLAGS)
    except BlockingIOError:
        return None
    except OSError as exc:
        failure = _fdpass.failure(exc, "send")  # (chains exc as the cause)
    raise failure


# send() with one buffer and no fds, and the channel's inline send, behave
# the same.
SENDERS = pytest.mark.parametrize("send", [_send_one_buffer, _send_inline])


@SENDERS
def test_send_returns_none_when_the_socket_is_full(
    pair: tuple[socket.socket, socket.socket],
    send: Callable[[socket.socket, bytes], int | None],
) -> None:
    a, b = pair
    chunk = b"x" * 65536
    total = 0
    while (sent := send(a, chunk)) is not None:
        total += sent
    assert total > 0
    # Reading makes room again.
    while _fdpass.receive(b, 1 << 20) is not None:
        pass
    assert send(a, b"y") == 1


@SENDERS
def test_calls_never_block_even_on_a_blocking_socket(
    pair: tuple[socket.socket, socket.socket],
    send: Callable[[socket.socket, bytes], int | None],
) -> None:
    # MSG_DONTWAIT: a socket left blocking cannot stall the event loop.
    a, b = pair
    a.setblocking(True)
    b.setblocking(True)
    assert _fdpass.receive(a, 1) is None  # nothing was sent to a
    while send(a, b"x" * 65536) is not None:
        pass


@SENDERS
def test_send_to_a_closed_peer_is_disconnected(
    pair: tuple[socket.socket, socket.socket],
    send: Callable[[socket.socket, bytes], int | None],
) -> None:
    a, b = pair
    b.close()
    with pytest.raises(DisconnectedError, match="Broken pipe") as info:
        send(a, b"x")
    assert isinstance(info.value.__cause__, BrokenPipeError)


def test_receive_after_the_peer_dropped_unread_data_is_disconnected(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    _fdpass.send(b, [b"unread"], [])
    a.close()  # with unread data: the kernel resets b's connection
    with pytest.raises(DisconnectedError, match="Connection reset") as info:
        _fdpass.receive(b, 100)
    assert isinstance(info.value.__cause__, ConnectionResetError)


def test_closed_socket_raises_closed_resource_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    a.close()
    with pytest.raises(trio.ClosedResourceError):
        _fdpass.send(a, [b"x"], [])
    with pytest.raises(trio.ClosedResourceError):
        _fdpass.receive(a, 100)


def test_truncated_control_data_closes_what_arrived_and_fails(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        before = open_fds()
        # 200 fds in one sendmsg: more than the 128 our control buffer holds.
        send_fds(a, b"x", [r] * 200)
        with pytest.raises(MalformedMessageError, match="MSG_CTRUNC"):
            _fdpass.receive(b, 100)
        assert open_fds() == before  # the 128 that arrived were closed
    finally:
        os.close(r)
        os.close(w)


def test_truncated_control_data_can_be_tolerated(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # Chromium's release behaviour, behind fail_on_truncation=False.
    a, b = pair
    with pipe_tagged(1) as (pipe,):
        send_fds(a, b"x", [pipe.fileno()] * 200)
    received = _fdpass.receive(b, 100, fail_on_truncation=False)
    assert received is not None
    data, handles = received
    try:
        assert data == b"x"
        assert len(handles) == 128
    finally:
        for h in handles:
            h.close()


def test_foreign_control_message_closes_fds_and_fails(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # SO_PASSCRED makes the kernel add SCM_CREDENTIALS next to SCM_RIGHTS:
    # the channel never asked for it, so it is a protocol violation.
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    before = open_fds()
    with pipe_tagged(3) as pipes:
        send_fds(a, b"x", [h.fileno() for h in pipes])
    with pytest.raises(MalformedMessageError, match="unexpected control message"):
        _fdpass.receive(b, 100)
    assert open_fds() == before


def test_received_fd_is_wrapped_even_with_a_short_buffer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # The fds come with the first byte; a 1-byte read still gets all of them.
    a, b = pair
    with pipe_tagged(2) as pipes:
        send_fds(a, b"abc", [h.fileno() for h in pipes])
    first = _fdpass.receive(b, 1)
    rest = _fdpass.receive(b, 100)
    assert first is not None
    assert rest == (b"bc", [])
    data, handles = first
    try:
        assert data == b"a"
        assert read_tags(handles) == [0, 1]
    finally:
        for h in handles:
            h.close()


def test_recv_control_size_holds_exactly_128_fds() -> None:
    assert socket.CMSG_SPACE(128 * 4) == _fdpass.RECV_CONTROL_SIZE


# ----------------------------------------------------------------------
# reopen: received pipes get a description of their own


def _received(sock: socket.socket, reopen: bool) -> list[Handle]:
    received = _fdpass.receive(sock, 100, reopen=reopen)
    assert received is not None
    return received[1]


@pytest.mark.parametrize("reopen", [True, False])
def test_reopened_pipes_are_out_of_the_sender_s_reach(
    pair: tuple[socket.socket, socket.socket], reopen: bool
) -> None:
    a, b = pair
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    sock, other = socket.socketpair()
    try:
        os.set_blocking(r, False)  # the receiver's FdStream would do this
        send_fds(a, b"x", [r, w, null, sock.fileno()])
        pipe_read, pipe_write, device, received_sock = _received(b, reopen)
        with pipe_read, pipe_write, device, received_sock:
            os.set_blocking(r, True)  # ... and the sender undoes it on its copy
            assert os.get_blocking(pipe_read.fileno()) is not reopen
            os.set_blocking(w, False)
            assert os.get_blocking(pipe_write.fileno()) is reopen
            # A device or a socket is never reopened: still shared.
            os.set_blocking(null, False)
            assert not os.get_blocking(device.fileno())
            sock.setblocking(False)
            assert not os.get_blocking(received_sock.fileno())
            os.write(pipe_write.fileno(), b"!")
            assert os.read(r, 1) == b"!"
    finally:
        for fd in (r, w, null):
            os.close(fd)
        sock.close()
        other.close()


def test_a_fifo_write_end_without_reader_fails_the_read_and_closes_every_fd(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    a, b = pair
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r, w = os.pipe()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.close(reader)
    try:
        before = open_fds()
        send_fds(a, b"x", [r, writer, w])
        with pytest.raises(MalformedMessageError, match="ENXIO"):
            _fdpass.receive(b, 100, reopen=True)
        assert open_fds() == before
    finally:
        for fd in (r, w, writer):
            os.close(fd)


@pytest.mark.parametrize("reopen_pipes", [True, False])
async def test_open_channel_reopens_received_pipes_on_request(
    reopen_pipes: bool,
) -> None:
    left, right = channel_pair()
    r, w = os.pipe()
    try:
        async with (
            open_channel(left) as sender,
            open_channel(right, reopen_pipes=reopen_pipes) as receiver,
        ):
            await sender.send(Message(b"pipe", [Handle.dup(r)]))
            with await receiver.receive() as message:
                os.set_blocking(r, not os.get_blocking(r))
                received = message.handles[0].fileno()
                assert (os.get_blocking(received) == os.get_blocking(r)) is not (
                    reopen_pipes
                )
    finally:
        os.close(r)
        os.close(w)


async def test_a_waiting_receiver_reading_itself_reopens_received_pipes() -> None:
    # receive() waits first, so the reader lends it the socket and the
    # receiver's own recvmsg gets the pipe: it must be reopened all the same.
    left, right = channel_pair()
    r, w = os.pipe()
    got: list[Message] = []
    try:
        async with (
            open_channel(left) as sender,
            open_channel(right, reopen_pipes=True) as receiver,
        ):

            async def receive() -> None:
                got.append(await receiver.receive())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                await sender.send(Message(b"pipe", [Handle.dup(r)]))
            with got[0] as message:
                os.set_blocking(r, not os.get_blocking(r))
                received = message.handles[0].fileno()
                assert os.get_blocking(received) != os.get_blocking(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to another uid (needs root)")
def test_send_reports_fds_in_flight_past_the_senders_limit() -> None:
    # The kernel refuses SCM_RIGHTS (ETOOMANYREFS) once a user without
    # CAP_SYS_RESOURCE has more fds in flight than its RLIMIT_NOFILE:
    # send() says so (nothing was sent) instead of raising.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        status = 1
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            for _ in range(64):
                sent = _fdpass.send(left, [b"x"], [devnull])
                if sent == _fdpass.FDS_IN_FLIGHT:
                    status = 0
                    break
        finally:
            os._exit(status)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        left.close()
        right.close()  # discards what is still in flight
        os.close(devnull)


def test_failures_that_are_not_os_errors_pass_through() -> None:
    # (What the channel does with them: records or raises them as they are.)
    bug = ZeroDivisionError("a bug")
    assert _fdpass.failure(bug, "send") is bug
    reset = _fdpass.failure(ConnectionResetError(104, "reset"), "recvmsg")
    assert isinstance(reset, DisconnectedError)
    assert isinstance(reset.__cause__, ConnectionResetError)
