"""Reading README.md and docs/ as the tests need: code blocks and tables.

A *snippet* is a Python code block: a fenced ``python`` block in the README,
a ``.. code-block:: python`` or a ``.. literalinclude::`` of a ``.py`` file in
the reST pages.  A snippet is a complete program unless the comment line
right above it says otherwise::

    .. part-of: tutorial/project/step1_fds.py (its worker imports this)
    .. literalinclude:: tutorial/project/src/wordcount/workers.py
       :pyobject: count_fds

The output a program prints may follow it: in reST a ``.. code-block:: text``
with ``:caption: Output``, in the README a fenced ``text`` block right after
the program.  ``...`` in it matches anything (doctest's ELLIPSIS).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"

PART_OF = re.compile(r"^\s*\.\. part-of: (\S+)")
_DIRECTIVE = re.compile(r"^(\s*)\.\. ([\w-]+):: ?(.*)$")
_OPTION = re.compile(r"^\s*:([\w-]+):\s*(.*)$")
_FENCE = re.compile(r"^```(\w*)\s*$")


@attrs.frozen
class Directive:
    """One reST directive: its name, argument, options and content."""

    where: str
    name: str
    argument: str
    options: dict[str, str]
    content: str
    end: int
    """Index of the first line after the directive."""


@attrs.frozen
class Snippet:
    """A Python code block shown in the documentation."""

    where: str
    """``file:line`` of the block, for messages."""
    code: str | None
    """The code of an inline block (None for an included file)."""
    path: Path | None
    """The included file (None for an inline block)."""
    part_of: str | None
    """The program this block is a fragment of, as the marker names it."""
    output: str | None
    """The output the documentation shows for this program, if any."""


def rst_pages() -> list[Path]:
    """Every reST page under docs/."""
    return sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def parse_directive(path: Path, lines: list[str], index: int) -> Directive | None:
    """The directive that starts at ``lines[index]``, if one does."""
    match = _DIRECTIVE.match(lines[index])
    if match is None:
        return None
    indent = len(match.group(1))
    options: dict[str, str] = {}
    body: list[str] = []
    i = index + 1
    while i < len(lines) and (option := _OPTION.match(lines[i])):
        if _indent(lines[i]) <= indent:
            break
        options[option.group(1)] = option.group(2)
        i += 1
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        body.append(lines[i])
        i += 1
    content = textwrap.dedent("\n".join(body)).strip("\n")
    return Directive(
        where=f"{path.relative_to(ROOT)}:{index + 1}",
        name=match.group(2),
        argument=match.group(3).strip(),
        options=options,
        content=content + "\n" if content else "",
        end=i,
    )


def directives(path: Path) -> Iterator[tuple[int, Directive]]:
    """Every directive of a reST page, with the index of its first line."""
    lines = path.read_text().splitlines()
    for index in range(len(lines)):
        directive = parse_directive(path, lines, index)
        if directive is not None:
            yield index, directive


def _is_python(directive: Directive) -> bool:
    if directive.name in ("code-block", "code", "sourcecode"):
        return directive.argument == "python"
    if directive.name == "literalinclude":
        language = directive.options.get("language", "")
        return language == "python" or (
            not language and directive.argument.endswith(".py")
        )
    return False


def _output_after(path: Path, lines: list[str], index: int) -> str | None:
    """The ``Output`` block that follows a program ending at ``lines[index]``."""
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index == len(lines):
        return None
    directive = parse_directive(path, lines, index)
    if (
        directive is not None
        and directive.name == "code-block"
        and directive.argument == "text"
        and directive.options.get("caption") == "Output"
    ):
        return directive.content
    return None


def rst_snippets(path: Path) -> list[Snippet]:
    """The Python snippets of one reST page."""
    lines = path.read_text().splitlines()
    found = []
    for index, directive in directives(path):
        if not _is_python(directive):
            continue
        marker = PART_OF.match(lines[index - 1]) if index else None
        included = directive.name == "literalinclude"
        found.append(
            Snippet(
                where=directive.where,
                code=None if included else directive.content,
                path=(path.parent / directive.argument).resolve() if included else None,
                part_of=marker.group(1) if marker else None,
                output=_output_after(path, lines, directive.end),
            )
        )
    return found


def markdown_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line, language, text)`` of each fenced block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        start = index
        index += 1
        body = []
        while not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        blocks.append((start + 1, match.group(1), "\n".join(body) + "\n"))
        index += 1
    return blocks


def markdown_snippets(path: Path) -> list[Snippet]:
    """The Python blocks of a Markdown file, each with the text block after it."""
    text = path.read_text().splitlines()
    blocks = markdown_blocks(path)
    found = []
    for position, (line, language, body) in enumerate(blocks):
        if language != "python":
            continue
        output = None
        if position + 1 < len(blocks):
            next_line, next_language, next_body = blocks[position + 1]
            end = line + body.count("\n") + 1  # the closing fence's index
            between = text[end : next_line - 1]
            if next_language == "text" and not any(s.strip() for s in between):
                output = next_body
        found.append(
            Snippet(
                where=f"{path.relative_to(ROOT)}:{line}",
                code=body,
                path=None,
                part_of=None,
                output=output,
            )
        )
    return found


def all_snippets() -> list[Snippet]:
    """Every Python snippet of the README and the documentation."""
    found = markdown_snippets(README)
    for page in rst_pages():
        found += rst_snippets(page)
    return found


def simple_table(path: Path, name: str) -> list[list[str]]:
    """The rows (header first) of the simple table named ``name`` on a page.

    The table is a ``.. table::`` directive with ``:name:``; a row whose
    first cell is empty continues the cells of the row above.
    """
    for _, directive in directives(path):
        if directive.name == "table" and directive.options.get("name") == name:
            break
    else:
        raise LookupError(f"no table named {name!r} in {path}")
    rule, *rest = directive.content.splitlines()
    starts = [
        i for i, char in enumerate(rule) if char == "=" and rule[i - 1 : i] != "="
    ]
    ends = [*starts[1:], None]
    rows: list[list[str]] = []
    for line in rest:
        if not line.strip() or set(line.strip()) <= {"=", " "}:
            continue
        cells = [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]
        if not cells[0] and rows:
            rows[-1] = [
                f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)
            ]
        else:
            rows.append(cells)
    return rows
