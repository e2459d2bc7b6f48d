"""Server-side subscriptions across two real server processes on one Redis: a device moved to another
restaurant, and a banned user disconnected everywhere."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .sse_support import open_sse
from .support import MS, ServerProcess, connect, recv_json, server_process

pytestmark = [pytest.mark.asyncio_only, pytest.mark.redis, pytest.mark.slow]


def app_process(redis_url: str, prefix: str) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    return server_process(
        "-m", "uvicorn", "tests.server_side_app:app", "--log-level", "warning",
        env={"RTB_REDIS_URL": redis_url, "RTB_KEY_PREFIX": prefix},
    )  # fmt: skip


async def publish(http: httpx.AsyncClient, host: str, channel: str, n: int) -> None:
    reply = await http.post(f"http://{host}/publish", json={"channel": channel, "n": n})
    assert reply.status_code == 200, reply.text


async def command(http: httpx.AsyncClient, host: str, action: str, **body: Any) -> int:
    reply = await http.post(f"http://{host}/control", json={"action": action, **body})
    assert reply.status_code == 200, reply.text
    changed: int = reply.json()["changed"]
    return changed


async def opened_v2(url: str, *channels: str) -> ClientConnection:
    """Connect on protocol 2 and read the welcome and the server-side subscriptions made at connect."""
    ws = await connect(url)
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome" and welcome["protocol"] == 2
    for channel in channels:
        frame = await recv_json(ws)
        assert (frame["type"], frame["id"], frame["channel"]) == ("subscribed", None, channel)
    return ws


async def event_of(ws: ClientConnection) -> tuple[str, int]:
    frame = await recv_json(ws)
    assert frame["type"] == "event", frame
    return frame["channel"], frame["event"]["n"]


async def test_a_device_moved_to_another_restaurant_follows_it_on_every_process(
    redis_url: str, redis_prefix: str
) -> None:
    async with (
        app_process(redis_url, redis_prefix) as one,
        app_process(redis_url, redis_prefix) as two,
        httpx.AsyncClient() as http,
    ):
        a, b = "restaurant:A", "restaurant:B"
        # Device d1 has a connection on each process (protocol 2); d2 stays at A; d1 also has a protocol-1
        # connection, whose one channel is fixed by its URL.
        moved = [
            await opened_v2(f"ws://{one.host}/ws?protocol=2&device=d1&restaurant=A", a),
            await opened_v2(f"ws://{two.host}/ws?protocol=2&device=d1&restaurant=A", a),
        ]
        stays = await opened_v2(f"ws://{two.host}/ws?protocol=2&device=d2&restaurant=A", a)
        legacy = await connect(f"ws://{one.host}/ws?device=d1&restaurant=A")
        assert (await recv_json(legacy))["type"] == "welcome"
        await publish(http, one.host, a, 1)
        for ws in (*moved, stays):
            assert await event_of(ws) == (a, 1)
        assert (await recv_json(legacy))["n"] == 1

        # Moved: through process two, for every process. Each process counts its own connections.
        assert await command(http, two.host, "unsubscribe", channel=a, identity="d1") == 1
        assert await command(http, two.host, "subscribe", channel=b, identity="d1") == 1
        for ws in moved:
            assert await recv_json(ws) == {
                "type": "unsubscribed",
                "id": None,
                "channel": a,
                "reason": "server",
            }
            subscribed = await recv_json(ws)
            assert (subscribed["type"], subscribed["id"], subscribed["channel"]) == ("subscribed", None, b)
            assert subscribed["resumed"] is False
        # Already there: nothing to change (and no second subscription).
        assert await command(http, one.host, "subscribe", channel=b, identity="d1") == 0

        await publish(http, two.host, a, 2)
        await publish(http, one.host, b, 3)
        await publish(http, two.host, a, 4)
        await publish(http, one.host, b, 5)
        for ws in moved:
            assert [await event_of(ws), await event_of(ws)] == [(b, 3), (b, 5)]
        assert [await event_of(stays), await event_of(stays)] == [(a, 2), (a, 4)]
        # The protocol-1 connection was left on A: only a disconnect can change it.
        assert [(await recv_json(legacy))["n"] for _ in range(2)] == [2, 4]
        # Nothing else arrived on the moved connections (A's events would be there first).
        await publish(http, one.host, b, 6)
        for ws in moved:
            assert await event_of(ws) == (b, 6)
        for ws in (*moved, stays, legacy):
            await ws.close()


async def test_a_banned_user_is_disconnected_on_every_process(redis_url: str, redis_prefix: str) -> None:
    async with (
        app_process(redis_url, redis_prefix) as one,
        app_process(redis_url, redis_prefix) as two,
        httpx.AsyncClient() as http,
    ):
        a = "restaurant:A"
        banned_v1 = await connect(f"ws://{one.host}/ws?device=u9&restaurant=A")
        banned_v2 = await opened_v2(f"ws://{two.host}/ws?protocol=2&device=u9&restaurant=A", a)
        bystanders = [
            await opened_v2(f"ws://{one.host}/ws?protocol=2&device=u1&restaurant=A", a),
            await opened_v2(f"ws://{two.host}/ws?protocol=2&device=u1&restaurant=A", a),
        ]
        assert (await recv_json(banned_v1))["type"] == "welcome"
        async with open_sse(http, f"http://{two.host}/ws/sse?device=u9&restaurant=A") as banned_sse:
            assert (await banned_sse.next_json())["type"] == "welcome"

            # Through process one: one of its connections (the protocol-1 one); the rest on process two.
            assert await command(http, one.host, "disconnect", identity="u9", reason="banned") == 1
            for ws in (banned_v1, banned_v2):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await recv_json(ws)
                assert closed.value.rcvd is not None
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4003, "banned")
            assert await banned_sse.until_end() == []
            assert banned_sse.comments[-1] == "closed 4003 banned"
            assert banned_sse.retry is not None

        # Everyone else is still connected, and still gets events.
        await publish(http, two.host, a, 1)
        for ws in bystanders:
            assert await event_of(ws) == (a, 1)
        # A tag selects too: the second bystander carries none, so a tag of nobody changes nothing.
        assert await command(http, two.host, "disconnect", tag="role:nobody") == 0
        for host in (one.host, two.host):
            health = (await http.get(f"http://{host}/health", timeout=5_000 * MS)).json()
            assert health["connections"] == 1
        for ws in bystanders:
            await ws.close()
