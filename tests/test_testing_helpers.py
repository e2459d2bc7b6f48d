"""rtbroadcast.testing: an app on a real uvicorn in the test's loop, followed with the Python client."""

from __future__ import annotations

import subprocess
import sys
from typing import Literal

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, Event
from rtbroadcast.client import Backoff
from rtbroadcast.testing import LiveServer, serve

from .support import broadcast_app, free_port


class Said(Event):
    type: Literal["testing_helpers_said"] = "testing_helpers_said"
    text: str


def app_with_a_post_route(broadcaster: Broadcaster) -> object:
    async def say(request: Request) -> JSONResponse:
        seq = await broadcaster.publish(
            "room:" + request.path_params["room"], Said(text=(await request.json())["text"])
        )
        return JSONResponse({"seq": seq}, status_code=201)

    # with_lifespan: serve() runs the app's lifespan, which connects (and at the end drains) the broadcaster.
    return broadcast_app(broadcaster, routes=[Route("/rooms/{room}/say", say, methods=["POST"])])


async def test_a_client_follows_an_app_served_in_the_tests_loop() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(app_with_a_post_route(broadcaster)) as server, server.client("/ws?room=t") as client:
        assert isinstance(server, LiveServer) and server.host.startswith("127.0.0.1:")
        assert server.ws_url("/ws?room=t") == f"ws://{server.host}/ws?room=t"
        subscription = client.subscribe(model=Said)
        welcome = await subscription.connected()
        async with server.http() as http:
            reply = await http.post("/rooms/t/say", json={"text": "hi"})
        [received] = await subscription.take(1)
    assert reply.status_code == 201 and received.seq == reply.json()["seq"] == welcome.seq + 1
    assert received.event == Said(text="hi", timestamp=received.event.timestamp)
    assert broadcaster.state.name == "CLOSED"  # the lifespan ran, both ways


async def test_a_server_restarted_on_the_same_port_is_resumed_by_the_client() -> None:
    port = free_port()
    broadcaster = Broadcaster("memory://")
    app = app_with_a_post_route(broadcaster)
    async with serve(app, port=port) as first:
        client = first.client("/ws?room=r", backoff=Backoff(initial_delay=0.05, max_delay=0.2))
        subscription = client.subscribe(model=Said)
        await subscription.connected()
        await broadcaster.publish("room:r", Said(text="before"))
        before = await subscription.take(1)
    async with client, serve(app, port=port) as again:  # the same broadcaster: the same stream
        assert again.host == first.host
        await broadcaster.publish("room:r", Said(text="after"))
        after = await subscription.take(1)
    assert [r.event.text for r in before + after] == ["before", "after"]
    assert [r.seq for r in before + after] == [1, 2] and client.stats.resumed == 1


async def test_a_server_that_cannot_start_raises() -> None:
    async def broken(scope: object, receive: object, send: object) -> None:
        raise RuntimeError("no lifespan for you")

    with pytest.raises(RuntimeError, match="stopped before it started"):
        async with serve(broken, lifespan="on"):
            pass


def test_importing_the_helpers_imports_no_server() -> None:
    code = "import sys, rtbroadcast.testing\nassert 'uvicorn' not in sys.modules and 'httpx' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)
