"""A griffe extension for the API reference: read rtbroadcast's Sphinx-flavoured docstrings as Markdown.

The source keeps Sphinx habits that read well in an editor: ``:class:`Event``` roles, ``#:`` comments that
document attributes, and ``::`` before a literal block. Rendered as Markdown they would show the role names
and lose the comments, so this turns roles into code spans, ``#:`` comments into docstrings, and ``::`` into
``:``. Nothing in the source changes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj|const):`(~?)([^`]+)`")
_LITERAL_BLOCK = re.compile(r"::\n\n")


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1]}`" if match.group(1) else f"`{target}`"


def doc_comment(lines: list[str], lineno: int) -> str | None:
    """Return the ``#:`` comment block right above line ``lineno`` (1-based), or ``None``."""
    found: list[str] = []
    index = lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        found.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(found) or None


class SphinxToMarkdown(griffe.Extension):
    """Rewrite docstrings for Markdown rendering, and pick up ``#:`` attribute comments."""

    def __init__(self) -> None:
        self._files: dict[Path, list[str]] = {}

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None and obj.is_attribute and obj.lineno and obj.filepath:
            path = Path(str(obj.filepath))
            lines = self._files.get(path)
            if lines is None:
                lines = self._files[path] = path.read_text().splitlines()
            comment = doc_comment(lines, obj.lineno)
            if comment:
                obj.docstring = griffe.Docstring(comment, parent=obj)
        if obj.docstring is not None:
            value = _ROLE.sub(_role, obj.docstring.value)
            obj.docstring.value = _LITERAL_BLOCK.sub(":\n\n", value)
