"""The tables of the documentation say what the code does.

* docs/design.rst: the byte tables of the three headers and the
  ``MessageType`` values, against ``encode_header`` and the decoder;
* docs/howto/sandbox.rst: each policy's layers and limits, against
  ``SandboxPolicy``;
* docs/howto/limits.rst: the channel options' defaults, against
  ``open_channel``'s signature.
"""

from __future__ import annotations

import inspect
import re
import struct

import pytest
from _docs_support import DOCS, directives, simple_table

from trio_mojo import (
    END_OF_STREAM,
    Framing,
    Message,
    MessageDecoder,
    MessageType,
    SandboxPolicy,
    encode_header,
    open_channel,
)
from trio_mojo._core._wire import HEADER_SIZE, IPCZ_HEADER_SIZE, LEGACY_HEADER_SIZE
from trio_mojo._sandbox._policy import LAYERS

DESIGN = DOCS / "design.rst"
_CODES = {"u16": ("H", 2), "u32": ("I", 4), "i64": ("q", 8)}


class Layout:
    """A header as a table documents it: fields at offsets, little-endian."""

    def __init__(self, name: str) -> None:
        header, *rows = simple_table(DESIGN, name)
        assert header[:4] == ["offset", "size", "type", "field"]
        self.format = "<"
        self.fields: list[str] = []
        offset = 0
        for cells in rows:
            assert int(cells[0]) == offset, f"{name}: a gap or overlap at {cells}"
            size = int(cells[1])
            if cells[2] == "pad":
                self.format += f"{size}s"
            else:
                code, width = _CODES[cells[2]]
                assert width == size, f"{name}: {cells[2]} is not {size} bytes"
                self.format += code
            self.fields.append(cells[3])
            offset += size
        self.size = offset
        assert struct.calcsize(self.format) == self.size

    def unpack(self, data: bytes) -> dict[str, object]:
        return dict(zip(self.fields, struct.unpack(self.format, data), strict=True))

    def pack(self, **values: object) -> bytes:
        return struct.pack(self.format, *(values[field] for field in self.fields))


def _decode(data: bytes, framing: Framing = Framing.MOJO) -> tuple[bytes, MessageType]:
    decoder = MessageDecoder(framing=framing)
    decoder.receive_data(data)
    decoder.receive_eof()
    message = decoder.next_message()
    assert decoder.next_message() is END_OF_STREAM
    assert isinstance(message, Message)
    return message.payload, message.type


_DATA_TYPES = [t for t in MessageType if t is not MessageType.NORMAL_LEGACY]


@pytest.mark.parametrize("message_type", _DATA_TYPES)
def test_the_header_table_is_what_encode_header_writes(
    message_type: MessageType,
) -> None:
    layout = Layout("wire-header")
    assert layout.size == HEADER_SIZE == 16
    header = encode_header(5, num_handles=3, type=message_type)
    assert layout.unpack(header) == {
        "num_bytes": 21,
        "num_header_bytes": 16,
        "message_type": int(message_type),
        "num_handles": 3,
        "padding": bytes(6),
    }


def test_a_reader_skips_the_extra_header_the_table_describes() -> None:
    layout = Layout("wire-header")
    header = layout.pack(
        num_bytes=16 + 8 + 5,
        num_header_bytes=24,
        message_type=1,
        num_handles=0,
        padding=b"ignored",
    )
    assert _decode(header + b"extra..." + b"hello") == (b"hello", MessageType.NORMAL)


def test_the_legacy_header_table_is_what_encode_header_writes() -> None:
    layout = Layout("wire-legacy-header")
    assert layout.size == LEGACY_HEADER_SIZE == 8
    header = encode_header(5, num_handles=3, type=MessageType.NORMAL_LEGACY)
    assert layout.unpack(header) == {
        "num_bytes": 13,
        "num_handles": 3,
        "message_type": 0,
    }
    built = layout.pack(num_bytes=13, num_handles=0, message_type=0)
    assert _decode(built + b"hello") == (b"hello", MessageType.NORMAL_LEGACY)


def test_the_ipcz_header_table_is_what_encode_header_writes() -> None:
    layout = Layout("wire-ipcz-header")
    assert layout.size == IPCZ_HEADER_SIZE == 16
    header = encode_header(
        5, num_handles=3, framing=Framing.IPCZ, timestamp_us=123_456_789
    )
    assert layout.unpack(header) == {
        "size": 16,
        "num_handles": 3,
        "num_bytes": 21,
        "creation_timeticks_us": 123_456_789,
    }


def test_a_reader_takes_an_ipcz_header_of_any_size_from_8() -> None:
    layout = Layout("wire-ipcz-header")
    v1 = layout.pack(size=8, num_handles=0, num_bytes=13, creation_timeticks_us=0)[:8]
    assert _decode(v1 + b"hello", Framing.IPCZ) == (b"hello", MessageType.NORMAL)
    longer = layout.pack(size=20, num_handles=0, num_bytes=25, creation_timeticks_us=1)
    data = longer + b"v3.." + b"hello"
    assert _decode(data, Framing.IPCZ) == (b"hello", MessageType.NORMAL)


def test_the_message_type_table_lists_every_value() -> None:
    header, *rows = simple_table(DESIGN, "wire-message-types")
    assert header[:2] == ["value", "name"]
    assert {name: int(value) for value, name, _ in rows} == {
        member.name: member.value for member in MessageType
    }


def _limit(text: str) -> int | None:
    if text == "None":
        return None
    number, _, unit = text.partition(" ")
    return int(number) * {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def test_the_policy_table_is_what_the_policies_set() -> None:
    header, *rows = simple_table(DOCS / "howto" / "sandbox.rst", "sandbox-policies")
    names = header[1:]
    assert names == ["strict", "default", "basic", "none"]
    policies = [
        SandboxPolicy.strict(),
        SandboxPolicy.default(),
        SandboxPolicy.basic(),
        SandboxPolicy.none(i_understand_this_is_unsandboxed=True),
    ]
    documented = {row[0]: row[1:] for row in rows}
    assert set(LAYERS) <= set(documented)
    for field, cells in documented.items():
        for policy, cell in zip(policies, cells, strict=True):
            if field in LAYERS:
                assert policy.level(field).name == cell, (policy.name, field)
            else:
                assert getattr(policy, field) == _limit(cell), (policy.name, field)


def _list_table_rows(text: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("* - "):
            rows.append([stripped[4:]])
        elif stripped.startswith("- "):
            rows[-1].append(stripped[2:])
        elif stripped and rows:
            rows[-1][-1] += " " + stripped
    return rows


def _default(text: str) -> float | int | None:
    if text.endswith(" s"):
        return float(text[:-2])
    return _limit(text)


def test_the_limits_table_is_what_open_channel_defaults_to() -> None:
    page = DOCS / "howto" / "limits.rst"
    tables = [d for _, d in directives(page) if d.name == "list-table"]
    header, *rows = _list_table_rows(tables[0].content)
    assert header[:2] == ["option", "default"]
    parameters = inspect.signature(open_channel).parameters
    checked = set()
    for options, defaults, _ in rows:
        names = re.findall(r"``(\w+)``", options)
        values = defaults.split(", ")
        assert len(names) == len(values), options
        for name, value in zip(names, values, strict=True):
            assert parameters[name].default == _default(value), name
            checked.add(name)
    assert len(checked) >= 9
