"""Frames written straight to uvicorn's transport: when that path is taken, and that it is byte-exact."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from websockets.frames import Frame, Opcode

from rtbroadcast import Broadcaster, Connection, QueueLimits
from rtbroadcast._direct import text_frame
from rtbroadcast.asgi import BroadcastEndpoint, channel_from_query
from rtbroadcast.starlette import lifespan, websocket_route

from .support import StalledClient, connect, recv_json, serve

BOUNDARY_SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_text_frame_is_what_websockets_serialises(size: int) -> None:
    payload = b"a" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


@given(st.binary(max_size=300))
def test_text_frame_header_lengths(payload: bytes) -> None:
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def starlette_app(broadcaster: Broadcaster, **options: Any) -> Starlette:
    return Starlette(
        routes=[websocket_route("/ws", broadcaster, channel=channel_from_query("room"), **options)],
        lifespan=lifespan(broadcaster),
    )


def bare_endpoint(broadcaster: Broadcaster) -> Any:
    """The endpoint as the whole ASGI app: it gets uvicorn's own ``send``."""
    endpoint = BroadcastEndpoint(broadcaster, channel_from_query("room"))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            async with broadcaster:
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        await endpoint(scope, receive, send)

    return app


async def _only_connection(broadcaster: Broadcaster, channel: str) -> Connection:
    for _ in range(200):
        connections = broadcaster.registry.fanout(channel)
        if connections:
            (connection,) = connections
            return connection
        await asyncio.sleep(0.01)
    raise AssertionError("no connection registered")


@pytest.mark.parametrize("mount", ["starlette", "bare"])
async def test_uncompressed_clients_get_direct_writes_with_every_size(mount: str) -> None:
    broadcaster = Broadcaster("memory://")
    app = starlette_app(broadcaster) if mount == "starlette" else bare_endpoint(broadcaster)
    async with serve(app) as host:
        ws = await connect(f"ws://{host}/ws?room=r", compression=None, max_size=None)
        assert (await recv_json(ws))["type"] == "welcome"
        assert (await _only_connection(broadcaster, "r")).direct
        # Sizes around the 7-bit, 16-bit and 64-bit length encodings of the frame header.
        for size in BOUNDARY_SIZES:
            pad = "p" * max(0, size - len('{"type":"x","pad":"","seq":0}') - len(str(size)) + 1)
            await broadcaster.publish_json("r", json.dumps({"type": "x", "pad": pad}))
        for seq, _size in enumerate(BOUNDARY_SIZES, start=1):
            message = await recv_json(ws)
            assert message["seq"] == seq
        # Protocol frames (pong) take the same path.
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_json(ws))["type"] == "pong"
        await ws.close()


async def test_compressed_clients_and_opt_out_use_asgi_send() -> None:
    broadcaster = Broadcaster("memory://")
    app = Starlette(
        routes=[
            websocket_route("/ws", broadcaster, channel=channel_from_query("room")),
            websocket_route("/plain", broadcaster, channel=channel_from_query("room"), direct_write=False),
        ],
        lifespan=lifespan(broadcaster),
    )
    async with serve(app) as host:
        deflate = await connect(f"ws://{host}/ws?room=deflate", compression="deflate")
        await recv_json(deflate)
        assert not (await _only_connection(broadcaster, "deflate")).direct
        plain = await connect(f"ws://{host}/plain?room=plain", compression=None)
        await recv_json(plain)
        assert not (await _only_connection(broadcaster, "plain")).direct
        for channel, ws in (("deflate", deflate), ("plain", plain)):
            await broadcaster.publish_json(channel, '{"type":"x"}')
            assert (await recv_json(ws))["seq"] == 1
            await ws.close()


async def test_other_websocket_implementations_use_asgi_send() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(starlette_app(broadcaster), ws="wsproto") as host:
        ws = await connect(f"ws://{host}/ws?room=w", compression=None)
        await recv_json(ws)
        assert not (await _only_connection(broadcaster, "w")).direct
        await broadcaster.publish_json("w", '{"type":"x"}')
        assert (await recv_json(ws))["seq"] == 1
        await ws.close()


async def test_direct_writes_stop_at_flow_control_and_the_queue_bound_applies() -> None:
    # A client that never reads: once the transport pauses, frames queue up, and past the bound the
    # connection is closed (4001) while a reading client gets everything.
    broadcaster = Broadcaster("memory://", queue_limits=QueueLimits(max_messages=20, max_size=2**20))
    async with serve(starlette_app(broadcaster)) as host:
        stalled = await StalledClient.open(host, "/ws?room=s")
        reader = await connect(f"ws://{host}/ws?room=s", compression=None, max_queue=None)
        await recv_json(reader)
        for _ in range(200):
            if broadcaster.connection_count("s") == 2:
                break
            await asyncio.sleep(0.01)
        assert all(c.direct for c in broadcaster.registry.fanout("s"))
        payload = json.dumps({"type": "blob", "blob": "z" * 8000})
        received: list[int] = []

        async def read() -> None:
            while len(received) < 1000:
                received.append((await recv_json(reader))["seq"])

        task = asyncio.create_task(read())
        for _ in range(1000):
            await broadcaster.publish_json("s", payload)
            await asyncio.sleep(0)
        await asyncio.wait_for(task, 20)
        assert received == list(range(1, 1001))
        assert broadcaster.stats()["slow_consumers_closed"] == 1
        await reader.close()
        stalled.close()
