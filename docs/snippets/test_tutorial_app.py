"""Tests of the tutorial's app: its broadcasts checked in-process, and over a real WebSocket."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
import websockets

from rtbroadcast import Received
from rtbroadcast.client import Client
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
@contextlib.asynccontextmanager
async def running(app: object) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port, lifespan included; yield ``host:port``."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn has no "started" event to await
        await asyncio.sleep(0.01)
    try:
        yield f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@pytest.mark.anyio
async def test_websocket_clients_receive_it() -> None:
    async with running(app) as host, websockets.connect(f"ws://{host}/realtime?room=tests-ws") as ws:
        welcome = json.loads(await ws.recv())
        async with httpx.AsyncClient(base_url=f"http://{host}") as client:
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
    async with running(app) as host, Client(f"ws://{host}/realtime?room=tests-client") as client:
        subscription = client.subscribe(model=MessagePosted)
        await subscription.connected()  # from here on, every event published reaches the subscription
        async with httpx.AsyncClient(base_url=f"http://{host}") as http:
            reply = await http.post("/rooms/tests-client/messages", json={"author": "cy", "text": "hey"})
        [received] = await subscription.take(1, timeout=5)

    assert received.seq == reply.json()["seq"]
    assert received.event.author == "cy"
    assert received.event.text == "hey"


# --8<-- [end:client]
