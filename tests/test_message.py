"""Message (``_message.py``): a frozen payload + handles + type."""

from __future__ import annotations

import os
from collections.abc import Iterator

import attrs
import pytest
from _core_support import FdFactory
from _fds import fd_is_open

from trio_mojo import Message, MessageType


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
