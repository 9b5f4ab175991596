"""Write the intersphinx inventories the documentation links through.

This machine and CI reach only the package index, not docs.python.org or
readthedocs.io, so the build cannot download ``objects.inv`` files.  This
script writes small ones instead: each lists exactly the external names the
docs refer to, with the page and anchor they have on the real site (each
checked against that site's sources).  Run it after adding a reference to
another project's name, and commit the ``.inv`` files:

    python docs/inventories/make_inventories.py

The format is Sphinx's inventory version 2: four comment lines, then
zlib-compressed lines of ``name domain:role priority uri display-name``,
where a ``uri`` ending in ``$`` stands for the URI followed by the name and
a display name ``-`` for the name itself.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# project -> (title, version, {name: (domain:role, page#anchor-or-$)})
INVENTORIES: dict[str, tuple[str, str, dict[str, tuple[str, str]]]] = {
    "python": (
        "Python",
        "3.11",
        {
            # built-in types and constants
            "bool": ("py:class", "library/functions.html#$"),
            "bytearray": ("py:class", "library/stdtypes.html#$"),
            "bytes": ("py:class", "library/stdtypes.html#$"),
            "float": ("py:class", "library/functions.html#$"),
            "int": ("py:class", "library/functions.html#$"),
            "memoryview": ("py:class", "library/stdtypes.html#$"),
            "str": ("py:class", "library/stdtypes.html#$"),
            "tuple": ("py:class", "library/stdtypes.html#$"),
            "None": ("py:data", "library/constants.html#$"),
            # exceptions and warnings
            "Exception": ("py:exception", "library/exceptions.html#$"),
            "OSError": ("py:exception", "library/exceptions.html#$"),
            "ProcessLookupError": ("py:exception", "library/exceptions.html#$"),
            "RuntimeError": ("py:exception", "library/exceptions.html#$"),
            "TypeError": ("py:exception", "library/exceptions.html#$"),
            "ValueError": ("py:exception", "library/exceptions.html#$"),
            "ExceptionGroup": ("py:exception", "library/exceptions.html#$"),
            # the standard library
            "collections.abc.AsyncIterable": (
                "py:class",
                "library/collections.abc.html#$",
            ),
            "collections.abc.AsyncIterator": (
                "py:class",
                "library/collections.abc.html#$",
            ),
            "collections.abc.Awaitable": ("py:class", "library/collections.abc.html#$"),
            "collections.abc.Callable": ("py:class", "library/collections.abc.html#$"),
            "collections.abc.Iterable": ("py:class", "library/collections.abc.html#$"),
            "collections.abc.Mapping": ("py:class", "library/collections.abc.html#$"),
            "collections.abc.Sequence": ("py:class", "library/collections.abc.html#$"),
            "contextlib.redirect_stderr": ("py:function", "library/contextlib.html#$"),
            "enum.Enum": ("py:class", "library/enum.html#$"),
            "enum.IntEnum": ("py:class", "library/enum.html#$"),
            "importlib.machinery.PathFinder.find_spec": (
                "py:method",
                "library/importlib.html#$",
            ),
            "os.PathLike": ("py:class", "library/os.html#$"),
            "socket": ("py:module", "library/socket.html#module-socket"),
            "socket.recv_fds": ("py:function", "library/socket.html#$"),
            "socket.send_fds": ("py:function", "library/socket.html#$"),
            "struct": ("py:module", "library/struct.html#module-struct"),
            "subprocess.Popen": ("py:class", "library/subprocess.html#$"),
            "subprocess.Popen.returncode": (
                "py:attribute",
                "library/subprocess.html#$",
            ),
            "sys.argv": ("py:data", "library/sys.html#$"),
            "sys.executable": ("py:data", "library/sys.html#$"),
            "sys.stderr": ("py:data", "library/sys.html#$"),
            "sys.stdout": ("py:data", "library/sys.html#$"),
        },
    ),
    "trio": (
        "Trio",
        "0.35",
        {
            "trio.Cancelled": ("py:exception", "reference-core.html#$"),
            "trio.TooSlowError": ("py:exception", "reference-core.html#$"),
            "trio.EndOfChannel": ("py:exception", "reference-core.html#$"),
            "trio.ClosedResourceError": ("py:exception", "reference-core.html#$"),
            "trio.BrokenResourceError": ("py:exception", "reference-core.html#$"),
            "trio.abc.Channel": ("py:class", "reference-io.html#$"),
            "trio.abc.HalfCloseableStream.send_eof": (
                "py:method",
                "reference-io.html#$",
            ),
            "trio.Process": ("py:class", "reference-io.html#$"),
            "trio.lowlevel.open_process": ("py:function", "reference-lowlevel.html#$"),
        },
    ),
    "attrs": (
        "attrs",
        "25.4",
        {
            "attrs.evolve": ("py:function", "api.html#$"),
        },
    ),
}


def inventory(project: str, version: str, entries: dict[str, tuple[str, str]]) -> bytes:
    """The bytes of one ``objects.inv`` (format version 2)."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(
        f"{name} {role} 1 {uri} -\n" for name, (role, uri) in sorted(entries.items())
    )
    return header.encode() + zlib.compress(body.encode(), 9)


def main() -> None:
    for name, (project, version, entries) in INVENTORIES.items():
        path = HERE / f"{name}.inv"
        path.write_bytes(inventory(project, version, entries))
        print(
            f"{path.relative_to(HERE.parent.parent)}: {len(entries)} names",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
