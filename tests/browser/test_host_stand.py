"""The host-stand page in real headless Chromium, against the real service on a loopback port.

Each simulated device is its own browser context (no shared cookies, cache or storage). Timings are from
just before the click on page A until page B shows the change, measured by the test (so they include
Playwright's own round trips): an upper bound of what a person would see.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import httpx
import pytest
from examples.restaurant_app import Settings, create_app
from examples.restaurant_app.app import DEMO_RESTAURANT_ID
from examples.restaurant_app.auth import mint_token
from examples.restaurant_app.db import create_engine
from playwright.async_api import Browser, Locator, Page
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rtbroadcast import Broadcaster
from tests.example.conftest import _postgres_url
from tests.support import MS, serve

pytestmark = [pytest.mark.asyncio_only, pytest.mark.slow]

RID = DEMO_RESTAURANT_ID
#: A loose bound on click-to-change: the point is the report, not a benchmark on a shared machine.
LATENCY_BOUND_S = 2.0
#: Playwright's waits, in its milliseconds: 5 s of the suite's time (``tests.support.MS``).
WAIT_MS = 5_000 * MS * 1_000
#: Set to a path (docs/images/host-stand.png) to write the screenshot there as well.
SCREENSHOT_ENV = "HOST_STAND_SCREENSHOT"
#: The services run with device tokens, as in production; the pages get theirs in the URL.
SECRET = "host-stand-browser-tests-" + "s" * 32


def settings(**changes: Any) -> Settings:
    """The service's settings for these tests: a token secret, and ``changes``."""
    return Settings(token_secret=SECRET, **changes)


def token(restaurant_id: str = RID, **options: Any) -> str:
    """A device token for ``restaurant_id`` (``mint_token`` options: ``ttl``, ``now``, ``device_id``)."""
    return mint_token(SECRET, restaurant_id, **options)


class Device:
    """One page of the host stand in its own browser context; collects the page's uncaught errors."""

    def __init__(self, page: Page, name: str) -> None:
        self.page = page
        self.name = name
        self.errors: list[str] = []
        self.console: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))

    def guest_row(self, name: str) -> Locator:
        return self.page.locator("tr[data-guest-id]", has_text=name)

    def table_card(self, name: str) -> Locator:
        return self.page.locator("#tables li[data-table-id]").filter(
            has=self.page.locator(".table-name", has_text=name)
        )

    async def wait_live(self) -> None:
        await self.page.locator('#connection[data-state="live"]').wait_for(timeout=WAIT_MS)

    async def stats(self) -> dict[str, int]:
        stats: dict[str, int] = await self.page.evaluate("() => ({...window.hostStand.stats})")
        return stats

    async def add_walk_in(self, name: str, party_size: int) -> None:
        await self.page.fill("#walk-in-name", name)
        await self.page.fill("#walk-in-size", str(party_size))
        await self.page.click("#walk-in-add")

    async def seat(self, guest: str, table_label: str) -> None:
        row = self.guest_row(guest)
        await row.locator("select.seat-table").select_option(label=table_label)
        await row.locator("button.seat-button").click()

    def check_no_errors(self) -> None:
        assert not self.errors, f"uncaught errors on {self.name}: {self.errors}\nconsole: {self.console}"


@contextlib.asynccontextmanager
async def open_device(
    browser: Browser,
    address: str,
    name: str,
    query: dict[str, str] | None = None,
    *,
    live: bool = True,
    listen: Callable[[Page], None] | None = None,
) -> AsyncIterator[Device]:
    """Open the host stand in a new browser context; by default for ``RID`` with a valid token, and live."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        page = await context.new_page()
        device = Device(page, name)
        if listen is not None:
            listen(page)
        if query is None:
            query = {"restaurant_id": RID, "token": token(device_id=f"stand-{name}")}
        await page.goto(f"http://{address}/host-stand/?{urlencode(query)}")
        if live:
            await device.wait_live()
        yield device
        device.check_no_errors()
    finally:
        await context.close()


async def same_position(a: Device, b: Device) -> None:
    """Wait until both pages have applied the same last event (each applies it on its own schedule)."""
    seq_b = await b.page.evaluate("() => window.hostStand.model.lastSeq")
    await a.page.wait_for_function(
        "(seq) => window.hostStand.model.lastSeq === seq", arg=seq_b, timeout=WAIT_MS
    )
    assert await b.page.evaluate("() => window.hostStand.model.lastSeq") == seq_b
    # Nothing newer is pending on A either: both pages end on the same event.
    assert await a.page.evaluate("() => window.hostStand.link.queue.length") == 0


# Page A: the time of the next click or change (capture phase: before the page's own handlers run).
ARM_CLICK = """() => {
    window.__actedAt = null;
    const mark = () => { window.__actedAt ??= performance.timeOrigin + performance.now(); };
    document.addEventListener("click", mark, { capture: true, once: true });
    document.addEventListener("change", mark, { capture: true, once: true });
}"""
# Page B: the time the DOM first shows an element matching the selector that contains every text.
ARM_CHANGE = """([selector, texts]) => {
    window.__shownAt = null;
    const shown = () => [...document.querySelectorAll(selector)].some(
        (node) => texts.every((text) => node.textContent.includes(text)));
    const observer = new MutationObserver(() => {
        if (shown()) {
            window.__shownAt = performance.timeOrigin + performance.now();
            observer.disconnect();
        }
    });
    observer.observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true });
}"""


async def timed(
    latencies: list[tuple[str, float, float]],
    what: str,
    a: Device,
    action: Callable[[], Awaitable[object]],
    b: Device,
    selector: str,
    *texts: str,
) -> float:
    """Do ``action`` on page A and wait until page B shows the change; record and return milliseconds.

    Measured in the browser: from the click (or select change) event on A to the mutation that made B's
    DOM show it, both on the machine's clock (``performance.timeOrigin + performance.now()``). The test's
    own view, which adds Playwright's polling, is checked against the loose bound too.
    """
    assert not await b.page.evaluate(
        "([s, t]) => [...document.querySelectorAll(s)].some((n) => t.every((x) => n.textContent.includes(x)))",
        [selector, list(texts)],
    ), f"{what}: page B shows the change already"
    await b.page.evaluate(ARM_CHANGE, [selector, list(texts)])
    await a.page.evaluate(ARM_CLICK)
    started = time.perf_counter()
    await action()
    await b.page.wait_for_function("() => window.__shownAt !== null", timeout=WAIT_MS)
    observed = time.perf_counter() - started
    acted_at = await a.page.evaluate("() => window.__actedAt")
    shown_at = await b.page.evaluate("() => window.__shownAt")
    assert acted_at is not None, f"{what}: no click or change event on page A"
    milliseconds = float(shown_at - acted_at)
    latencies.append((what, milliseconds, observed * 1000))
    assert 0 < milliseconds < LATENCY_BOUND_S * 1000, f"{what}: {milliseconds:.1f} ms from A's click to B"
    assert observed < LATENCY_BOUND_S, f"{what}: {observed:.3f} s as the test saw it"
    return milliseconds


async def test_an_action_on_a_shows_on_b(
    browser: Browser, engine: AsyncEngine, latencies: list[tuple[str, float, float]]
) -> None:
    app = create_app(settings(demo=True), engine=engine)
    async with (
        serve(app) as address,
        open_device(browser, address, "A") as a,
        open_device(browser, address, "B") as b,
    ):
        await b.table_card("T6").wait_for(timeout=WAIT_MS)  # the demo's six tables, from the snapshot
        assert await b.page.locator("#tables li").count() == 6

        # Add a walk-in on A: it joins B's waitlist.
        await a.page.fill("#walk-in-name", "Ada Lovelace")
        await a.page.fill("#walk-in-size", "3")
        await timed(
            latencies,
            "add walk-in (guest_created)",
            a,
            lambda: a.page.click("#walk-in-add"),
            b,
            '#waitlist tr[data-status="waiting"]',
            "Ada Lovelace",
        )
        assert await b.guest_row("Ada Lovelace").locator("td.party").inner_text() == "3"

        # Change her status on A.
        await timed(
            latencies,
            "change status (guest_updated)",
            a,
            lambda: a.guest_row("Ada Lovelace").locator("select.status-select").select_option("notified"),
            b,
            '#waitlist tr[data-status="notified"]',
            "Ada Lovelace",
        )

        # Seat her at T3 through the atomic endpoint: B reloads both entities and shows the table taken.
        row_a = a.guest_row("Ada Lovelace")
        await row_a.locator("select.seat-table").select_option(label="T3 (4)")
        await timed(
            latencies,
            "seat at table (atomic transaction)",
            a,
            lambda: row_a.locator("button.seat-button").click(),
            b,
            '#tables li[data-status="occupied"]',
            "T3",
            "Ada Lovelace",
        )
        seated = b.page.locator('#done tr[data-status="seated"]', has_text="Ada Lovelace")
        await seated.wait_for(timeout=WAIT_MS)
        assert await seated.locator("td.table").inner_text() == "T3"
        assert await b.guest_row("Ada Lovelace").count() == 1
        # Both pages are at the same position, and B got there on its first snapshot and connection.
        await same_position(a, b)
        stats = await b.stats()
        assert stats["snapshots"] == 1 and stats["connects"] == 1 and stats["resyncs"] == 0, stats


async def test_b_reconnects_after_its_server_restarts_and_catches_up(
    browser: Browser, engine: AsyncEngine
) -> None:
    # Two servers on one database and one broadcaster, as two processes would share Redis: the memory
    # backend's history lives in the Broadcaster object, so it outlives server B's restart. Server A's
    # lifespan connects the broadcaster and creates the schema; server B runs without a lifespan.
    broadcaster = Broadcaster("memory://")
    await restart_scenario(
        browser,
        create_app(settings(demo=True), engine=engine, broadcaster=broadcaster),
        lambda: create_app(settings(), engine=engine, broadcaster=broadcaster),
        lifespan="off",
    )


@pytest.mark.redis
async def test_on_redis_b_reconnects_after_its_server_restarts_and_catches_up(
    browser: Browser, engine: AsyncEngine, redis_url: str, redis_prefix: str
) -> None:
    # The same on Redis, where nothing is shared in memory: each server has its own broadcaster (and its
    # outbox relay), and server B's is disconnected with it and built anew on restart. The history B
    # resumes from is the one in Redis.
    separator = "&" if "?" in redis_url else "?"
    broadcast_url = f"{redis_url}{separator}key_prefix={redis_prefix}"
    await restart_scenario(
        browser,
        create_app(settings(demo=True, broadcast_url=broadcast_url), engine=engine),
        lambda: create_app(settings(broadcast_url=broadcast_url), engine=engine),
    )


@pytest.fixture
async def pg_broadcast() -> AsyncIterator[tuple[AsyncEngine, str]]:
    """The service's database on PostgreSQL (a fresh schema) and a ``postgresql://`` broadcast URL on it.

    The configuration with no Redis and no outbox: every write publishes inside its own transaction.
    """
    url, why = await _postgres_url()
    if url is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is not reachable ({why}); CI=true requires it")
        pytest.skip(f"PostgreSQL is not reachable ({why})")
    schema = f"rtb_browser_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    async with admin.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_engine(url, connect_args={"server_settings": {"search_path": schema}})
    try:
        yield engine, f"{url.replace('postgresql+asyncpg://', 'postgresql://')}?schema={schema}"
    finally:
        await engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@pytest.mark.postgresql
async def test_on_postgresql_b_reconnects_after_its_server_restarts_and_catches_up(
    browser: Browser, pg_broadcast: tuple[AsyncEngine, str]
) -> None:
    # The PostgreSQL backend, no Redis: each server has its own broadcaster, and the history page B
    # resumes from is in the database, written in the same transactions as the guests and tables.
    engine, broadcast_url = pg_broadcast
    await restart_scenario(
        browser,
        create_app(settings(demo=True, broadcast_url=broadcast_url), engine=engine),
        lambda: create_app(settings(broadcast_url=broadcast_url), engine=engine),
    )


async def restart_scenario(
    browser: Browser, app_a: Any, make_app_b: Callable[[], Any], **serve_b: Any
) -> None:
    """Page A on server A, page B on server B; stop B, change things on A, restart B on the same port."""
    async with serve(app_a) as address_a, contextlib.AsyncExitStack() as server_b:
        address_b = await server_b.enter_async_context(serve(make_app_b(), **serve_b))
        port_b = int(address_b.rsplit(":", 1)[1])
        async with open_device(browser, address_a, "A") as a, open_device(browser, address_b, "B") as b:
            await a.add_walk_in("Grace Hopper", 2)
            await b.guest_row("Grace Hopper").wait_for(timeout=WAIT_MS)

            # Stop server B: page B notices and keeps trying.
            await server_b.aclose()
            await b.page.locator('#connection[data-state="reconnecting"]').wait_for(timeout=WAIT_MS)

            # Changes on A while B is away: a walk-in seated at T2, and Grace notified.
            await a.add_walk_in("Alan Turing", 4)
            await a.guest_row("Alan Turing").wait_for(timeout=WAIT_MS)
            await a.seat("Alan Turing", "T2 (2)")
            await a.guest_row("Grace Hopper").locator("select.status-select").select_option("notified")
            await a.page.locator('#done tr[data-status="seated"]', has_text="Alan Turing").wait_for(
                timeout=WAIT_MS
            )
            await a.page.locator('#waitlist tr[data-status="notified"]', has_text="Grace Hopper").wait_for(
                timeout=WAIT_MS
            )
            assert await b.guest_row("Alan Turing").count() == 0
            assert await b.page.locator("#connection").get_attribute("data-state") == "reconnecting"

            # Server B comes back on the same port: page B reconnects by itself and resumes.
            async with serve(make_app_b(), port=port_b, **serve_b):
                await b.page.locator('#done tr[data-status="seated"]', has_text="Alan Turing").wait_for(
                    timeout=3 * WAIT_MS  # the page's backoff decides when it tries again
                )
                await b.wait_live()
                await (
                    b.table_card("T2")
                    .and_(b.page.locator('[data-status="occupied"]', has_text="Alan Turing"))
                    .wait_for(timeout=WAIT_MS)
                )
                await b.page.locator(
                    '#waitlist tr[data-status="notified"]', has_text="Grace Hopper"
                ).wait_for(timeout=WAIT_MS)
                stats = await b.stats()
                # Caught up by resuming from its last seq: no second snapshot, no resync.
                assert stats["snapshots"] == 1 and stats["resyncs"] == 0, stats
                assert stats["resumed"] >= 1 and stats["connects"] >= 2, stats
                await same_position(a, b)


async def test_b_reloads_its_snapshot_when_the_history_is_gone(browser: Browser, engine: AsyncEngine) -> None:
    # Server B comes back with a new broadcaster (a new memory backend: a new epoch, no history), as a
    # single-process deployment does after a restart. Page B cannot resume: it gets resync_required,
    # reloads its snapshot, and follows the new stream from there.
    # Without the outbox: each process's relay publishes any pending row to its own broadcaster, and with
    # two broadcasters on one database (something only this test builds) B's writes could reach A's.
    shared = Broadcaster("memory://")
    async with (
        serve(create_app(settings(demo=True, outbox=False), engine=engine, broadcaster=shared)) as address_a,
        contextlib.AsyncExitStack() as server_b,
    ):
        address_b = await server_b.enter_async_context(
            serve(create_app(settings(outbox=False), engine=engine, broadcaster=shared), lifespan="off")
        )
        port_b = int(address_b.rsplit(":", 1)[1])
        async with open_device(browser, address_a, "A") as a, open_device(browser, address_b, "B") as b:
            await server_b.aclose()
            await b.page.locator('#connection[data-state="reconnecting"]').wait_for(timeout=WAIT_MS)

            await a.add_walk_in("Katherine Johnson", 5)
            await a.guest_row("Katherine Johnson").wait_for(timeout=WAIT_MS)
            await a.seat("Katherine Johnson", "T5 (6)")
            await a.page.locator('#done tr[data-status="seated"]', has_text="Katherine Johnson").wait_for(
                timeout=WAIT_MS
            )

            fresh = create_app(settings(outbox=False), engine=engine, broadcaster=Broadcaster("memory://"))
            async with serve(fresh, port=port_b):
                await b.page.locator('#done tr[data-status="seated"]', has_text="Katherine Johnson").wait_for(
                    timeout=3 * WAIT_MS
                )
                await b.wait_live()
                stats = await b.stats()
                assert stats["resyncs"] == 1 and stats["snapshots"] == 2, stats
                # Live again, on the new stream: B's own walk-in arrives through its WebSocket.
                await b.add_walk_in("Dorothy Vaughan", 2)
                await b.page.locator(
                    '#waitlist tr[data-status="waiting"]', has_text="Dorothy Vaughan"
                ).wait_for(timeout=WAIT_MS)
                assert (await b.stats())["applied"] >= 1


async def test_screenshot(browser: Browser, engine: AsyncEngine, tmp_path: Path) -> None:
    """A busy evening on the host stand; the picture in docs/host-stand.md comes from here.

    ``HOST_STAND_SCREENSHOT=docs/images/host-stand.png pytest tests/browser -k screenshot`` refreshes it.
    """
    app = create_app(settings(demo=True), engine=engine)
    async with (
        serve(app) as address,
        httpx.AsyncClient(
            base_url=f"http://{address}", headers={"Authorization": f"Bearer {token()}"}, timeout=10
        ) as http,
    ):
        tables = {t["name"]: t["id"] for t in (await http.get(f"/restaurants/{RID}/tables")).json()["tables"]}
        guests = {}
        for name, size in [
            ("Marie Curie", 2),
            ("Nikola Tesla", 4),
            ("Rosalind Franklin", 3),
            ("Alan Turing", 6),
            ("Hedy Lamarr", 2),
            ("Ada Lovelace", 4),
        ]:
            created = await http.post(
                f"/restaurants/{RID}/guests", json={"guestName": name, "partySize": size}
            )
            guests[name] = created.json()["id"]
        for guest, table in [("Marie Curie", "T1"), ("Nikola Tesla", "T4"), ("Alan Turing", "T5")]:
            operations = [
                {
                    "op": "update_guest",
                    "guest_id": guests[guest],
                    "changes": {"status": "seated", "table_id": tables[table]},
                },
                {
                    "op": "update_table",
                    "table_id": tables[table],
                    "changes": {"status": "occupied", "guest_id": guests[guest]},
                },
            ]
            response = await http.post(
                "/transactions/atomic", json={"restaurant_id": RID, "operations": operations}
            )
            assert response.status_code == 200, response.text
        await http.put(
            f"/restaurants/{RID}/guests/{guests['Rosalind Franklin']}", json={"status": "notified"}
        )
        await http.put(f"/restaurants/{RID}/tables/{tables['T6']}", json={"status": "cleaning"})

        async with open_device(browser, address, "host stand") as device:
            await device.add_walk_in("Grace Hopper", 5)  # arrives live, after the snapshot
            await device.page.locator("#waitlist tr", has_text="Grace Hopper").wait_for(timeout=WAIT_MS)
            assert await device.page.locator("#waitlist tr").count() == 4
            assert await device.page.locator('#tables li[data-status="occupied"]').count() == 3
            await device.page.fill("#walk-in-name", "")
            target = tmp_path / "host-stand.png"
            await device.page.screenshot(path=str(target), full_page=True)
            assert target.stat().st_size > 10_000
            configured = os.environ.get(SCREENSHOT_ENV)
            if configured:
                await anyio.Path(configured).parent.mkdir(parents=True, exist_ok=True)
                await anyio.Path(configured).write_bytes(await anyio.Path(target).read_bytes())


async def test_the_page_is_served(engine: AsyncEngine) -> None:
    # No browser needed: the routes, the redirect that keeps the query, and the content types.
    async with (
        serve(create_app(settings(), engine=engine)) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http,
    ):
        response = await http.get("/?restaurant_id=r-1&token=t")
        assert response.status_code == 307
        assert response.headers["location"] == "/host-stand/?restaurant_id=r-1&token=t"
        response = await http.get("/host-stand/?restaurant_id=r-1")  # the page itself needs no token
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert '<script src="host-stand.js" defer></script>' in response.text
        for asset, kind in [("host-stand.js", "javascript"), ("host-stand.css", "text/css")]:
            response = await http.get(f"/host-stand/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"], asset
        # The page is not part of the API's schema.
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert "/" not in paths and not any(path.startswith("/host-stand") for path in paths)


async def test_the_page_sends_its_token_on_every_request(browser: Browser, engine: AsyncEngine) -> None:
    device_token = token(device_id="stand-1")
    sockets: list[str] = []
    authorizations: list[str | None] = []

    def listen(page: Page) -> None:
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.on(
            "request",
            lambda request: (
                authorizations.append(request.headers.get("authorization"))
                if "/restaurants/" in request.url or "/transactions/" in request.url
                else None
            ),
        )

    async with (
        serve(create_app(settings(demo=True), engine=engine)) as address,
        open_device(
            browser, address, "1", {"restaurant_id": RID, "token": device_token}, listen=listen
        ) as device,
    ):
        await device.add_walk_in("Barbara Liskov", 2)
        await device.guest_row("Barbara Liskov").wait_for(timeout=WAIT_MS)
        await device.seat("Barbara Liskov", "T1 (2)")
        await (
            device.table_card("T1")
            .and_(device.page.locator('[data-status="occupied"]', has_text="Barbara Liskov"))
            .wait_for(timeout=WAIT_MS)
        )
    assert len(sockets) == 1 and f"token={device_token}" in sockets[0], sockets
    # Two snapshot reads, the walk-in, the atomic transaction and the two entities it changed.
    assert len(authorizations) >= 6 and set(authorizations) == {f"Bearer {device_token}"}, authorizations


@pytest.mark.parametrize(
    ("case", "query"),
    [
        pytest.param("no token", {"restaurant_id": RID}, id="no-token"),
        pytest.param("another restaurant's token", {"restaurant_id": RID, "token": "other"}, id="other"),
        pytest.param("expired token", {"restaurant_id": RID, "token": "expired"}, id="expired"),
        pytest.param("invalid restaurant id", {"restaurant_id": "no spaces", "token": "own"}, id="bad-id"),
    ],
)
async def test_a_refused_page_stops_with_the_reason(
    browser: Browser, engine: AsyncEngine, case: str, query: dict[str, str]
) -> None:
    tokens = {
        "other": token("another-restaurant"),
        "expired": token(ttl=60, now=time.time() - 3600),
        "own": token(),
    }
    if "token" in query:
        query = {**query, "token": tokens[query["token"]]}
    async with (
        serve(create_app(settings(), engine=engine)) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http,
    ):
        headers = {"Authorization": f"Bearer {query['token']}"} if "token" in query else {}
        expected = (
            await http.get(f"/restaurants/{query['restaurant_id']}/guests", headers=headers)
        ).status_code
        assert expected in (401, 403, 422), (case, expected)
        async with open_device(browser, address, case, query, live=False) as device:
            await device.page.locator('#connection[data-state="error"]').wait_for(timeout=WAIT_MS)
            assert str(expected) in await device.page.locator("#message").inner_text()
            await device.page.wait_for_timeout(1000)  # and it stays stopped: no retries
            assert await device.stats() == {
                "snapshots": 0,
                "connects": 0,
                "welcomes": 0,
                "resumed": 0,
                "resyncs": 0,
                "applied": 0,
            }, case


async def test_an_expiring_token_stops_the_page(browser: Browser, engine: AsyncEngine) -> None:
    # The service closes a connection with 4003 "token expired" when its token expires (after a leeway
    # of 10 s): retrying with the same token cannot help, so the page stops and says why.
    # Accepted for 3 to 4 s more (the token's times are whole seconds): long enough for the service to
    # start and the page to go live on a loaded machine (measured 0.6 to 1.6 s), short enough to expire
    # while the page is connected.
    expiring = token(ttl=60, now=time.time() - 60 - 6)
    async with (
        serve(create_app(settings(demo=True), engine=engine)) as address,
        open_device(browser, address, "expiring", {"restaurant_id": RID, "token": expiring}) as device,
    ):
        badge = device.page.locator("#connection")
        await device.page.locator('#connection[data-state="error"]').wait_for(timeout=WAIT_MS)
        assert "4003" in await badge.inner_text() and "token expired" in await badge.inner_text()
        stats = await device.stats()
        assert stats["connects"] == 1 and stats["welcomes"] == 1, stats


async def test_the_page_runs_on_the_client_package(browser: Browser, engine: AsyncEngine) -> None:
    # The page has no reconnect code of its own: it imports @rtbroadcast/client's built module, served
    # from the static files (clients/js `npm run vendor` copies it; the JS tests fail on a stale copy).
    async with (
        serve(create_app(settings(demo=True), engine=engine)) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http,
    ):
        for module in ("index.js", "client.js", "cursor.js", "transport.js"):
            response = await http.get(f"/host-stand/vendor/rtbroadcast-client/{module}")
            assert response.status_code == 200 and "javascript" in response.headers["content-type"], module
        page_source = (await http.get("/host-stand/host-stand.js")).text
        assert 'import("./vendor/rtbroadcast-client/index.js")' in page_source
        assert "new WebSocket(" not in page_source and "setTimeout(" not in page_source
        async with open_device(browser, address, "A") as device:
            described = await device.page.evaluate(
                """() => ({
                    client: window.hostStand.link.client.constructor.name,
                    state: window.hostStand.link.client.state,
                    position: window.hostStand.link.subscription.position,
                    lastSeq: window.hostStand.model.lastSeq,
                })"""
            )
            assert described["client"] == "Client" and described["state"] == "connected", described
            assert described["position"]["seq"] == described["lastSeq"], described
