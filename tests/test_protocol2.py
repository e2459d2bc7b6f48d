"""Protocol 2 end to end: uvicorn on a loopback port, real WebSocket clients, many channels per connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from rtbroadcast import Allow, Broadcaster, Deny, Identity
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.protocol import ResumePoint, encode_positions

from . import support
from .support import MS, broadcast_app, connect, recv_json, serve, until


@pytest.fixture(autouse=True, params=["deflate", None], ids=["asgi-send", "direct-write"])
def client_compression(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run every test twice: clients with permessage-deflate (frames through ASGI) and without (direct)."""
    support.client_compression = request.param
    try:
        yield
    finally:
        support.client_compression = "deflate"


async def _post(broadcaster: Broadcaster, channel: str, n: int) -> int:
    return await broadcaster.publish_json(channel, json.dumps({"type": "posted", "n": n}))


def _none(request: ConnectionRequest) -> None:
    return None


async def _send(ws: Any, frame: dict[str, Any]) -> None:
    await ws.send(json.dumps(frame))


async def test_subscribe_receive_unsubscribe_on_one_connection() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster, channel=_none)) as host:
        ws = await connect(f"ws://{host}/ws?protocol=2")
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome"
        assert welcome["protocol"] == 2
        assert "channel" not in welcome
        assert isinstance(welcome["connection"], str) and welcome["connection"]
        await _post(broadcaster, "a", 0)
        await _send(ws, {"type": "subscribe", "id": "r1", "channel": "a"})
        assert await recv_json(ws) == {
            "type": "subscribed",
            "id": "r1",
            "channel": "a",
            "epoch": (await broadcaster.backend.position("a")).epoch,
            "seq": 1,
            "resumed": False,
        }
        await _send(ws, {"type": "subscribe", "id": "r2", "channel": "b"})
        assert (await recv_json(ws))["id"] == "r2"
        await _post(broadcaster, "a", 1)
        await _post(broadcaster, "b", 2)
        first, second = await recv_json(ws), await recv_json(ws)
        assert first == {"type": "event", "channel": "a", "event": {"type": "posted", "n": 1, "seq": 2}}
        assert second == {"type": "event", "channel": "b", "event": {"type": "posted", "n": 2, "seq": 1}}
        await _send(ws, {"type": "unsubscribe", "id": "r3", "channel": "a"})
        assert await recv_json(ws) == {"type": "unsubscribed", "id": "r3", "channel": "a", "reason": "client"}
        await _post(broadcaster, "a", 3)
        await _post(broadcaster, "b", 4)
        assert (await recv_json(ws))["event"]["n"] == 4
        await _send(ws, {"type": "unsubscribe", "id": "r4", "channel": "a"})
        error = await recv_json(ws)
        assert error["type"] == "error" and error["id"] == "r4" and error["code"] == "not_subscribed"
        await _send(ws, {"type": "subscribe", "id": "r5", "channel": "b"})
        error = await recv_json(ws)
        assert error["code"] == "already_subscribed" and error["channel"] == "b"
        await ws.close()
        await until(lambda: broadcaster.connection_count() == 0)


async def test_resolver_channels_are_server_side_subscriptions_resumed_by_token() -> None:
    broadcaster = Broadcaster("memory://")

    def channels(request: ConnectionRequest) -> list[str]:
        return ["user:42", "restaurant:R", "secret"]

    def authorize(request: ConnectionRequest, channel: str) -> bool | Deny | Allow:
        assert request.identity is not None and request.identity.id == "u42"
        if channel == "secret":
            return Deny("not yours")
        return Allow(info={"name": "Host stand"})

    def authenticate(request: ConnectionRequest) -> Identity:
        assert request.protocol == 2
        return Identity("u42", tags=frozenset({"staff"}))

    app = broadcast_app(broadcaster, channel=channels, authorize=authorize, authenticate=authenticate)
    async with serve(app) as host:
        for n in range(3):
            await _post(broadcaster, "user:42", n)
            await _post(broadcaster, "secret", n)
        epoch = (await broadcaster.backend.position("user:42")).epoch
        token = encode_positions({"user:42": ResumePoint(epoch, 1)})
        ws = await connect(f"ws://{host}/ws?protocol=2&resume={token}")
        assert (await recv_json(ws))["type"] == "welcome"
        user = await recv_json(ws)
        assert user == {
            "type": "subscribed",
            "id": None,
            "channel": "user:42",
            "epoch": epoch,
            "seq": 1,
            "resumed": True,
        }
        # The missed events of user:42 follow its subscribed frame, before the next subscription's.
        assert [(await recv_json(ws))["event"]["n"] for _ in range(2)] == [1, 2]
        restaurant = await recv_json(ws)
        assert restaurant["channel"] == "restaurant:R" and restaurant["id"] is None
        denied = await recv_json(ws)
        assert denied == {
            "type": "error",
            "id": None,
            "channel": "secret",
            "code": "forbidden",
            "message": "not yours",
        }
        await _post(broadcaster, "secret", 99)
        await _post(broadcaster, "restaurant:R", 5)
        assert await recv_json(ws) == {
            "type": "event",
            "channel": "restaurant:R",
            "event": {"type": "posted", "n": 5, "seq": 1},
        }
        await ws.close()


async def test_protocol_1_refuses_several_channels_and_unknown_protocols() -> None:
    broadcaster = Broadcaster("memory://")

    def channels(request: ConnectionRequest) -> list[str]:
        return ["a", "b"]

    async with serve(broadcast_app(broadcaster, channel=channels)) as host:
        ws = await connect(f"ws://{host}/ws")
        await ws.wait_closed()
        assert ws.close_code == 4004
        assert ws.close_reason == "this endpoint resolves several channels; connect with ?protocol=2"
        ws = await connect(f"ws://{host}/ws?protocol=3")
        await ws.wait_closed()
        assert ws.close_code == 4004
        assert ws.close_reason == "unsupported protocol '3'; this server speaks 1 and 2"


async def test_gap_after_unsubscribe_and_resubscribe_resumes_per_channel() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster, channel=_none)) as host:
        ws = await connect(f"ws://{host}/ws?protocol=2")
        await recv_json(ws)
        await _send(ws, {"type": "subscribe", "id": "r1", "channel": "a"})
        subscribed = await recv_json(ws)
        await _post(broadcaster, "a", 1)
        assert (await recv_json(ws))["event"]["seq"] == 1
        await _send(ws, {"type": "unsubscribe", "id": "r2", "channel": "a"})
        assert (await recv_json(ws))["type"] == "unsubscribed"
        await _post(broadcaster, "a", 2)
        await _post(broadcaster, "a", 3)
        resume = {"epoch": subscribed["epoch"], "last_seq": 1}
        await _send(ws, {"type": "subscribe", "id": "r3", "channel": "a", **resume})
        again = await recv_json(ws)
        assert again["resumed"] is True and again["seq"] == 1
        assert [(await recv_json(ws))["event"]["n"] for _ in range(2)] == [2, 3]
        await _send(ws, {"type": "subscribe", "id": "r4", "channel": "b", "epoch": "nope", "last_seq": 5})
        b = await recv_json(ws)
        assert b["resumed"] is False
        resync = await recv_json(ws)
        assert resync == {
            "type": "resync_required",
            "channel": "b",
            "reason": "epoch_changed",
            "epoch": b["epoch"],
            "seq": 0,
        }
        await asyncio.wait_for(ws.close(), 2_000 * MS)
