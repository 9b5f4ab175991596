"""Whether another interpreter could import a module, found without importing it.

Theory of operation
-------------------

A worker runs ``python -I``: isolated mode leaves the script's directory,
``PYTHONPATH`` and the user's site directory off ``sys.path``, so a module
the parent imports may not exist for its workers.  The parent finds out
before it starts one, without running the module's code (its import-time
code runs in the worker, or in a zygote, and nowhere else):

1. It asks each interpreter once what it sees, by running the worker's own
   entry point, ``python -I -m trio_mojo._workers._bootstrap
   --find-module=NAME``, so that it sees what a worker sees (whatever
   wraps the interpreter too), and a ``trio_mojo`` missing from that
   environment shows at once.  The answer (:func:`answer`) is one line of
   JSON: the interpreter's ``sys.path``, its module suffixes, its built-in
   module names, whether a meta path finder other than the standard ones
   is installed (setuptools' editable installs add one), and where it
   finds ``NAME``.
2. Then, in the parent, :func:`locate` walks the dotted name down that path
   with :meth:`importlib.machinery.PathFinder.find_spec`, one part at a
   time (each package's directory is the search path of the next part),
   as the interpreter's own import would, but only looking: a ``stat`` per
   path entry, no module executed.
3. When the interpreter's suffixes differ from ours (another Python
   version), or the walk finds nothing (the interpreter's path may have
   grown since, or an import hook may serve the name), the interpreter is
   asked about that module again: it finds the top-level name through its
   whole meta path (which imports nothing) and walks the rest as above.

A namespace package's search path is the set of its directories under the
parent's search path, computed here: :mod:`importlib`'s own
``_NamespacePath`` would recompute it from *this* process's ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

__all__ = [
    "Answer",
    "NotImportableError",
    "View",
    "answer",
    "locate",
    "not_on_path",
    "parse_answer",
]

_STANDARD_FINDERS = (
    importlib.machinery.BuiltinImporter,
    importlib.machinery.FrozenImporter,
    importlib.machinery.PathFinder,
)


class NotImportableError(Exception):
    """A module the interpreter cannot import; the message says which part."""


def not_on_path(name: str) -> str:
    """Why top-level module ``name`` is not importable."""
    return f"no module named {name!r} on its sys.path"


@dataclasses.dataclass(frozen=True)
class View:
    """What an interpreter in isolated mode imports from."""

    path: tuple[str, ...]
    """Its ``sys.path``."""
    suffixes: tuple[str, ...]
    """Its :func:`importlib.machinery.all_suffixes`."""
    builtin: frozenset[str]
    """Its :data:`sys.builtin_module_names`."""
    other_finders: bool
    """Whether a meta path finder beyond the standard three is installed
    (informative: a name the walk does not find is asked about anyway)."""

    def is_like_this_process(self) -> bool:
        """Whether this process finds modules as that interpreter does."""
        return self.suffixes == tuple(importlib.machinery.all_suffixes())


@dataclasses.dataclass(frozen=True)
class Answer:
    """What :func:`answer` says: the :class:`View`, and the modules asked about."""

    view: View
    origins: dict[str, str]
    """Each module found, and where."""
    missing: dict[str, str]
    """Each module not found, and why."""


def parse_answer(text: str) -> Answer:
    """Parse the line :func:`answer` made.

    Raises:
        ValueError: not JSON.
        TypeError: not an answer of this script.
    """
    data = json.loads(text)
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    other = data.get("other_finders")
    if type(other) is not bool:
        raise TypeError("other_finders must be a bool")
    view = View(
        path=_strings(data.get("path")),
        suffixes=_strings(data.get("suffixes")),
        builtin=frozenset(_strings(data.get("builtin"))),
        other_finders=other,
    )
    modules = data.get("modules", {})
    if not isinstance(modules, dict):
        raise TypeError("modules must be an object")
    origins: dict[str, str] = {}
    missing: dict[str, str] = {}
    for name, where in modules.items():
        if not isinstance(where, dict) or len(where) != 1:
            raise TypeError(f"bad answer for module {name!r}")
        ((key, value),) = where.items()
        if key not in ("origin", "missing") or not isinstance(value, str):
            raise TypeError(f"bad answer for module {name!r}")
        (origins if key == "origin" else missing)[name] = value
    return Answer(view, origins, missing)


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"expected a list of strings, not {value!r:.80}")
    return tuple(value)


def _describe(spec: importlib.machinery.ModuleSpec) -> str:
    """Where a found module is: its file, or what it is."""
    if spec.origin is None:
        return "a namespace package"
    return spec.origin  # a file, or "built-in", "frozen"


def locate(
    name: str, path: Sequence[str], builtin: frozenset[str] = frozenset()
) -> str:
    """Where module ``name`` is imported from, searching ``path``.

    Returns the file of the module, ``"a namespace package"`` or
    ``"built-in"``.

    Raises:
        NotImportableError: a part of the name is not found; the message
            says which, and in which package it was looked for.
    """
    parts = name.split(".")
    if parts[0] in builtin:
        if len(parts) > 1:
            raise NotImportableError(
                f"{parts[0]!r} is a built-in module, not a package"
            )
        return "built-in"
    return _walk(parts, list(path))


def _walk(
    parts: Sequence[str], locations: list[str], start: int = 0, where: str = ""
) -> str:
    """Find ``parts[start:]``, the packages before them found at ``where``."""
    for depth in range(start, len(parts)):
        part = parts[depth]
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(parts[: depth + 1]), locations
        )
        if spec is None:
            if not depth:
                raise NotImportableError(not_on_path(part))
            package = ".".join(parts[:depth])
            raise NotImportableError(
                f"package {package!r} ({where}) has no module {part!r}"
            )
        where = _describe(spec)
        if depth + 1 < len(parts):
            locations = _search_path(spec, ".".join(parts[: depth + 1]), locations)
    return where


def _search_path(
    spec: importlib.machinery.ModuleSpec, fullname: str, locations: Sequence[str]
) -> list[str]:
    """Where the submodules of ``fullname`` (found as ``spec``) are searched."""
    if spec.submodule_search_locations is None:
        raise NotImportableError(
            f"{fullname!r} ({_describe(spec)}) is a module, not a package"
        )
    if spec.origin is not None:
        return list(spec.submodule_search_locations)
    # A namespace package: its directories under the search path.
    part = fullname.rpartition(".")[2]
    return [
        os.path.join(entry, part)
        for entry in locations
        if os.path.isdir(os.path.join(entry, part))
    ]


def _locate_here(name: str) -> dict[str, str]:
    """In the probed interpreter: find ``name`` through its whole meta path."""
    try:
        return {"origin": _find_here(name.split("."))}
    except NotImportableError as exc:
        return {"missing": str(exc)}


def _find_here(parts: Sequence[str]) -> str:
    spec = importlib.util.find_spec(parts[0])  # a top-level name: no import
    if spec is None:
        raise NotImportableError(not_on_path(parts[0]))
    where = _describe(spec)
    if len(parts) == 1:
        return where
    locations = _search_path(spec, parts[0], sys.path)
    return _walk(parts, locations, start=1, where=where)


def _view() -> dict[str, object]:
    return {
        "path": sys.path,
        "suffixes": importlib.machinery.all_suffixes(),
        "builtin": sorted(sys.builtin_module_names),
        "other_finders": any(
            finder not in _STANDARD_FINDERS for finder in sys.meta_path
        ),
    }


def answer(names: Sequence[str]) -> str:
    """This interpreter's :class:`View` and, for each name, where it is, as
    the line of JSON :func:`parse_answer` reads."""
    found = _view()
    found["modules"] = {name: _locate_here(name) for name in names}
    return json.dumps(found)
