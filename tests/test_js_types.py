"""The TypeScript types of the example service's events, committed in ``clients/js/examples``, are what
the JS client's generator (``clients/js/scripts/asyncapi-to-ts.mjs``) makes of the service's current
AsyncAPI document: a change to an event model without regenerating them fails here (and so in ``.ci/run``).

The generator has no dependencies, so this runs on a bare ``node`` before any ``npm ci``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "clients/js/scripts/asyncapi-to-ts.mjs"
COMMITTED = ROOT / "clients/js/examples/restaurant-events.ts"
#: The command a developer runs to regenerate the file (also printed when it drifted).
REGENERATE = (
    "python -m rtbroadcast schema examples.restaurant_app.asyncapi:document"
    " | node clients/js/scripts/asyncapi-to-ts.mjs - --out clients/js/examples/restaurant-events.ts"
)


@pytest.fixture
def node() -> str:
    """The ``node`` executable; missing, the test is skipped (and fails under ``CI=true``)."""
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true needs node on PATH for the JS client's type check")
        pytest.skip("node is not installed")
    return found


def service_document() -> str:
    """The example service's AsyncAPI document, as ``rtbroadcast schema`` prints it."""
    result = subprocess.run(
        [sys.executable, "-m", "rtbroadcast", "schema", "examples.restaurant_app.asyncapi:document"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def generate(node: str, document: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(GENERATOR), "-", *args], input=document, capture_output=True, text=True, timeout=60
    )


def test_committed_types_match_the_service_schema(node: str) -> None:
    result = generate(node, service_document())
    assert result.returncode == 0, result.stderr
    assert result.stdout == COMMITTED.read_text(encoding="utf-8"), (
        f"{COMMITTED.relative_to(ROOT)} drifted from the service's schema; regenerate it:\n  {REGENERATE}"
    )
    for name in ("GuestCreated", "GuestUpdatedData", "ServiceEvent", "ServiceEventMap"):
        assert f"export interface {name} " in result.stdout or f"export type {name} =" in result.stdout


def test_check_mode_fails_on_a_changed_schema(node: str, tmp_path: Path) -> None:
    # What the test above guards against, shown on the generator's own --check: a field added to an
    # event changes the output, so the committed copy no longer passes.
    document = service_document()
    committed = str(COMMITTED)
    assert generate(node, document, "--check", committed).returncode == 0
    changed = document.replace('"guest_id": {', '"party_note": {"type": "string"}, "guest_id": {', 1)
    assert changed != document
    result = generate(node, changed, "--check", committed)
    assert result.returncode == 1
    assert "is not what the schema generates" in result.stderr
