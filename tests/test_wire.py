"""The wire format (``_wire.py``): worked examples, header encoding, its limits."""

from __future__ import annotations

import doctest
import struct
import time
from typing import cast

import pytest
from _core_support import EXAMPLE_IDS, EXAMPLES, WireExample

from trio_mojo import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_ATTACHED_HANDLES,
    MAX_SENDMSG_HANDLES,
    Framing,
    HandlePolicy,
    MessageType,
    encode_header,
    encode_message,
)
from trio_mojo._core import _wire

ENCODABLE = [pytest.param(e, id=e.name) for e in EXAMPLES if e.encodable]


@pytest.mark.parametrize("example", ENCODABLE)
def test_encode_message_matches_worked_example(example: WireExample) -> None:
    wire = encode_message(
        example.payload,
        num_handles=example.num_handles,
        type=example.type,
        framing=example.framing,
        timestamp_us=example.timestamp_us,
    )
    assert wire.hex(" ") == example.wire.hex(" ")


@pytest.mark.parametrize("example", ENCODABLE)
def test_encode_header_is_the_prefix_of_the_worked_example(
    example: WireExample,
) -> None:
    header = encode_header(
        len(example.payload),
        num_handles=example.num_handles,
        type=example.type,
        framing=example.framing,
        timestamp_us=example.timestamp_us,
    )
    assert header + example.payload == example.wire


def test_example_h_is_the_only_one_we_cannot_write() -> None:
    # Example H is an old (v1) IPCZ sender's 8-byte header.  We write the
    # 16-byte header of current Linux Chromium; the data part is identical.
    (h,) = (e for e in EXAMPLES if not e.encodable)
    assert h.name.startswith("H-")
    ours = encode_message(h.payload, framing=Framing.IPCZ, timestamp_us=0)
    assert ours == bytes.fromhex("10 00 00 00 12 00 00 00") + bytes(8) + b"hi"
    assert ours[16:] == h.wire[8:]


def test_example_ids_cover_a_to_h() -> None:
    assert {name[0] for name in EXAMPLE_IDS} >= set("ABCDEFGH")


def test_message_type_values_are_the_non_ios_ordinals() -> None:
    assert [(t.name, int(t)) for t in MessageType] == [
        ("NORMAL_LEGACY", 0),
        ("NORMAL", 1),
        ("UPGRADE_OFFER", 2),
        ("UPGRADE_ACCEPT", 3),
        ("UPGRADE_REJECT", 4),
    ]


def test_framing_and_handle_policy_members() -> None:
    assert {f.name for f in Framing} == {"MOJO", "IPCZ"}
    assert {p.name for p in HandlePolicy} == {"ACCEPT", "REJECT"}


def test_limits_match_chromium() -> None:
    assert _wire.LEGACY_HEADER_SIZE == 8
    assert _wire.HEADER_SIZE == 16
    assert _wire.IPCZ_HEADER_SIZE == 16
    assert _wire.IPCZ_MIN_HEADER_SIZE == 8
    assert MAX_SENDMSG_HANDLES == 128
    assert MAX_ATTACHED_HANDLES == 253
    assert _wire.MAX_BATCH_READ_SIZE == 256 * 1024
    assert DEFAULT_MAX_MESSAGE_SIZE == 256 * 1024 * 1024
    assert _wire.MAX_MESSAGE_SIZE_LIMIT == 2**32 - 1
    assert _wire.MAX_HANDLES_FIELD == 2**16 - 1


def test_normal_header_layout_field_by_field() -> None:
    header = encode_header(0x1234, num_handles=0x0102, type=MessageType.UPGRADE_ACCEPT)
    num_bytes, header_bytes, mtype, num_handles = struct.unpack_from("<IHHH", header)
    assert len(header) == 16
    assert num_bytes == 16 + 0x1234
    assert header_bytes == 16
    assert mtype == 3
    assert num_handles == 0x0102
    assert header[10:] == bytes(6)  # padding is zeroed


def test_legacy_header_layout_field_by_field() -> None:
    header = encode_header(3, num_handles=253, type=MessageType.NORMAL_LEGACY)
    assert header == struct.pack("<IHH", 11, 253, 0)


def test_ipcz_header_layout_field_by_field() -> None:
    header = encode_header(
        7, num_handles=5, framing=Framing.IPCZ, timestamp_us=-(2**63)
    )
    assert header == struct.pack("<HHIq", 16, 5, 23, -(2**63))


def test_ipcz_default_timestamp_is_monotonic_microseconds() -> None:
    before = time.monotonic_ns() // 1000
    header = encode_header(0, framing=Framing.IPCZ)
    after = time.monotonic_ns() // 1000
    (stamp,) = struct.unpack_from("<q", header, 8)
    assert before <= stamp <= after


def test_timestamp_is_ignored_by_mojo_framing() -> None:
    assert encode_header(0, timestamp_us=12345) == encode_header(0)


def test_type_may_be_given_as_a_plain_int() -> None:
    (reject,) = (e for e in EXAMPLES if e.name.startswith("E-"))
    assert encode_header(0, type=cast(MessageType, 4)) == reject.wire
    assert encode_header(2, type=cast(MessageType, 0)) == struct.pack("<IHH", 10, 0, 0)


@pytest.mark.parametrize(
    ("framing", "header_size"),
    [(Framing.MOJO, 16), (Framing.IPCZ, 16)],
)
def test_largest_message_that_fits_u32(framing: Framing, header_size: int) -> None:
    header = encode_header(2**32 - 1 - header_size, framing=framing, timestamp_us=0)
    offset = 0 if framing is Framing.MOJO else 4
    assert struct.unpack_from("<I", header, offset) == (2**32 - 1,)


def test_largest_legacy_message_that_fits_u32() -> None:
    header = encode_header(2**32 - 1 - 8, type=MessageType.NORMAL_LEGACY)
    assert struct.unpack_from("<I", header) == (2**32 - 1,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(
            {"payload_size": 2**32 - 16},
            r"message of 4294967296 bytes does not fit the u32 num_bytes field",
            id="normal-too-big",
        ),
        pytest.param(
            {"payload_size": 2**32 - 8, "type": MessageType.NORMAL_LEGACY},
            r"message of 4294967296 bytes",
            id="legacy-too-big",
        ),
        pytest.param(
            {"payload_size": 2**32 - 16, "framing": Framing.IPCZ},
            r"message of 4294967296 bytes",
            id="ipcz-too-big",
        ),
        pytest.param(
            {"payload_size": -1},
            r"payload_size=-1 is negative",
            id="negative-payload",
        ),
        pytest.param(
            {"payload_size": 0, "num_handles": -1},
            r"num_handles=-1 is outside 0\.\.65535",
            id="negative-handles",
        ),
        pytest.param(
            {"payload_size": 0, "num_handles": 65536},
            r"num_handles=65536 is outside 0\.\.65535",
            id="too-many-handles-for-u16",
        ),
        pytest.param(
            {
                "payload_size": 0,
                "framing": Framing.IPCZ,
                "type": MessageType.NORMAL_LEGACY,
            },
            r"Framing\.IPCZ carries only NORMAL messages, not <MessageType\.NORMAL_LEGACY",
            id="ipcz-legacy-type",
        ),
        pytest.param(
            {
                "payload_size": 0,
                "framing": Framing.IPCZ,
                "type": MessageType.UPGRADE_OFFER,
            },
            r"Framing\.IPCZ carries only NORMAL messages",
            id="ipcz-control-type",
        ),
        pytest.param(
            {"payload_size": 0, "type": 5},
            r"5 is not a valid MessageType",
            id="unknown-type",
        ),
        pytest.param(
            {"payload_size": 0, "framing": "mojo"},
            r"unknown framing 'mojo'",
            id="framing-not-an-enum",
        ),
    ],
)
def test_encode_header_rejects(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_header(**kwargs)  # type: ignore[arg-type]


def test_encode_message_propagates_header_errors() -> None:
    with pytest.raises(ValueError, match="num_handles=70000"):
        encode_message(b"x", num_handles=70000)


def test_encode_message_maximum_handle_count_field() -> None:
    wire = encode_message(b"", num_handles=65535)
    assert struct.unpack_from("<H", wire, 8) == (65535,)


def test_docstring_examples_hold() -> None:
    # module=False: the public functions report module "trio_mojo", so the
    # default finder would not count them as _wire's own.
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(_wire, module=False, globs=vars(_wire).copy()):
        runner.run(test, out=lambda _: None)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 1
    assert result.failed == 0
