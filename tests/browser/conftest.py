"""Fixtures of the browser tests: headless Chromium (Debian's ``chromium``) driven by Playwright.

Playwright never downloads a browser here: it drives the system's Chromium through ``executable_path``
(``RTB_CHROMIUM``, else ``chromium`` on ``PATH``, else ``/usr/bin/chromium``). Without it the tests are
skipped, unless ``CI=true``: then they fail. The service runs on SQLite, with uvicorn on a loopback port.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from examples.restaurant_app.db import create_engine
from playwright.async_api import Browser, async_playwright
from sqlalchemy.ext.asyncio import AsyncEngine

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: (what, milliseconds in the browsers, milliseconds as the test saw them), reported at the end.
LATENCIES: list[tuple[str, float, float]] = []


def chromium_path() -> str | None:
    """Where the system's Chromium is, or ``None``."""
    configured = os.environ.get("RTB_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium; each test opens its own contexts (one per simulated device)."""
    path = chromium_path()
    if path is None:
        message = "Chromium is not installed (apt-get install chromium, or set RTB_CHROMIUM)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true requires it")
        pytest.skip(message)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A database engine on an empty SQLite file."""
    sqlite_engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'restaurant.db'}")
    yield sqlite_engine
    await sqlite_engine.dispose()


@pytest.fixture
def latencies(record_property: pytest.RecordProperty) -> Iterator[list[tuple[str, float, float]]]:
    """Where a test puts its click-to-change measurements (also recorded as JUnit properties)."""
    measured: list[tuple[str, float, float]] = []
    yield measured
    for what, in_browser, observed in measured:
        record_property(f"latency_ms[{what}]", f"{in_browser:.1f}")
        record_property(f"latency_observed_ms[{what}]", f"{observed:.1f}")
    LATENCIES.extend(measured)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LATENCIES:
        return
    terminalreporter.section("host stand: click on page A -> change shown on page B")
    terminalreporter.write_line(f"{'':<40} {'in the browsers':>16} {'seen by the test':>17}")
    for what, in_browser, observed in LATENCIES:
        terminalreporter.write_line(f"{what:<40} {in_browser:13.1f} ms {observed:14.1f} ms")
