"""Drive test/browser.html in headless Chromium (Debian's, through Playwright) against test/server.py.

Usage: ``python test/browser.py http://127.0.0.1:PORT``. Exits 0 when every check passed, 77 when there
is no Chromium or Playwright here (the caller skips), 1 with the failed check otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

SKIP = 77
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def chromium_path() -> str | None:
    configured = os.environ.get("RTB_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


def post(base: str, path: str) -> Any:
    request = urllib.request.Request(base + path, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


class CheckFailed(Exception):
    """A check of the page's state failed."""


def check(condition: bool, message: object) -> None:
    if not condition:
        raise CheckFailed(str(message))


async def until(page: Any, expression: str, seconds: float = 10.0) -> None:
    await page.wait_for_function(expression, timeout=seconds * 1000)


async def main(base: str) -> None:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        sys.exit(SKIP)
    path = chromium_path()
    if path is None:
        sys.exit(SKIP)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=ARGS, headless=True)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))

            # Live events after the snapshot, then a server-side close (1012): resume, nothing lost.
            post(base, "/control/publish?room=b&n=3")
            await page.goto(f"{base}/pkg/test/browser.html?room=b&initial_delay=200")
            await until(page, "window.follower && window.follower.states.includes('connected')")
            post(base, "/control/publish?room=b&n=5")
            await until(page, "window.follower.items.length === 8")
            post(base, "/control/close?room=b&code=1012")
            post(base, "/control/publish?room=b&n=4")
            await until(page, "window.follower.items.length === 12")
            follower = await page.evaluate("window.follower")
            check(follower["items"] == list(range(1, 13)), follower)
            check(follower["applied"] == list(range(4, 13)), follower)
            check(follower["resyncs"] == ["initial"], follower)
            check(follower["disconnects"][0]["code"] == 1012, follower)

            # Back online: a client waiting out a long backoff (up to 10 minutes here) retries at once.
            slow = await browser.new_page()
            slow.on("pageerror", lambda error: errors.append(str(error)))
            await slow.goto(f"{base}/pkg/test/browser.html?room=c&initial_delay=600000")
            await until(slow, "window.follower && window.follower.states.includes('connected')")
            post(base, "/control/close?room=c&code=1012")
            await until(slow, "window.follower.client.state === 'waiting'")
            retry_in = await slow.evaluate("window.follower.disconnects[0].retryIn")
            started = time.monotonic()
            await slow.evaluate("window.dispatchEvent(new Event('online'))")
            await until(slow, "window.follower.client.state === 'connected'", seconds=5)
            took = time.monotonic() - started
            check(took < 3, f"reconnected {took:.1f} s after 'online' (backoff said {retry_in} ms)")

            # Back in view: the same for a page that becomes visible again.
            post(base, "/control/close?room=c&code=1012")
            await until(slow, "window.follower.client.state === 'waiting'")
            started = time.monotonic()
            await slow.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
            await until(slow, "window.follower.client.state === 'connected'", seconds=5)
            took_visible = time.monotonic() - started
            check(took_visible < 3, f"reconnected {took_visible:.1f} s after 'visibilitychange'")
            check(errors == [], errors)
            result = {
                "ok": True,
                "online_retry_s": round(took, 3),
                "visible_retry_s": round(took_visible, 3),
                "backoff_ms": retry_in,
            }
            sys.stdout.write(json.dumps(result) + "\n")
        finally:
            await browser.close()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1]))
    except CheckFailed as failure:
        sys.stderr.write(f"browser check failed: {failure}\n")
        sys.exit(1)
