"""A worker's stderr and stdout as the parent takes them: a tail, and live lines.

Theory of operation
-------------------

What a worker writes is hostile text (its target is), so the parent holds
a fixed amount of it at most, and never passes on a control character of
it:

* **The tail**, always: the last :data:`STDERR_TAIL_BYTES` of the worker's
  stderr, for :class:`WorkerError` and ``Worker.stderr_tail``.
* **Forwarding**, with ``open_worker(..., forward_output=True)``: each line
  the worker writes to its stderr (stdout) is written to this process's
  :data:`sys.stderr` (:data:`sys.stdout`) as soon as its newline arrives,
  as ``[worker PID] text``.  ``PID`` is the worker's host pid,
  ``Worker.pid``; until the parent has found it (the handshake), the pid
  of the process it started, which is the one writing until its sandbox
  is up.  A line longer than :data:`MAX_LINE_BYTES` is written at once, cut
  there and marked, and the rest of it is dropped up to its newline: a
  worker that writes a gigabyte without a newline makes the parent hold
  :data:`MAX_LINE_BYTES` of it, per stream.  A last line without a
  newline (a worker that died mid-line) is written when the stream ends.

Both decode leniently (a byte that is not UTF-8 becomes U+FFFD) and escape
every control character but newline and tab (:func:`escape_controls`).  The line splitting is pure
(:class:`LineSplitter`); one task per pipe reads it until it ends
(:class:`ChildOutput`).  The streams of this process are looked up at each
write, so ``contextlib.redirect_stderr`` and test capture see the lines;
the write blocks the loop as a ``print`` would.
"""

from __future__ import annotations

import collections
import logging
import sys
import unicodedata
from collections.abc import Callable
from typing import Final, Protocol, TextIO

import trio

__all__ = [
    "MAX_LINE_BYTES",
    "STDERR_TAIL_BYTES",
    "ChildOutput",
    "LineSplitter",
    "Tail",
    "escape_controls",
    "format_line",
]

STDERR_TAIL_BYTES: Final = 8192
"""How much of a worker's stderr the parent keeps (the end of it)."""
MAX_LINE_BYTES: Final = 4096
"""The longest forwarded line; a longer one is cut there."""
_SETTLE_TIME: Final = 1.0
"""Seconds to wait for the rest of a dead worker's output."""
_log = logging.getLogger("trio_mojo")

_SHOWN_AS_IS: Final = frozenset("\n\t")
_INVISIBLE: Final = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
"""Unicode categories escaped in a worker's stderr: controls (C0, C1, DEL),
formatting characters (bidi overrides and isolates, zero-width ones),
surrogates, private-use and unassigned code points, line and paragraph
separators."""


def escape_controls(text: str, *, keep: frozenset[str] = _SHOWN_AS_IS) -> str:
    """``text`` with every control character but those in ``keep`` escaped.

    A worker's stderr is hostile: written verbatim into a log or a terminal,
    an ``ESC`` sequence could rewrite the screen, a ``\\r`` overwrite the
    line, a bidi override reorder what is shown.  Such characters become
    ``\\x1b``, ``\\r``, ``\\u202e`` (their ``repr`` escape).  ``keep`` is
    newline and tab by default; pass an empty set for text that must stay
    on one line.
    """
    return "".join(
        repr(char)[1:-1]
        if char not in keep and unicodedata.category(char) in _INVISIBLE
        else char
        for char in text
    )


class Tail:
    """The last :data:`STDERR_TAIL_BYTES` of a stream."""

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0

    def add(self, data: bytes | bytearray) -> None:
        """Keep ``data``, dropping what falls out of the tail."""
        self._chunks.append(bytes(data))
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= STDERR_TAIL_BYTES:
            self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        """The tail, decoded leniently, control characters escaped."""
        raw = b"".join(self._chunks)[-STDERR_TAIL_BYTES:]
        return escape_controls(raw.decode(errors="replace"))


class LineSplitter:
    """Bytes in, complete lines out, each at most ``max_line`` bytes.

    :meth:`feed` and :meth:`end` return ``(line, cut)`` pairs: a line
    without its newline, and whether it was cut (it was longer; what
    followed, up to its newline, is dropped).  It holds at most
    ``max_line`` bytes between calls.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._max_line = max_line
        self._partial = bytearray()
        self._dropping = False
        """The current line was cut: drop up to its newline."""

    def feed(self, data: bytes | bytearray) -> list[tuple[bytes, bool]]:
        """The lines that ``data`` completes (or cuts)."""
        lines: list[tuple[bytes, bool]] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if not self._dropping:
                room = self._max_line - len(self._partial)
                self._partial += data[start : min(end, start + room)]
                if end - start > room:
                    lines.append((bytes(self._partial), True))
                    self._partial.clear()
                    self._dropping = True
                elif newline >= 0:
                    lines.append((bytes(self._partial), False))
                    self._partial.clear()
            if newline < 0:
                break
            self._dropping = False
            start = newline + 1
        return lines

    def end(self) -> list[tuple[bytes, bool]]:
        """The stream ended: its last line, if it had no newline."""
        partial = bytes(self._partial)
        self._partial.clear()
        self._dropping = False
        return [(partial, False)] if partial else []


def format_line(pid: int, line: bytes, cut: bool) -> str:
    """A forwarded line: ``[worker PID] text``, escaped, with a newline."""
    text = escape_controls(line.decode(errors="replace"))  # (no newline in it)
    mark = f" [line cut at {MAX_LINE_BYTES} bytes]" if cut else ""
    return f"[worker {pid}] {text}{mark}\n"


class _Pipe(Protocol):
    """What :class:`ChildOutput` uses of a child: its pid and its pipes."""

    @property
    def pid(self) -> int: ...

    stdout: trio.lowlevel.FdStream | None
    stderr: trio.lowlevel.FdStream | None


class ChildOutput:
    """The parent's side of a child's stderr and, forwarded, its stdout.

    :meth:`start` reads the child's stderr into the tail (:meth:`text`)
    and, with ``forward``, writes its lines (and those of its stdout, if
    that is a pipe) to this process's.  ``pid`` is the pid in the prefix of
    forwarded lines.
    """

    def __init__(self, *, forward: bool = False) -> None:
        self.forward: Final = forward
        self.pid = 0
        self._tail = Tail()
        self._ended: list[trio.Event] = []
        self._write_failed = False

    def start(self, nursery: trio.Nursery, child: _Pipe) -> None:
        """Start a task per pipe of ``child`` in ``nursery``."""
        self.pid = child.pid
        assert child.stderr is not None
        self._start(nursery, child.stderr, self._tail, lambda: sys.stderr)
        if self.forward and child.stdout is not None:
            self._start(nursery, child.stdout, None, lambda: sys.stdout)

    def text(self) -> str:
        """The tail of the child's stderr (see :meth:`Tail.text`)."""
        return self._tail.text()

    async def settle(self) -> None:
        """Wait until the pipes ended, so the tail is complete (bounded).

        A child that exited has closed its end, but the tasks may not have
        read the last bytes yet (a traceback written just before the
        exit).  The wait is bounded because a grandchild can hold a pipe
        open.
        """
        with trio.move_on_after(_SETTLE_TIME):
            for ended in self._ended:
                await ended.wait()

    def _start(
        self,
        nursery: trio.Nursery,
        stream: trio.lowlevel.FdStream,
        tail: Tail | None,
        target: Callable[[], TextIO | None],
    ) -> None:
        ended = trio.Event()
        self._ended.append(ended)
        nursery.start_soon(self._drain, stream, tail, target, ended)

    async def _drain(
        self,
        stream: trio.lowlevel.FdStream,
        tail: Tail | None,
        target: Callable[[], TextIO | None],
        ended: trio.Event,
    ) -> None:
        lines = LineSplitter() if self.forward else None
        try:
            async for chunk in stream:
                if tail is not None:
                    tail.add(chunk)
                if lines is not None:
                    self._write(target, lines.feed(chunk))
            if lines is not None:
                self._write(target, lines.end())
        finally:
            ended.set()

    def _write(
        self, target: Callable[[], TextIO | None], lines: list[tuple[bytes, bool]]
    ) -> None:
        stream = target()
        if not lines or stream is None or self._write_failed:
            return
        try:
            stream.write("".join(format_line(self.pid, *line) for line in lines))
            stream.flush()
        except (OSError, ValueError) as exc:  # closed, or a broken pipe
            self._write_failed = True
            _log.warning(
                "stopped forwarding the output of worker pid %d: %r", self.pid, exc
            )
