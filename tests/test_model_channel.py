"""The channel against a model: any sequence of operations, checked at every step.

A hypothesis ``RuleBasedStateMachine`` drives a real ``channel_pair()``
inside one ``trio.run`` (see ``_model_driver.py``): both ends open as
channels, or the right end a raw socket peer (``_model_peer.py``) that can
also misbehave.  The rules, in any order:

* ``send`` a message (0 B to 1 MB, ``NORMAL`` or ``NORMAL_LEGACY``,
  0 to 253 tagged fds) and ``receive``, each as an operation that may stay
  pending across steps; ``cancel`` a pending send, receive or
  ``send_eof``; ``send_eof``; close an end (``aclose()``, leaving the
  block, or cancelling it: an abort, which is a reset for the peer when it
  leaves the peer's data unread); ``send_invalid`` messages;
* the raw peer: ``raw_send``, ``raw_receive`` (a few bytes or everything),
  ``raw_send_eof``, ``raw_garbage`` (malformed headers, a message whose
  fds never come, 200 fds in one ``sendmsg``) and ``raw_close`` (at a
  boundary, inside a message, or with the channel's data unread: the
  ``AF_UNIX`` reset).

The model says, after every step, what must have happened:

* **delivered**: each end receives exactly the messages whose ``send``
  returned on the other, in order, payload, type and fds (each fd exactly
  once, open, close-on-exec, still reading its tag); a cancelled ``send``
  delivers nothing and leaves the caller its fds, open; a cancelled
  ``receive`` loses nothing; when the sender is gone, exactly the messages
  its ``statistics().messages_sent`` counts arrive, and all of them when
  it closed without an error;
* **raised**: the documented exception for the situation, exactly
  (``EndOfChannel`` after a clean end, ``DisconnectedError`` after an end
  inside a message or a reset, ``MalformedMessageError`` after garbage,
  ``ClosedResourceError`` on a closed end, ``ValueError`` for an invalid
  message), a single exception, never an ``ExceptionGroup``, a channel
  error with its cause chained; never a hang: a ``receive`` still waits
  only if nothing can arrive, a ``send`` only if the send queue is full, a
  ``send_eof`` only while the queue holds messages; every step settles or
  the driver's watchdog fails it;
* **closed**: at the end every fd of the example is closed (the process's
  fd table is as before it), every fd given to a ``send`` that returned
  was closed by the channel, and no task is left.

Every example runs in virtual time and settles between steps, so a failure
shrinks and replays.  The default session runs :data:`DEFAULT_EXAMPLES`
examples; ``nox -s slow`` runs :data:`SLOW_EXAMPLES`.
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import attrs
import pytest
import trio
from _fds import open_fds
from _model_driver import Driver, Op
from _model_peer import GARBAGE, ModelPeer, Tags, read_tag, wire_size
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from trio_mojo import (
    Channel,
    ChannelError,
    DisconnectedError,
    Endpoint,
    FlushTimeoutError,
    Framing,
    Handle,
    MalformedMessageError,
    Message,
    MessageType,
    channel_pair,
    open_channel,
)
from trio_mojo._handles import close_all

T = TypeVar("T")
Failure = type[BaseException]

LEFT, RIGHT = "left", "right"
SIZES = (0, 1, 15, 100, 1024, 1025, 70_000, 300_000, 1_000_000)
"""Payload sizes: empty, inside a header's worth, around the 1 KiB inline
limit, and beyond the kernel's socket buffer (about 208 KiB by default)."""
SMALL_BUFFER = 8192
"""The small ``SO_SNDBUF`` some examples give both sockets."""
FD_COUNTS = (0, 1, 2, 3, 128, 129, 253)
"""Fds per message: none, a few, one ``sendmsg``'s worth, more, the most."""
MESSAGES = st.tuples(st.sampled_from(SIZES), st.sampled_from(FD_COUNTS), st.booleans())
"""One message to send: payload size, fd count, legacy type (MOJO only)."""
FLUSH_TIMEOUT = 1.0
"""Virtual seconds a graceful close waits for its queue to drain."""
MAX_OPEN_FDS = 4000
"""Above this many open fds, sends carry none (the model keeps its own)."""
DEFAULT_EXAMPLES = 40
SLOW_EXAMPLES = 1500
STEPS = 40
POINT_CHECKS = 3
"""Times per example ``send_invalid`` and ``refused`` may run (otherwise,
always enabled, they crowd out the rules that change the state)."""
EVERYTHING = 1 << 30
"""``raw_receive``'s limit: read until nothing more comes."""
INVALID = (
    "closed handle",
    "254 handles",
    "same handle twice",
    "reserved type",
    "legacy on ipcz",
    "not a message",
)
"""The invalid messages ``send_invalid`` tries."""


def _other(name: str) -> str:
    return RIGHT if name == LEFT else LEFT


def _set_send_buffer(endpoint: Endpoint, size: int) -> None:
    """Set ``SO_SNDBUF`` of the endpoint's socket (through a duplicate fd)."""
    with socket.socket(fileno=os.dup(endpoint.fileno())) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _in_trio(fn: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    """A step that calls ``fn`` inside the Trio run (it may wake tasks)."""

    async def call() -> None:
        fn()

    return call


def _payload(serial: int, size: int) -> bytes:
    head = serial.to_bytes(4, "little")
    return (head + bytes([serial % 251]) * max(size - 4, 0))[:size]


@attrs.frozen
class Config:
    """One example's channel options (both ends use the same).

    ``buffer`` is the sockets' ``SO_SNDBUF`` (None: the kernel's default,
    about 208 KiB): a small one makes the kernel push back after a few
    KiB, so sends wait for room far more often.
    """

    framing: Framing
    max_message_size: int
    buffer: int | None
    options: dict[str, Any]


@st.composite
def configs(draw: st.DrawFn) -> Config:
    framing = draw(st.sampled_from(Framing))
    max_size = draw(st.sampled_from((2 * 1024 * 1024, 128 * 1024)))
    options: dict[str, Any] = {
        "framing": framing,
        "max_message_size": max_size,
        "flush_timeout": FLUSH_TIMEOUT,
    }
    for name, choices in (
        ("send_queue_messages", (4096, 1, 3)),
        ("send_queue_bytes", (8 << 20, 1, 65536)),
        ("send_queue_handles", (1024, 1, 8)),
        ("receive_queue_messages", (4096, 1, 3)),
        ("receive_queue_bytes", (8 << 20, 1, 65536)),
        ("receive_queue_handles", (506, 1, 8)),
    ):
        options[name] = draw(st.sampled_from(choices), label=name)
    buffer = draw(st.sampled_from((None, SMALL_BUFFER)), label="SO_SNDBUF")
    return Config(framing, max_size, buffer, options)


@attrs.frozen
class Expected:
    """A message the model expects to arrive."""

    payload: bytes
    type: MessageType
    tags: tuple[int, ...]
    wire: int


class Flow:
    """The messages from one end to the other: accepted, arrived, and the end.

    ``limit`` is how many can ever arrive once the sender is gone (None:
    every accepted one); ``end`` the exceptions the receiver may get once
    they did (None: nothing ends the flow yet, a receive must wait).
    """

    def __init__(self) -> None:
        self.accepted: list[Expected] = []
        self.wire_prefix = [0]  # wire bytes of the first n accepted messages
        self.received = 0
        self.limit: int | None = None
        self.end: frozenset[Failure] | None = None
        self.end_seen = False  # the receiver got the end: it is now exact
        self.lossy = False  # a truncated read may lose the last messages

    def accept(self, expected: Expected) -> None:
        self.accepted.append(expected)
        self.wire_prefix.append(self.wire_prefix[-1] + expected.wire)

    def remaining(self) -> int:
        limit = len(self.accepted) if self.limit is None else self.limit
        return limit - self.received

    def set_end(self, end: Iterable[Failure], limit: int | None) -> None:
        if not self.end_seen:
            self.end = frozenset(end)
            if limit is not None:
                assert limit <= len(self.accepted), (limit, len(self.accepted))
                self.limit = limit


def _end_after_close(partial: bool, unread: bool, eof_first: bool) -> set[Failure]:
    """What the receiver gets once a closed sender's messages arrived.

    An end inside a message is a ``DisconnectedError``; so is the reset the
    kernel reports when the sender closed with the receiver's data unread,
    unless the receiver already read a half-close before it (a race).
    """
    if partial or (unread and not eof_first):
        return {DisconnectedError}
    if unread:
        return {trio.EndOfChannel, DisconnectedError}
    return {trio.EndOfChannel}


@attrs.define
class Outgoing:
    """One message of a burst: what is sent, and what must arrive."""

    message: Message
    handles: list[Handle]
    expected: Expected
    too_big: bool


@attrs.define
class PendingSend:
    """A burst of sends started by one rule, one after the other.

    ``sent`` counts the sends that returned; the burst stops at the first
    that raises.  ``may_succeed`` and ``failures`` are what the model
    allowed when it started.
    """

    op: Op[None]
    burst: list[Outgoing]
    step: int  # the step that started it
    may_succeed: bool
    failures: set[Failure]
    sent: int = 0
    accepted: int = 0  # of those sent, how many the model has accepted

    def current(self) -> Outgoing:
        return self.burst[self.sent]


@attrs.define
class End:
    """A channel end under test and its operations in flight."""

    name: str
    channel: Channel
    holder: Op[None]  # the task inside ``async with open_channel(...)``
    leave: trio.Event
    closed: bool = False
    closed_by: str = ""  # "leave", "aclose" or "abort"
    eof: bool = False  # send_eof was called (even if cancelled)
    malformed_seen: bool = False
    disconnect_seen: bool = False  # an operation on it raised DisconnectedError
    owes_disconnect: bool = False  # it took a message after its peer was gone
    close_failure: Failure | None = None  # what closing it raised
    send: PendingSend | None = None
    receive: Op[Message] | None = None
    eof_op: Op[None] | None = None
    cancelled: set[str] = attrs.Factory(set)  # which of its ops we cancelled


def _check_single(error: BaseException) -> None:
    assert not isinstance(error, BaseExceptionGroup), f"an ExceptionGroup: {error!r}"
    if isinstance(error, ChannelError):
        assert error.__cause__ is not None, f"{error!r} has no cause chained"


def _note_failure(end: End, error: BaseException) -> None:
    """Remember which failures the user of ``end`` was handed."""
    if isinstance(error, DisconnectedError):
        end.disconnect_seen = True
    if isinstance(error, MalformedMessageError):
        end.malformed_seen = True


def _check_queue_counts(end: End) -> None:
    """An empty queue holds no bytes and no fds: its counters add up."""
    stats = end.channel.statistics()
    if not stats.receive_queue_messages:
        held = (stats.receive_queue_bytes, stats.receive_queue_handles)
        assert held == (0, 0), f"{end.name}: empty receive queue holds {held}"
    if not stats.send_queue_messages:
        held = (stats.send_queue_bytes, stats.send_queue_handles)
        assert held == (0, 0), f"{end.name}: empty send queue holds {held}"


def _check_failure(what: str, error: BaseException, allowed: set[Failure]) -> None:
    _check_single(error)
    assert type(error) in allowed, (
        f"{what} raised {error!r}; the model allows {sorted(e.__name__ for e in allowed)}"
    )


class ChannelModel(RuleBasedStateMachine):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.fds_before = open_fds()
        self.driver = Driver()
        self.tags = Tags()
        self.ends: dict[str, End] = {}
        self.peer: ModelPeer | None = None
        self.peer_writer: Op[None] | None = None
        self.flow = {LEFT: Flow(), RIGHT: Flow()}  # by sender
        self.given: list[Handle] = []  # taken by a send: the channel closes them
        self.garbage = False
        self.ctrunc = False
        self.healthy = False  # the last rule ended without a failure
        self.config: Config | None = None
        self.serial = 0
        self.steps = 0
        self.point_checks: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------
    # Opening

    @initialize(config=configs(), raw=st.booleans())
    def open(self, config: Config, raw: bool) -> None:
        self.config = config
        left, right = channel_pair()
        try:
            if config.buffer is not None:
                for endpoint in (left, right):
                    _set_send_buffer(endpoint, config.buffer)
            self._step(lambda: self._open_end(LEFT, left))
            if raw:
                sock = socket.socket(fileno=right.detach())
                self.peer = ModelPeer(sock, config.framing, config.max_message_size)
                self._launch("raw writer", self.peer.write_loop, self._set_writer)
            else:
                self._step(lambda: self._open_end(RIGHT, right))
        finally:
            left.close()
            right.close()
        self._reap()

    async def _open_end(self, name: str, endpoint: Endpoint) -> None:
        assert self.config is not None
        options = self.config.options
        leave = trio.Event()
        box: list[Channel] = []
        ready = trio.Event()

        async def hold() -> None:
            try:
                async with open_channel(endpoint, **options) as channel:
                    box.append(channel)
                    ready.set()
                    await leave.wait()
            finally:
                ready.set()

        holder = self.driver.start(f"{name} block", hold)
        await ready.wait()
        assert box, f"open_channel failed: {holder!r}"
        self.ends[name] = End(name, box[0], holder, leave)

    def _set_writer(self, op: Op[None]) -> None:
        self.peer_writer = op

    # ------------------------------------------------------------------
    # Running steps

    def _step(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one step (no checks yet: the caller updates the model first)."""
        self.healthy = False
        self.steps += 1
        return self.driver.step(fn)

    def _launch(
        self,
        name: str,
        fn: Callable[[], Awaitable[T]],
        register: Callable[[Op[T]], None],
    ) -> Op[T]:
        """Start ``fn`` as an operation; ``register`` it before it is checked."""

        async def start() -> Op[T]:
            op = self.driver.start(name, fn)
            register(op)
            return op

        op = self._step(start)
        self._reap()
        return op

    def _live(self, kind: str) -> list[str]:
        """Open ends where an operation of ``kind`` may start now."""
        names = []
        for name, end in self.ends.items():
            busy = {
                "send": end.eof or end.send is not None,
                "receive": end.receive is not None,
                "eof": end.eof,
            }
            if not end.closed and not busy[kind]:
                names.append(name)
        return names

    def _point_check(self, rule: str) -> bool:
        """Rules that check one reply: a few per example are enough.

        Once every end is closed nothing else is left to do: then they may
        run on (hypothesis needs a rule to run).
        """
        everything_closed = all(end.closed for end in self.ends.values()) and (
            self.peer is None or self.peer.closed
        )
        return everything_closed or self.point_checks[rule] < POINT_CHECKS

    def _refusing(self) -> list[str]:
        """Ends that are closed, or called send_eof, with no send pending."""
        return [
            name
            for name, end in self.ends.items()
            if (end.closed or end.eof) and end.send is None
        ]

    def _peer_gone(self, name: str) -> bool:
        """The other end of ``name`` is closed."""
        other = _other(name)
        if other in self.ends:
            return self.ends[other].closed
        return self.peer is not None and self.peer.closed

    def _new_message(
        self, size: int, mtype: MessageType, nfds: int
    ) -> tuple[Expected, list[Handle]]:
        assert self.config is not None
        if len(open_fds()) + nfds > MAX_OPEN_FDS:
            nfds = 0
        handles, tags = self.tags.make(nfds)
        self.serial += 1
        payload = _payload(self.serial, size)
        wire = wire_size(self.config.framing, size, mtype)
        return Expected(payload, mtype, tags, wire), handles

    def _type(self, legacy: bool) -> MessageType:
        assert self.config is not None
        if legacy and self.config.framing is Framing.MOJO:
            return MessageType.NORMAL_LEGACY
        return MessageType.NORMAL

    # ------------------------------------------------------------------
    # Channel rules

    @precondition(lambda self: bool(self._live("send")))
    @rule(data=st.data(), burst=st.lists(MESSAGES, min_size=1, max_size=6))
    def send(self, data: st.DataObject, burst: list[tuple[int, int, bool]]) -> None:
        """Send one message, or several back to back (they may be batched)."""
        name = data.draw(st.sampled_from(self._live("send")), label="end")
        end = self.ends[name]
        self._send(
            end, [(size, nfds, self._type(legacy)) for size, nfds, legacy in burst]
        )

    def _send(self, end: End, burst: list[tuple[int, int, MessageType]]) -> None:
        assert self.config is not None
        outgoing = []
        for size, nfds, mtype in burst:
            expected, handles = self._new_message(size, mtype, nfds)
            too_big = expected.wire > self.config.max_message_size
            message = Message(expected.payload, handles, mtype)
            outgoing.append(Outgoing(message, handles, expected, too_big))
        pending = PendingSend(
            Op("unstarted"),
            outgoing,
            self.steps + 1,
            not self._send_must_fail(end),
            self._send_failures(end),
        )

        async def send_all() -> None:
            for item in outgoing:
                await end.channel.send(item.message)
                pending.sent += 1

        def register(op: Op[None]) -> None:
            pending.op = op
            end.send = pending

        self._launch(f"{end.name} send", send_all, register)

    @precondition(lambda self: bool(self._live("receive")))
    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._live("receive")), label="end")
        self._receive(self.ends[name])

    def _receive(self, end: End) -> None:
        def register(op: Op[Message]) -> None:
            end.receive = op

        self._launch(f"{end.name} receive", end.channel.receive, register)

    @precondition(lambda self: bool(self._live("eof")))
    @rule(data=st.data(), twice=st.booleans())
    def send_eof(self, data: st.DataObject, twice: bool) -> None:
        name = data.draw(st.sampled_from(self._live("eof")), label="end")
        end = self.ends[name]
        end.eof = True
        self.flow[name].set_end({trio.EndOfChannel}, None)
        self._send_eof(end)
        if twice and end.eof_op is None:
            self._send_eof(end)  # again: waits for the same end, if at all

    def _send_eof(self, end: End) -> None:
        def register(op: Op[None]) -> None:
            end.eof_op = op

        self._launch(f"{end.name} send_eof", end.channel.send_eof, register)

    @precondition(lambda self: self._point_check("refused") and bool(self._refusing()))
    @rule(data=st.data(), kind=st.sampled_from(("send", "receive", "send_eof")))
    def refused(self, data: st.DataObject, kind: str) -> None:
        """A closed end refuses everything; after send_eof, an end refuses sends."""
        name = data.draw(st.sampled_from(self._refusing()), label="end")
        self.point_checks["refused"] += 1
        end = self.ends[name]
        if kind == "send" or not end.closed:
            self._send(end, [(0, 1, MessageType.NORMAL)])
        elif kind == "receive":
            self._receive(end)
        else:
            self._send_eof(end)

    def _pending_ops(self) -> list[tuple[str, str]]:
        ops = []
        for name, end in self.ends.items():
            if end.send is not None:
                ops.append((name, "send"))
            if end.receive is not None:
                ops.append((name, "receive"))
            if end.eof_op is not None:
                ops.append((name, "eof"))
        return ops

    @precondition(lambda self: bool(self._pending_ops()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        name, kind = data.draw(st.sampled_from(self._pending_ops()), label="op")
        end = self.ends[name]
        op: Op[Any]
        if kind == "send":
            assert end.send is not None
            op = end.send.op
        elif kind == "receive":
            assert end.receive is not None
            op = end.receive
        else:
            assert end.eof_op is not None
            op = end.eof_op
        end.cancelled.add(kind)

        async def cancel() -> None:
            op.cancel()

        self._step(cancel)
        assert op.cancelled, (
            f"{op!r} was cancelled while it waited, yet ended otherwise"
        )
        self._reap()

    @precondition(lambda self: any(not e.closed for e in self.ends.values()))
    @rule(data=st.data(), how=st.sampled_from(("leave", "aclose", "abort")))
    def close(self, data: st.DataObject, how: str) -> None:
        names = [name for name, end in self.ends.items() if not end.closed]
        name = data.draw(st.sampled_from(names), label="end")
        self._close(self.ends[name], how)

    def _close(self, end: End, how: str) -> None:
        """Close ``end`` by ``aclose()``, leaving its block, or cancelling it."""
        queued = end.channel.statistics().send_queue_messages
        flow = self.flow[end.name]
        closing: list[Op[None]] = []

        async def close() -> None:
            if how == "aclose":
                closing.append(
                    self.driver.start(f"{end.name} aclose", end.channel.aclose)
                )
            elif how == "abort":
                end.holder.cancel()
            else:
                end.leave.set()

        self._step(close)
        op = closing[0] if closing else end.holder
        end.closed = True
        end.closed_by = how
        assert op.done, f"closing ({how}) still waits: {op!r}"
        stats = end.channel.statistics()
        if how == "abort":
            assert op.cancelled, f"abort: {op!r}"
            assert op.error is None, f"abort: {op!r}"
        else:
            allowed: set[Failure] = set()
            if queued:
                allowed.add(FlushTimeoutError)
            if self._peer_gone(end.name):
                allowed.add(DisconnectedError)
            if self.garbage:
                allowed.add(MalformedMessageError)
            if end.owes_disconnect and not end.disconnect_seen:
                # It took messages after its peer was gone: not a word yet.
                allowed.discard(FlushTimeoutError)
                assert op.error is not None, f"{end.name} {how} swallowed the failure"
            if op.error is not None:
                _check_failure(f"{end.name} {how}", op.error, allowed)
                end.close_failure = type(op.error)
                if isinstance(op.error, FlushTimeoutError):
                    assert stats.messages_sent < len(flow.accepted)
            elif not self._peer_gone(end.name) and not self.garbage:
                assert stats.messages_sent == len(flow.accepted), (
                    f"{end.name} closed without an error but sent "
                    f"{stats.messages_sent} of {len(flow.accepted)} messages"
                )
        self._sender_closed(end)
        self._reap()

    def _sender_closed(self, end: End) -> None:
        """``end`` is closed: what may still reach the other end, and how it ends."""
        stats = end.channel.statistics()
        flow = self.flow[end.name]
        other = self.ends.get(_other(end.name))
        if other is None:
            flow.limit = stats.messages_sent  # checked when the raw peer reads
            return
        partial = stats.bytes_sent != flow.wire_prefix[stats.messages_sent]
        unread = other.channel.statistics().bytes_sent > stats.bytes_received
        flow.set_end(_end_after_close(partial, unread, end.eof), stats.messages_sent)

    @precondition(lambda self: self._point_check("send_invalid"))
    @rule(data=st.data(), kind=st.sampled_from(INVALID))
    def send_invalid(self, data: st.DataObject, kind: str) -> None:
        assert self.config is not None
        name = data.draw(st.sampled_from(sorted(self.ends)), label="end")
        self.point_checks["send_invalid"] += 1
        end = self.ends[name]
        handles, _ = self.tags.make(1)
        extra: list[Handle] = []
        message: Any = b"not a message"
        expected: Failure = TypeError
        if kind == "closed handle":
            extra = self.tags.make(1)[0]
            extra[0].close()
            message, expected = Message(b"x", [*handles, *extra]), ValueError
        elif kind == "254 handles":
            extra = [Handle.dup(handles[0]) for _ in range(253)]
            message, expected = Message(b"x", [*handles, *extra]), ValueError
        elif kind == "same handle twice":
            message, expected = Message(b"x", [handles[0], handles[0]]), ValueError
        elif kind == "reserved type":
            message = Message(b"x", handles, MessageType.UPGRADE_OFFER)
            expected = ValueError
        elif kind == "legacy on ipcz" and self.config.framing is Framing.IPCZ:
            # Refused before any wait, queued messages or not (a finding of
            # this model, fixed: test_model_findings.py).
            message = Message(b"x", handles, MessageType.NORMAL_LEGACY)
            expected = ValueError
        # Which comes first when the message is invalid and the channel
        # refuses any message anyway is not specified: either is fine.
        refusal = self._send_failures(end)
        failing: list[Op[None]] = []
        try:
            self._launch(
                f"{name} send", lambda: end.channel.send(message), failing.append
            )
            op = failing[0]
            assert op.done, f"invalid send ({kind}): {op!r}"
            assert op.error is not None, f"invalid send ({kind}): {op!r}"
            _check_failure(f"invalid send ({kind})", op.error, {expected} | refusal)
            _note_failure(end, op.error)
            if type(op.error) is expected:
                for handle in handles:
                    assert not handle.closed, (
                        f"invalid send ({kind}) closed the caller's handle"
                    )
        finally:
            close_all(handles)
            close_all(extra)

    # ------------------------------------------------------------------
    # Raw peer rules

    def _peer_can_send(self) -> bool:
        peer = self.peer
        return (
            peer is not None
            and not peer.closed
            and not peer.eof_queued
            and not self.garbage
            and peer.write_error is None
        )

    @precondition(lambda self: self._peer_can_send())
    @rule(
        size=st.sampled_from(SIZES),
        nfds=st.sampled_from(FD_COUNTS),
        legacy=st.booleans(),
    )
    def raw_send(self, size: int, nfds: int, legacy: bool) -> None:
        assert self.peer is not None
        assert self.config is not None
        mtype = self._type(legacy)
        size = min(size, self.config.max_message_size - 16)
        expected, handles = self._new_message(size, mtype, nfds)
        peer = self.peer
        self.flow[RIGHT].accept(expected)
        self._step(
            _in_trio(lambda: peer.send_message(expected.payload, mtype, handles))
        )
        self._reap()

    @precondition(lambda self: self._peer_can_send())
    @rule()
    def raw_send_eof(self) -> None:
        assert self.peer is not None
        self.flow[RIGHT].set_end({trio.EndOfChannel}, None)
        self._step(_in_trio(self.peer.send_eof))
        self._reap()

    @precondition(lambda self: self._peer_can_send())
    @rule(kind=st.sampled_from(GARBAGE), tail=st.binary(max_size=64))
    def raw_garbage(self, kind: str, tail: bytes) -> None:
        assert self.peer is not None
        assert self.config is not None
        if kind == "unknown type" and self.config.framing is Framing.IPCZ:
            kind = "too small"
        peer = self.peer
        left = self.ends[LEFT].channel.statistics()
        everything_read = not peer.outbox and left.bytes_received == peer.bytes_written
        fds: list[Handle] = []
        if kind == "200 fds":
            fds = self.tags.make(200)[0]
            self.ctrunc = True
            # A read that hits the truncated fds fails before its bytes are
            # decoded: the messages whose bytes it also holds are lost.
            self.flow[RIGHT].lossy = not everything_read
        self.garbage = True
        self.flow[RIGHT].set_end({MalformedMessageError}, None)
        self._step(_in_trio(lambda: peer.send_garbage(kind, tail, fds)))
        self._reap()

    @precondition(
        lambda self: (
            self.peer is not None
            and not self.peer.closed
            and self.peer.read_end is None
        )
    )
    @rule(limit=st.sampled_from((EVERYTHING, 1, 100, 65536)))
    def raw_receive(self, limit: int) -> None:
        assert self.peer is not None
        peer = self.peer
        got: list[Message] = []
        errors: list[BaseException] = []

        async def read() -> None:
            budget = limit
            while budget > 0 and not errors:
                before = peer.bytes_read
                messages, error = peer.read(budget)
                got.extend(messages)
                if error is not None:
                    errors.append(error)
                budget -= peer.bytes_read - before
                if peer.read_end is not None or peer.bytes_read == before:
                    return
                await self.driver.settle()

        self._step(read)
        flow = self.flow[LEFT]
        try:
            self._reap()  # first: a send that ended in this step was accepted
            for message in got:
                self._check_delivered(flow, message, "the raw peer")
        finally:
            for message in got:
                message.close()
        if errors:
            assert type(errors[0]) is DisconnectedError, f"the raw peer: {errors[0]!r}"
        if peer.read_end is not None:
            self._check_raw_end()
        left = self.ends[LEFT]
        if limit == EVERYTHING and not (left.closed or left.eof or self.garbage):
            # The raw peer read everything: nothing may be stuck in the channel.
            assert flow.remaining() == 0, f"{flow.remaining()} message(s) never came"
            assert left.send is None, "a send still waits although the peer reads"

    def _check_raw_end(self) -> None:
        """The raw peer read the end of the stream: was it due, the right one?"""
        assert self.peer is not None
        peer, end = self.peer, self.ends[LEFT]
        flow = self.flow[LEFT]
        stats = end.channel.statistics()
        assert end.closed or end.eof or self.garbage, f"unexpected {peer.read_end}"
        assert flow.received == stats.messages_sent, (
            f"the raw peer got {flow.received} messages, the channel sent "
            f"{stats.messages_sent}"
        )
        if not end.closed and not self.garbage:
            assert flow.received == len(flow.accepted), "send_eof lost messages"
        partial = stats.bytes_sent != flow.wire_prefix[stats.messages_sent]
        clean = "disconnected" if partial else "eof"
        reset = end.closed and peer.bytes_written > stats.bytes_received
        allowed = {"reset"} if reset else {clean}
        if reset and self.ctrunc:
            allowed.add(clean)  # bytes_received misses the truncated read's bytes
        assert peer.read_end in allowed, f"the raw peer read {peer.read_end}: {allowed}"

    @precondition(
        lambda self: (
            self.peer is not None
            and not self.peer.closed
            and not (self.garbage and self.peer.outbox)
        )
    )
    @rule(cut=st.sampled_from((0, 1, 7, 20)))
    def raw_close(self, cut: int) -> None:
        assert self.peer is not None
        assert self.peer_writer is not None
        peer, writer = self.peer, self.peer_writer
        dies_inside_a_message = cut and self._peer_can_send()

        async def close() -> None:
            if dies_inside_a_message:
                peer.send_partial(_payload(0, 100), cut)
            await self.driver.settle()
            writer.cancel()
            await self.driver.settle()
            peer.close()

        self._step(close)
        stats = self.ends[LEFT].channel.statistics()
        if not self.garbage:
            unread = stats.bytes_sent > peer.bytes_read
            self.flow[RIGHT].set_end(
                _end_after_close(not peer.boundary, unread, peer.eof_queued),
                peer.messages_written,
            )
        self._reap()

    # ------------------------------------------------------------------
    # Checking what ended

    def _reap(self) -> None:
        """Check every operation that ended, then every one still waiting."""
        if self.peer is not None and self.peer.write_error is not None:
            assert self.ends[LEFT].closed or self.garbage, (
                f"the raw peer's write failed: {self.peer.write_error!r}"
            )
            flow = self.flow[RIGHT]
            if flow.limit is None:
                flow.limit = self.peer.messages_written
        for end in self.ends.values():
            if end.eof_op is not None and end.eof_op.done:
                eof_op, end.eof_op = end.eof_op, None
                self._eof_ended(end, eof_op)
        for end in self.ends.values():
            if end.send is not None:
                self._send_progress(end, end.send)
                if end.send.op.done:
                    pending, end.send = end.send, None
                    self._send_ended(end, pending)
        for end in self.ends.values():
            if end.receive is not None and end.receive.done:
                receive_op, end.receive = end.receive, None
                self._receive_ended(end, receive_op)
        for end in self.ends.values():
            self._check_waiting(end)
            if not end.closed:
                _check_queue_counts(end)

    @invariant()
    def step_passed(self) -> None:
        """Reached only when a rule passed: teardown may check liveness."""
        self.healthy = True

    def _send_failures(self, end: End) -> set[Failure]:
        """What a send on ``end`` may raise now (besides ValueError)."""
        if end.closed:
            return {trio.ClosedResourceError}
        failures: set[Failure] = set()
        if end.eof:
            failures.add(trio.ClosedResourceError)
        if self._peer_gone(end.name):
            failures.add(DisconnectedError)
        if self.garbage:
            failures.add(MalformedMessageError)
        return failures

    def _send_must_fail(self, end: End) -> bool:
        """A send now must fail.

        A send after the peer is gone may still return: it queues the
        message when a write is already waiting for the writer task, which
        then fails; the next operation or the close reports that.
        """
        return end.closed or end.eof or end.malformed_seen

    def _send_progress(self, end: End, pending: PendingSend) -> None:
        """Accept the messages of a burst whose send returned since the last step."""
        fresh = pending.step == self.steps  # started by this very step
        for item in pending.burst[pending.accepted : pending.sent]:
            assert not item.too_big, f"{end.name} send took a message that is too big"
            assert fresh or not end.closed, f"{end.name} send returned on a closed end"
            assert pending.may_succeed or not fresh, (
                f"{end.name} send returned; the model expected "
                f"{sorted(e.__name__ for e in pending.failures)}"
            )
            self.given.extend(item.handles)
            self.flow[end.name].accept(item.expected)
            if fresh and self._peer_gone(end.name):
                end.owes_disconnect = True
        pending.accepted = pending.sent

    def _send_ended(self, end: End, pending: PendingSend) -> None:
        op = pending.op
        fresh = pending.step == self.steps
        if pending.sent == len(pending.burst):
            assert not op.cancelled, f"{op!r} sent everything, then was cancelled"
            assert op.error is None, f"{op!r} sent everything, then raised"
            return
        item, unsent = pending.burst[pending.sent], pending.burst[pending.sent + 1 :]
        for later in unsent:  # never handed to send(): still ours
            close_all(later.handles)
        if op.cancelled:
            assert "send" in end.cancelled, f"{op!r} cancelled by nobody"
            end.cancelled.discard("send")
            assert not any(h.closed for h in item.handles), "a cancelled send took fds"
            close_all(item.handles)
            return
        assert op.error is not None, f"{op!r} stopped without an error"
        allowed: set[Failure]
        if item.too_big:
            allowed = {ValueError}
        else:
            allowed = pending.failures if fresh else self._send_failures(end)
        _check_failure(f"{end.name} send", op.error, allowed)
        _note_failure(end, op.error)
        if isinstance(op.error, ValueError):
            assert not any(h.closed for h in item.handles), "ValueError took fds"
            close_all(item.handles)
        else:
            assert all(h.closed for h in item.handles), "a failed send kept fds"

    def _eof_ended(self, end: End, op: Op[None]) -> None:
        if op.cancelled:
            assert "eof" in end.cancelled, f"{op!r} cancelled by nobody"
            end.cancelled.discard("eof")
        elif op.error is not None:
            allowed = self._send_failures(end)
            if not end.closed:
                allowed.discard(trio.ClosedResourceError)
            if end.close_failure is not None:
                # Closing gave up on the queue send_eof was waiting for.
                allowed.add(end.close_failure)
            _check_failure(f"{end.name} send_eof", op.error, allowed)
            _note_failure(end, op.error)

    def _receive_ended(self, end: End, op: Op[Message]) -> None:
        flow = self.flow[_other(end.name)]
        if op.cancelled:
            assert "receive" in end.cancelled, f"{op!r} cancelled by nobody"
            end.cancelled.discard("receive")
            return
        if op.error is None:
            message = op.value
            assert message is not None
            try:
                assert not end.closed, "a closed channel delivered a message"
                self._check_delivered(flow, message, end.name)
            finally:
                message.close()
            return
        error = op.error
        if end.closed:
            _check_failure(f"{end.name} receive", error, {trio.ClosedResourceError})
            return
        _note_failure(end, error)
        if isinstance(error, MalformedMessageError) and flow.lossy:
            flow.limit = flow.received
        assert flow.remaining() == 0, (
            f"{end.name} receive raised {error!r} with {flow.remaining()} message(s) due"
        )
        _check_failure(f"{end.name} receive", error, set(flow.end or ()))
        flow.end = frozenset({type(error)})  # from now on it raises that again
        flow.end_seen = True

    def _check_delivered(self, flow: Flow, message: Message, where: str) -> None:
        assert flow.remaining() > 0, f"{where} received a message nobody sent"
        expected = flow.accepted[flow.received]
        flow.received += 1
        assert message.type is expected.type, (where, message.type, expected.type)
        assert message.payload == expected.payload, (
            f"{where}, message #{flow.received}: {len(message.payload)} bytes "
            f"differ from the {len(expected.payload)} sent"
        )
        tags = tuple(read_tag(handle) for handle in message.handles)
        assert tags == expected.tags, (
            f"{where}, message #{flow.received}: fds {tags}, sent {expected.tags}"
        )

    def _check_waiting(self, end: End) -> None:
        """An operation may still wait only when the model says it must."""
        assert self.config is not None
        stats = end.channel.statistics()
        options = self.config.options
        flow = self.flow[_other(end.name)]
        if end.receive is not None:
            assert not end.closed, "a receive on a closed channel still waits"
            due = f"{flow.remaining()} message(s) due and end {flow.end}"
            assert flow.remaining() == 0, f"{end.name} receive still waits, {due}"
            assert flow.end is None, f"{end.name} receive still waits, {due}"
            assert stats.receive_queue_messages == 0, "a receive waits, messages queued"
        if end.send is not None:
            assert not end.closed, "a send on a closed channel still waits"
            assert not end.malformed_seen, "a send still waits after garbage arrived"
            waiting = end.send.current()
            wire, nfds = waiting.expected.wire, len(waiting.handles)
            assert stats.send_queue_messages > 0, f"{end.name} send waits, empty queue"
            assert (
                stats.send_queue_messages >= options["send_queue_messages"]
                or stats.send_queue_bytes + wire > options["send_queue_bytes"]
                or stats.send_queue_handles + nfds > options["send_queue_handles"]
            ), f"{end.name} send waits although the send queue has room: {stats}"
        if end.eof_op is not None:
            assert not end.closed, "send_eof on a closed channel still waits"
            assert stats.send_queue_messages > 0, "send_eof waits with nothing queued"

    # ------------------------------------------------------------------
    # The end of an example

    def teardown(self) -> None:
        healthy = self.healthy
        try:
            if healthy:
                self._drain()
                for end in self.ends.values():
                    if not end.closed:
                        self._close(end, "leave")
                if self.peer is not None and not self.peer.closed:
                    self.raw_close(0)
                self._leave_blocks()
                left_over = self._step(self._running)
                assert not left_over, f"tasks left: {left_over}"
        finally:
            self._tear_down()
        if healthy:
            leaked = [h for h in self.given if not h.closed]
            assert not leaked, f"{len(leaked)} fd(s) taken by send() never closed"
            leaked_fds = open_fds() - self.fds_before
            assert not leaked_fds, f"the example left fds open: {sorted(leaked_fds)}"

    def _leave_blocks(self) -> None:
        """Leave the blocks of ends closed by ``aclose()``: nothing more is raised."""

        async def leave() -> None:
            for end in self.ends.values():
                end.leave.set()

        self._step(leave)
        for end in self.ends.values():
            holder = end.holder
            if end.closed_by != "aclose":
                continue  # checked when it was left or cancelled
            assert holder.done, f"{end.name}: leaving a closed channel's block waits"
            assert holder.error is None, (
                f"{end.name}: leaving the block after aclose() raised {holder.error!r}"
            )

    async def _running(self) -> list[str]:
        return self.driver.running()

    def _drain(self) -> None:
        """Liveness: a reader that keeps reading gets everything that is due."""
        for name, end in self.ends.items():
            flow = self.flow[_other(name)]
            while not (end.closed or end.malformed_seen or end.receive is not None):
                if flow.end_seen or (flow.remaining() == 0 and flow.end is None):
                    break
                self._receive(end)  # each returns a message, or the end
            other = self.ends.get(_other(name))
            if other is not None and not (end.closed or other.closed):
                assert other.send is None, "a send still waits after the peer drained"
        if (
            self.peer is not None
            and not self.peer.closed
            and self.peer.read_end is None
        ):
            self.raw_receive(EVERYTHING)

    def _tear_down(self) -> None:
        """Whatever happened: end every task, close every fd, stop the run."""

        async def abort() -> None:
            for end in self.ends.values():
                end.holder.cancel()
            if self.peer_writer is not None:
                self.peer_writer.cancel()
            await self.driver.settle()
            if self.peer is not None and not self.peer.closed:
                self.peer.close()

        try:
            self.driver.step(abort)
        finally:
            self.driver.stop()
            for end in self.ends.values():
                if end.send is not None:
                    for item in end.send.burst:
                        close_all(item.handles)
                if end.receive is not None and end.receive.value is not None:
                    end.receive.value.close()


def _run_model(examples: int) -> None:
    run_state_machine_as_test(
        ChannelModel,
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_the_channel_behaves_like_its_model() -> None:
    _run_model(DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_the_channel_behaves_like_its_model_long_run() -> None:
    _run_model(SLOW_EXAMPLES)
