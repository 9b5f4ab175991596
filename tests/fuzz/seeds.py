"""Write the hand-made seed inputs of every target into ``tests/corpus/``.

``python tests/fuzz/seeds.py`` (re)writes them; each file is named by the
SHA-1 of its content, as libFuzzer names what it adds, so running it again
changes nothing.  The seeds are the cases the spec and the hostile-peer
tests name: the worked examples A-I, each malformed header, fds early, late,
missing and surplus, the 1 MiB wait, upgrade messages; the encoder's fd
batching across the 128 boundary under one-byte writes; the broker's
symlink, ``..``, FIFO and device traps; real and twisted sandbox reports.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:  # so that ``fuzz`` and ``_core_support`` import
    sys.path.insert(0, str(TESTS))

from _core_support import EXAMPLES  # noqa: E402

from fuzz._input import InputWriter  # noqa: E402
from fuzz.decoder import Chunk, DecoderCase  # noqa: E402
from fuzz.targets import CORPUS  # noqa: E402
from trio_mojo import (  # noqa: E402
    Framing,
    HandlePolicy,
    MessageType,
    SandboxReport,
    encode_message,
)

_HEADER = struct.Struct("<IHHH6x")
_IPCZ = struct.Struct("<HHIq")


def _split(data: bytes, cuts: list[int], fds: dict[int, int]) -> tuple[Chunk, ...]:
    """``data`` cut at ``cuts``; ``fds[i]`` fds arrive with chunk ``i``."""
    bounds = [0, *cuts, len(data)]
    return tuple(
        Chunk(data[start:end], fds.get(index, 0))
        for index, (start, end) in enumerate(itertools.pairwise(bounds))
    )


def decoder_seeds() -> Iterator[bytes]:
    mojo, ipcz = Framing.MOJO, Framing.IPCZ
    for example in EXAMPLES:
        wire = example.wire
        for eof in (False, True):
            yield DecoderCase(
                framing=example.framing,
                eof=eof,
                chunks=(Chunk(wire, example.num_handles),),
            ).to_bytes()
        # Byte by byte (16 chunks at most: the rest is the last chunk).
        yield DecoderCase(
            framing=example.framing,
            eof=True,
            chunks=_split(wire, list(range(1, 16)), {0: example.num_handles}),
        ).to_bytes()
    three = encode_message(b"one") + encode_message(b"two", num_handles=2)
    three += encode_message(b"three", type=MessageType.NORMAL_LEGACY)
    for cut in (1, 8, 15, 16, 19, 20, 35, 36):
        yield DecoderCase(eof=True, chunks=_split(three, [cut], {0: 2})).to_bytes()
    # The fds of a message arrive one read late: malformed unless lenient.
    late = encode_message(b"late", num_handles=1)
    for strict in (True, False):
        yield DecoderCase(
            strict_handles=strict,
            eof=True,
            chunks=(Chunk(late), Chunk(encode_message(b"next"), 1)),
        ).to_bytes()
    # Malformed headers (tests/test_hostile_peer.py), in one read each.
    for bad in (
        *(struct.pack("<IHH", n, 0, 0) for n in range(8)),
        _HEADER.pack(4097, 16, 1, 0) + b"x" * 8,
        _HEADER.pack(32, 15, 1, 0),
        _HEADER.pack(20, 24, 1, 0),
        _HEADER.pack(16, 16, 1, 254),
        _HEADER.pack(16, 16, 5, 0),
        _HEADER.pack(16, 16, 0xFFFF, 0),
        _HEADER.pack(0xFFFFFFFF, 16, 1, 0) + b"x" * 100,
        _HEADER.pack(40, 24, 1, 0) + bytes(24),  # an extra header: accepted
    ):
        yield DecoderCase(size_index=5, chunks=(Chunk(bad),)).to_bytes()
    for size, num_bytes, handles in (
        (0, 16, 0),
        (7, 16, 0),
        (16, 15, 0),
        (16, 16, 254),
    ):
        yield DecoderCase(
            framing=ipcz, chunks=(Chunk(_IPCZ.pack(size, handles, num_bytes, 0)),)
        ).to_bytes()
    # An 8-byte v1 ipcz header with no data, stranded by Chromium's threshold.
    v1 = struct.pack("<HHI", 8, 0, 8)
    for threshold in (8, 16):
        yield DecoderCase(
            framing=ipcz, ipcz_parse_threshold=threshold, eof=True, chunks=(Chunk(v1),)
        ).to_bytes()
    # Handles on a REJECT channel: declared, and arriving unannounced.
    for declared, arriving in ((1, 0), (0, 1), (1, 1)):
        yield DecoderCase(
            handle_policy=HandlePolicy.REJECT,
            chunks=(Chunk(encode_message(b"fd", num_handles=declared), arriving),),
        ).to_bytes()
    # Surplus fds: unclaimed at the end, and past the queued-fds cap.
    yield DecoderCase(eof=True, chunks=(Chunk(encode_message(b"none"), 2),)).to_bytes()
    yield DecoderCase(
        strict_handles=False, eof=True, chunks=(Chunk(encode_message(b"none"), 2),)
    ).to_bytes()
    yield DecoderCase(
        chunks=tuple(Chunk(encode_message(b"none"), 128) for _ in range(4))
    ).to_bytes()
    # A 253-fd message whose fds come in two batches before its last byte.
    big = encode_message(b"x" * 10, num_handles=253)
    yield DecoderCase(eof=True, chunks=_split(big, [1, 2], {0: 128, 1: 125})).to_bytes()
    # A declared 200 MiB message fed a trickle, then a vanished peer.
    huge = _HEADER.pack(200 << 20, 16, 1, 0) + b"x" * 1000
    yield DecoderCase(eof=True, chunks=(Chunk(huge),)).to_bytes()
    # Lenient: a complete message waits for its fd while 1 MiB more arrives.
    waiting = encode_message(b"wait", num_handles=1)
    filler = encode_message(b"f" * 4080)
    yield DecoderCase(
        strict_handles=False,
        chunks=(Chunk(waiting), Chunk(filler, 0, 255), Chunk(filler, 0, 10)),
    ).to_bytes()
    # Large messages straddling many reads (the collected-chunks path).
    large = encode_message(bytes(range(256)) * 300, framing=mojo)
    for reused in (False, True):  # True: the reader overwrites its buffers
        yield DecoderCase(
            eof=True,
            reused_buffers=reused,
            chunks=_split(large, [5, 17, 4000, 40000, 60000], {}),
        ).to_bytes()
        yield DecoderCase(
            eof=True, reused_buffers=reused, chunks=_split(three, [19], {0: 2})
        ).to_bytes()
    large_ipcz = encode_message(b"z" * 70000, framing=ipcz, timestamp_us=1)
    yield DecoderCase(
        framing=ipcz, eof=True, chunks=_split(large_ipcz, [9, 16, 65535], {})
    ).to_bytes()


def _queue(
    mtype: int, size_class: int, size: int, handles: int, handles2: int
) -> bytes:
    return (
        InputWriter()
        .u8(0)
        .u8(mtype)
        .u8(size_class)
        .u16(size)
        .u8(handles)
        .u8(handles2)
        .build()
    )


def _write(how: int, fraction: int = 0) -> bytes:
    return InputWriter().u8(6).u8(how).u16(fraction).build()


def encoder_seeds() -> Iterator[bytes]:
    small = _queue(0, 1, 5, 1, 0)  # NORMAL, 5 bytes, 1 fd
    many = _queue(0, 1, 3, 192, 133)  # 253 fds (120 + 133)
    batch = _queue(0, 1, 3, 192, 8)  # 128 fds
    legacy = _queue(2, 1, 0, 2, 0)  # NORMAL_LEGACY, empty, 2 fds
    offer = _queue(3, 0, 0, 0, 0)  # UPGRADE_OFFER, empty
    large = _queue(0, 3, 40000, 0, 0)  # 1.25 MiB, across plans
    inline = _queue(0, 2, 8, 3, 0)  # 1024 bytes: the inline limit
    for framing in (0, 1):
        yield bytes((framing,)) + small + _write(2)
        yield bytes((framing,)) + many + _write(1) * 6 + _write(2)
        yield bytes((framing,)) + batch + batch + many + _write(1) * 8
        yield bytes((framing,)) + large + small + _write(3, 999) * 4
        yield bytes((framing,)) + inline + large + inline + _write(4) * 4
        yield bytes((framing,)) + many + many + _write(0) + _write(5) + _write(1)
        yield (
            bytes((framing,)) + small + legacy + offer + _write(1) + b"\x0d\x01\x00\x00"
        )
        yield bytes((framing,)) + small + many + _write(1) + b"\x0f"  # then close
        yield (
            bytes((framing,))
            + InputWriter().u8(14).u8(1).u8(0).u16(0).u8(0).u8(0).build()
        )  # a message the encoder must refuse
        yield bytes((framing,)) + _write(2)  # a write with nothing queued


def _broker_structured(mode: int, base: int, suffix: bytes, walk: bool) -> bytes:
    return bytes((2 if walk else 0, mode, base)) + suffix


def broker_seeds() -> Iterator[bytes]:
    suffixes = (
        b"/file.txt",
        b"/sub/nested.txt",
        b"/./sub//nested.txt",
        b"/sub/../file.txt",
        b"/../secret.txt",
        b"/sub/../../secret.txt",
        b"/link-out",
        b"/link-in",
        b"/rel-link",
        b"/sub/up",
        b"/dir-link/x.txt",
        b"/dev-link",
        b"/loop",
        b"/fifo",
        b"/sock",
        b"/null",
        b"/existing.txt",
        b"/new.txt",
        b"/subdir/new.txt",
        b"/dangling",
        b"/nope",
        b"/",
        b"",
        b"/file.txt/",
        b"/file.txt\x00/../../secret.txt",
    )
    read, write, read_write = 0, 1, 3
    ro, rw, single = 0, 1, 2
    for walk in (False, True):
        for base, mode in ((ro, read), (ro, write), (rw, write), (rw, read_write)):
            for suffix in suffixes:
                yield _broker_structured(mode, base, suffix, walk)
        for suffix in (b"", b"/", b"/x", b"/."):
            yield _broker_structured(read, single, suffix, walk)
        for base in range(3, 8):
            yield _broker_structured(read, base, b"/secret.txt", walk)
    for raw in (
        b"",
        b"OPEN",
        b"OPEN\x00",
        b"OPEN\x04/x",
        b"OPEM\x00/x",
        b"OPEN\x00relative",
        b"OPEN\x00" + b"/" * 4097,
        b"OPEN\x00/a\x00b",
    ):
        yield b"\x01" + raw


def report_seeds() -> Iterator[bytes]:
    real = SandboxReport(
        policy="strict",
        pid=4242,
        uid=65534,
        layers={
            "rlimits": "applied",
            "no_new_privs": "applied",
            "seccomp": "applied",
            "landlock": "applied",
            "namespaces": "unavailable: no user namespaces",
        },
        fds=(0, 1, 2, 3),
    )
    failed = SandboxReport(
        policy="strict",
        pid=1,
        uid=0,
        layers={"seccomp": "off"},
        fds=(),
        failed="landlock",
        reason="kernel too old",
    )
    for report in (real, failed):
        yield b"\x00" + report.to_bytes()
    yield b"\x00" + real.to_bytes().replace(b"4242", b"-1")
    yield b"\x00" + real.to_bytes().replace(b"4242", b"1e400")
    yield b"\x00" + real.to_bytes().replace(b"4242", b"9" * 5000)
    yield b"\x00" + real.to_bytes().replace(b'"strict"', b'"\\ud800"')
    yield b"\x00" + b"[" * 70000
    yield b"\x00" + b'{"layers": ' * 3000 + b"{}" + b"}" * 3000
    yield b"\x00" + b"\xff\xfe" + real.to_bytes().decode().encode("utf-16-le")
    yield b"\x00[]"
    yield b"\x00null"
    for flags in (1, 3):
        for presence in (2, 1, 0):
            yield bytes((flags,)) + bytes((presence,)) * 7 + bytes(range(64))


SEEDS = {
    "decoder": decoder_seeds,
    "encoder": encoder_seeds,
    "broker": broker_seeds,
    "report": report_seeds,
}


def main() -> None:
    for name, seeds in SEEDS.items():
        directory = CORPUS / name
        directory.mkdir(parents=True, exist_ok=True)
        written = 0
        for data in seeds():
            path = directory / hashlib.sha1(data).hexdigest()
            if not path.exists():
                path.write_bytes(data)
                written += 1
        print(f"{name}: {written} new seed(s) in {directory}")


if __name__ == "__main__":
    main()
