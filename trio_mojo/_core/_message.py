"""Message: one framed unit of the channel, its payload and its handles.

Theory of operation
-------------------

A :class:`Message` is validated once, when it is built, so that everything
downstream (the channel's ``send``, the encoder) can trust its fields: the
payload is ``bytes``, the handles a tuple of :class:`Handle`, the type a
:class:`MessageType`.  A ``bytearray`` or ``memoryview`` payload is accepted
and copied into ``bytes`` at construction (a snapshot: changing the buffer
afterwards changes nothing that is sent); anything else is a ``TypeError``
there and then, not a failure at send time.

Received messages come from the decoder, whose fields are already right by
construction; :func:`received_message` builds them without the checks (a
few C calls instead of a Python ``__init__``), because the receive path
builds one per message and that cost is on every message's path.  Both
ways produce the same frozen attrs class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Self

import attrs

from trio_mojo._handles import Handle, close_all

from ._wire import MessageType

__all__ = ["Message", "received_message"]

_NORMAL: Final = MessageType.NORMAL
_SNAPSHOT_TYPES: Final = (bytearray, memoryview)


@attrs.frozen(slots=True, eq=False, init=False)
class Message:
    """One message: a bytes payload and the file descriptors that travel with it.

    ``payload`` is the application's bytes (the header is not part of it),
    ``handles`` the attached fds, each owned by a :class:`Handle`, and
    ``type`` the Mojo message type (``NORMAL`` unless the peer speaks the
    legacy header).

    The fields are checked when the message is built.  ``payload`` may be
    ``bytes``, or a ``bytearray`` or ``memoryview``, which is copied into
    ``bytes`` at once (a snapshot); ``handles`` any iterable of
    :class:`Handle` (stored as a tuple).

    Sending a message transfers its fds to the channel: ``send`` moves them
    out of the message's handles (which read as closed from then on) into
    its send queue, and closes them once the kernel has taken its own
    reference.  A received message's
    handles belong to whoever received it: close them (``with message:``
    does) or :meth:`~Handle.detach` them.

    Equality is identity: two messages that carry fds are never "equal".

    Raises:
        TypeError: ``payload`` is not bytes-like (a ``str`` must be encoded
            first), a handle is not a :class:`Handle`, or ``type`` is not a
            :class:`MessageType`.
    """

    payload: bytes
    handles: tuple[Handle, ...]
    type: MessageType

    def __init__(
        self,
        payload: bytes | bytearray | memoryview = b"",
        handles: Iterable[Handle] = (),
        type: MessageType = _NORMAL,  # noqa: A002 - mirrors Mojo's field
    ) -> None:
        if payload.__class__ is not bytes:
            if isinstance(payload, bytes):
                payload = bytes(payload)  # a subclass: store the plain type
            elif isinstance(payload, _SNAPSHOT_TYPES):
                payload = bytes(payload)
            else:
                raise TypeError(
                    "Message payload must be bytes, bytearray or memoryview, not "
                    f"{payload.__class__.__name__}"
                    + (" (encode text first)" if isinstance(payload, str) else "")
                )
        if handles.__class__ is not tuple:
            if isinstance(handles, (str, bytes, Handle)) or not isinstance(
                handles, Iterable
            ):
                raise TypeError(
                    "Message handles must be an iterable of Handle, not "
                    f"{handles.__class__.__name__}"
                )
            handles = tuple(handles)
        for handle in handles:
            if handle.__class__ is not Handle and not isinstance(handle, Handle):
                raise TypeError(
                    "Message handles must be Handle objects (wrap an fd with "
                    f"trio_mojo.Handle(fd)), not {handle!r}"
                )
        if type.__class__ is not MessageType:
            raise TypeError(f"Message type must be a MessageType, not {type!r}")
        _set_payload(self, payload)
        _set_handles(self, handles)
        _set_type(self, type)

    def close(self) -> None:
        """Close every attached handle."""
        close_all(self.handles)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# The slots' own descriptors: setting through them bypasses the frozen
# ``__setattr__`` (this is what attrs' generated ``__init__`` does too).
_set_payload: Final = Message.__dict__["payload"].__set__
_set_handles: Final = Message.__dict__["handles"].__set__
_set_type: Final = Message.__dict__["type"].__set__
_new: Final = object.__new__


def received_message(
    payload: bytes,
    handles: tuple[Handle, ...],
    type: MessageType,  # noqa: A002
) -> Message:
    """A :class:`Message` from fields the decoder guarantees (no checks).

    The decoder inlines these same four calls in its hot loop.
    """
    message: Message = _new(Message)
    _set_payload(message, payload)
    _set_handles(message, handles)
    _set_type(message, type)
    return message
