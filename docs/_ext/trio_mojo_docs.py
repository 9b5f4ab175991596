"""Sphinx extension for the trio_mojo docs: the API reference stays complete.

* ``.. trio-mojo-remaining-names::`` documents every name of
  ``trio_mojo.__all__`` that the page has not documented above it, so a
  public name added later appears in the reference without anyone editing
  it (under "Other public names" until it is given a section).
* Public names report ``trio_mojo`` as their module (so that the docs say
  ``trio_mojo.Channel``), but their source is in private modules, where
  autodoc's source analyzer must look for the docstrings of constants,
  attributes and enum members (a string literal after the assignment) and
  for the order of members.  ``_teach_analyzer`` copies what the analyzer
  finds in each defining module into its entry for ``trio_mojo``.
* After the build, every name of ``__all__`` must be in the objects
  inventory (``trio_mojo.<name>``), else the build fails; an entry of the
  local intersphinx inventories that no page links to is reported (they
  should list exactly the names the docs use).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import re
import zlib
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

import trio_mojo

logger = logging.getLogger(__name__)


def _imports(module: str) -> dict[str, str]:
    """Map each name a module imports relatively to the module it comes from."""
    source = Path(inspect.getfile(importlib.import_module(module))).read_text()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = importlib.util.resolve_name(
                "." * node.level + (node.module or ""), _package(module)
            )
            for alias in node.names:
                found[alias.asname or alias.name] = base
    return found


def _package(module: str) -> str:
    imported = importlib.import_module(module)
    return (
        imported.__name__
        if hasattr(imported, "__path__")
        else module.rpartition(".")[0]
    )


@functools.cache
def _defining_modules() -> dict[str, str]:
    """Map each public name to the private module whose source defines it
    (following re-exports through ``trio_mojo/_sandbox/__init__.py`` and
    the like)."""
    found = {}
    for name in trio_mojo.__all__:
        module = "trio_mojo"
        while (source := _imports(module).get(name)) is not None:
            module = source
        found[name] = module
    return found


def autodoc_directive(name: str) -> str:
    """The autodoc directive that documents ``trio_mojo.<name>`` in the
    "Other public names" section.

    A class there is shown without its constructor's arguments: most public
    classes are made by the library (``open_worker`` makes a ``Worker``), and
    their constructors take private types.  Give the name a section of its
    own to show them.
    """
    obj = getattr(trio_mojo, name)
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return f".. autoexception:: trio_mojo.{name}\n   :members:"
    if isinstance(obj, type):
        return f".. autoclass:: trio_mojo.{name}()\n   :members:"
    if callable(obj):
        return f".. autofunction:: trio_mojo.{name}"
    return f".. autodata:: trio_mojo.{name}"


def _public_bases(
    app: Sphinx, name: str, obj: object, options: object, bases: list[type]
) -> None:
    """Show only public base classes: a private helper base is an
    implementation detail (and has no page to link to)."""
    bases[:] = [
        base
        for base in bases
        if not (
            base.__module__.startswith("trio_mojo.")
            and getattr(trio_mojo, base.__name__, None) is not base
        )
    ]


class RemainingNames(SphinxDirective):
    """Document every public name not documented earlier on the page."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        documented = self.env.domains["py"].objects
        remaining = [
            name for name in trio_mojo.__all__ if f"trio_mojo.{name}" not in documented
        ]
        if not remaining:
            return []
        text = StringList()
        source = self.get_source_info()[0]
        for line in ["Other public names", "-" * 18, ""]:
            text.append(line, source)
        for name in remaining:
            for line in [*autodoc_directive(name).splitlines(), ""]:
                text.append(line, source)
        container = nodes.section()
        nested_parse_with_titles(self.state, text, container)
        return list(container.children)


def _teach_analyzer(app: Sphinx) -> None:
    """Give the analyzer of ``trio_mojo`` the attribute docs and member order
    of the private modules that define its public names."""
    public = ModuleAnalyzer.for_module("trio_mojo")
    public.analyze()
    for name, module in _defining_modules().items():
        private = ModuleAnalyzer.for_module(module)
        private.analyze()
        for (scope, attribute), lines in private.attr_docs.items():
            if (scope, attribute) == ("", name) or scope.partition(".")[0] == name:
                public.attr_docs[scope, attribute] = lines
        for qualname, order in private.tagorder.items():
            if qualname.partition(".")[0] == name:
                public.tagorder[qualname] = order


def _inventory_urls(app: Sphinx) -> dict[str, str]:
    """Each URL the local intersphinx inventories list, with its name."""
    urls = {}
    # intersphinx normalises each entry to (name, (base, (inventory, ...))).
    for _, (base, (path, *_)) in app.config.intersphinx_mapping.values():
        data = Path(path).read_bytes()
        body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
        for line in body.splitlines():
            name, _, _, uri, _ = line.split(" ", 4)
            urls[f"{base.rstrip('/')}/{uri.replace('$', name)}"] = name
    return urls


def _check_build(app: Sphinx, exception: BaseException | None) -> None:
    if exception is not None or app.builder.name != "html":
        return
    documented = app.env.domains["py"].objects
    missing = [
        name for name in trio_mojo.__all__ if f"trio_mojo.{name}" not in documented
    ]
    if missing:
        raise ExtensionError(f"public names missing from the reference: {missing}")
    linked = set()
    for page in Path(app.outdir).rglob("*.html"):
        linked.update(re.findall(r'href="(https://[^"]+)"', page.read_text()))
    unused = sorted(n for url, n in _inventory_urls(app).items() if url not in linked)
    if unused:
        # Not an error: an unused entry is harmless, and a docstring changed
        # on another branch must not break the build.  Tidy up when seen.
        logger.info(
            "note: no page links to %s; remove them from "
            "docs/inventories/make_inventories.py and run it",
            unused,
        )


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("trio-mojo-remaining-names", RemainingNames)
    app.connect("builder-inited", _teach_analyzer)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("build-finished", _check_build)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
