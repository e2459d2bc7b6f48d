"""Protocol 2 end to end: uvicorn on a loopback port, real WebSocket clients, many channels per connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

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


async def _open(host: str, query: str = "") -> Any:
    ws = await connect(f"ws://{host}/ws?protocol=2{query}")
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome"
    return ws


async def _pong(ws: Any) -> None:
    """The connection is still served: a ping is answered."""
    await ws.send('{"type":"ping"}')
    assert (await recv_json(ws))["type"] == "pong"


BAD_FRAMES: list[tuple[str | bytes, str, str | None, str | None]] = [
    # (frame, code, id echoed, channel echoed)
    ('{"type":"subscribe","id":"r1","channel":"a\\u0000b"}', "invalid_channel", "r1", None),
    ('{"type":"subscribe","id":"r1","channel":"\\ud800"}', "invalid_channel", "r1", None),
    ('{"type":"subscribe","id":"\\ud800","channel":"a"}', "invalid_frame", None, None),
    ('{"type":"subscribe","id":"a\\u0000","channel":"a"}', "invalid_frame", None, None),
    ('{"type":"subscribe","id":"' + "x" * 65 + '","channel":"a"}', "invalid_frame", None, None),
    ('{"type":"subscribe","id":12345678901234567890,"channel":"a"}', "invalid_frame", None, None),
    ('{"type":"subscribe","id":["r1"],"channel":"a"}', "invalid_frame", None, None),
    ('{"type":"subscribe","id":"r1","channel":7}', "invalid_channel", "r1", None),
    ('{"type":"subscribe","id":"r1","channel":"' + "c" * 257 + '"}', "invalid_channel", "r1", None),
    ('{"type":"subscribe","id":"r1","channel":"a","epoch":"e"}', "invalid_frame", "r1", "a"),
    ('{"type":"subscribe","id":"r1","channel":"a","epoch":"e","last_seq":-1}', "invalid_frame", "r1", "a"),
    (
        '{"type":"subscribe","id":"r1","channel":"a","epoch":"e","last_seq":99999999999999999999}',
        "invalid_frame",
        "r1",
        "a",
    ),
    ('{"type":"subscribe","id":"r1","channel":"a","epoch":"e","last_seq":"1"}', "invalid_frame", "r1", "a"),
    ('{"type":"subscribe","id":"r1","channel":"a","presence":"yes"}', "invalid_frame", "r1", "a"),
    ('{"type":"unsubscribe","id":"r1"}', "invalid_channel", "r1", None),
    ('{"type":"unsubscribe","channel":"a"}', "invalid_frame", None, None),
    ('{"type":"subscribe"', "malformed_frame", None, None),
    ("[1,2]", "malformed_frame", None, None),
    (b"\xff\xfe", "malformed_frame", None, None),
    ('{"type":"publish","id":"r7"}', "unknown_type", "r7", None),
    ('{"type":"subscribe","id":"r1","channel":"' + "c" * 20_000 + '"}', "frame_too_large", None, None),
]


@pytest.mark.parametrize(("frame", "code", "request_id", "channel"), BAD_FRAMES, ids=range(len(BAD_FRAMES)))
async def test_bad_input_gets_a_typed_error_and_the_connection_stays(
    frame: str | bytes, code: str, request_id: str | None, channel: str | None
) -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster, channel=_none)) as host:
        ws = await _open(host)
        await ws.send(frame)
        error = await recv_json(ws)
        assert error["type"] == "error"
        assert (error["code"], error["id"], error["channel"]) == (code, request_id, channel), error
        assert isinstance(error["message"], str) and error["message"]
        await _pong(ws)
        # Still fully working: a good subscribe after the bad one.
        await _send(ws, {"type": "subscribe", "id": "ok", "channel": "a"})
        assert (await recv_json(ws))["type"] == "subscribed"
        await ws.close()


async def test_a_flood_of_subscribe_frames_is_rate_limited_with_4008() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster, channel=_none)) as host:
        ws = await _open(host)
        sent = 0
        with contextlib.suppress(websockets.ConnectionClosed):
            for n in range(10_000):
                await ws.send(json.dumps({"type": "subscribe", "id": f"r{n}", "channel": f"c{n}"}))
                sent += 1
        await asyncio.wait_for(ws.wait_closed(), 5_000 * MS)
        assert ws.close_code == 4008
        assert broadcaster.connection_count() <= 1
        await until(lambda: broadcaster.connection_count() == 0)
        # Every subscription of the closed connection went with it.
        assert broadcaster.registry.channels() == []


async def test_max_subscriptions_counts_server_side_ones() -> None:
    broadcaster = Broadcaster("memory://")

    def two(request: ConnectionRequest) -> list[str]:
        return ["s1", "s2"]

    async with serve(broadcast_app(broadcaster, channel=two, max_subscriptions=3)) as host:
        ws = await _open(host)
        assert [(await recv_json(ws))["channel"] for _ in range(2)] == ["s1", "s2"]
        await _send(ws, {"type": "subscribe", "id": "r1", "channel": "a"})
        assert (await recv_json(ws))["type"] == "subscribed"
        await _send(ws, {"type": "subscribe", "id": "r2", "channel": "b"})
        error = await recv_json(ws)
        assert (error["code"], error["id"], error["channel"]) == ("too_many_subscriptions", "r2", "b")
        await _send(ws, {"type": "unsubscribe", "id": "r3", "channel": "s1"})
        assert (await recv_json(ws))["type"] == "unsubscribed"
        await _send(ws, {"type": "subscribe", "id": "r4", "channel": "b"})
        assert (await recv_json(ws))["type"] == "subscribed"
        await ws.close()


async def test_a_channel_connection_limit_answers_try_again_later() -> None:
    broadcaster = Broadcaster("memory://", max_connections_per_channel=1)
    async with serve(broadcast_app(broadcaster, channel=_none)) as host:
        one, two = await _open(host), await _open(host)
        await _send(one, {"type": "subscribe", "id": "r1", "channel": "full"})
        assert (await recv_json(one))["type"] == "subscribed"
        await _send(two, {"type": "subscribe", "id": "r1", "channel": "full"})
        error = await recv_json(two)
        assert (error["code"], error["channel"]) == ("try_again_later", "full")
        await _send(two, {"type": "subscribe", "id": "r2", "channel": "other"})
        assert (await recv_json(two))["type"] == "subscribed"
        await one.close()
        await two.close()


async def test_presence_on_a_channel_without_it_is_presence_unavailable_after_subscribed() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster, channel=_none)) as host:
        ws = await _open(host)
        await _send(ws, {"type": "subscribe", "id": "r1", "channel": "a", "presence": True})
        subscribed = await recv_json(ws)
        assert subscribed["type"] == "subscribed" and "presence" not in subscribed
        error = await recv_json(ws)
        assert (error["code"], error["id"], error["channel"]) == ("presence_unavailable", "r1", "a")
        await _post(broadcaster, "a", 1)
        assert (await recv_json(ws))["event"]["n"] == 1
        await ws.close()


async def test_authenticate_deny_refuses_with_4003_and_a_failing_authorize_closes_1011() -> None:
    broadcaster = Broadcaster("memory://")

    def authenticate(request: ConnectionRequest) -> Identity | Deny:
        token = request.query.get("token")
        return Identity(token) if token else Deny("no token")

    def authorize(request: ConnectionRequest, channel: str) -> bool:
        if channel == "boom":
            raise RuntimeError("hook bug")
        return True

    app = broadcast_app(broadcaster, channel=_none, authenticate=authenticate, authorize=authorize)
    async with serve(app) as host:
        ws = await connect(f"ws://{host}/ws?protocol=2")
        await ws.wait_closed()
        assert (ws.close_code, ws.close_reason) == (4003, "no token")
        ws = await connect(f"ws://{host}/ws")  # protocol 1 too
        await ws.wait_closed()
        assert ws.close_code == 4003
        ws = await _open(host, "&token=u1")
        await _send(ws, {"type": "subscribe", "id": "r1", "channel": "boom"})
        await asyncio.wait_for(ws.wait_closed(), 5_000 * MS)
        assert ws.close_code == 1011


async def test_cross_tenant_a_denied_subscription_never_receives_an_event() -> None:
    """Tenants t1 and t2 each may read only their own channels; every attempt at the other's fails."""
    broadcaster = Broadcaster("memory://")

    def authenticate(request: ConnectionRequest) -> Identity:
        return Identity(request.query["user"], tags=frozenset({"tenant:" + request.query["tenant"]}))

    def authorize(request: ConnectionRequest, channel: str) -> bool | Deny:
        assert request.identity is not None
        tenant = channel.split(":")[1]
        if "tenant:" + tenant not in request.identity.tags:
            return Deny("other tenant")
        return True

    def own(request: ConnectionRequest) -> list[str]:
        # Deliberately also resolves the other tenant's feed: authorize must keep it out.
        return ["feed:t1", "feed:t2"]

    app = broadcast_app(broadcaster, channel=own, authenticate=authenticate, authorize=authorize)
    async with serve(app) as host:
        one = await _open(host, "&user=a&tenant=t1")
        two = await _open(host, "&user=b&tenant=t2")
        for ws, mine, theirs in ((one, "t1", "t2"), (two, "t2", "t1")):
            first, second = await recv_json(ws), await recv_json(ws)
            frames = {frame["channel"]: frame for frame in (first, second)}
            assert frames[f"feed:{mine}"]["type"] == "subscribed"
            assert frames[f"feed:{theirs}"]["type"] == "error"
            assert frames[f"feed:{theirs}"]["code"] == "forbidden"
            for n, channel in enumerate((f"room:{theirs}", f"room:{theirs}", f"room:{mine}")):
                await _send(ws, {"type": "subscribe", "id": f"r{n}", "channel": channel})
                answer = await recv_json(ws)
                expected = "subscribed" if channel.endswith(mine) else "error"
                assert answer["type"] == expected, answer
            # A resume attempt of the other's channel is denied before history is read.
            await _send(
                ws,
                {"type": "subscribe", "id": "rr", "channel": f"room:{theirs}", "epoch": "e", "last_seq": 0},
            )
            assert (await recv_json(ws))["code"] == "forbidden"
        for n in range(20):
            for tenant in ("t1", "t2"):
                await _post(broadcaster, f"room:{tenant}", n)
                await _post(broadcaster, f"feed:{tenant}", n)
        for ws, mine in ((one, "t1"), (two, "t2")):
            got = [await recv_json(ws) for _ in range(40)]
            assert {frame["channel"] for frame in got} == {f"room:{mine}", f"feed:{mine}"}
            await _pong(ws)  # nothing else was queued before the pong: no event of the other tenant
        assert broadcaster.connection_count("room:t1") == 1
        assert broadcaster.connection_count("room:t2") == 1
        await one.close()
        await two.close()


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("&resume=!!!", "the resume token is not base64url of a JSON object"),
        ("&resume=eyJhIjpbImUiLC0xXX0", "the resume token's position of 'a' is not [epoch, seq]"),
        (
            "&epoch=e&last_seq=1",
            "protocol 2 resumes per channel: 'resume' (server-side channels) or subscribe frames",
        ),
    ],
    ids=["not-base64", "negative-seq", "protocol-1-resume"],
)
async def test_bad_connect_parameters_on_protocol_2_are_refused_with_4004(query: str, reason: str) -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster, channel=_none)) as host:
        ws = await connect(f"ws://{host}/ws?protocol=2{query}")
        await asyncio.wait_for(ws.wait_closed(), 5_000 * MS)
        assert (ws.close_code, ws.close_reason) == (4004, reason)
        assert broadcaster.connection_count() == 0


async def test_an_invalid_channel_from_the_resolver_refuses_protocol_2_with_4004() -> None:
    broadcaster = Broadcaster("memory://")

    def bad(request: ConnectionRequest) -> list[str]:
        return ["ok", "no\x00pe"]

    async with serve(broadcast_app(broadcaster, channel=bad)) as host:
        ws = await connect(f"ws://{host}/ws?protocol=2")
        await asyncio.wait_for(ws.wait_closed(), 5_000 * MS)
        assert ws.close_code == 4004


@pytest.mark.parametrize("ws_protocol", ["direct", "deflate"])
async def test_direct_writes_serve_both_protocols_on_one_channel_each_its_own_frame(ws_protocol: str) -> None:
    """Under rtbroadcast.uvicorn each event's frame is built once per protocol (and per deflate window):
    protocol-1 and protocol-2 connections of one channel, interleaved in fan-out, each get their own."""
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

    broadcaster = Broadcaster("memory://")
    server_ws = {
        "direct": "rtbroadcast.uvicorn:WebSocketProtocol",
        "deflate": "rtbroadcast.uvicorn:DeflateWebSocketProtocol",
    }
    options: dict[str, Any] = {"compression": None, "max_size": None}
    if ws_protocol == "deflate":
        options["extensions"] = [ClientPerMessageDeflateFactory(client_max_window_bits=True)]

    def room(request: ConnectionRequest) -> str | None:
        return request.query.get("room")

    async with serve(broadcast_app(broadcaster, channel=room), ws=server_ws[ws_protocol]) as host:
        clients: list[tuple[int, Any]] = []
        for n in range(6):
            if n % 2:
                ws = await connect(f"ws://{host}/ws?room=r", **options)
                assert (await recv_json(ws))["type"] == "welcome"
                clients.append((1, ws))
            else:
                ws = await connect(f"ws://{host}/ws?protocol=2", **options)
                assert (await recv_json(ws))["type"] == "welcome"
                await _send(ws, {"type": "subscribe", "id": "r1", "channel": "r"})
                assert (await recv_json(ws))["type"] == "subscribed"
                clients.append((2, ws))
        await until(lambda: broadcaster.connection_count("r") == 6)
        assert all(cursor.connection.direct for cursor in broadcaster.registry.cursors("r"))
        pads = ["a" * size for size in (0, 100, 70_000)] + ["b" * 200]
        for pad in pads:
            await broadcaster.publish_json("r", json.dumps({"type": "x", "pad": pad}))
        for protocol, ws in clients:
            for seq, pad in enumerate(pads, start=1):
                frame = await recv_json(ws)
                event = frame if protocol == 1 else frame["event"]
                if protocol == 2:
                    assert (frame["type"], frame["channel"]) == ("event", "r")
                assert (event["type"], event["seq"], event["pad"]) == ("x", seq, pad)
            await ws.close()
