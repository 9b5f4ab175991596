"""The public namespace: every public name presents itself as ``trio_mojo``."""

from __future__ import annotations

import pickle
import traceback

import pytest

import trio_mojo


def test_every_public_class_and_function_reports_module_trio_mojo() -> None:
    checked = 0
    for name in trio_mojo.__all__:
        obj = getattr(trio_mojo, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__module__ == "trio_mojo", name
            checked += 1
    assert checked >= 30  # the classes and functions, not the constants


def test_a_traceback_names_the_public_class() -> None:
    text = "".join(traceback.format_exception(trio_mojo.WorkerError("died")))
    assert "trio_mojo.WorkerError: died" in text
    assert "_errors" not in text.splitlines()[-1]


@pytest.mark.parametrize(
    "error",
    [
        trio_mojo.ChannelError("broken"),
        trio_mojo.DisconnectedError("gone"),
        trio_mojo.MalformedMessageError("bad header"),
        trio_mojo.WorkerTargetError("no such module", target="m:f", returncode=73),
    ],
)
def test_public_exceptions_still_pickle_by_reference(error: Exception) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert again.args == error.args
    assert vars(again) == vars(error)
