"""Message (``_message.py``): a frozen payload + handles + type."""

from __future__ import annotations

import os
from collections.abc import Iterator

import attrs
import pytest
from _core_support import FdFactory
from _fds import fd_is_open

from trio_mojo import Message, MessageType
from trio_mojo._core._message import received_message


@pytest.fixture
def fds() -> Iterator[FdFactory]:
    with FdFactory() as factory:
        yield factory


def test_defaults() -> None:
    message = Message()
    assert message.payload == b""
    assert message.handles == ()
    assert message.type is MessageType.NORMAL


def test_handles_become_a_tuple(fds: FdFactory) -> None:
    handles = fds.make(2)
    assert Message(b"x", handles).handles == tuple(handles)
    assert Message(b"x", iter(handles)).handles == tuple(handles)
    as_tuple = tuple(handles)
    assert Message(b"x", as_tuple).handles is as_tuple  # no copy


def test_message_is_frozen() -> None:
    message = Message(b"x")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        message.payload = b"y"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        message.extra = 1  # type: ignore[attr-defined]


def test_equality_is_identity() -> None:
    first = Message(b"same")
    assert first == first
    assert first != Message(b"same")


def test_close_closes_every_handle(fds: FdFactory) -> None:
    handles = fds.make(3)
    numbers = [h.fileno() for h in handles]
    message = Message(b"x", handles, MessageType.NORMAL_LEGACY)
    message.close()
    message.close()  # idempotent, like Handle.close
    assert all(h.closed for h in handles)
    assert not any(fd_is_open(n) for n in numbers)


def test_context_manager_closes_every_handle(fds: FdFactory) -> None:
    handles = fds.make(2)
    message = Message(b"x", handles)
    with pytest.raises(KeyError):
        _fail_inside(message)
    assert all(h.closed for h in handles)


def _fail_inside(message: Message) -> None:
    with message as entered:
        assert entered is message
        raise KeyError("boom")


def test_close_continues_past_a_failing_handle(fds: FdFactory) -> None:
    first, broken, last = fds.make(3)
    os.close(broken.fileno())  # closed behind its back: close() hits EBADF
    with pytest.raises(OSError, match="Bad file descriptor"):
        Message(b"x", [first, broken, last]).close()
    assert first.closed
    assert broken.closed
    assert last.closed


def test_repr_names_the_fields(fds: FdFactory) -> None:
    (handle,) = fds.make(1)
    text = repr(Message(b"hi", [handle], MessageType.UPGRADE_OFFER))
    assert "payload=b'hi'" in text
    assert f"<trio_mojo.Handle fd={handle.fileno()}>" in text
    assert "UPGRADE_OFFER" in text


# ----------------------------------------------------------------------
# Validation at construction (a bad field fails here, not at send time)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ("text", r"not str \(encode text first\)"),
        (42, "not int"),
        (None, "not NoneType"),
        ([1, 2], "not list"),
    ],
)
def test_payload_must_be_bytes_like(payload: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        Message(payload)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_bytearray_and_memoryview_payloads_are_snapshots(
    kind: type[bytearray | memoryview],
) -> None:
    buffer = bytearray(b"before")
    message = Message(kind(buffer))
    buffer[:] = b"AFTER!"
    assert type(message.payload) is bytes
    assert message.payload == b"before"


def test_a_bytes_subclass_is_stored_as_plain_bytes() -> None:
    class Tagged(bytes):
        pass

    message = Message(Tagged(b"tagged"))
    assert type(message.payload) is bytes
    assert message.payload == b"tagged"


def test_bytes_payload_is_not_copied() -> None:
    payload = b"x" * 100
    assert Message(payload).payload is payload


@pytest.mark.parametrize("bad", [3, "fd", None, b"x"])
def test_handles_must_be_handle_objects(bad: object) -> None:
    with pytest.raises(TypeError, match="must be Handle objects"):
        Message(b"x", [bad])  # type: ignore[list-item]


def test_handles_must_be_an_iterable_of_handles(fds: FdFactory) -> None:
    (handle,) = fds.make(1)
    with pytest.raises(TypeError, match="iterable of Handle, not Handle"):
        Message(b"x", handle)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable of Handle, not int"):
        Message(b"x", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable of Handle, not bytes"):
        Message(b"x", b"\x03")  # type: ignore[arg-type]
    assert not handle.closed  # a refused message takes nothing


@pytest.mark.parametrize("bad", [1, "NORMAL", None])
def test_type_must_be_a_message_type(bad: object) -> None:
    with pytest.raises(TypeError, match="must be a MessageType"):
        Message(b"x", (), bad)  # type: ignore[arg-type]


def test_received_message_is_the_same_frozen_class(fds: FdFactory) -> None:
    handles = tuple(fds.make(2))
    message = received_message(b"in", handles, MessageType.NORMAL_LEGACY)
    assert type(message) is Message
    assert message.payload == b"in"
    assert message.handles is handles
    assert message.type is MessageType.NORMAL_LEGACY
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        message.payload = b"y"  # type: ignore[misc]
    assert repr(message) == repr(Message(b"in", handles, MessageType.NORMAL_LEGACY))
