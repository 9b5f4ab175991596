"""The fuzz corpus, replayed in every test run (no atheris needed).

Every input kept in ``tests/corpus/<target>/`` (the hand-made seeds of
``tests/fuzz/seeds.py`` and what fuzzing added) goes through its target in
``tests/fuzz/``, which checks the target's rule.  The second half shows that
each rule can fail: a target run against a deliberately broken copy of what
it tests must catch it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzz import seeds
from fuzz.targets import TARGETS

from trio_mojo import Message, MessageDecoder, MessageEncoder
from trio_mojo._core._encoder import Buffer
from trio_mojo._sandbox import _report
from trio_mojo._workers import _broker


def _replay(name: str, workdir: Path) -> list[str]:
    target = TARGETS[name]
    inputs = sorted(target.corpus.iterdir())
    assert inputs, f"tests/corpus/{name}/ is empty"
    failures = []
    with target.load().open_target(workdir) as one_input:
        for path in inputs:
            try:
                one_input(path.read_bytes())
            except Exception as exc:
                failures.append(f"{path.relative_to(target.corpus.parent)}: {exc!r}")
    return failures


@pytest.mark.parametrize("name", list(TARGETS))
def test_corpus_replays(name: str, tmp_path: Path) -> None:
    failures = _replay(name, tmp_path)
    assert not failures, f"{len(failures)} input(s) break the rule:\n" + "\n".join(
        failures[:20]
    )


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_states_its_rule(name: str) -> None:
    assert TARGETS[name].rule().startswith("Rule: ")


def test_every_seed_is_in_the_corpus() -> None:
    # seeds.py and the input layouts change together: rerun seeds.py.
    for name, make in seeds.SEEDS.items():
        for data in make():
            path = TARGETS[name].corpus / hashlib.sha1(data).hexdigest()
            assert path.exists(), f"{path} missing: run python tests/fuzz/seeds.py"


# ----------------------------------------------------------------------
# Each rule catches a broken implementation


def _breaks_the_rule(name: str, workdir: Path) -> bool:
    return bool(_replay(name, workdir))


def test_decoder_rule_catches_a_wrong_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = MessageDecoder.next_message

    def truncating(self: MessageDecoder) -> object:
        event = original(self)
        if isinstance(event, Message) and event.payload:
            return Message(event.payload[:-1], event.handles, event.type)
        return event

    monkeypatch.setattr(MessageDecoder, "next_message", truncating)
    assert _breaks_the_rule("decoder", tmp_path)


def test_decoder_rule_catches_kept_fds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MessageDecoder, "close", lambda self: None)
    assert _breaks_the_rule("decoder", tmp_path)


def test_decoder_rule_catches_memory_beyond_the_bytes_fed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = MessageDecoder.receive_data
    hoard: list[bytes] = []

    def hoarding(self: MessageDecoder, data: bytes) -> None:
        hoard.append(bytes(4 * len(data)))
        original(self, data)

    monkeypatch.setattr(MessageDecoder, "receive_data", hoarding)
    assert _breaks_the_rule("decoder", tmp_path)


def test_encoder_rule_catches_fds_out_of_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = MessageEncoder.plan

    def reversing(self: MessageEncoder) -> tuple[list[Buffer], list[int]]:
        buffers, fds = original(self)
        return buffers, fds[::-1]

    monkeypatch.setattr(MessageEncoder, "plan", reversing)
    assert _breaks_the_rule("encoder", tmp_path)


def test_broker_rule_catches_a_broker_that_follows_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def following(root: str, relative: bytes, flags: int) -> int:
        return os.open(os.path.join(os.fsencode(root), relative), flags, 0o600)

    monkeypatch.setattr(_broker, "_open_beneath", following)
    assert _breaks_the_rule("broker", tmp_path)


def test_report_rule_catches_unchecked_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity: Callable[[object], object] = lambda value: value  # noqa: E731
    monkeypatch.setattr(_report, "_int", identity)
    assert _breaks_the_rule("report", tmp_path)
