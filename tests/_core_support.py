"""Shared data and helpers for the tests of the pure sans-I/O core.

* ``EXAMPLES``: the worked byte-level examples A-I of ``mojo_spec.md``
  section 2.9, exactly as the spec prints them.
* :class:`FdFactory`: real file descriptors (dups of one pipe end) wrapped in
  :class:`Handle`, all closed again on exit.
* :func:`drain`: pull every available event out of a decoder.

This module must not import trio: the core it serves does no I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from trio_mojo import Framing, Handle, Message, MessageDecoder, MessageType
from trio_mojo._core._decoder import DecoderEvent


@dataclass(frozen=True)
class WireExample:
    """One worked example: the bytes on the wire and what they mean."""

    name: str
    wire: bytes
    payload: bytes
    type: MessageType
    num_handles: int = 0
    framing: Framing = Framing.MOJO
    timestamp_us: int | None = None
    encodable: bool = True  # False: our encoder never writes this header


EXAMPLES = (
    WireExample(
        "A-normal-empty",
        bytes.fromhex("10 00 00 00 10 00 01 00 00 00 00 00 00 00 00 00"),
        b"",
        MessageType.NORMAL,
    ),
    WireExample(
        "B-normal-hello",
        bytes.fromhex("15 00 00 00 10 00 01 00 00 00 00 00 00 00 00 00 68 65 6c 6c 6f"),
        b"hello",
        MessageType.NORMAL,
    ),
    WireExample(
        "C-normal-two-fds",
        bytes.fromhex(
            "18 00 00 00 10 00 01 00 02 00 00 00 00 00 00 00 01 02 03 04 05 06 07 08"
        ),
        bytes(range(1, 9)),
        MessageType.NORMAL,
        num_handles=2,
    ),
    WireExample(
        "D-legacy-hello",
        bytes.fromhex("0d 00 00 00 00 00 00 00 68 65 6c 6c 6f"),
        b"hello",
        MessageType.NORMAL_LEGACY,
    ),
    WireExample(
        "D-legacy-hello-one-fd",
        bytes.fromhex("0d 00 00 00 01 00 00 00 68 65 6c 6c 6f"),
        b"hello",
        MessageType.NORMAL_LEGACY,
        num_handles=1,
    ),
    WireExample(
        "E-upgrade-reject",
        bytes.fromhex("10 00 00 00 10 00 04 00 00 00 00 00 00 00 00 00"),
        b"",
        MessageType.UPGRADE_REJECT,
    ),
    WireExample(
        "F-upgrade-offer",
        bytes.fromhex(
            "18 00 00 00 10 00 02 00 02 00 00 00 00 00 00 00 01 00 00 00 04 00 00 00"
        ),
        bytes.fromhex("01 00 00 00 04 00 00 00"),
        MessageType.UPGRADE_OFFER,
        num_handles=2,
    ),
    WireExample(
        "G-ipcz-hello",
        bytes.fromhex("10 00 00 00 15 00 00 00 89 67 45 23 01 00 00 00 68 65 6c 6c 6f"),
        b"hello",
        MessageType.NORMAL,
        framing=Framing.IPCZ,
        timestamp_us=0x0000000123456789,
    ),
    WireExample(
        "H-ipcz-v1-hi",
        bytes.fromhex("08 00 00 00 0a 00 00 00 68 69"),
        b"hi",
        MessageType.NORMAL,
        framing=Framing.IPCZ,
        encodable=False,  # an old (v1) sender's 8-byte header; we write 16
    ),
    WireExample(
        "I-node-channel-accept-invitee",
        bytes.fromhex("40 00 00 00 10 00 01 00 00 00 00 00 00 00 00 00")
        + bytes(8)
        + bytes(range(40)),
        bytes(8) + bytes(range(40)),
        MessageType.NORMAL,
    ),
)
EXAMPLE_IDS = [example.name for example in EXAMPLES]
MOJO_EXAMPLES = tuple(e for e in EXAMPLES if e.framing is Framing.MOJO)


class FdFactory:
    """Hands out real fds (dups of a pipe's read end) wrapped in Handles.

    Every handle it made, and the pipe, is closed on :meth:`close` (closing
    is idempotent, so handles that a decoder or encoder closed are fine).
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        self.made: list[Handle] = []

    def make(self, count: int) -> list[Handle]:
        handles = [Handle.dup(self._read_fd) for _ in range(count)]
        self.made.extend(handles)
        return handles

    def identity(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` shared by every handle this factory made."""
        return file_identity(self._read_fd)

    def close(self) -> None:
        for handle in self.made:
            handle.close()
        os.close(self._read_fd)
        os.close(self._write_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def file_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def drain(decoder: MessageDecoder) -> tuple[list[Message], DecoderEvent]:
    """Return every message the decoder yields now, and the marker it stopped on."""
    messages: list[Message] = []
    while True:
        event = decoder.next_message()
        if not isinstance(event, Message):
            return messages, event
        messages.append(event)
