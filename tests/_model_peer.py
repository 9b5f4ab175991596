"""The raw peer of the model test, and the tagged fds its messages carry.

:class:`ModelPeer` is the far end of a channel as a bare socket that can do
what a compromised peer does: send valid messages (fds placed as Mojo
places them: each batch of at most 128 riding on the message's first
bytes), stop in the middle of one, send malformed headers or more fds than
a ``recvmsg`` can take, half-close, close with unread data (for
``AF_UNIX`` that is the reset: ``SO_LINGER`` has no effect on it), and
read what the channel sent, decoded with a ``MessageDecoder``.  Its writes
go through a queue and a writer task, so a channel that stops reading
pushes back on it as on any peer; it counts the bytes and the whole
messages written, and the bytes read, so the model can tell what the
channel must have received.

:class:`Tags` makes the fds: each is the read end of a fresh pipe holding a
4-byte serial number, its write end closed, so a received fd is identified
by reading it — and a second copy of it would read nothing.
"""

from __future__ import annotations

import array
import collections
import fcntl
import os
import socket
import struct
from collections.abc import Sequence

import attrs
import trio

from trio_mojo import (
    END_OF_STREAM,
    NEED_DATA,
    Framing,
    Handle,
    Message,
    MessageDecoder,
    MessageType,
    encode_header,
)
from trio_mojo._handles import close_all

__all__ = ["GARBAGE", "ModelPeer", "Segment", "Tags", "wire_size"]

_TAG = struct.Struct("<I")
_CONTROL_SPACE = socket.CMSG_SPACE(253 * 4)
_SENDMSG_FDS = 128


class Tags:
    """Tagged fds: pipe read ends, each holding its own serial number."""

    def __init__(self) -> None:
        self._next = 0

    def make(self, count: int) -> tuple[list[Handle], tuple[int, ...]]:
        """``count`` new tagged fds and their tags."""
        handles: list[Handle] = []
        try:
            for _ in range(count):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                handles.append(Handle(read_end))
                try:
                    os.write(write_end, _TAG.pack(self._next))
                finally:
                    os.close(write_end)
                self._next += 1
        except BaseException:
            close_all(handles)
            raise
        return handles, tuple(range(self._next - count, self._next))


def read_tag(handle: Handle) -> int | None:
    """The tag a received fd holds (consumed), or None if it holds none.

    Also checks what every received fd must be: open and close-on-exec.
    """
    fd = handle.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, f"fd {fd} inheritable"
    data = os.read(fd, 8)
    return _TAG.unpack(data)[0] if len(data) == _TAG.size else None


def wire_size(framing: Framing, payload_size: int, mtype: MessageType) -> int:
    """Bytes one message takes on the wire."""
    header = 8 if mtype is MessageType.NORMAL_LEGACY else 16
    return header + payload_size if framing is Framing.MOJO else 16 + payload_size


def _malformed(framing: Framing, kind: str, max_message_size: int) -> bytes:
    """A header that breaks the protocol in the way ``kind`` names."""
    if framing is Framing.IPCZ:
        ipcz: dict[str, tuple[int, int, int]] = {
            "too small": (4, 0, 16),  # size below 8
            "size past end": (16, 0, 12),  # num_bytes below size
            "too many handles": (16, 254, 16),
            "too big": (16, 0, max_message_size + 1),
        }
        size, handles, num_bytes = ipcz[kind]
        return struct.pack("<HHIq", size, handles, num_bytes, 0)
    mojo: dict[str, tuple[int, int, int, int]] = {
        "too small": (7, 16, 1, 0),
        "size past end": (16, 17, 1, 0),  # num_header_bytes above num_bytes
        "too many handles": (16, 16, 1, 254),
        "too big": (max_message_size + 1, 16, 1, 0),
        "unknown type": (16, 16, 5, 0),
    }
    num_bytes, header_bytes, mtype, handles = mojo[kind]
    return struct.pack("<IHHH6x", num_bytes, header_bytes, mtype, handles)


GARBAGE = (
    "too small",
    "size past end",
    "too many handles",
    "too big",
    "unknown type",  # MOJO only (IPCZ has no type field)
    "missing fds",  # a whole message that declares 2 fds, none sent
    "200 fds",  # one sendmsg with more fds than a recvmsg takes: MSG_CTRUNC
)
"""The kinds of garbage :meth:`ModelPeer.send_garbage` sends."""


@attrs.define
class Segment:
    """Bytes the writer sends in order; ``fds`` ride on its first ``sendmsg``.

    ``ends_message`` marks the last segment of a valid message; ``eof``
    is a half-close once everything before it is written.
    """

    data: bytes
    fds: list[Handle] = attrs.Factory(list)
    ends_message: bool = False
    eof: bool = False
    offset: int = 0


class ModelPeer:
    """A raw socket peer with a write queue, a byte count and a decoder."""

    def __init__(self, sock: socket.socket, framing: Framing, max_size: int) -> None:
        self.stdlib = sock
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.framing = framing
        self.max_message_size = max_size
        self.outbox: collections.deque[Segment] = collections.deque()
        self._wake = trio.lowlevel.ParkingLot()
        self.bytes_written = 0
        self.messages_written = 0
        self.boundary = True  # the bytes written end at a message boundary
        self.write_error: OSError | None = None
        self.eof_queued = False
        self.decoder = MessageDecoder(framing=framing, max_message_size=max_size)
        self.bytes_read = 0
        self.read_end: str | None = None  # "eof", "disconnected", "reset"
        self.closed = False

    # -- writing --------------------------------------------------------

    def send_message(
        self, payload: bytes, mtype: MessageType, fds: list[Handle]
    ) -> None:
        """Queue one valid message (takes ownership of ``fds``)."""
        data = encode_header(
            len(payload), num_handles=len(fds), type=mtype, framing=self.framing
        )
        data += payload
        if len(fds) > _SENDMSG_FDS:
            # The first 128 fds on the first byte, the rest with the rest.
            self._queue(Segment(data[:1], fds[:_SENDMSG_FDS]))
            self._queue(Segment(data[1:], fds[_SENDMSG_FDS:], ends_message=True))
        else:
            self._queue(Segment(data, fds, ends_message=True))

    def send_partial(self, payload: bytes, cut: int) -> None:
        """Queue the first ``cut`` bytes of a message (0 < cut < its size)."""
        data = encode_header(len(payload), framing=self.framing) + payload
        assert 0 < cut < len(data)
        self._queue(Segment(data[:cut]))

    def send_garbage(self, kind: str, tail: bytes, fds: list[Handle]) -> None:
        """Queue malformed bytes of ``kind`` (see :data:`GARBAGE`), then ``tail``.

        ``fds`` (owned from now on) ride along; "200 fds" needs 200 of them.
        """
        if kind == "missing fds":
            data = encode_header(len(tail), num_handles=2, framing=self.framing) + tail
        elif kind == "200 fds":
            data = encode_header(len(tail), framing=self.framing) + tail
        else:
            data = _malformed(self.framing, kind, self.max_message_size) + tail
        self._queue(Segment(data, fds))

    def send_eof(self) -> None:
        """Half-close once everything queued is written."""
        self.eof_queued = True
        self._queue(Segment(b"", eof=True))

    def _queue(self, segment: Segment) -> None:
        if self.write_error is not None or self.closed:
            close_all(segment.fds)
            return
        self.outbox.append(segment)
        self._wake.unpark_all()

    async def write_loop(self) -> None:
        """The writer task: send the queue, waiting while the socket is full."""
        while True:
            while not self.outbox:
                await self._wake.park()
            segment = self.outbox[0]
            if segment.eof:
                self.stdlib.shutdown(socket.SHUT_WR)
                self.outbox.popleft()
                continue
            ancdata = []
            if segment.fds:
                fds = array.array("i", [h.fileno() for h in segment.fds])
                ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
            try:
                sent = await self.sock.sendmsg(
                    [segment.data[segment.offset :]], ancdata, socket.MSG_NOSIGNAL
                )
            except OSError as exc:
                self.write_error = exc
                self.drop_outbox()
                return
            close_all(segment.fds)  # the kernel holds its own references now
            segment.fds = []
            segment.offset += sent
            self.bytes_written += sent
            self.boundary = False
            if segment.offset == len(segment.data):
                self.outbox.popleft()
                if segment.ends_message:
                    self.messages_written += 1
                    self.boundary = True

    def drop_outbox(self) -> None:
        while self.outbox:
            close_all(self.outbox.popleft().fds)

    # -- reading --------------------------------------------------------

    def read(self, limit: int) -> tuple[list[Message], BaseException | None]:
        """Read up to ``limit`` bytes that are there now; decode them.

        Returns the messages complete so far and the decoder's error, if
        any.  ``read_end`` records how the stream ended, if it did.
        """
        while limit > 0 and self.read_end is None:
            try:
                data, ancdata, flags, _ = self.stdlib.recvmsg(
                    min(limit, 65536),
                    _CONTROL_SPACE,
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
                )
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.read_end = "reset"
                break
            assert not flags & socket.MSG_CTRUNC, "the channel sent too many fds"
            handles: list[Handle] = []
            for level, kind, payload in ancdata:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS), kind
                handles.extend(map(Handle, _fds(payload)))
            assert len(handles) <= _SENDMSG_FDS, "more than 128 fds in one sendmsg"
            assert data or not handles, "fds without data"
            self.decoder.receive_handles(handles)
            if not data:
                self.decoder.receive_eof()
                self.read_end = "eof"
                break
            self.decoder.receive_data(data)
            self.bytes_read += len(data)
            limit -= len(data)
        return self._decoded()

    def _decoded(self) -> tuple[list[Message], BaseException | None]:
        messages: list[Message] = []
        try:
            while True:
                event = self.decoder.next_message()
                if event is NEED_DATA or event is END_OF_STREAM:
                    break
                messages.append(event)
        except Exception as exc:
            if self.read_end == "eof":
                self.read_end = "disconnected"
            return messages, exc
        return messages, None

    def close(self) -> None:
        """Close the socket now, dropping whatever is not yet written."""
        self.closed = True
        self.drop_outbox()
        self.decoder.close()
        self.sock.close()


def _fds(payload: bytes) -> Sequence[int]:
    fds = array.array("i")
    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return fds
