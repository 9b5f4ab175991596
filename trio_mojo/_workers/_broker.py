"""The file broker: the parent opens files for a worker that may not.

Theory of operation
-------------------

Chromium's renderers cannot open files; a broker in a more privileged
process opens what policy allows and passes the fd back.  We do the same
over a **second channel** dedicated to the broker (a separate socket pair,
passed as ``--trio-mojo-broker-handle=N``), so the worker's main channel
carries only the application's messages, untouched by any envelope, and a
worker that breaks the broker protocol cannot disturb it.  The second
channel exists only when the parent grants some :class:`FileAccess`.

The protocol is one request, one reply, in order; payloads are bytes (no
pickle).  Request (worker -> parent)::

    b"OPEN" | mode: u8 | path: bytes (os.fsencode, at most 4096 bytes)

with mode ``0 = "r"``, ``1 = "w"`` (create/truncate), ``2 = "a"``
(create/append), ``3 = "r+"``.  Reply (parent -> worker)::

    b"OK" with exactly one handle attached: the opened file
    b"ER" | errno: u32 little-endian | message: UTF-8     (no handle)

The parent treats every request as hostile:

* the path must be absolute and lie under the root of some rule; the part
  below the root is resolved with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` from a directory fd of the
  root, so ``..``, symlinks and absolute escapes are refused by the kernel;
  where ``openat2`` is missing we walk the components ourselves with
  ``O_NOFOLLOW`` at every step and refuse ``..``;
* writing needs a read-write rule; only regular files are served (a FIFO
  or device is refused, opened with ``O_NONBLOCK`` so the attempt cannot
  hang); every open has ``O_CLOEXEC | O_NOCTTY``;
* the open runs in a worker thread, so a slow file system never blocks the
  Trio loop, and requests are served one at a time (a natural rate limit);
* a request that breaks the protocol gets an ``EINVAL`` reply; a channel
  failure ends the broker for that worker but never the parent.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from typing import Final

import attrs
import trio

from trio_mojo._channel import Channel
from trio_mojo._core._message import Message
from trio_mojo._errors import BrokerError
from trio_mojo._handles import Handle
from trio_mojo._sandbox import _syscalls

__all__ = [
    "BROKER_SWITCH",
    "BrokerClient",
    "FileAccess",
    "FileBroker",
    "current_broker",
]

BROKER_SWITCH: Final = "--trio-mojo-broker-handle"
MAX_PATH_BYTES: Final = 4096
MAX_REQUEST_SIZE: Final = 64 + MAX_PATH_BYTES
_OPEN: Final = b"OPEN"
_OK: Final = b"OK"
_ERROR: Final = b"ER"
_ERROR_HEADER: Final = struct.Struct("<2sI")
_MAX_REASON_BYTES: Final = 512
_MODES: Final = ("r", "w", "a", "r+")
_MODE_FLAGS: Final = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "r+": os.O_RDWR,
}
_ALWAYS: Final = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_NO_SYMLINKS: Final = 0x04
_RESOLVE_BENEATH: Final = 0x08


def _absolute(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise ValueError(f"a FileAccess root must be an absolute path, not {text!r}")
    return os.path.normpath(text)


def _existing_root(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute (see :func:`_absolute`), which must exist."""
    root = _absolute(path)
    try:
        os.stat(root)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "a FileAccess root must exist, and this one does not", root
        ) from None
    except OSError as exc:
        raise type(exc)(
            exc.errno, f"a FileAccess root must be reachable ({exc.strerror})", root
        ) from None
    return root


@attrs.frozen
class FileAccess:
    """One rule of what a worker may open through the broker.

    ``root`` is an absolute path that exists: a directory (everything
    beneath it) or a single file.  ``writable`` allows the write modes
    (``"w"``, ``"a"``, ``"r+"``).  Symlinks are never followed below the
    root; the root itself is resolved once, when the rule is made.

    Raises:
        ValueError: ``root`` is not an absolute path.
        FileNotFoundError: ``root`` does not exist (an :exc:`OSError`, with
            the errno of the failed ``stat``, when it cannot be reached).
    """

    root: str = attrs.field(converter=_existing_root)
    writable: bool = False

    @classmethod
    def read_only(cls, root: str | os.PathLike[str]) -> FileAccess:
        """Allow reading ``root`` (a file, or a directory and all beneath it).

        Raises:
            ValueError: ``root`` is not an absolute path.
            FileNotFoundError: ``root`` does not exist.
        """
        return cls(os.path.realpath(_absolute(root)), writable=False)

    @classmethod
    def read_write(cls, root: str | os.PathLike[str]) -> FileAccess:
        """Allow reading and writing (creating, truncating) under ``root``.

        Raises:
            ValueError: ``root`` is not an absolute path.
            FileNotFoundError: ``root`` does not exist.
        """
        return cls(os.path.realpath(_absolute(root)), writable=True)


def encode_request(path: str | os.PathLike[str], mode: str) -> bytes:
    """The payload of an open request (used by :class:`BrokerClient`)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
    raw = os.fsencode(path)
    if len(raw) > MAX_PATH_BYTES or b"\0" in raw or not raw:
        raise ValueError(f"bad path for the broker: {raw[:80]!r}")
    return _OPEN + bytes((_MODES.index(mode),)) + raw


def _decode_request(payload: bytes) -> tuple[bytes, str]:
    if len(payload) < 6 or not payload.startswith(_OPEN):
        raise BrokerError(errno.EINVAL, "not an OPEN request")
    mode_index = payload[4]
    if mode_index >= len(_MODES):
        raise BrokerError(errno.EINVAL, f"unknown mode {mode_index}")
    path = payload[5:]
    if len(path) > MAX_PATH_BYTES or b"\0" in path:
        raise BrokerError(errno.EINVAL, "bad path")
    return path, _MODES[mode_index]


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_state: dict[str, bool] = {}  # "works": learnt on first use


def _openat2(dirfd: int, relative: bytes, flags: int) -> int | None:
    """``openat2`` confined beneath ``dirfd``; ``None`` if the kernel lacks it."""
    if _openat2_state.get("works") is False:
        return None
    try:
        number = _syscalls.number("openat2")
    except OSError:
        return None  # no table for this architecture: the O_NOFOLLOW walk
    mode = 0o600 if flags & os.O_CREAT else 0  # a mode without O_CREAT is EINVAL
    how = _OpenHow(
        flags, mode, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
    )
    ctypes.set_errno(0)
    fd: int = _libc.syscall(
        number, dirfd, relative, ctypes.byref(how), ctypes.sizeof(how)
    )
    if fd >= 0:
        _openat2_state["works"] = True
        return fd
    err = ctypes.get_errno()
    if err == errno.ENOSYS and "works" not in _openat2_state:
        _openat2_state["works"] = False
        return None
    raise OSError(err, os.strerror(err))


def _walk_nofollow(dirfd: int, relative: bytes, flags: int) -> int:
    """Fallback: open each component with ``O_NOFOLLOW``, refusing ``..``."""
    parts = [part for part in relative.split(b"/") if part not in (b"", b".")]
    if b".." in parts:
        raise OSError(errno.EXDEV, "'..' is not allowed")
    if not parts:
        parts = [
            b"."
        ]  # the root itself ("root/."): opened, then refused as a directory
    current = os.dup(dirfd)
    try:
        for part in parts[:-1]:
            following = os.open(
                part,
                os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=current,
            )
            os.close(current)
            current = following
        return os.open(parts[-1], flags | os.O_NOFOLLOW, 0o600, dir_fd=current)
    finally:
        os.close(current)


def _open_beneath(root: str, relative: bytes, flags: int) -> int:
    if not relative:
        # The rule names this very file: open it, refusing a symlink.
        return os.open(root, flags | os.O_NOFOLLOW, 0o600)
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _openat2(dirfd, relative, flags)
        return fd if fd is not None else _walk_nofollow(dirfd, relative, flags)
    finally:
        os.close(dirfd)


class FileBroker:
    """Serves a worker's open requests according to a list of rules."""

    def __init__(self, rules: Iterable[FileAccess]) -> None:
        self.rules: Final = tuple(rules)
        for rule in self.rules:
            if not isinstance(rule, FileAccess):
                raise TypeError(f"file_access takes FileAccess rules, not {rule!r}")
        self.served = 0
        self.refused = 0
        self.error: Exception | None = None
        """Why the broker stopped early (the worker broke its protocol), if it did."""

    def _match(self, path: bytes, mode: str) -> tuple[str, bytes]:
        if not path.startswith(b"/"):
            raise BrokerError(errno.EACCES, "the broker only serves absolute paths")
        wants_write = mode != "r"
        refused_for_write = False
        for rule in self.rules:
            root = os.fsencode(rule.root)
            if path == root:
                relative = b""
            elif path.startswith(root.rstrip(b"/") + b"/"):
                relative = path[len(root.rstrip(b"/")) + 1 :]
            else:
                continue
            if wants_write and not rule.writable:
                refused_for_write = True
                continue
            return rule.root, relative
        if refused_for_write:
            raise BrokerError(errno.EACCES, f"mode {mode!r} needs a read-write rule")
        raise BrokerError(errno.EACCES, "outside every FileAccess rule")

    def open(self, path: bytes, mode: str) -> int:
        """Open ``path`` for ``mode`` if a rule allows it; blocking.

        Returns a new close-on-exec fd of a regular file.

        Raises:
            BrokerError: refused, or the open failed.
        """
        if b"\0" in path:
            # The kernel would stop at the NUL: another path than the one
            # the rules were checked against.
            raise BrokerError(errno.EINVAL, "a path cannot contain a NUL byte")
        root, relative = self._match(path, mode)
        try:
            fd = _open_beneath(root, relative, _MODE_FLAGS[mode] | _ALWAYS)
        except OSError as exc:
            code = exc.errno or errno.EACCES
            if code in (errno.ELOOP, errno.EXDEV):
                raise BrokerError(
                    code, "the path escapes its rule (symlink or '..')"
                ) from None
            raise BrokerError(code, os.strerror(code)) from None
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if regular:
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        if not regular:
            os.close(fd)
            raise BrokerError(errno.EACCES, "not a regular file")
        return fd

    async def serve(self, channel: Channel) -> None:
        """Answer requests on ``channel`` until the worker closes it.

        Each file is opened in a worker thread, so the event loop never
        blocks on the file system.  Cancelled, it stops: an open already
        running in its thread finishes first, and the fd it opened is
        closed, not sent.
        """
        async for request in channel:
            request.close()  # a request carries no handles (the channel rejects them)
            try:
                path, mode = _decode_request(request.payload)
                fd = await trio.to_thread.run_sync(self.open, path, mode)
            except BrokerError as exc:
                self.refused += 1
                code = exc.errno or errno.EACCES
                # The reason only: the worker knows the path it asked for, and
                # quoting a hostile path (escaped by repr, up to 4 times its
                # size) could exceed the broker channel's message size limit.
                reason = str(exc.strerror or "refused").encode(errors="replace")
                reply = _ERROR_HEADER.pack(_ERROR, code) + reason[:_MAX_REASON_BYTES]
                await channel.send(Message(reply))
                continue
            handle = Handle(fd)
            try:
                await channel.send(Message(_OK, (handle,)))
            except BaseException:
                # Cancelled before the channel took the fd (send is
                # cancel-atomic); otherwise the channel closed it already.
                handle.close()
                raise
            self.served += 1


class BrokerClient:
    """The worker's side: ask the parent to open a file.

    Get it with :func:`current_broker` inside a worker started with
    ``file_access=...``.  Requests are serialised: one in flight at a time.
    Cancelling :meth:`open` is safe: the reply that still comes for it is
    discarded (its fd closed) before the next request.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._lock = trio.Lock()
        self._unanswered = 0
        """Replies still owed to requests whose caller was cancelled."""

    async def open(self, path: str | os.PathLike[str], mode: str = "r") -> Handle:
        """Return a :class:`Handle` for ``path``, opened by the parent.

        ``mode`` is ``"r"``, ``"w"``, ``"a"`` or ``"r+"``.  Wrap the handle's
        fd with ``os.fdopen(handle.detach(), ...)`` or read it directly.

        Raises:
            BrokerError: the parent refused or the open failed (``errno``,
                message and ``filename`` set).
            ValueError: a bad mode or path.
            ChannelError: the broker channel failed.
        """
        request = encode_request(path, mode)
        async with self._lock:
            # A request cancelled while waiting for its reply still gets one:
            # discard it (closing its fd), or every later caller would get
            # the reply meant for the request before it.
            while self._unanswered:
                (await self._channel.receive()).close()
                self._unanswered -= 1
            await self._channel.send(Message(request))  # cancel-atomic
            self._unanswered += 1
            reply = await self._channel.receive()
            self._unanswered -= 1
        if reply.payload == _OK and len(reply.handles) == 1:
            return reply.handles[0]
        reply.close()
        if (
            reply.payload.startswith(_ERROR)
            and len(reply.payload) >= _ERROR_HEADER.size
        ):
            _, code = _ERROR_HEADER.unpack_from(reply.payload)
            text = reply.payload[_ERROR_HEADER.size :].decode(errors="replace")
            raise BrokerError(code, text, os.fspath(path))
        raise BrokerError(
            errno.EPROTO, "malformed reply from the broker", os.fspath(path)
        )


_current: contextvars.ContextVar[BrokerClient] = contextvars.ContextVar(
    "trio_mojo_broker"
)


def current_broker() -> BrokerClient:
    """The file broker of this worker process.

    Raises:
        RuntimeError: not in a worker, or the parent granted no file access.
    """
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(
            "no file broker: call this in a worker started with open_worker(..., file_access=[...])"
        ) from None


def set_current_broker(client: BrokerClient) -> None:
    """Install the broker client for this task and the tasks it starts."""
    _current.set(client)


def sequence_of_rules(
    value: Sequence[FileAccess] | FileAccess,
) -> tuple[FileAccess, ...]:
    """Accept a single rule or a sequence of them."""
    return (value,) if isinstance(value, FileAccess) else tuple(value)
