"""Every ``sendmsg`` and ``recvmsg``: their flags, errors and fds.

Theory of operation
-------------------

This module makes the channel's ``sendmsg`` and ``recvmsg`` calls, except
on the request/response path: there the channel calls ``send`` (one
buffer, no fds) and ``recvmsg`` itself, to save a Python call per message,
with this module's :data:`SEND_FLAGS` and :data:`RECV_FLAGS`, and hands a
failure to :func:`failure` and any control data to
:func:`received_handles`, so the rules below hold for every call.

Both calls are non-blocking (``MSG_DONTWAIT``) whatever the socket's own
flag says, and return ``None`` for "would block" so the shell can wait for
readiness; an exception is reserved for real failures, translated into the
channel's error tree:

* ``EPIPE`` / ``ECONNRESET`` -> :class:`DisconnectedError` (peer vanished);
* ``EBADF`` / ``ENOTSOCK`` after a local close -> :class:`trio.ClosedResourceError`;
* anything else -> :class:`ChannelError` with the ``OSError`` chained.

``EINTR`` is retried by Python itself (PEP 475).  Every send passes
``MSG_NOSIGNAL``, so a vanished peer can never kill the process with
``SIGPIPE`` (Python ignores it, but an embedding program or a non-Python
child might not).

Receiving asks for ``MSG_CMSG_CLOEXEC`` so an fd from the peer is never
inherited by a process we spawn, even for the instant before we could set
the flag ourselves.  The control buffer has room for
:data:`~trio_mojo._core._wire.MAX_SENDMSG_HANDLES` fds, the most a conforming
peer sends per ``sendmsg``.  Every fd that arrives is wrapped in a
:class:`Handle` before anything else happens, so no later error can leak it;
if the kernel had to truncate the control data (``MSG_CTRUNC``: the peer
sent more fds than fit, or we hit ``RLIMIT_NOFILE``) the fds that did arrive
are closed and the read fails with :class:`MalformedMessageError`
(Chromium only asserts this in debug builds and would then lose fds).

With ``reopen=True`` every pipe and FIFO that arrives is reopened
(:meth:`Handle.reopen`) before the caller sees it, so that the peer's
copies share no open file description (and no ``O_NONBLOCK`` flag) with
ours.  It costs an ``lseek(fd, 0, SEEK_CUR)`` per received fd (a seekable
fd is no pipe), and an ``fstat``, an ``open`` and a ``close`` per pipe.  A
FIFO's write end that has lost its last reader cannot be reopened
(``ENXIO``): the read fails with :class:`MalformedMessageError`, every fd
closed.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import stat
from typing import Final

import trio

from ._core._wire import MAX_SENDMSG_HANDLES
from ._errors import ChannelError, DisconnectedError, MalformedMessageError
from ._handles import Handle, adopt_all, close_all

__all__ = [
    "FDS_IN_FLIGHT",
    "IN_FLIGHT_DELAYS",
    "MSG_CTRUNC",
    "RECV_CONTROL_SIZE",
    "RECV_FLAGS",
    "SEND_FLAGS",
    "failure",
    "receive",
    "received_handles",
    "reopen_pipes",
    "send",
]

RECV_CONTROL_SIZE: Final = socket.CMSG_SPACE(
    MAX_SENDMSG_HANDLES * array.array("i").itemsize
)
# Plain ints: ``flags & socket.MSG_CTRUNC`` with the IntFlag member runs
# enum's Python-level __rand__ and builds a new flag (~1 us per recvmsg).
SEND_FLAGS: Final = int(socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
"""The flags of every ``send`` and ``sendmsg``."""
RECV_FLAGS: Final = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
"""The flags of every ``recvmsg``."""
MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
"""``recvmsg``'s flag for truncated control data (the fds that did not fit)."""
_CLOSED_ERRNOS: Final = frozenset((errno.EBADF, errno.ENOTSOCK))
_DISCONNECT_ERRNOS: Final = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN))


def _translate(exc: OSError, action: str) -> Exception:
    if exc.errno in _DISCONNECT_ERRNOS:
        return DisconnectedError(f"peer disconnected during {action}: {exc}")
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError(f"the channel's socket was closed ({exc})")
    return ChannelError(f"{action} failed: {exc}")


FDS_IN_FLIGHT: Final = -1
"""What :func:`send` returns when the kernel refused its fds for now."""
IN_FLIGHT_DELAYS: Final = (0.001, 0.1)
"""First and longest wait before retrying fds the kernel refused with
``ETOOMANYREFS`` (the delay doubles from one to the other)."""


def send(
    sock: socket.socket, buffers: list[bytes | bytearray | memoryview], fds: list[int]
) -> int | None:
    """One non-blocking ``sendmsg``; returns bytes sent, or ``None`` to wait.

    ``fds`` (at most 128) travel as one ``SCM_RIGHTS`` message; the caller
    keeps owning them and must not send them without data bytes.

    Returns :data:`FDS_IN_FLIGHT` (nothing was sent) on ``ETOOMANYREFS``:
    the kernel counts the fds a user has in flight in unix sockets (sent,
    not yet received) and refuses more past the sender's
    ``RLIMIT_NOFILE``, unless it has ``CAP_SYS_RESOURCE``.  That is
    back-pressure, not a failure: the count falls as the receivers read,
    but no readiness event says when, so the caller retries after a delay.

    Raises:
        DisconnectedError, ChannelError, trio.ClosedResourceError: see above.
    """
    try:
        if fds:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            return sock.sendmsg(buffers, rights, SEND_FLAGS)
        return sock.sendmsg(buffers, (), SEND_FLAGS)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.ETOOMANYREFS:
            return FDS_IN_FLIGHT
        raise _translate(exc, "sendmsg") from exc


def reopen_pipes(handles: list[Handle]) -> None:
    """Give each pipe and FIFO of ``handles`` an open file description of its own.

    Other fds are left as they are, and so is an ``O_PATH`` FIFO (it does no
    I/O; reopening it would open the FIFO).

    Raises:
        OSError: a reopen failed; the handles are the caller's to close.
    """
    for handle in handles:
        fd = handle.fileno()
        try:
            # Seekable (a file, a memfd, /dev/null): no pipe.  A third of an
            # fstat's cost, the common case of the fd path; io.open asks the
            # same question.
            os.lseek(fd, 0, os.SEEK_CUR)
            continue
        except OSError:  # ESPIPE: a pipe, FIFO, socket or terminal
            pass
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            try:
                handle.reopen()
            except ValueError:  # O_PATH
                continue


def receive(
    sock: socket.socket,
    size: int,
    *,
    fail_on_truncation: bool = True,
    reopen: bool = False,
) -> tuple[bytes, list[Handle]] | None:
    """One non-blocking ``recvmsg`` of up to ``size`` bytes.

    Returns ``(data, handles)``; ``data == b""`` means end of stream.
    Returns ``None`` when nothing is available.  With ``reopen``, each pipe
    and FIFO received has been reopened (:func:`reopen_pipes`).

    Raises:
        MalformedMessageError: control data was truncated (unless
            ``fail_on_truncation`` is false) or was not ``SCM_RIGHTS``, or
            a FIFO could not be reopened for want of a reader; every fd
            that arrived has been closed.
        DisconnectedError, ChannelError, trio.ClosedResourceError: see above.
    """
    try:
        data, ancdata, flags, _ = sock.recvmsg(size, RECV_CONTROL_SIZE, RECV_FLAGS)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise failure(exc, "recvmsg") from exc
    if not ancdata and not flags & MSG_CTRUNC:
        return data, []
    return data, received_handles(
        ancdata, flags, fail_on_truncation=fail_on_truncation, reopen=reopen
    )


def failure(exc: BaseException, call: str) -> BaseException:
    """What a ``call`` (``"send"``, ``"recvmsg"``) that raised ``exc``
    raises: an ``OSError`` translated (see above, the ``OSError`` chained),
    anything else as it is.

    (For the channel, which calls ``send`` and ``recvmsg`` itself on the
    request/response path.)
    """
    if not isinstance(exc, OSError):
        return exc
    error = _translate(exc, call)
    error.__cause__ = exc
    return error


def received_handles(
    ancdata: list[tuple[int, int, bytes]],
    flags: int,
    *,
    fail_on_truncation: bool = True,
    reopen: bool = False,
) -> list[Handle]:
    """The fds of one ``recvmsg``'s control data and flags, each in a Handle.

    What :func:`receive` does with them (see there; it raises the same).
    """
    handles: list[Handle] = []
    foreign: list[tuple[int, int]] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            handles += adopt_all(fds)
        else:
            foreign.append((level, kind))
    if foreign:
        close_all(handles)
        raise MalformedMessageError(
            f"unexpected control message(s) (level, type): {foreign}"
        )
    if flags & MSG_CTRUNC and fail_on_truncation:
        close_all(handles)
        if not ancdata:
            raise MalformedMessageError(
                "control data truncated (MSG_CTRUNC): file descriptors were lost"
            )
        raise MalformedMessageError(
            f"control data truncated (MSG_CTRUNC): {len(handles)} file descriptor(s) "
            f"arrived, more were sent than the {MAX_SENDMSG_HANDLES} a sendmsg may carry "
            "or RLIMIT_NOFILE was reached"
        )
    if reopen:
        try:
            reopen_pipes(handles)
        except OSError as exc:
            close_all(handles)
            if exc.errno == errno.ENXIO:
                raise MalformedMessageError(
                    "the peer sent the write end of a FIFO that has no reader: it "
                    "cannot be reopened (ENXIO)"
                ) from exc
            raise ChannelError(f"reopening a received pipe failed: {exc}") from exc
    return handles
