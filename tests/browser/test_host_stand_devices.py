"""The host stand's protocol-2 parts in headless Chromium: devices online (presence), direct messages."""

from __future__ import annotations

import httpx
import pytest
from examples.restaurant_app import create_app
from playwright.async_api import Browser
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.browser.test_host_stand import RID, WAIT_MS, open_device, settings, token
from tests.support import serve

pytestmark = [pytest.mark.asyncio_only, pytest.mark.slow]

DEVICE_NAMES = "() => [...document.querySelectorAll('#devices li')].map((li) => li.dataset.device)"


async def test_devices_online_update_live_when_one_leaves(browser: Browser, engine: AsyncEngine) -> None:
    app = create_app(settings(demo=True), engine=engine)
    names = {"A": "Host stand", "B": "Bar tablet"}
    async with serve(app) as address, httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http:
        query_a = {"restaurant_id": RID, "token": token(device_id="stand-A", name=names["A"])}
        query_b = {"restaurant_id": RID, "token": token(device_id="stand-B", name=names["B"])}
        async with open_device(browser, address, "A", query_a) as a:
            await a.page.locator('#devices li[data-device="stand-A"]').wait_for(timeout=WAIT_MS)
            assert "this device" in await a.page.locator('#devices li[data-device="stand-A"]').inner_text()
            async with open_device(browser, address, "B", query_b) as b:
                # A learns of B by a presence_join; B's snapshot lists both, in join order.
                await a.page.locator('#devices li[data-device="stand-B"]', has_text="Bar tablet").wait_for(
                    timeout=WAIT_MS
                )
                await b.page.wait_for_function(
                    f"() => ({DEVICE_NAMES})().join() === 'stand-A,stand-B'", timeout=WAIT_MS
                )
                assert await a.page.locator("#devices-count").inner_text() == "(2)"
                # The service's view is the same: names come from the tokens, not from the pages.
                online = (
                    await http.get(
                        f"/restaurants/{RID}/devices", headers={"Authorization": f"Bearer {token()}"}
                    )
                ).json()
                assert online["count"] == 2 and not online["truncated"], online
                assert [(d["device"], d["name"]) for d in online["devices"]] == [
                    ("stand-A", "Host stand"),
                    ("stand-B", "Bar tablet"),
                ], online
            # B's context closed: A's list drops it (presence_leave) without a reload.
            await a.page.wait_for_function(f"() => ({DEVICE_NAMES})().join() === 'stand-A'", timeout=WAIT_MS)
            assert await a.page.locator("#devices-count").inner_text() == "(1)"
            assert (await a.stats())["snapshots"] == 1  # no reload: the leave came live


async def test_a_direct_message_reaches_only_its_device(browser: Browser, engine: AsyncEngine) -> None:
    app = create_app(settings(demo=True), engine=engine)
    manager = {"Authorization": f"Bearer {token(device_id='manager', name='Manager')}"}
    async with serve(app) as address, httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http:
        query_a = {"restaurant_id": RID, "token": token(device_id="stand-A")}
        query_b = {"restaurant_id": RID, "token": token(device_id="stand-B")}
        async with (
            open_device(browser, address, "A", query_a) as a,
            open_device(browser, address, "B", query_b) as b,
        ):
            # The device channel is subscribed once the page is live; it may confirm just after.
            await a.page.wait_for_function(
                "() => window.hostStand.link.client.subscriptions.size === 2", timeout=WAIT_MS
            )
            sent = await http.post(
                f"/restaurants/{RID}/devices/stand-A/messages",
                json={"text": "Table 4 wants you"},
                headers=manager,
            )
            assert sent.status_code == 202, sent.text
            assert sent.json()["channel"] == f"device:{RID}:stand-A"
            message = a.page.locator("#device-messages li", has_text="Table 4 wants you")
            await message.wait_for(timeout=WAIT_MS)
            assert await message.get_attribute("title") == "from manager"
            # The restaurant's own stream did not see it: nothing applied, seq unchanged on both pages.
            seq_before = await b.page.evaluate("() => window.hostStand.model.lastSeq")
            sent_b = await http.post(
                f"/restaurants/{RID}/devices/stand-B/messages", json={"text": "for B"}, headers=manager
            )
            assert sent_b.status_code == 202
            await b.page.locator("#device-messages li", has_text="for B").wait_for(timeout=WAIT_MS)
            assert await b.page.evaluate("() => window.hostStand.model.lastSeq") == seq_before
            assert await a.page.locator("#device-messages li").count() == 1
            assert await b.page.locator("#device-messages li", has_text="Table 4").count() == 0
            # Another restaurant's token cannot message this restaurant's devices.
            other = {"Authorization": f"Bearer {token('another-restaurant')}"}
            refused = await http.post(
                f"/restaurants/{RID}/devices/stand-A/messages", json={"text": "x"}, headers=other
            )
            assert refused.status_code == 403
