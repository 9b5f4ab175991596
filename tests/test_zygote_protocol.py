"""The zygote's control protocol, as pure functions: encode, parse, refuse."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mojo._workers._zygote_protocol import (
    MAX_CONTROL_MESSAGE,
    MAX_SPAWN_FDS,
    Exited,
    PreloadFailed,
    ProtocolError,
    Ready,
    Refused,
    Reply,
    Spawned,
    SpawnRequest,
    encode,
    parse_reply,
    parse_request,
)

REQUEST = SpawnRequest(
    id=7,
    target="pkg.mod:main",
    sandbox='{"name":"strict"}',
    fds=("channel", "stderr", "broker"),
    cwd="/tmp",
)


def test_a_spawn_request_round_trips() -> None:
    assert parse_request(encode(REQUEST), 3) == REQUEST
    plain = SpawnRequest(id=1, target="m:f", sandbox="{}", fds=("stderr", "channel"))
    assert parse_request(encode(plain), 2) == plain


@pytest.mark.parametrize(
    ("reply", "handles"),
    [
        (Ready(pid=10, preloaded=("a", "b.c")), 0),
        (PreloadFailed(module="a", error="ImportError: no"), 0),
        (Spawned(id=3, pid=11, own_pid_namespace=True), 1),
        (Spawned(id=3, pid=11, own_pid_namespace=False), 1),
        (Refused(id=4, error="OSError: threads"), 0),
        (Exited(pid=12, returncode=-9), 0),
        (Exited(pid=12, returncode=3), 0),
    ],
)
def test_every_reply_round_trips(reply: Reply, handles: int) -> None:
    assert parse_reply(encode(reply), handles) == reply


def _request(**changes: object) -> bytes:
    data = json.loads(encode(REQUEST))
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("payload", "handles", "error"),
    [
        (_request(kind="fork"), 3, "unknown request kind"),
        (_request(fds=["channel", "stderr", "secret"]), 3, "bad fd roles"),
        (_request(fds=["channel", "channel", "stderr"]), 3, "bad fd roles"),
        (_request(fds=["channel", "broker"]), 2, "without \\['stderr'\\]"),
        (_request(), 2, "3 fd roles but 2 fds"),
        (_request(), MAX_SPAWN_FDS, "3 fd roles but 4 fds"),
        (_request(id=-1), 3, "non-negative int"),
        (_request(id=True), 3, "non-negative int"),
        (_request(target=["m:f"]), 3, "expected a string"),
        (_request(target="m:" + "f" * 5000), 3, "at most 4096"),
        (_request(cwd=3), 3, "expected a string"),
        (_request(startup_timeout=0), 3, "not a positive number of seconds"),
        (_request(startup_timeout=True), 3, "a number of seconds"),
        (_request(fds="channel"), 3, "expected a list"),
        (b'{"kind": "spawn", "fds": ["channel", "stderr"]}', 2, "without 'id'"),
        (b"[1, 2]", 0, "not a JSON object"),
        (b"\xff", 0, "not JSON"),
        (b"[" * 50_000, 0, "not JSON"),
        (b" " * (MAX_CONTROL_MESSAGE + 1), 0, "control message of"),
    ],
)
def test_a_bad_request_is_refused(payload: bytes, handles: int, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        parse_request(payload, handles)


@pytest.mark.parametrize(
    ("payload", "handles", "error"),
    [
        (
            encode(Spawned(id=1, pid=2, own_pid_namespace=True)),
            0,
            "'spawned' reply with 0 fds",
        ),
        (
            b'{"kind": "spawned", "id": 1, "pid": 2, "own_pid_namespace": 1}',
            1,
            "own_pid_namespace 1 is not a bool",
        ),
        (encode(Ready(pid=1, preloaded=())), 1, "'ready' reply with 1 fds"),
        (b'{"kind": "exited", "pid": 1, "returncode": "0"}', 0, "not an int"),
        (b'{"kind": "exited", "pid": 1}', 0, "without 'returncode'"),
        (b'{"kind": "ready", "pid": 1, "preloaded": "a"}', 0, "expected a list"),
        (b'{"kind": "hello"}', 0, "unknown reply kind"),
        (b"{}", 0, "unknown reply kind"),
    ],
)
def test_a_bad_reply_is_refused(payload: bytes, handles: int, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        parse_reply(payload, handles)


def _parses_or_is_refused(payload: bytes, handles: int) -> None:
    """Either side's parser returns what encodes back to itself, or refuses."""
    for parse in (parse_request, parse_reply):
        try:
            message = parse(payload, handles)
        except ProtocolError:
            continue
        assert parse(encode(message), handles) == message


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=4))
def test_any_bytes_parse_or_are_refused_cleanly(payload: bytes, handles: int) -> None:
    _parses_or_is_refused(payload, handles)


@given(
    st.dictionaries(
        st.sampled_from(["kind", "id", "pid", "target", "sandbox", "fds", "cwd",
                         "preloaded", "module", "error", "returncode",
                         "own_pid_namespace", "startup_timeout"]),
        st.one_of(st.integers(-3, 3), st.text(max_size=5), st.none(), st.booleans(),
                  st.lists(st.sampled_from(["channel", "stderr", "x"]), max_size=4),
                  st.sampled_from(["spawn", "ready", "spawned", "refused", "exited",
                                   "preload_failed"])),
    ),
    st.integers(min_value=0, max_value=4),
)  # fmt: skip
def test_any_json_object_parses_or_is_refused_cleanly(
    data: dict[str, object], handles: int
) -> None:
    _parses_or_is_refused(json.dumps(data).encode(), handles)
