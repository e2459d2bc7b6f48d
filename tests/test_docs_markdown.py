"""The Markdown itself, as a reader sees it on GitHub or in the site: install lines that work."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types; mkdocs depends on it

from rtbroadcast import Broadcaster

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("README.md")])
#: The commands that install Python packages, and what follows them on the line.
_INSTALL = re.compile(r"\b(?:pip3? install|uv add|uv pip install|poetry add|pipx install|pdm add)\b([^`\n]*)")


def _installed(line: str) -> list[str]:
    """Return the requirement tokens of each install command on ``line``, without their quotes."""
    commands = (match[1].split(" #")[0] for match in _INSTALL.finditer(line))  # a shell comment ends one
    return [token.strip("'\"") for command in commands for token in command.split()]


def bare_uvicorn_installs(text: str) -> list[str]:
    """Return the lines of ``text`` that install uvicorn without its ``[standard]`` extra."""
    found = []
    for line in text.splitlines():
        for requirement in _installed(line):
            name = re.split(r"[\[<>=!~;@ ]", requirement, maxsplit=1)[0].lower()
            if name == "uvicorn" and not requirement.lower().startswith("uvicorn[standard"):
                found.append(line.strip())
    return found


#: The extras that bring ``uvicorn[standard]`` along.
_SERVING_EXTRAS = {"testing", "example"}


def adapter_installs_without_a_server(text: str) -> list[str]:
    """Return the lines of ``text`` that install the Starlette adapter but no server to run it on."""
    found = []
    for line in text.splitlines():
        requirements = [requirement.lower() for requirement in _installed(line)]
        extras = {
            extra.strip()
            for requirement in requirements
            if requirement.startswith("rtbroadcast[")
            for extra in requirement.split("[", 1)[1].split("]", 1)[0].split(",")
        }
        serves = extras & _SERVING_EXTRAS or any(r.startswith("uvicorn[standard") for r in requirements)
        if "starlette" in extras and not serves:
            found.append(line.strip())
    return found


def test_the_check_finds_an_adapter_without_a_server() -> None:
    assert adapter_installs_without_a_server("pip install 'rtbroadcast[starlette]'") != []
    assert adapter_installs_without_a_server("pip install 'rtbroadcast[redis,starlette]' fastapi") != []
    assert adapter_installs_without_a_server("pip install 'rtbroadcast[starlette]' 'uvicorn[standard]'") == []
    assert adapter_installs_without_a_server("pip install 'rtbroadcast[starlette,testing]'") == []
    assert adapter_installs_without_a_server("pip install 'rtbroadcast[redis]'") == []


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_installing_the_adapter_installs_a_server_that_speaks_websocket(page: Path) -> None:
    """A reader who copies the line and then runs uvicorn would otherwise install plain uvicorn, or none."""
    assert adapter_installs_without_a_server(page.read_text()) == []


def test_the_check_finds_a_bare_uvicorn() -> None:
    assert bare_uvicorn_installs("pip install 'rtbroadcast[starlette]' uvicorn") != []
    assert bare_uvicorn_installs("tools first: `pip install pytest uvicorn>=0.29`.") != []
    assert bare_uvicorn_installs("uv add fastapi 'uvicorn'") != []
    assert bare_uvicorn_installs("pip install 'rtbroadcast[starlette]' 'uvicorn[standard]'") == []
    assert bare_uvicorn_installs("run uvicorn app:app after pip install rtbroadcast") == []
    assert bare_uvicorn_installs("pip install 'uvicorn[standard]'  # plain uvicorn has none") == []


def test_pages_are_found() -> None:
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/tutorial.md", "examples/restaurant_app/README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_install_lines_say_uvicorn_standard(page: Path) -> None:
    """Plain ``uvicorn`` has no WebSocket implementation: it answers a WebSocket handshake with a 404."""
    assert bare_uvicorn_installs(page.read_text()) == []


_PUBLISH_AFTER_COMMIT = re.compile(r"publish(?:ed|ing)?\W+(?:\w+\W+){0,3}after\W+(?:\w+\W+){0,3}commit", re.I)


def test_publish_after_commit_advice_warns_about_commit_order() -> None:
    """Publishing after the commit is not enough with several processes: seq order is not commit order."""
    advised = [page for page in PAGES if _PUBLISH_AFTER_COMMIT.search(page.read_text())]
    assert {page.name for page in advised} >= {"failures.md", "fastapi.md"}
    for page in advised:
        text = " ".join(page.read_text().split())
        assert "not commit order" in text, page
        assert "outbox" in text, page
        # Both transactional options: the outbox, and publishing inside the transaction on PostgreSQL.
        assert "postgresql.md" in text or page.name == "postgresql.md", page
        assert "is planned" not in text, page  # the PostgreSQL backend shipped


# -- the site ----------------------------------------------------------------------------------------


def _directive_options(page: str, target: str) -> dict[str, Any]:
    """Return the ``options:`` of the mkdocstrings directive ``::: target`` on ``page``."""
    block = re.search(rf"^::: {re.escape(target)}\n((?:    .*\n)*)", page, flags=re.M)
    assert block is not None, f"no ::: {target}"
    options: dict[str, Any] = (yaml.safe_load(textwrap.dedent(block[1])) or {}).get("options", {})
    return options


def _shown(names: list[str], filters: list[str]) -> list[str]:
    """Apply mkdocstrings' ``filters`` (regular expressions; ``!`` excludes) to member names."""

    def kept(name: str) -> bool:
        for pattern in filters:
            negative = pattern.startswith("!")
            found = re.search(pattern.removeprefix("!"), name) is not None
            if found == negative:
                return False
        return True

    return [name for name in names if kept(name)]


def test_the_api_page_hides_what_only_adapters_and_backends_call() -> None:
    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    names = [name for name in dir(Broadcaster) if not name.startswith("__")]
    shown = _shown(names, _directive_options(page, "rtbroadcast.Broadcaster")["filters"])
    internals = (
        "on_envelope",
        "on_interruption",
        "attach",
        "detach",
        "check_positions",
        "_lock",
        "on_presence",
    )
    for internal in (*internals, "presence_watch", "presence_join", "presence_leave"):
        assert internal not in shown
    assert {"publish", "subscribe", "stats", "drain", "connect", "disconnect", "presence"} <= set(shown)
    members = _directive_options(page, "rtbroadcast.Connection")["members"]
    assert "push" not in members and "set_gap_handler" not in members
    assert {"channel", "last_seq", "sent", "dropped"} <= set(members)


def test_the_site_requests_no_external_fonts() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["font"] is False  # Material otherwise loads Google Fonts from fonts.googleapis.com


def test_the_api_page_documents_every_starlette_helper() -> None:
    import rtbroadcast.starlette

    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    members = _directive_options(page, "rtbroadcast.starlette")["members"]
    assert sorted(members) == sorted(rtbroadcast.starlette.__all__)
