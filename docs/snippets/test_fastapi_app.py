"""Tests of the FastAPI how-to's app with rtbroadcast.testing: live server, capture, client, TestClient."""

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi.testclient import TestClient

from fastapi_app import OrderPlaced, app, broadcaster
from rtbroadcast import CloseCode, Welcome
from rtbroadcast.testing import LiveServer, capture, connect, read_frame, serve


# --8<-- [start:capture]
@pytest.mark.anyio
async def test_placing_an_order_broadcasts_it() -> None:
    async with (
        serve(app) as server,  # uvicorn on a free port; the lifespan connects the broadcaster
        capture(broadcaster, "shop:s1", model=OrderPlaced) as shop,  # subscribed from here on
        httpx.AsyncClient(base_url=server.url()) as http,
    ):
        reply = await http.post("/shops/s1/orders", json={"items": ["tea"]})
        [received] = await shop.take(1)  # fails after 5 s, saying what did arrive

    assert received.seq == reply.json()["seq"]
    assert (received.event.order_id, received.event.items) == (reply.json()["order_id"], ["tea"])


# --8<-- [end:capture]


# --8<-- [start:connect]
@pytest.mark.anyio
async def test_a_device_receives_the_order_as_json() -> None:
    async with (
        serve(app) as server,
        connect(server.ws_url("/realtime", shop_id="s2")) as device,  # reads the welcome
        httpx.AsyncClient(base_url=server.url()) as http,
    ):
        assert isinstance(device.welcome, Welcome)
        reply = (await http.post("/shops/s2/orders", json={"items": ["cake"]})).json()
        event = await device.event()  # the JSON object a client parses, seq included

    assert event == {
        "type": "order_placed",
        "timestamp": event["timestamp"],
        "shop_id": "s2",
        "order_id": reply["order_id"],
        "items": ["cake"],
        "seq": device.welcome.seq + 1,
    }


@pytest.mark.anyio
async def test_a_malformed_shop_id_is_refused() -> None:
    async with serve(app) as server, connect(server.ws_url("/realtime", shop_id="a/b")) as device:
        assert device.welcome is None  # no welcome: the server closed the connection instead
        assert device.close_code == CloseCode.BAD_REQUEST


# --8<-- [end:connect]


# --8<-- [start:fixture]
@pytest.fixture
async def server() -> AsyncIterator[LiveServer]:
    async with serve(app) as live:  # a fresh server per test
        yield live


@pytest.mark.anyio
async def test_the_health_check_counts_a_device(server: LiveServer) -> None:
    async with connect(server.ws_url("/realtime", shop_id="s4")), server.http() as http:
        health = (await http.get("/health")).json()

    assert health["channels"] == {"shop:s4": 1}


# --8<-- [end:fixture]


# --8<-- [start:testclient]
def test_with_fastapis_test_client() -> None:
    with TestClient(app) as client, client.websocket_connect("/realtime?shop_id=s3") as ws:
        welcome = read_frame(ws)  # decoded: Welcome, then events
        reply = client.post("/shops/s3/orders", json={"items": ["pie"]}).json()
        event = ws.receive_json()  # or the raw JSON

    assert isinstance(welcome, Welcome)
    assert welcome.channel == "shop:s3"
    assert event["order_id"] == reply["order_id"]
    assert event["seq"] == welcome.seq + 1


# --8<-- [end:testclient]
