"""Handle: the owner of exactly one file descriptor.

Theory of operation
-------------------

Every fd that trio_mojo touches has exactly one owner at every moment.
Outside the channel that owner is a :class:`Handle`: a received fd is
wrapped the instant ``recvmsg`` returns, and a message handed to the user
transfers its handles with it.  Inside the send queue it is the queue
itself: ``send`` moves each fd out of the caller's handle
(:func:`take_all`, which leaves the handle reading as closed) and the
encoder keeps the bare number in the queued entry until the kernel holds
its own reference, then closes it (:func:`close_fds`), or gives it back
into the same handle (:func:`give_back`) if the ``send`` is cancelled.  A
number has no ``__del__``: whoever holds one closes it exactly once on
every path, which the channel's tests check.

Closing follows Trio's ``_FdHolder`` discipline: the stored number is
overwritten with -1 *before* ``os.close`` runs, so a handle can never close a
number that the kernel has meanwhile reused for another file, and a second
``close()`` is a no-op.  A handle that is garbage-collected while still open
closes its fd and emits :class:`ResourceWarning`, which the test suite turns
into an error: a leak is a bug, the safety net only keeps it from growing.

An fd passed by another process shares its *open file description* with
the sender's copy: the offset and the status flags (``O_NONBLOCK``,
``O_APPEND``) are one object in the kernel, which the sender can still
change.  :meth:`Handle.reopen` replaces a pipe's, FIFO's or regular file's
fd by a new description of the same file, opened through
``/proc/self/fd/N``, that belongs to this process alone.
"""

from __future__ import annotations

import fcntl
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Final, Protocol, Self

__all__ = [
    "Handle",
    "adopt_all",
    "close_all",
    "close_fds",
    "give_back",
    "take_all",
]

_KEPT_FLAGS: Final = os.O_ACCMODE | os.O_APPEND
"""Status flags a reopened description copies from the original.

``O_NONBLOCK`` is set for the open itself (a FIFO's open would otherwise
wait for its other end) and then put back as the original had it."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class Handle:
    """Owns one file descriptor and closes it exactly once.

    ``Handle(fd)`` takes ownership of ``fd``: from then on only the handle may
    close it.  Use :meth:`detach` to take the number back without closing it.
    A handle is a context manager that closes on exit.

    Raises:
        TypeError: ``fd`` is not an ``int``.
        ValueError: ``fd`` is negative.
    """

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, fd: int) -> None:
        self._fd = -1  # so that __del__ is quiet if the checks below raise
        if type(fd) is not int:
            if isinstance(fd, bool) or not isinstance(fd, int):
                raise TypeError(f"Handle needs an int fd, not {type(fd).__name__}")
            fd = int(fd)
        if fd < 0:
            raise ValueError(f"Handle needs a non-negative fd, got {fd}")
        self._fd = fd

    @classmethod
    def dup(cls, fd: int | _HasFileno) -> Handle:
        """Return a new handle owning a close-on-exec duplicate of ``fd``.

        ``fd`` may be an int or any object with ``fileno()`` (a file, a
        socket, another :class:`Handle`); the original stays open and stays
        the caller's.
        """
        number = fd if isinstance(fd, int) else fd.fileno()
        return cls(os.dup(number))  # os.dup returns a non-inheritable fd

    @classmethod
    def open(cls, path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> Handle:
        """Open ``path`` with ``os.open`` (close-on-exec added) and own the fd.

        Raises:
            OSError: the open failed.
        """
        return cls(os.open(path, flags | os.O_CLOEXEC))

    @property
    def closed(self) -> bool:
        """True once the handle was closed or detached."""
        return self._fd < 0

    def fileno(self) -> int:
        """Return the fd number (still owned by the handle).

        Raises:
            ValueError: the handle is closed or detached.
        """
        if self._fd < 0:
            raise ValueError("I/O operation on a closed Handle")
        return self._fd

    def reopen(self) -> None:
        """Own a new open file description of the same pipe, FIFO or file.

        The fd came from another process (a worker, a peer): its open file
        description, with its offset and its ``O_NONBLOCK`` and
        ``O_APPEND`` flags, is shared with every copy the sender kept, and
        the sender can change those flags under you (a pipe you read with
        ``trio.lowlevel.FdStream`` made blocking again freezes your
        event loop).  ``reopen`` opens ``/proc/self/fd/N`` with the same
        access mode, ``O_APPEND`` and ``O_NONBLOCK`` as the original
        (close-on-exec), closes the original and keeps the new fd, whose
        description nobody else holds.  A regular file's new offset is 0.
        ``open_worker`` does this for every pipe and FIFO a worker sends
        (``open_channel(..., reopen_pipes=True)``).

        Only pipes, FIFOs and regular files can be reopened.  A socket, an
        eventfd, a timerfd, a pidfd or any other anonymous inode has no
        path to open again, and a device's open would run its driver: each
        raises :exc:`ValueError`, as does an ``O_PATH`` fd, which does no
        I/O (and whose reopening would open a FIFO that nobody opened).

        Raises:
            ValueError: the handle is closed, or the fd is of another kind.
            OSError: the open failed (``ENXIO``: the write end of a pipe
                or FIFO that has no reader left; ``ENOENT``: no ``/proc``);
                the handle then keeps its original fd.
        """
        fd = self.fileno()
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        mode = os.fstat(fd).st_mode
        if flags & os.O_PATH:
            raise ValueError("an O_PATH fd does no I/O and is not reopened")
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
            raise ValueError(
                f"only a pipe, FIFO or regular file can be reopened, not {_kind(mode)}"
            )
        new = os.open(
            f"/proc/self/fd/{fd}",
            (flags & _KEPT_FLAGS) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
        )
        if not flags & os.O_NONBLOCK:
            os.set_blocking(new, True)
        self._fd = new
        os.close(fd)

    def detach(self) -> int:
        """Give up ownership and return the fd without closing it.

        Raises:
            ValueError: the handle is already closed or detached.
        """
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the fd.  Idempotent: closing a closed handle does nothing."""
        fd = self._fd
        if fd >= 0:
            self._fd = -1
            os.close(fd)

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
        if self._fd < 0:
            return "<trio_mojo.Handle closed>"
        return f"<trio_mojo.Handle fd={self._fd}>"

    def __del__(self) -> None:
        if self._fd >= 0:  # (runs for every handle: kept short)
            fd = self._fd
            self._fd = -1
            try:
                os.close(fd)
            finally:
                warnings.warn(
                    f"unclosed trio_mojo.Handle fd={fd} was closed by the garbage "
                    "collector",
                    ResourceWarning,
                    stacklevel=2,
                    source=self,
                )


def _kind(mode: int) -> str:
    """What an ``st_mode`` is, for an error message."""
    for test, name in (
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "an anonymous inode (eventfd, timerfd, pidfd, ...)"


def close_all(handles: Iterable[Handle]) -> None:
    """Close every handle, even if closing one of them raises.

    The first exception is re-raised after every handle has been closed.
    """
    fds: list[int] = []
    for handle in handles:
        # Handle.close(), inlined: the fd path closes one handle per fd.
        fd = handle._fd
        if fd >= 0:
            handle._fd = -1
            fds.append(fd)
    close_fds(fds)


_new: Final = object.__new__


def adopt_all(fds: Iterable[int]) -> list[Handle]:
    """Wrap fds the kernel has just handed us, each in a new :class:`Handle`.

    The receive path's way to build handles: the numbers come from
    ``SCM_RIGHTS``, so they are non-negative ints and the checks of
    ``Handle(fd)`` are skipped (its ``__init__`` costs a Python call per fd).
    """
    handles: list[Handle] = []
    append = handles.append
    for fd in fds:
        handle: Handle = _new(Handle)
        handle._fd = fd
        append(handle)
    return handles


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd number of ``fds`` (which the caller owns, bare).

    The first exception is re-raised after every fd has been closed; the
    caller must drop the numbers, which may be reused at once.
    """
    first: BaseException | None = None
    for fd in fds:
        try:
            os.close(fd)
        except BaseException as exc:
            if first is None:
                first = exc
    if first is not None:
        raise first


def take_all(handles: Sequence[Handle]) -> list[int]:
    """Move the fds out of ``handles``; return their numbers, in order.

    ``send`` takes a message's fds this way when it accepts the message:
    the caller's handles read as closed at once, so none of them can be
    sent (or closed) a second time while the first message still waits in
    the send queue, and the returned numbers, which nobody else holds, are
    the caller's to close (or to :func:`give_back`).

    Raises:
        ValueError: a handle is closed (or detached, or already taken), or
            appears twice; then no handle changed.
    """
    taken: list[int] = []
    append = taken.append
    for handle in handles:
        fd = handle._fd
        if fd < 0:
            repeated = any(seen is handle for seen in handles[: len(taken)])
            give_back(handles, taken)
            if repeated:
                raise ValueError("the same Handle appears twice in one message")
            raise ValueError(
                f"cannot send a closed handle ({handle!r}): it was closed, "
                "detached, or already given to send()"
            )
        handle._fd = -1
        append(fd)
    return taken


def give_back(handles: Sequence[Handle], fds: Sequence[int]) -> None:
    """Undo :func:`take_all`: put each fd of ``fds`` back into ``handles``.

    For a ``send`` cancelled after it took the fds: the caller owns them
    again, in the same :class:`Handle` objects.  (``fds`` may be shorter:
    :func:`take_all` gives back what it took before it met a bad handle.)
    """
    for handle, fd in zip(handles, fds, strict=False):
        handle._fd = fd
