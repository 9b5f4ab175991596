"""FuzzInput: typed values drawn from the fuzzer's bytes, front to back.

Every draw takes a fixed number of bytes, so an input can be written by
hand (``tests/fuzz/seeds.py`` does) with :class:`InputWriter`.  Past the
end of the input every draw reads zeros: any byte string is a valid input.
"""

from __future__ import annotations

import struct

__all__ = ["FuzzInput", "InputWriter"]

_U16 = struct.Struct("<H")


class FuzzInput:
    """Reads fixed-width values off the front of ``data``."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not yet drawn."""
        return len(self._data) - self._pos

    def u8(self) -> int:
        """One byte, 0..255."""
        return self._take(1)[0]

    def u16(self) -> int:
        """Two bytes, little-endian, 0..65535."""
        value: int = _U16.unpack(self._take(2))[0]
        return value

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes: fewer only at the end of the input."""
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        """Every byte not yet drawn."""
        return self.take(self.remaining)

    def _take(self, size: int) -> bytes:
        chunk = self.take(size)
        return chunk + bytes(size - len(chunk))


class InputWriter:
    """Builds an input that :class:`FuzzInput` reads back value by value."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> InputWriter:
        self._parts.append(bytes((value,)))
        return self

    def u16(self, value: int) -> InputWriter:
        self._parts.append(_U16.pack(value))
        return self

    def raw(self, data: bytes) -> InputWriter:
        self._parts.append(data)
        return self

    def build(self) -> bytes:
        return b"".join(self._parts)
