"""The zygote's control protocol: what a parent and its zygote say to each other.

Theory of operation
-------------------

One control channel (a socket pair, Mojo framing) joins the parent and the
zygote it started.  Nothing else ever reaches the zygote: no worker holds
an end of this channel, and the parent sends only spawn requests, so the
zygote never sees user data.  Every payload is a JSON object (no pickle)
with a ``"kind"``:

parent -> zygote
    ``spawn``: ``{"kind": "spawn", "id": N, "target": "pkg.mod:func",
    "sandbox": "<policy JSON>", "fds": [role, ...], "cwd": path | null,
    "startup_timeout": seconds}`` with one fd attached per role, in order
    (the worker waits at most ``startup_timeout`` for its go-ahead).  The roles are ``channel`` and
    ``stderr`` (always), ``broker`` and ``stdout`` (when used).

zygote -> parent
    ``ready``: ``{"kind": "ready", "pid": P, "preloaded": [module, ...]}``,
    the first message, once the preloads are imported;
    ``preload_failed``: ``{"kind": "preload_failed", "module": M,
    "error": "..."}`` instead, and the zygote exits;
    ``spawned``: ``{"kind": "spawned", "id": N, "pid": P,
    "own_pid_namespace": B}`` with one fd attached, a pidfd of the worker
    (opened by its parent, the zygote, before it could be reaped, so it
    names that process and no other); ``B`` is true when the zygote forked
    it into a PID namespace of its own (``P`` runs the target), false when
    its lockdown makes one (``P`` is then the supervisor of the process
    that does);
    ``refused``: ``{"kind": "refused", "id": N, "error": "..."}`` (nothing
    was forked);
    ``exited``: ``{"kind": "exited", "pid": P, "returncode": R}`` once the
    zygote reaped a worker and emptied its PID namespace (``R`` as
    :attr:`subprocess.Popen.returncode`: negative for a signal).  It always
    follows that worker's ``spawned``.

The zygote serves requests one at a time, in order, so replies come in the
order of the requests.  Both sides parse what they receive as untrusted
(a bug must fail loudly, not fork the wrong thing): :func:`parse_request`
and :func:`parse_reply` check every field and raise :class:`ProtocolError`.
The bounds each side can be made to hold are constants here:
:data:`MAX_CONTROL_MESSAGE` bytes per message, :data:`MAX_SPAWN_FDS` fds
per request, one fd per reply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

import attrs

__all__ = [
    "MAX_CONTROL_MESSAGE",
    "MAX_SPAWN_FDS",
    "REQUIRED_ROLES",
    "ROLES",
    "Exited",
    "PreloadFailed",
    "ProtocolError",
    "Ready",
    "Refused",
    "Reply",
    "SpawnRequest",
    "Spawned",
    "encode",
    "parse_reply",
    "parse_request",
]

MAX_CONTROL_MESSAGE: Final = 64 * 1024
"""The largest control message either side accepts, header included."""
ROLES: Final = ("channel", "stderr", "broker", "stdout")
"""What each fd of a spawn request becomes in the worker."""
REQUIRED_ROLES: Final = ("channel", "stderr")
MAX_SPAWN_FDS: Final = len(ROLES)
"""The most fds a spawn request carries (each role at most once)."""
_MAX_TEXT: Final = 4096
"""Longest string field (a target, a path, an error) that is accepted."""


class ProtocolError(ValueError):
    """A control message that breaks this protocol."""


@attrs.frozen(kw_only=True)
class SpawnRequest:
    """Fork a worker running ``target`` under ``sandbox`` with these fds."""

    id: int
    target: str
    sandbox: str
    fds: tuple[str, ...]
    cwd: str | None = None
    startup_timeout: float = 30.0


@attrs.frozen(kw_only=True)
class Ready:
    """The zygote imported its preloads and serves requests."""

    pid: int
    preloaded: tuple[str, ...]


@attrs.frozen(kw_only=True)
class PreloadFailed:
    """A preload could not be imported; the zygote exits."""

    module: str
    error: str


@attrs.frozen(kw_only=True)
class Spawned:
    """Request ``id`` forked worker ``pid`` (its pidfd is attached);
    ``own_pid_namespace``: into a PID namespace of its own, as its pid 2."""

    id: int
    pid: int
    own_pid_namespace: bool


@attrs.frozen(kw_only=True)
class Refused:
    """Request ``id`` forked nothing, for this reason."""

    id: int
    error: str


@attrs.frozen(kw_only=True)
class Exited:
    """Worker ``pid`` exited with ``returncode`` and was reaped."""

    pid: int
    returncode: int


Reply: TypeAlias = Ready | PreloadFailed | Spawned | Refused | Exited
_KINDS: Final[dict[type[object], str]] = {
    SpawnRequest: "spawn",
    Ready: "ready",
    PreloadFailed: "preload_failed",
    Spawned: "spawned",
    Refused: "refused",
    Exited: "exited",
}


def encode(message: SpawnRequest | Reply) -> bytes:
    """The JSON payload of a control message."""
    data = attrs.asdict(message)
    data["kind"] = _KINDS[type(message)]
    return json.dumps(data, separators=(",", ":")).encode()


def parse_request(payload: bytes, num_handles: int) -> SpawnRequest:
    """Parse a parent's message (in the zygote).

    Raises:
        ProtocolError: not a well-formed spawn request, or its fd count does
            not match its roles.
    """
    data = _load(payload)
    try:
        return _spawn_request(data, num_handles)
    except KeyError as exc:
        raise ProtocolError(f"spawn request without {exc}") from None


def _spawn_request(data: dict[str, Any], num_handles: int) -> SpawnRequest:
    if data.get("kind") != "spawn":
        raise ProtocolError(f"unknown request kind {data.get('kind')!r:.40}")
    fds = tuple(_text(role) for role in _list(data["fds"]))
    unknown = [role for role in fds if role not in ROLES]
    if unknown or len(set(fds)) != len(fds):
        raise ProtocolError(f"bad fd roles {fds!r:.200}")
    missing = [role for role in REQUIRED_ROLES if role not in fds]
    if missing:
        raise ProtocolError(f"spawn request without {missing}")
    if num_handles != len(fds):
        raise ProtocolError(f"{len(fds)} fd roles but {num_handles} fds attached")
    cwd = data.get("cwd")
    return SpawnRequest(
        id=_int(data["id"]),
        target=_text(data["target"]),
        sandbox=_text(data["sandbox"]),
        fds=fds,
        cwd=None if cwd is None else _text(cwd),
        startup_timeout=_seconds(data["startup_timeout"]),
    )


def parse_reply(payload: bytes, num_handles: int) -> Reply:
    """Parse a zygote's message (in the parent).

    Raises:
        ProtocolError: not a well-formed reply, or it carries the wrong number
            of fds (one with ``spawned``, none otherwise).
    """
    data = _load(payload)
    try:
        return _reply(data, num_handles)
    except KeyError as exc:
        raise ProtocolError(f"{data.get('kind')!r:.40} reply without {exc}") from None


def _reply(data: dict[str, Any], num_handles: int) -> Reply:
    kind = data.get("kind")
    expected_handles = 1 if kind == "spawned" else 0
    if num_handles != expected_handles:
        raise ProtocolError(f"a {kind!r:.40} reply with {num_handles} fds")
    if kind == "ready":
        preloaded = tuple(_text(name) for name in _list(data["preloaded"]))
        return Ready(pid=_int(data["pid"]), preloaded=preloaded)
    if kind == "preload_failed":
        return PreloadFailed(module=_text(data["module"]), error=_text(data["error"]))
    if kind == "spawned":
        own_namespace = data["own_pid_namespace"]
        if type(own_namespace) is not bool:
            raise ProtocolError(
                f"own_pid_namespace {own_namespace!r:.40} is not a bool"
            )
        return Spawned(
            id=_int(data["id"]), pid=_int(data["pid"]), own_pid_namespace=own_namespace
        )
    if kind == "refused":
        return Refused(id=_int(data["id"]), error=_text(data["error"]))
    if kind == "exited":
        returncode = data["returncode"]
        if type(returncode) is not int:
            raise ProtocolError(f"returncode {returncode!r:.40} is not an int")
        return Exited(pid=_int(data["pid"]), returncode=returncode)
    raise ProtocolError(f"unknown reply kind {kind!r:.40}")


def _load(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL_MESSAGE:
        raise ProtocolError(f"control message of {len(payload)} bytes")
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"control message is not JSON: {exc!r:.200}") from None
    if type(data) is not dict:
        raise ProtocolError("control message is not a JSON object")
    return data


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ProtocolError(f"expected a non-negative int, got {value!r:.40}")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"expected a number of seconds, got {value!r:.40}")
    if not 0 < value < math.inf:
        raise ProtocolError(f"{value!r:.40} is not a positive number of seconds")
    return float(value)


def _text(value: object) -> str:
    if type(value) is not str or len(value) > _MAX_TEXT:
        raise ProtocolError(
            f"expected a string of at most {_MAX_TEXT}, got {value!r:.40}"
        )
    return value


def _list(value: object) -> Sequence[object]:
    if type(value) is not list:
        raise ProtocolError(f"expected a list, got {value!r:.40}")
    return value
