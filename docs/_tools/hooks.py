"""MkDocs hooks: tables generated from the code, so that the protocol reference cannot drift from it.

A page writes a marker such as ``<!-- rtbroadcast:error-codes -->`` on a line of its own; the build
replaces it with a table built from the code (here the ``#:`` comments above each member of
:class:`rtbroadcast.ResyncReason`, say). A table that must also read right as source, on GitHub, sits
between a marker and its closing ``<!-- /rtbroadcast:... -->``: the build refreshes it from the code, a
test checks that the page already holds what the code says, and ``python docs/_tools/hooks.py`` rewrites
the pages. The build also adds the AsyncAPI documents of the tutorial's app and of the example service.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rtbroadcast import CloseCode, ProtocolError, ResyncReason
from rtbroadcast.protocol import ObservedCloseCode, SubscriptionErrorCode

SNIPPETS = Path(__file__).parent.parent / "snippets"
ROOT = Path(__file__).parent.parent.parent
_ASSIGNMENT = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=\s*(.+?)\s*$")


def commented_members(cls: type) -> list[tuple[str, str]]:
    """Return ``(NAME, comment)`` for each upper-case class attribute, with the ``#:`` comment above it."""
    members: list[tuple[str, str]] = []
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            comment.append(stripped[2:].strip())
            continue
        match = _ASSIGNMENT.match(line)
        if match:
            members.append((match.group(1), " ".join(comment)))
        comment = []
    return members


def _cell(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def close_codes_table() -> str:
    """Return the Markdown table of every close code a client can see, from rtbroadcast or not, by code."""
    rows = ["| Code | Name | Meaning, and what the client does |", "| ---: | --- | --- |"]
    codes = [(int(CloseCode[name]), f"`{name}`", comment) for name, comment in commented_members(CloseCode)]
    codes += [
        (int(ObservedCloseCode[name]), f"`{name}` (not from rtbroadcast)", comment)
        for name, comment in commented_members(ObservedCloseCode)
    ]
    for code, name, comment in sorted(codes):
        rows.append(f"| `{code}` | {name} | {_cell(comment)} |")
    return "\n".join(rows)


def resync_reasons_table() -> str:
    """Return the Markdown table of every ``resync_required`` reason."""
    rows = ["| `reason` | Meaning |", "| --- | --- |"]
    for name, comment in commented_members(ResyncReason):
        rows.append(f"| `{getattr(ResyncReason, name)}` | {_cell(comment)} |")
    return "\n".join(rows)


def error_codes_table() -> str:
    """Return the Markdown table of every ``error`` frame code."""
    rows = ["| `code` | Meaning |", "| --- | --- |"]
    pending: list[type[ProtocolError]] = list(ProtocolError.__subclasses__())
    while pending:
        cls = pending.pop(0)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        rows.append(f"| `{cls.code}` | {_cell(doc)} |")
        pending.extend(cls.__subclasses__())
    return "\n".join(rows)


def subscription_error_codes_table() -> str:
    """Return the Markdown table of protocol 2's ``error`` codes about one subscription."""
    rows = ["| `code` | Meaning |", "| --- | --- |"]
    for name, comment in commented_members(SubscriptionErrorCode):
        rows.append(f"| `{getattr(SubscriptionErrorCode, name)}` | {_cell(comment)} |")
    return "\n".join(rows)


MARKERS: dict[str, Callable[[], str]] = {
    "<!-- rtbroadcast:close-codes -->": close_codes_table,
    "<!-- rtbroadcast:resync-reasons -->": resync_reasons_table,
    "<!-- rtbroadcast:error-codes -->": error_codes_table,
    "<!-- rtbroadcast:subscription-error-codes -->": subscription_error_codes_table,
}


#: Tables kept in the Markdown between ``<!-- rtbroadcast:NAME -->`` and ``<!-- /rtbroadcast:NAME -->``.
KEPT = ("close-codes", "error-codes", "resync-reasons", "subscription-error-codes")
PAGES_WITH_KEPT_TABLES = (
    ROOT / "docs" / "reference" / "protocol.md",
    ROOT / "docs" / "concepts" / "resume.md",
)


def _kept(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- rtbroadcast:{name} -->\n)(.*?)(<!-- /rtbroadcast:{name} -->)", re.S)


def _between(table: str) -> str:
    return "\n" + table + "\n\n"


def refresh(markdown: str) -> str:
    """Put the current table between each pair of kept-table markers in ``markdown``."""
    for name in KEPT:
        table = _between(MARKERS[f"<!-- rtbroadcast:{name} -->"]())
        markdown = _kept(name).sub(lambda match, table=table: match[1] + table + match[3], markdown)
    return markdown


def expand(markdown: str) -> str:
    """Refresh every kept table in ``markdown`` and replace every bare marker with its generated table."""
    markdown = refresh(markdown)
    for marker, build in MARKERS.items():
        closing = marker.replace("rtbroadcast:", "/rtbroadcast:")
        if marker in markdown and closing not in markdown:
            markdown = markdown.replace(marker, build())
    return markdown


def load_snippet(name: str) -> Any:
    """Import ``docs/snippets/<name>.py`` once, as module ``name`` (its events register once)."""
    if name in sys.modules:
        return sys.modules[name]
    for folder in (ROOT, SNIPPETS):  # snippets import each other, and the example service, as a reader would
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, SNIPPETS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return expand(markdown)


#: Generated files of the site: path -> the snippet whose ``document()`` they hold.
GENERATED = {"asyncapi/tutorial.json": "asyncapi_export", "asyncapi/restaurant.json": "restaurant_asyncapi"}


def generated(path: str) -> str:
    """Return the content of a generated file of the site."""
    return json.dumps(load_snippet(GENERATED[path]).document(), indent=2, ensure_ascii=False) + "\n"


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    for path in GENERATED:
        files.append(File.generated(config, path, content=generated(path)))
    return files


if __name__ == "__main__":  # python docs/_tools/hooks.py: rewrite the kept tables from the code
    for page in PAGES_WITH_KEPT_TABLES:
        text = page.read_text()
        if refresh(text) != text:
            page.write_text(refresh(text))
            sys.stdout.write(f"updated {page.relative_to(ROOT)}\n")
