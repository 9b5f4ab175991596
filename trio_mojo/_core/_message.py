"""Message: one framed unit of the channel, its payload and its handles."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Self

import attrs

from trio_mojo._handles import Handle, close_all

from ._wire import MessageType

__all__ = ["Message"]


def _to_handle_tuple(handles: Iterable[Handle]) -> tuple[Handle, ...]:
    if type(handles) is tuple:
        return handles
    return tuple(handles)


@attrs.frozen(slots=True, eq=False)
class Message:
    """One message: a bytes payload and the file descriptors that travel with it.

    ``payload`` is the application's bytes (the header is not part of it),
    ``handles`` the attached fds, each owned by a :class:`Handle`, and
    ``type`` the Mojo message type (``NORMAL`` unless the peer speaks the
    legacy header).

    Sending a message transfers its handles to the channel, which closes them
    once the kernel has taken its own reference.  A received message's
    handles belong to whoever received it: close them (``with message:``
    does) or :meth:`~Handle.detach` them.

    Equality is identity: two messages that carry fds are never "equal".
    """

    payload: bytes = b""
    handles: tuple[Handle, ...] = attrs.field(default=(), converter=_to_handle_tuple)
    type: MessageType = MessageType.NORMAL

    def close(self) -> None:
        """Close every attached handle."""
        close_all(self.handles)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
