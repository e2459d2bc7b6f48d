"""Presence end to end: uvicorn on a loopback port, real WebSocket clients (protocol 2 and protocol 1).

Members come from the service (``authenticate`` gives the identity, ``authorize`` the info), join when a
subscription starts and leave when it ends; ``presence_join`` / ``presence_leave`` go to the protocol-2
subscriptions that asked, in order with the subscribes and unsubscribes, never to protocol 1.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets

from rtbroadcast import (
    Allow,
    Broadcaster,
    CloseCode,
    ConfigurationError,
    Connection,
    Identity,
    PresenceChange,
    PresenceMember,
    PresenceSnapshot,
)
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.backends.memory import MemoryBackend
from rtbroadcast.connection import item_text_v2

from .support import MS, broadcast_app, connect, recv_json, serve, until

pytestmark = pytest.mark.asyncio_only


def resolve(request: ConnectionRequest) -> str | None:
    """Protocol 1 follows ``?room=``; protocol 2 subscribes itself."""
    return None if request.protocol == 2 else f"room:{request.query['room']}"


def authenticate(request: ConnectionRequest) -> Identity:
    user = request.query.get("user", "anon")
    return Identity(user, info={"name": f"user {user}"})


def authorize(request: ConnectionRequest, channel: str) -> bool | Allow:
    if channel.startswith("room:") and request.query.get("desk"):
        return Allow(info={"desk": request.query["desk"]})
    return True


def app(broadcaster: Broadcaster) -> Any:
    return broadcast_app(broadcaster, channel=resolve, authenticate=authenticate, authorize=authorize)


async def send(ws: Any, frame: dict[str, Any]) -> None:
    await ws.send(json.dumps(frame))


async def open_v2(host: str, user: str, **query: str) -> tuple[Any, str]:
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    ws = await connect(f"ws://{host}/ws?protocol=2&user={user}{extra}")
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome" and welcome["protocol"] == 2
    return ws, welcome["connection"]


async def no_frame(ws: Any, wait: float = 200 * MS) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), wait)


async def test_join_and_leave_frames_follow_subscribes_and_unsubscribes_in_order() -> None:
    broadcaster = Broadcaster("memory://", presence=("room:",))
    async with serve(app(broadcaster)) as host:
        alice, alice_id = await open_v2(host, "alice", desk="host-stand")
        await send(alice, {"type": "subscribe", "id": "a1", "channel": "room:1", "presence": True})
        subscribed = await recv_json(alice)
        assert subscribed["type"] == "subscribed" and subscribed["id"] == "a1"
        me = {"client": alice_id, "identity": "alice", "info": {"desk": "host-stand"}}
        assert subscribed["presence"] == {"count": 1, "members": [me], "truncated": False}

        bob, bob_id = await open_v2(host, "bob")
        await send(bob, {"type": "subscribe", "id": "b1", "channel": "room:1", "presence": True})
        bob_subscribed = await recv_json(bob)
        bob_member = {"client": bob_id, "identity": "bob", "info": {"name": "user bob"}}  # identity.info
        assert bob_subscribed["presence"] == {"count": 2, "members": [me, bob_member], "truncated": False}
        assert await recv_json(alice) == {"type": "presence_join", "channel": "room:1", "member": bob_member}

        # A protocol-1 connection is a member too (with its connection's id), but never hears presence.
        carol = await connect(f"ws://{host}/ws?room=1&user=carol")
        carol_welcome = await recv_json(carol)
        assert carol_welcome["type"] == "welcome" and "presence" not in carol_welcome
        joined = await recv_json(alice)
        assert joined["type"] == "presence_join" and joined["member"]["identity"] == "carol"
        carol_id = joined["member"]["client"]
        assert (await recv_json(bob))["member"]["client"] == carol_id

        # Events and presence interleave in the order they happened.
        await broadcaster.publish_json("room:1", json.dumps({"type": "said", "text": "hi"}))
        await send(bob, {"type": "unsubscribe", "id": "b2", "channel": "room:1"})
        assert (await recv_json(bob))["type"] == "event"
        assert await recv_json(bob) == {
            "type": "unsubscribed",
            "id": "b2",
            "channel": "room:1",
            "reason": "client",
        }
        assert (await recv_json(alice))["event"]["text"] == "hi"
        assert await recv_json(alice) == {"type": "presence_leave", "channel": "room:1", "member": bob_member}

        # Subscribing again without presence: a member again, but no snapshot and no frames for bob.
        await send(bob, {"type": "subscribe", "id": "b3", "channel": "room:1"})
        again = await recv_json(bob)
        assert again["type"] == "subscribed" and "presence" not in again
        assert await recv_json(alice) == {"type": "presence_join", "channel": "room:1", "member": bob_member}
        await bob.close()
        assert await recv_json(alice) == {"type": "presence_leave", "channel": "room:1", "member": bob_member}
        await carol.close()
        left = await recv_json(alice)
        assert left["type"] == "presence_leave" and left["member"]["client"] == carol_id

        stats = broadcaster.stats()
        assert stats.presence_members == 1 and stats.presence_watchers == 1
        snapshot = await broadcaster.presence("room:1")
        assert snapshot.members == (PresenceMember(alice_id, "alice", {"desk": "host-stand"}),)
        await alice.close()
        await until(lambda: broadcaster.connection_count() == 0)
        assert await broadcaster.presence_count("room:1") == 0


async def test_a_protocol_1_connection_never_sees_a_presence_frame() -> None:
    broadcaster = Broadcaster("memory://", presence=("room:",))
    async with serve(app(broadcaster)) as host:
        legacy = await connect(f"ws://{host}/ws?room=1&user=old")
        assert (await recv_json(legacy))["type"] == "welcome"
        clients = []
        for n in range(5):
            ws, _ = await open_v2(host, f"u{n}")
            await send(ws, {"type": "subscribe", "id": "s", "channel": "room:1", "presence": True})
            assert "presence" in await recv_json(ws)
            clients.append(ws)
        for ws in clients[:3]:
            await ws.close()
        await until(lambda: broadcaster.connection_count("room:1") == 3)
        await broadcaster.publish_json("room:1", json.dumps({"type": "said", "text": "after"}))
        frame = await recv_json(legacy)
        assert frame == {"type": "said", "text": "after", "seq": 1}  # nothing came before it
        await no_frame(legacy)
        await legacy.close()
        for ws in clients[3:]:
            await ws.close()


async def test_presence_on_a_channel_without_it_is_an_error_after_subscribed() -> None:
    broadcaster = Broadcaster("memory://", presence=("room:",))
    async with serve(app(broadcaster)) as host:
        ws, _ = await open_v2(host, "u")
        await send(ws, {"type": "subscribe", "id": "s1", "channel": "news", "presence": True})
        subscribed = await recv_json(ws)
        assert subscribed["type"] == "subscribed" and "presence" not in subscribed
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "presence_unavailable" and error["id"] == "s1"
        await ws.close()


async def test_count_only_channels_send_the_count_and_no_frames() -> None:
    broadcaster = Broadcaster("memory://", presence=("room:",), presence_count_only=("room:big",))
    async with serve(app(broadcaster)) as host:
        first, _ = await open_v2(host, "one")
        await send(first, {"type": "subscribe", "id": "s", "channel": "room:big", "presence": True})
        assert (await recv_json(first))["presence"] == {"count": 1, "members": [], "truncated": False}
        second, _ = await open_v2(host, "two")
        await send(second, {"type": "subscribe", "id": "s", "channel": "room:big", "presence": True})
        assert (await recv_json(second))["presence"] == {"count": 2, "members": [], "truncated": False}
        await second.close()
        await until(lambda: broadcaster.connection_count("room:big") == 1)
        await no_frame(first)
        assert await broadcaster.presence_count("room:big") == 1
        assert (await broadcaster.presence("room:big")).members == ()
        await first.close()


async def test_a_joiner_of_a_channel_with_ten_thousand_members_gets_a_capped_snapshot() -> None:
    broadcaster = Broadcaster("memory://", presence=("room:",))
    async with serve(app(broadcaster)) as host:
        for n in range(10_000):
            await broadcaster.presence_join("room:big", PresenceMember(f"other-{n}", f"user-{n}", {"n": n}))
        ws, _ = await open_v2(host, "late")
        await send(ws, {"type": "subscribe", "id": "s", "channel": "room:big", "presence": True})
        raw = await asyncio.wait_for(ws.recv(), 5_000 * MS)
        presence = json.loads(raw)["presence"]
        assert presence["count"] == 10_001 and presence["truncated"] is True
        assert len(presence["members"]) == 100
        assert [m["client"] for m in presence["members"][:2]] == ["other-0", "other-1"]  # join order
        assert len(raw) < 10_000, len(raw)  # a hundred small members, not ten thousand
        await ws.close()


async def test_members_leave_on_slow_consumer_close_and_drain() -> None:
    broadcaster = Broadcaster("memory://", presence=("room:",))
    async with serve(app(broadcaster)) as host:
        watcher, _ = await open_v2(host, "w")
        await send(watcher, {"type": "subscribe", "id": "s", "channel": "room:1", "presence": True})
        await recv_json(watcher)
        slow, slow_id = await open_v2(host, "slow")
        await send(slow, {"type": "subscribe", "id": "s", "channel": "room:1"})
        await recv_json(slow)
        assert (await recv_json(watcher))["type"] == "presence_join"
        # The slow-consumer close, as the queue bound triggers it, on the server's own connection object.
        (connection,) = [c for c in broadcaster.registry if c.client_id == slow_id]
        connection.close(CloseCode.SLOW_CONSUMER, "too slow")
        left = await recv_json(watcher)
        assert left["type"] == "presence_leave" and left["member"]["client"] == slow_id
        legacy = await connect(f"ws://{host}/ws?room=1&user=old")
        await recv_json(legacy)
        assert (await recv_json(watcher))["type"] == "presence_join"
        assert await broadcaster.presence_count("room:1") == 2
        await broadcaster.drain()
        assert await broadcaster.presence_count("room:1") == 0


async def test_server_side_subscriptions_are_members_and_in_process_ones_are_not() -> None:
    broadcaster = Broadcaster("memory://", presence=("room:",))

    def channels(request: ConnectionRequest) -> list[str]:
        return ["room:9"]

    app = broadcast_app(broadcaster, channel=channels, authenticate=authenticate)
    async with serve(app) as host, broadcaster.subscribe("room:9"):
        assert await broadcaster.presence_count("room:9") == 0
        ws = await connect(f"ws://{host}/ws?protocol=2&user=dave")
        client = (await recv_json(ws))["connection"]
        subscribed = await recv_json(ws)
        assert subscribed["id"] is None and "presence" not in subscribed
        snapshot = await broadcaster.presence("room:9")
        assert snapshot.members == (PresenceMember(client, "dave", {"name": "user dave"}),)
        await ws.close()
        await until(lambda: broadcaster.connection_count("room:9") == 1)  # the in-process one
        await until(lambda: broadcaster.stats().presence_members == 0)
        assert await broadcaster.presence_count("room:9") == 0


class RacingBackend(MemoryBackend):
    """Memory presence whose join is overtaken by the PUB/SUB of a real network, deterministically.

    While a join is on its way, the listener hears a change the snapshot already covers (in flight from
    before) and one that happened after it (overtook the reply): Redis's two connections allow both.
    """

    async def presence_join(
        self, channel: str, member: PresenceMember, *, limit: int, notify: bool = True
    ) -> PresenceSnapshot:
        before = PresenceMember("before", "x", {})
        after = PresenceMember("after", "y", {})
        await super().presence_join(channel, before, limit=0)
        snapshot = await super().presence_join(channel, member, limit=limit, notify=False)
        listener = self._listener
        assert listener is not None
        listener.on_presence(PresenceChange(channel, "join", before, snapshot.version, before.to_json()))
        listener.on_presence(PresenceChange(channel, "join", after, snapshot.version + 1, after.to_json()))
        return snapshot


async def test_changes_racing_a_join_are_held_back_then_filtered_by_version() -> None:
    broadcaster = Broadcaster(backend=RacingBackend(), presence=("room:",))
    async with broadcaster:
        connection = Connection(protocol=2)
        await broadcaster.attach(connection)
        await broadcaster.backend.subscribe("room:1")  # so that the racing changes are heard
        await broadcaster.add_subscription(connection, "room:1", request_id="r", presence=True)
        frames = []
        while (item := connection.get_nowait()) is not None:
            frames.append(json.loads(item_text_v2(item)))
        assert [f["type"] for f in frames] == ["welcome", "subscribed", "presence_join"]
        assert {m["client"] for m in frames[1]["presence"]["members"]} == {"before", connection.client_id}
        assert frames[2]["member"]["client"] == "after"  # once, after subscribed; "before" not twice
        # Later changes with an old version (delivered late) are dropped too.
        stale = PresenceMember("stale", None, {})
        broadcaster.on_presence(PresenceChange("room:1", "join", stale, 1, stale.to_json()))
        assert connection.get_nowait() is None
        connection.close()


async def test_presence_info_that_is_not_json_fails_in_the_hook_not_in_the_fan_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broadcaster = Broadcaster("memory://", presence=("room:",))

    def bad_authorize(request: ConnectionRequest, channel: str) -> Allow:
        return Allow(info={"since": object()})

    app = broadcast_app(broadcaster, channel=resolve, authorize=bad_authorize)
    async with serve(app) as host:
        ws, _ = await open_v2(host, "u")
        await send(ws, {"type": "subscribe", "id": "s", "channel": "room:1", "presence": True})
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCode.INTERNAL_ERROR
        assert "Allow.info must be JSON-serialisable" in caplog.text
        assert await broadcaster.presence_count("room:1") == 0
    with pytest.raises(ConfigurationError, match=r"Identity\.info must be JSON-serialisable"):
        Identity("u", info={"n": float("nan")})
