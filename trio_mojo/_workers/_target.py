"""Worker targets: what one is, what the parent checks, how a worker loads its own.

Theory of operation
-------------------

A *target* is the async function a worker calls with its channel.  The
parent names it ``"package.module:function"`` or passes the function
object; either way it travels as that string (a worker imports its target:
nothing is pickled).  Each problem is found as early as it can be, and
raised as a :class:`WorkerTargetError` whose message is one line that says
what is wrong and what to do:

1. In the parent, before anything starts (:func:`target_spec`): the
   string's shape; for a function object, that a worker can import it by
   name (``__module__`` and ``__qualname__`` must name that very object:
   not a lambda, a closure, a method or a function of ``__main__``) and
   that it is an ``async def``.
2. In the parent, before anything starts (:func:`check_importable`): that
   the worker's interpreter in isolated mode finds the module, without
   running the module's code (``_importable``).  The interpreter is run
   once, ``python -I -m trio_mojo._workers._bootstrap --find-module=NAME``,
   to learn its ``sys.path``; the walk down the dotted name then happens
   here.  When that walk finds nothing, or the interpreter is of another
   Python version, the interpreter is asked about the module itself before
   it is refused (its ``sys.path`` may have grown since, or an import hook
   may serve it); what it finds so is remembered.
3. In the worker (or a zygote), when it imports the target before its
   sandbox (:func:`load_target`): what only the import can tell, that the
   module imports without raising, has the function, and that it is an
   ``async def``.  The failure is a :class:`TargetLoadError` with the one
   line; the worker prints the import's traceback, if any, to its stderr
   (the parent keeps the tail), sends the line to the parent in place of
   its sandbox report (``_handshake.target_failed``) and exits.
"""

from __future__ import annotations

import importlib
import inspect
import keyword
import subprocess
import sys
import traceback
import types
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, TypeAlias

import trio

from trio_mojo._channel import Channel
from trio_mojo._errors import WorkerError, WorkerTargetError

from . import _importable
from ._importable import NotImportableError, View, locate, not_on_path
from ._output import escape_controls

__all__ = [
    "Target",
    "TargetLoadError",
    "check_importable",
    "load_target",
    "target_module",
    "target_spec",
]

Target: TypeAlias = Callable[[Channel], Awaitable[object]]
"""What a worker calls: ``await target(channel)``."""

_MAX_SHOWN: Final = 300
"""Longest text of a worker's exception shown in a message."""
_TOP_LEVEL: Final = "define it with async def at the top level of an installed module"
_IMPORTLIB: Final = "<frozen importlib."

_views: dict[str, View] = {}
"""What each interpreter imports from, learnt once per interpreter."""
_found_by_asking: set[tuple[str, str]] = set()
"""(interpreter, module) found by asking the interpreter itself."""


class TargetLoadError(Exception):
    """A worker could not load its target; the message is one line."""


# ----------------------------------------------------------------------
# In the parent


def target_spec(target: object) -> str:
    """The ``"package.module:function"`` string of ``target``, checked.

    Raises:
        WorkerTargetError: a malformed string; a function object a worker
            cannot import by name, or one that is not an ``async def``.
    """
    if isinstance(target, str):
        _check_shape(target)
        return target
    return _spec_of_function(target)


def target_module(spec: str) -> str:
    """The module of a target string (or of a plain module name)."""
    return spec.partition(":")[0]


def _refuse(message: str, target: str) -> WorkerTargetError:
    return WorkerTargetError(message, target=target)


def _check_shape(spec: str) -> None:
    module, sep, function = spec.partition(":")
    if not sep or not module or not _is_name(function):
        raise _refuse(
            f"worker target must look like 'package.module:function', "
            f"not {spec!r:.{_MAX_SHOWN}}",
            spec,
        )
    if not all(map(_is_name, module.split("."))):
        raise _refuse(f"worker target module {module!r} is not a dotted name", spec)


def _is_name(text: str) -> bool:
    return text.isidentifier() and not keyword.iskeyword(text)


def _spec_of_function(target: object) -> str:
    shown = f"{target!r:.{_MAX_SHOWN}}"
    if inspect.ismethod(target):
        raise _refuse(
            f"worker target {target.__qualname__} is a bound method, which a worker "
            f"cannot call without its object: {_TOP_LEVEL}",
            shown,
        )
    if not inspect.isfunction(target):
        raise _refuse(
            "worker target must be 'package.module:function' or an async function, "
            f"not {shown}",
            shown,
        )
    module, qualname = target.__module__, target.__qualname__
    name = f"{module}.{qualname}"
    if target.__name__ == "<lambda>":
        raise _refuse(
            f"worker target {name} is a lambda, which a worker cannot import by "
            f"name: {_TOP_LEVEL}",
            shown,
        )
    if "<locals>" in qualname:
        raise _refuse(
            f"worker target {name} is defined inside a function, which a worker "
            f"cannot import by name: {_TOP_LEVEL}",
            shown,
        )
    if "." in qualname:
        raise _refuse(
            f"worker target {name} is a method, which a worker cannot call without "
            f"its object: {_TOP_LEVEL}",
            shown,
        )
    if module == "__main__":
        raise _refuse(_in_main(qualname), shown)
    spec = f"{module}:{qualname}"
    if getattr(sys.modules.get(module), qualname, None) is not target:
        raise _refuse(
            f"worker target {spec} does not name the function given: {name} is "
            "another object (a decorator that does not use functools.wraps, or a "
            "name bound again)",
            spec,
        )
    if not inspect.iscoroutinefunction(target):
        raise _refuse(_not_async(spec, target), spec)
    return spec


def _in_main(qualname: str) -> str:
    message = (
        f"worker target {qualname} is defined in __main__ (the script being run), "
        "which a worker cannot import: move it into an installed module"
    )
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is not None and main_spec.name not in ("__main__", ""):
        # Run as python -m package.module: the module has a name.
        message += f", or name it as '{main_spec.name}:{qualname}'"
    return message


def _not_async(spec: str, target: object) -> str:
    if inspect.isasyncgenfunction(target):
        kind = "an async generator function"
    elif inspect.isclass(target):
        kind = "a class"
    elif inspect.isfunction(target) or inspect.isbuiltin(target):
        kind = "a plain function"
    else:
        kind = f"an object of type {type(target).__name__}"
    return (
        f"worker target {spec!r} is not an async function (it is {kind}): a worker "
        "runs await target(channel), so define it with async def"
    )


async def check_importable(
    spec: str,
    *,
    python: str,
    env: Mapping[str, str],
    startup_timeout: float,
    what: str = "worker target module",
) -> None:
    """Check that ``python -I`` would find the module of ``spec``.

    ``what`` names the module in the message.

    Raises:
        WorkerTargetError: it would not: one line that says why and how to
            fix it.
        WorkerError: the interpreter did not say what it imports (it
            failed, or took longer than ``startup_timeout`` seconds).
        OSError: the interpreter cannot be run.
    """
    module = target_module(spec)
    view = _views.get(python)
    if view is not None and view.is_like_this_process():
        try:
            locate(module, view.path, view.builtin)
        except NotImportableError:
            pass  # the path may have grown since, or an import hook serves it
        else:
            return
    if (python, module) in _found_by_asking:
        return
    answer = await _ask(python, env, startup_timeout, module)
    _views[python] = answer.view
    if module in answer.origins:
        _found_by_asking.add((python, module))
        return
    raise _refuse(_not_importable(what, module, python, answer.missing[module]), spec)


def _not_importable(what: str, module: str, python: str, reason: str) -> str:
    message = f"{what} {module!r} is not importable by {python} -I: {reason}"
    try:
        here = locate(module, sys.path, frozenset(sys.builtin_module_names))
    except NotImportableError:
        here = None
    top_level_missing = reason == not_on_path(module.partition(".")[0])
    if top_level_missing:
        message += (
            " (workers run in isolated mode: the script's directory and PYTHONPATH "
            "are not on sys.path"
        )
        message += f"; this process imports it from {here})" if here else ")"
        message += "; install it into that environment, e.g. with pip install -e ."
    elif here:
        message += f" (this process imports it from {here})"
    return message


async def _ask(
    python: str, env: Mapping[str, str], startup_timeout: float, module: str
) -> _importable.Answer:
    """Ask ``python -I`` where it finds ``module`` (see ``_importable``)."""
    argv = [python, "-I", "-m", "trio_mojo._workers._bootstrap"]
    argv.append(f"--find-module={module}")
    with trio.move_on_after(startup_timeout) as scope:
        result = await trio.run_process(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if scope.cancelled_caught:
        raise WorkerError(
            f"{python} -I did not say what it can import within {startup_timeout} s"
        )
    command = f"{python} -I -m trio_mojo._workers._bootstrap --find-module"
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip().splitlines()
        last = f": {stderr[-1]:.{_MAX_SHOWN}}" if stderr else ""
        raise WorkerError(
            f"{command} exited with status {result.returncode}"
            + escape_controls(last, keep=frozenset())
            + " (is trio_mojo installed in that interpreter's environment?)"
        )
    stdout = result.stdout.decode(errors="replace").strip().splitlines()
    try:
        return _importable.parse_answer(stdout[-1] if stdout else "")
    except (ValueError, TypeError) as exc:
        raise WorkerError(
            f"{command} did not print its answer: "
            + escape_controls(str(exc), keep=frozenset())
        ) from None


# ----------------------------------------------------------------------
# In the worker (or the zygote)


def import_target_module(module_name: str, *, where: str) -> types.ModuleType:
    """Import a target's module, or a zygote's preload.

    ``where`` (``"the worker"``, ``"the zygote"``) is named in the message.

    Raises:
        TargetLoadError: the import raised (anything, ``SystemExit``
            included); its message is one line, and the import's exception
            is chained.
    """
    try:
        return importlib.import_module(module_name)
    except BaseException as exc:
        raise TargetLoadError(
            f"worker target module {module_name!r} raised {_one_line(exc)} when "
            f"{where} imported it{_location(exc)}"
        ) from exc


def load_target(spec: str, *, where: str = "the worker") -> Target:
    """Import and return the async function ``spec`` names.

    Raises:
        TargetLoadError: the module raised on import, has no such
            function, or it is not an ``async def`` (one line).
    """
    module_name, _, function_name = spec.partition(":")
    module = import_target_module(module_name, where=where)
    try:
        target = getattr(module, function_name)
    except AttributeError:
        raise TargetLoadError(
            f"worker target {spec!r} does not exist: module {module_name!r} "
            f"({getattr(module, '__file__', None) or 'built-in'}) has no attribute "
            f"{function_name!r}"
        ) from None
    if not inspect.iscoroutinefunction(target):
        raise TargetLoadError(_not_async(spec, target))
    return target  # type: ignore[no-any-return]


def print_import_traceback(error: TargetLoadError) -> None:
    """Write the traceback of the import behind ``error``, if any, to stderr."""
    if error.__cause__ is not None:
        traceback.print_exception(error.__cause__, file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    # A SyntaxError's str() has its place too, which _location shows.
    message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return " ".join(text.split())[:_MAX_SHOWN]


def _location(exc: BaseException) -> str:
    """`` (at FILE:LINE)``: where the import raised, outside importlib."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {exc.filename}:{exc.lineno})"
    ours = (__file__, importlib.__file__)
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename not in ours and not frame.filename.startswith(_IMPORTLIB)
    ]
    if not frames:  # the module itself was not found
        return ""
    return f" (at {frames[-1].filename}:{frames[-1].lineno})"
