"""Rule: whatever messages are queued and however short the writes, the planned bytes and fds, fed to a decoder in the same chunks, decode to exactly the messages queued (payloads, types, handle order), with <= 128 fds per plan, never fds without bytes, each message's first fd batch no later than its first byte, and no fd leaked.

Input layout (read with :class:`~fuzz._input.FuzzInput`)::

    u8  flags       bit 0 IPCZ framing
    then operations until the input ends (at most MAX_OPERATIONS):
    u8  op          op % 16: 0-5 queue a message, 6-12 one sendmsg,
                    13 plan twice then one sendmsg, 14 queue a message the
                    encoder must refuse, 15 close the encoder (the end)
    queue:          u8 type (bits 5-7: 5 = a bytearray payload, 6 = a
                    memoryview, which the caller then overwrites),
                    u8 size class, u16 size, u8 handles, u8 handles2
                    (then up to 255 payload bytes for size class 0)
    sendmsg:        u8 how much the kernel takes (% 6: nothing, one byte,
                    all, a fraction, half, or first advance() by more than
                    the plan and by -1, which must raise), u16 the fraction

Each "sendmsg" plans, checks the plan's invariants, pretends the kernel
took ``sent`` bytes (``dup`` of each planned fd, as the kernel takes its own
reference), feeds a real :class:`MessageDecoder` with that read, and calls
``advance``.  At the end the queue is flushed with full writes and every
message must have come out, in order, with its own fds in order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from _fds import fd_is_open, open_fds

from trio_mojo import (
    END_OF_STREAM,
    MAX_ATTACHED_HANDLES,
    MAX_SENDMSG_HANDLES,
    NEED_DATA,
    Framing,
    Handle,
    Message,
    MessageDecoder,
    MessageEncoder,
    MessageType,
    OutgoingMessage,
)
from trio_mojo._core._encoder import MAX_PLAN_BUFFERS, Buffer

from ._input import FuzzInput

__all__ = ["MAX_OPERATIONS", "open_target"]

MAX_OPERATIONS = 256
MAX_LIVE_HANDLES = 2048
"""Handles queued at once, at most (a message beyond it carries none)."""
_MOJO_TYPES = (
    MessageType.NORMAL,
    MessageType.NORMAL,
    MessageType.NORMAL_LEGACY,
    MessageType.UPGRADE_OFFER,
    MessageType.UPGRADE_ACCEPT,
    MessageType.UPGRADE_REJECT,
)


def _as_buffer(payload: bytes, kind: int) -> bytes | bytearray | memoryview:
    """``payload`` as the caller may hand it over: mostly ``bytes``."""
    if kind == 5:
        return bytearray(payload)
    if kind == 6:
        return memoryview(bytearray(payload))
    return payload


@dataclass
class _Sent:
    """One queued message and where its bytes and fds went."""

    payload: bytes
    type: MessageType
    handles: list[Handle]
    written: int = 0
    first_write: int | None = None
    last_write: int | None = None
    fd_writes: list[int] = field(default_factory=list)


class _Harness:
    """An encoder, the decoder at the far end, and the model of the queue."""

    def __init__(self, framing: Framing, devnull: int) -> None:
        self.framing = framing
        self.devnull = devnull
        self.encoder = MessageEncoder()
        self.decoder = MessageDecoder(framing=framing, max_message_size=None)
        self.queued: list[_Sent] = []  # not yet completely written, in order
        self.decoded: list[Message] = []
        self.all_sent: list[_Sent] = []
        # fd number of a queued fd (the encoder took it from the handle) ->
        # its message and that handle
        self.owner: dict[int, tuple[_Sent, Handle]] = {}
        self.received: dict[int, Handle] = {}  # id of a dup -> the original
        self.writes = 0
        self.live_handles = 0

    # -- operations -----------------------------------------------------

    def queue(self, reader: FuzzInput) -> None:
        mtype, payload, count, kind = self._draw_message(reader)
        if self.framing is Framing.IPCZ:
            mtype = MessageType.NORMAL
        count = min(count, MAX_ATTACHED_HANDLES, MAX_LIVE_HANDLES - self.live_handles)
        handles = self._new_handles(count)
        given = _as_buffer(payload, kind)
        message = Message(cast(bytes, given), handles, mtype)
        sent = _Sent(payload, mtype, handles)
        for handle in handles:
            self.owner[handle.fileno()] = (sent, handle)
        entry = OutgoingMessage.encode(message, self.framing)
        assert all(h.closed for h in handles), "the entry did not take the fds"
        if not isinstance(given, bytes):
            given[:] = b"\xaa" * len(given)  # the encoder took a snapshot
        self.live_handles += count
        self.queued.append(sent)
        self.all_sent.append(sent)
        self.encoder.push(entry)

    def queue_invalid(self, reader: FuzzInput) -> None:
        mtype, payload, count, _ = self._draw_message(reader)
        if self.framing is Framing.MOJO or mtype is MessageType.NORMAL:
            count = MAX_ATTACHED_HANDLES + 1 + count % 8  # too many handles
        handles = self._new_handles(count)
        try:
            OutgoingMessage.encode(Message(payload, handles, mtype), self.framing)
        except ValueError:
            assert not any(h.closed for h in handles), "a refused message's fds"
        else:
            raise AssertionError(f"encoded {count} handles with {mtype!r}")
        finally:
            for handle in handles:
                handle.close()

    def write(self, reader: FuzzInput, *, replan: bool = False) -> None:
        how, fraction = reader.u8() % 6, reader.u16()
        if not self.encoder:
            try:
                self.encoder.plan()
            except RuntimeError:
                return
            raise AssertionError("plan() on an empty encoder did not raise")
        if replan:
            self.encoder.plan()
        buffers, fds = self.encoder.plan()
        planned = self._check_plan(buffers, fds)
        if how == 5:
            for wrong in (planned + 1, -1):
                try:
                    self.encoder.advance(wrong)
                except ValueError:
                    continue  # nothing was recorded
                raise AssertionError(f"advance({wrong}) with {planned} planned")
            how = 2  # the full plan goes now
        sent = {0: 0, 1: 1, 2: planned, 3: 1 + fraction % planned}.get(
            how, planned // 2
        )
        self._transmit(buffers, fds, sent)

    def flush(self) -> None:
        """Full writes until the queue is empty (each must make progress)."""
        for _ in range(4 * len(self.queued) + 4):
            if not self.encoder:
                return
            buffers, fds = self.encoder.plan()
            self._transmit(buffers, fds, self._check_plan(buffers, fds))
        raise AssertionError("full writes did not empty the queue")

    def close(self) -> None:
        self.encoder.close()
        assert not self.encoder
        assert self.encoder.queued_bytes == 0
        assert not any(map(fd_is_open, self.owner)), "close() left an fd open"
        self.owner.clear()
        self.queued.clear()

    # -- internals ------------------------------------------------------

    def _draw_message(self, reader: FuzzInput) -> tuple[MessageType, bytes, int, int]:
        """A message's type, payload, handle count and payload kind."""
        kind = reader.u8()
        mtype = _MOJO_TYPES[kind % len(_MOJO_TYPES)]
        size_class, size = reader.u8() % 4, reader.u16()
        handles, handles2 = reader.u8(), reader.u8()
        if size_class == 0:
            payload = reader.take(size % 256)
        else:
            length = {1: size, 2: 1016 + size % 16, 3: size * 32}[size_class]
            payload = bytes((size & 0xFF,)) * length
        if handles < 128:
            count = handles % 4
        elif handles < 192:
            count = handles2 % 130
        else:
            count = 120 + handles2 % 134  # 120..253, across the 128 boundary
        return mtype, payload, count, kind >> 5

    def _new_handles(self, count: int) -> list[Handle]:
        return [Handle(os.dup(self.devnull)) for _ in range(count)]

    def _check_plan(self, buffers: list[Buffer], fds: list[int]) -> int:
        planned = sum(len(buffer) for buffer in buffers)
        assert planned > 0, "an empty plan for a non-empty queue"
        assert len(buffers) <= MAX_PLAN_BUFFERS
        assert len(fds) <= MAX_SENDMSG_HANDLES, f"{len(fds)} fds in one sendmsg"
        assert len(set(fds)) == len(fds), "an fd planned twice"
        for fd in fds:
            assert fd in self.owner, f"fd {fd} is not a queued handle"
        return planned

    def _transmit(self, buffers: list[Buffer], fds: list[int], sent: int) -> None:
        """The kernel takes ``sent`` bytes (and, if any, every planned fd)."""
        data = b"".join(buffers)[:sent]
        arriving: list[Handle] = []
        if sent:
            self.writes += 1
            for fd in fds:
                owner, original = self.owner.pop(fd)
                owner.fd_writes.append(self.writes)
                dup = Handle(os.dup(fd))
                self.received[id(dup)] = original
                arriving.append(dup)
            self._note_bytes(len(data))
        queued_before = self.encoder.queued_bytes
        completed = self.encoder.advance(sent)
        assert self.encoder.queued_bytes == queued_before - sent
        assert self.encoder.queued_messages == len(self.queued) - completed
        if sent:
            # The kernel has its own references: ours went with this call.
            assert not any(map(fd_is_open, fds)), "a sent fd not closed"
        done = self.queued[:completed]
        assert all(s.last_write is not None for s in done)
        del self.queued[:completed]
        assert all(s.last_write is None for s in self.queued), "a message ended early"
        for sent_message in done:
            self.live_handles -= len(sent_message.handles)
            assert len(sent_message.fd_writes) == len(sent_message.handles), (
                "a message completed before all its fds were sent"
            )
        if arriving:
            self.decoder.receive_handles(arriving)
        if data:
            self.decoder.receive_data(data)
        while (message := self.decoder.next_message()) is not NEED_DATA:
            assert isinstance(message, Message), message
            self.decoded.append(message)

    def _note_bytes(self, count: int) -> None:
        """Record which messages' first and last bytes this write carried."""
        remaining = count
        for sent in self.queued:
            if remaining == 0:
                break
            if sent.first_write is None:
                sent.first_write = self.writes
            size = self._wire_size(sent)
            taken = min(remaining, size - sent.written)
            sent.written += taken
            remaining -= taken
            if sent.written == size:
                sent.last_write = self.writes

    def _wire_size(self, sent: _Sent) -> int:
        if self.framing is Framing.IPCZ:
            return 16 + len(sent.payload)
        header = 8 if sent.type is MessageType.NORMAL_LEGACY else 16
        return header + len(sent.payload)

    # -- the end --------------------------------------------------------

    def verify(self, *, flushed: bool) -> None:
        """Every message written came out whole, in order, with its own fds."""
        decoded, expected = self.decoded, self.all_sent
        if flushed:
            assert len(decoded) == len(expected), (len(decoded), len(expected))
            assert self.decoder.buffered_bytes == 0
            assert self.decoder.queued_handles == 0
        assert len(decoded) <= len(expected)
        for index, (message, sent) in enumerate(zip(decoded, expected, strict=False)):
            assert message.payload == sent.payload, f"message {index}: payload"
            assert message.type is sent.type, f"message {index}: {message.type!r}"
            originals = [self.received[id(handle)] for handle in message.handles]
            assert originals == sent.handles, f"message {index}: fds out of order"
            self._check_fd_timing(index, sent)
        if flushed:
            self.decoder.receive_eof()
            assert self.decoder.next_message() is END_OF_STREAM

    def _check_fd_timing(self, index: int, sent: _Sent) -> None:
        if not sent.handles:
            return
        assert sent.first_write is not None
        assert sent.last_write is not None
        first_batch = sent.fd_writes[:MAX_SENDMSG_HANDLES]
        assert max(first_batch) <= sent.first_write, (
            f"message {index}: fds sent in write {max(first_batch)}, after its "
            f"first byte (write {sent.first_write})"
        )
        assert max(sent.fd_writes) <= sent.last_write, f"message {index}: late fds"

    def cleanup(self) -> None:
        """Close everything, whatever state a failed check left."""
        self.encoder.close()
        self.decoder.close()
        for message in self.decoded:
            message.close()
        for sent in self.all_sent:
            for handle in sent.handles:
                handle.close()


def check(data: bytes, devnull: int) -> None:
    """Run the operations ``data`` describes; check the rule."""
    reader = FuzzInput(data)
    framing = Framing.IPCZ if reader.u8() & 1 else Framing.MOJO
    fds_before = len(open_fds())
    harness = _Harness(framing, devnull)
    try:
        flushed = True
        for _ in range(MAX_OPERATIONS):
            if not reader.remaining:
                break
            op = reader.u8() % 16
            if op <= 5:
                harness.queue(reader)
            elif op <= 12:
                harness.write(reader)
            elif op == 13:
                harness.write(reader, replan=True)
            elif op == 14:
                harness.queue_invalid(reader)
            else:
                harness.close()
                flushed = False
                break
        if flushed:
            harness.flush()
        harness.verify(flushed=flushed)
        assert not harness.owner, "an fd neither sent nor closed"
    finally:
        harness.cleanup()
    assert len(open_fds()) == fds_before, "fds leaked"


@contextlib.contextmanager
def open_target(workdir: Path) -> Iterator[Callable[[bytes], None]]:
    """Yield the one-input function (``workdir`` is unused here)."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield lambda data: check(data, devnull)
    finally:
        os.close(devnull)
