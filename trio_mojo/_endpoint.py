"""Endpoint: one end of a connected AF_UNIX stream socket, not yet in use.

An endpoint is what Chromium calls a ``PlatformChannelEndpoint``: an owned
socket fd that can be handed to :func:`open_channel` (which consumes it) or
passed to a child process.  :func:`channel_pair` makes two connected ones.
"""

from __future__ import annotations

import os
import socket
import stat
from types import TracebackType
from typing import Self

from ._handles import Handle

__all__ = ["Endpoint", "channel_pair"]


class Endpoint:
    """An owned, connected ``AF_UNIX`` ``SOCK_STREAM`` socket.

    Create one with :func:`channel_pair` or :meth:`from_fd`.  Consume it with
    :func:`open_channel`; an endpoint can be consumed once.  Closing an
    unconsumed endpoint closes the socket (the peer sees end of stream).
    """

    __slots__ = ("_handle",)

    def __init__(self, handle: Handle) -> None:
        self._handle = handle

    @classmethod
    def from_fd(cls, fd: int) -> Endpoint:
        """Adopt ``fd``, which must be a connected AF_UNIX stream socket.

        On success the endpoint owns ``fd`` and has made it non-blocking and
        close-on-exec.  On failure ``fd`` is left open and still the
        caller's.

        Raises:
            ValueError: ``fd`` is not a connected AF_UNIX SOCK_STREAM socket.
            OSError: ``fd`` is not open.
        """
        if type(fd) is not int or fd < 0:
            raise ValueError(f"an fd must be a non-negative int, not {fd!r}")
        mode = os.fstat(fd).st_mode
        if not stat.S_ISSOCK(mode):
            raise ValueError(f"fd {fd} is not a socket")
        probe = socket.socket(fileno=fd)
        try:
            if probe.family != socket.AF_UNIX:
                raise ValueError(f"fd {fd} is not an AF_UNIX socket ({probe.family!r})")
            if probe.type != socket.SOCK_STREAM:
                raise ValueError(
                    f"fd {fd} is not a SOCK_STREAM socket ({probe.type!r})"
                )
            try:
                probe.getpeername()
            except OSError as exc:
                raise ValueError(f"fd {fd} is not a connected socket ({exc})") from None
            probe.setblocking(False)
            os.set_inheritable(fd, False)
        finally:
            probe.detach()
        return cls(Handle(fd))

    @property
    def closed(self) -> bool:
        """True once the endpoint was closed, detached or consumed."""
        return self._handle.closed

    def fileno(self) -> int:
        """The socket's fd (still owned by the endpoint).

        Raises:
            ValueError: the endpoint was closed, detached or consumed.
        """
        return self._handle.fileno()

    def detach(self) -> int:
        """Give up ownership and return the fd without closing it.

        Raises:
            ValueError: the endpoint was closed, detached or consumed.
        """
        return self._handle.detach()

    def close(self) -> None:
        """Close the socket.  Idempotent."""
        self._handle.close()

    def _consume(self) -> socket.socket:
        """Turn the endpoint into the socket object a channel runs on."""
        try:
            fd = self._handle.detach()
        except ValueError:
            raise ValueError(
                "this Endpoint was already consumed, detached or closed"
            ) from None
        return socket.socket(fileno=fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<trio_mojo.Endpoint closed>"
        return f"<trio_mojo.Endpoint fd={self._handle.fileno()}>"


def channel_pair() -> tuple[Endpoint, Endpoint]:
    """Return two connected endpoints (``socketpair(AF_UNIX, SOCK_STREAM)``).

    Both are non-blocking and close-on-exec; pass one to a child with
    ``pass_fds`` (which makes the child's copy inheritable) and keep the
    other.

    Raises:
        OSError: the socket pair could not be made (``EMFILE``: no fd left).
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    return Endpoint(Handle(a.detach())), Endpoint(Handle(b.detach()))
