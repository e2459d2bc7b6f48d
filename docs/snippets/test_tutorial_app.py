"""Tests of the tutorial's app: its broadcasts checked in-process, and over a real WebSocket."""

import json

import httpx
import pytest
import websockets

from rtbroadcast import Received
from rtbroadcast.testing import serve
from tutorial_app import MessagePosted, app, broadcaster


# --8<-- [start:in_process]
@pytest.mark.anyio
async def test_posting_a_message_broadcasts_it() -> None:
    transport = httpx.ASGITransport(app=app)  # calls the app directly: no server, no lifespan
    async with (
        broadcaster,  # so connect the broadcaster here, as the lifespan would
        broadcaster.subscribe("room:tests", model=MessagePosted) as subscription,
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        response = await client.post("/rooms/tests/messages", json={"author": "ada", "text": "hi"})
        received = await anext(subscription)

    assert response.status_code == 201
    assert isinstance(received, Received)
    assert received.seq == response.json()["seq"]
    assert received.event.author == "ada"
    assert received.event.text == "hi"


# --8<-- [end:in_process]


# --8<-- [start:websocket]
@pytest.mark.anyio
async def test_websocket_clients_receive_it() -> None:
    async with serve(app) as server, websockets.connect(server.ws_url("/realtime?room=tests-ws")) as ws:
        welcome = json.loads(await ws.recv())
        async with server.http() as client:
            await client.post("/rooms/tests-ws/messages", json={"author": "bob", "text": "hello"})
        event = json.loads(await ws.recv())

    assert welcome["type"] == "welcome"
    assert event == {
        "type": "message_posted",
        "timestamp": event["timestamp"],
        "room": "tests-ws",
        "author": "bob",
        "text": "hello",
        "seq": welcome["seq"] + 1,
    }


# --8<-- [end:websocket]


# --8<-- [start:client]
@pytest.mark.anyio
async def test_a_client_follows_the_room() -> None:
    async with serve(app) as server, server.client("/realtime?room=tests-client") as client:
        subscription = client.subscribe(model=MessagePosted)
        await subscription.connected()  # from here on, every event published reaches the subscription
        async with server.http() as http:
            reply = await http.post("/rooms/tests-client/messages", json={"author": "cy", "text": "hey"})
        [received] = await subscription.take(1, timeout=5)

    assert received.seq == reply.json()["seq"]
    assert received.event.author == "cy"
    assert received.event.text == "hey"


# --8<-- [end:client]
