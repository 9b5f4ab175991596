"""Rule: any first message from a worker gives SandboxReport.from_bytes' documented ValueError or a report whose fields have their documented types, which describes itself and survives to_bytes/from_bytes unchanged.

Input layout (read with :class:`~fuzz._input.FuzzInput`)::

    u8  flags   bit 0 clear: the rest is the payload, as the worker sent it
                bit 0 set: the rest drives a generator of JSON objects with
                the report's keys, each value well-typed or not (bit 1:
                one more key), serialised with ``json.dumps``

JSON is parsed in C, which atheris cannot see into, so raw bytes rarely
reach the field checks; the generator does.  The parent parses a worker's
first message exactly like this (``_workers._worker._handshake``).  The
dictionary ``tests/fuzz/report.dict`` gives the fuzzer the JSON keys and
layer states for the raw half.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from trio_mojo import SandboxReport

from ._input import FuzzInput

__all__ = ["KEYS", "check", "open_target", "payload_of"]

KEYS = ("policy", "pid", "uid", "layers", "fds", "failed", "reason")
WORDS = (
    "strict",
    "applied",
    "off",
    "unavailable: no kernel support",
    "seccomp",
    "landlock",
    "namespaces",
    "rlimits",
    "no_new_privs",
    "",
    "\ud800",
    "\x00",
)
"""Strings the generator picks from (a lone surrogate and a NUL among them)."""
MAX_DEPTH = 4


def _string(reader: FuzzInput) -> str:
    choice = reader.u8()
    if choice < 200:
        return WORDS[choice % len(WORDS)]
    return reader.take(reader.u8() % 16).decode("utf-8", "surrogateescape")


def _any(reader: FuzzInput, depth: int) -> object:
    kind = reader.u8() % (8 if depth < MAX_DEPTH else 5)
    if kind == 0:
        return None
    if kind == 1:
        return bool(reader.u8() & 1)
    if kind == 2:
        value = reader.u16() - 256
        return value if reader.u8() < 240 else value * 10 ** reader.u8()
    if kind == 3:
        return (reader.u16() - 32768) / 7
    if kind == 4:
        return _string(reader)
    if kind in (5, 6):
        return [_any(reader, depth + 1) for _ in range(reader.u8() % 4)]
    return {_string(reader): _any(reader, depth + 1) for _ in range(reader.u8() % 4)}


def _well_typed(key: str, reader: FuzzInput) -> object:
    if key in ("pid", "uid"):
        return reader.u16()
    if key == "layers":
        return {_string(reader): _string(reader) for _ in range(reader.u8() % 6)}
    if key == "fds":
        return [reader.u8() for _ in range(reader.u8() % 8)]
    if key in ("failed", "reason") and reader.u8() & 1:
        return None
    return _string(reader)


def payload_of(data: bytes) -> bytes:
    """The payload the input ``data`` describes."""
    reader = FuzzInput(data)
    flags = reader.u8()
    if not flags & 1:
        return reader.rest()
    report: dict[str, object] = {}
    for key in KEYS:
        presence = reader.u8()
        if presence % 8 == 0:
            continue  # missing
        if presence % 8 == 1:
            report[key] = _any(reader, 0)
        else:
            report[key] = _well_typed(key, reader)
    if flags & 2:
        report[_string(reader)] = _any(reader, 0)
    return json.dumps(report).encode()


def check(data: bytes) -> None:
    """Parse the payload ``data`` describes as a sandbox report; check the rule."""
    payload = payload_of(data)
    try:
        report = SandboxReport.from_bytes(payload)
    except ValueError as exc:
        refusal = str(exc)
    else:
        _check_report(report)
        return
    assert refusal.startswith("malformed sandbox report"), refusal


def _check_report(report: SandboxReport) -> None:
    assert type(report.policy) is str
    assert type(report.pid) is int
    assert report.pid >= 0
    assert type(report.uid) is int
    assert report.uid >= 0
    assert isinstance(report.layers, Mapping)
    assert all(type(k) is str and type(v) is str for k, v in report.layers.items())
    assert type(report.fds) is tuple
    assert all(type(fd) is int and fd >= 0 for fd in report.fds)
    for optional in (report.failed, report.reason):
        assert optional is None or type(optional) is str
    assert report.ok is (report.failed is None)
    assert isinstance(report.describe(), str)
    assert SandboxReport.from_bytes(report.to_bytes()) == report


@contextlib.contextmanager
def open_target(workdir: Path) -> Iterator[Callable[[bytes], None]]:
    """Yield the one-input function (``workdir`` is unused here)."""
    yield check
