"""The sandbox report: what a worker says it applied, parsed as hostile input."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["MAX_REPORT_BYTES", "SandboxReport"]

MAX_REPORT_BYTES: Final = 64 * 1024
"""A longer first message is not a sandbox report (real ones are ~0.4 KiB)."""


@attrs.frozen(kw_only=True)
class SandboxReport:
    """What the worker says it applied; the worker's first message.

    ``layers`` maps each layer to ``"applied"``, ``"off"`` or
    ``"unavailable: <reason>"`` (in the parent, sorted by name: the report
    travels as JSON with sorted keys); ``failed``
    names a required layer that could not be applied (the worker then never
    ran its target).  ``pid`` and ``uid`` are as the worker sees them (in its
    own PID namespace the worker is pid 2; ``Worker.pid`` is its host pid).
    ``fds`` is the worker's fd table when its lockdown began.  ``nonce`` is
    the worker's token for the go-ahead handshake (``_workers._handshake``).
    """

    policy: str
    pid: int
    uid: int
    layers: Mapping[str, str]
    fds: tuple[int, ...]
    failed: str | None = None
    reason: str | None = None
    nonce: str = ""

    @property
    def ok(self) -> bool:
        """True when every required layer was applied."""
        return self.failed is None

    def to_bytes(self) -> bytes:
        """Encode as the JSON payload of the first message."""
        data = attrs.asdict(self)
        data["fds"] = list(self.fds)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> SandboxReport:
        """Parse a report; the worker is untrusted, so check every field.

        Raises:
            ValueError: the payload is not a well-formed report.
        """
        if len(payload) > MAX_REPORT_BYTES:
            raise ValueError(
                f"malformed sandbox report: {len(payload)} bytes, "
                f"more than {MAX_REPORT_BYTES}"
            )
        try:
            data: Any = json.loads(payload)
            layers = _object(data["layers"])
            report = cls(
                policy=_text(data["policy"]),
                pid=_int(data["pid"]),
                uid=_int(data["uid"]),
                layers={_text(k): _text(v) for k, v in layers.items()},
                fds=tuple(_int(fd) for fd in _list(data["fds"])),
                failed=_optional_text(data.get("failed")),
                reason=_optional_text(data.get("reason")),
                nonce=_text(data.get("nonce", "")),
            )
        # RecursionError: deeply nested JSON arrays or objects.
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ValueError(f"malformed sandbox report: {exc!r:.200}") from None
        return report

    def describe(self) -> str:
        """One line for humans: policy and each layer's state."""
        layers = ", ".join(f"{k}={v}" for k, v in self.layers.items())
        state = "ok" if self.ok else f"FAILED {self.failed}: {self.reason}"
        return f"pid {self.pid} uid {self.uid} policy={self.policy} [{state}] {layers}"


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"expected a non-negative int, got {value!r:.80}")
    return value


def _text(value: object) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, got {value!r:.80}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _object(value: object) -> dict[object, object]:
    if type(value) is not dict:
        raise TypeError(f"expected an object, got {value!r:.80}")
    return value


def _list(value: object) -> list[object]:
    if type(value) is not list:
        raise TypeError(f"expected a list, got {value!r:.80}")
    return value
