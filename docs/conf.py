"""Sphinx configuration for the trio_mojo documentation.

Built by ``nox -s docs`` (``sphinx-build -W -n --keep-going``): every warning
is an error and every cross-reference must resolve.  The intersphinx
inventories are local files (``docs/inventories/``, written by
``make_inventories.py`` there), so the build never touches the network.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio_mojo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "trio-mojo"
author = "the trio_mojo developers"
copyright = "2025, the trio_mojo developers"  # noqa: A001 - Sphinx's name
release = trio_mojo.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
    "myst_parser",
    "trio_mojo_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "tutorial/project", "**/README.md"]
templates_path: list[str] = []

nitpicky = True
default_role = "py:obj"
primary_domain = "py"

# ---------------------------------------------------------------- autodoc
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# ---------------------------------------------------------------- intersphinx
# (base URL of the real site, local inventory): see inventories/make_inventories.py.
# Private helper types that appear in public signatures: shown, not linked.
nitpick_ignore = [("py:class", "trio_mojo._handles._HasFileno")]

intersphinx_mapping = {
    name: (url, str(HERE / "inventories" / f"{name}.inv"))
    for name, url in {
        "python": "https://docs.python.org/3",
        "trio": "https://trio.readthedocs.io/en/stable",
        "attrs": "https://www.attrs.org/en/stable",
    }.items()
}
intersphinx_timeout = 1

# ---------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"trio-mojo {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
myst_heading_anchors = 2
