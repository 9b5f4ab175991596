"""The API reference covers every public name; the docs build needs no network.

The reference page (docs/reference.rst) documents names section by section
and ends with ``.. trio-mojo-remaining-names::``, which documents every name
of ``trio_mojo.__all__`` the sections do not (so a name added later cannot
be forgotten).  ``nox -s docs`` checks after the build that every name is
in the objects inventory; these tests check the page itself and the local
intersphinx inventories.
"""

from __future__ import annotations

import importlib.util
import re
import runpy
import zlib
from collections import Counter
from pathlib import Path
from types import ModuleType

from _docs_support import DOCS, directives

import trio_mojo

REFERENCE = DOCS / "reference.rst"
_AUTO = {"autoclass", "autoexception", "autofunction", "autodata"}


def _documented_names() -> list[str]:
    return [
        d.argument.removeprefix("trio_mojo.").removesuffix("()")
        for _, d in directives(REFERENCE)
        if d.name in _AUTO
    ]


def test_every_name_in_the_reference_is_public_and_listed_once() -> None:
    names = _documented_names()
    assert not [name for name, n in Counter(names).items() if n > 1]
    assert set(names) <= set(trio_mojo.__all__), "a stale name in the reference"


def test_the_reference_ends_with_every_remaining_public_name() -> None:
    last = list(directives(REFERENCE))[-1][1]
    assert last.name == "trio-mojo-remaining-names"
    conf = runpy.run_path(str(DOCS / "conf.py"))
    assert "trio_mojo_docs" in conf["extensions"]
    extension = (DOCS / "_ext" / "trio_mojo_docs.py").read_text()
    assert '"trio-mojo-remaining-names", RemainingNames' in extension


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_inventories_are_what_the_script_writes() -> None:
    script = _load(DOCS / "inventories" / "make_inventories.py")
    for name, (project, version, entries) in script.INVENTORIES.items():
        committed = (DOCS / "inventories" / f"{name}.inv").read_bytes()
        assert committed == script.inventory(project, version, entries), name


def test_each_inventory_entry_is_a_real_page_and_anchor() -> None:
    script = _load(DOCS / "inventories" / "make_inventories.py")
    for _, _, entries in script.INVENTORIES.values():
        for name, (role, uri) in entries.items():
            assert re.fullmatch(
                r"py:(class|function|exception|method|attribute|data|module)", role
            )
            page, _, anchor = uri.partition("#")
            assert page.endswith(".html"), name
            assert anchor in ("$", f"module-{name}"), name


def test_intersphinx_reads_only_local_inventories() -> None:
    conf = runpy.run_path(str(DOCS / "conf.py"))
    mapping = conf["intersphinx_mapping"]
    assert set(mapping) == {"python", "trio", "attrs"}
    for url, inventory in mapping.values():
        assert url.startswith("https://")
        path = Path(inventory)
        assert path.is_file()
        assert path.is_relative_to(DOCS)
        header, _, body = path.read_bytes().partition(b"zlib.\n")
        assert header.startswith(b"# Sphinx inventory version 2")
        assert zlib.decompress(body)


def test_docstrings_that_restate_constants_still_match_them() -> None:
    """Docstrings name a few private constants by value, not by link."""
    from trio_mojo._core import _encoder
    from trio_mojo._sandbox._policy import (
        DEFAULT_MAX_ADDRESS_SPACE,
        DEFAULT_MAX_DATA,
        DEFAULT_MAX_PROCESSES,
        LAYERS,
        PID_MAX_LIMIT,
        WORKER_ID_BASE,
    )
    from trio_mojo._workers._worker import ENV_ALLOWLIST

    worker_doc = trio_mojo.open_worker.__doc__ or ""
    assert all(f"``{name}``" in worker_doc for name in ENV_ALLOWLIST)
    level_doc = trio_mojo.SandboxPolicy.level.__doc__ or ""
    assert re.findall(r'``"(\w+)"``', level_doc) == list(LAYERS)
    policy_doc = " ".join((trio_mojo.SandboxPolicy.__doc__ or "").split())
    assert DEFAULT_MAX_DATA == 8 << 30
    assert "``max_data`` defaults to 8 GiB" in policy_doc
    assert DEFAULT_MAX_ADDRESS_SPACE == 16 << 30
    assert "``max_address_space`` to 16 GiB" in policy_doc
    assert DEFAULT_MAX_PROCESSES == 64
    assert "``RLIMIT_NPROC`` (default 64)" in policy_doc
    assert WORKER_ID_BASE == 1879048192
    assert PID_MAX_LIMIT == 4194304
    assert "(default 1879048192," in policy_doc
    assert "the range holds 4194304 ids" in policy_doc
    append_doc = trio_mojo.OutgoingMessage.append.__doc__ or ""
    assert _encoder.INLINE_PAYLOAD == 1024
    assert "1 KiB" in append_doc
    assert _encoder.MAX_BATCH_BYTES == 256 * 1024
    assert "256 KiB" in append_doc
    assert _encoder.MAX_BATCH_PARTS == 64
    assert "64 parts" in append_doc
