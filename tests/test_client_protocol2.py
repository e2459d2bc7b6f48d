"""rtbroadcast.client on protocol 2 against real servers: many channels on one connection, each its own.

The conformance suite (tests/test_conformance.py) runs every client scenario on protocol 2 as well; these
tests cover what only protocol 2 has: several subscriptions on one socket, per-channel resync, refusals
of one subscription, unsubscribing, server-side subscriptions, and presence frames.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from rtbroadcast import Broadcaster, CloseCode, Deny, Event, ResumePoint
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.client import (
    Backoff,
    ChannelSubscription,
    Client,
    ClientError,
    PresenceChange,
    ResyncInfo,
    Subscription,
    SubscriptionDenied,
)
from rtbroadcast.protocol import Subscribed

from .support import MS, broadcast_app, no_task_left, serve, until

FAST = Backoff(initial_delay=0.05, max_delay=0.2)


class Posted(Event):
    type: Literal["client2_posted"] = "client2_posted"
    n: int


def nothing(request: ConnectionRequest) -> None:
    return None


async def post(broadcaster: Broadcaster, channel: str, numbers: range) -> None:
    for n in numbers:
        await broadcaster.publish(channel, Posted(n=n))


async def test_several_channels_share_one_connection_each_in_its_own_order() -> None:
    since = set(asyncio.all_tasks())
    broadcaster = Broadcaster("memory://")
    async with (
        serve(broadcast_app(broadcaster, channel=nothing)) as host,
        Client(f"ws://{host}/ws", protocol=2, backoff=FAST) as client,
    ):
        a = client.subscribe("room:a", model=Posted)
        b = client.subscribe("room:b", model=Posted)
        assert isinstance(a, ChannelSubscription) and isinstance(a, Subscription)
        subscribed = await a.connected()
        await b.connected()
        assert subscribed.channel == "room:a" and subscribed.seq == 0 and not subscribed.resumed
        await post(broadcaster, "room:a", range(5))
        await post(broadcaster, "room:b", range(100, 103))
        got_b = await b.take(3)
        got_a = await a.take(5)
        assert len(list(broadcaster.registry)) == 1  # one connection carries both
        assert client.stats.attempts == 1 and client.connection_id
        assert set(client.subscriptions) == {"room:a", "room:b"}
    await no_task_left(since)  # the connection's reader and pinger ended with the client
    assert [(r.channel, r.seq, r.event.n) for r in got_a] == [("room:a", s, s - 1) for s in range(1, 6)]
    assert [(r.channel, r.seq, r.event.n) for r in got_b] == [
        ("room:b", 1, 100),
        ("room:b", 2, 101),
        ("room:b", 3, 102),
    ]


async def test_after_a_drop_every_channel_resumes_from_its_own_position() -> None:
    broadcaster = Broadcaster("memory://")
    async with (
        serve(broadcast_app(broadcaster, channel=nothing)) as host,
        Client(f"ws://{host}/ws", protocol=2, backoff=FAST) as client,
    ):
        a = client.subscribe("room:a", model=Posted)
        b = client.subscribe("room:b", model=Posted)
        await a.connected()
        await b.connected()
        await post(broadcaster, "room:a", range(3))
        await post(broadcaster, "room:b", range(2))
        first = await a.take(3) + await b.take(2)
        for connection in list(broadcaster.registry):
            connection.close(CloseCode.SLOW_CONSUMER, "test")
        await post(broadcaster, "room:a", range(3, 5))  # missed: replayed on resume
        await post(broadcaster, "room:b", range(2, 6))
        later = await a.take(2) + await b.take(4)
    assert [r.event.n for r in first + later] == [0, 1, 2, 0, 1, 3, 4, 2, 3, 4, 5]
    assert [r.seq for r in later] == [4, 5, 3, 4, 5, 6]
    assert client.stats.attempts == 2 and client.stats.resumed == 2  # one resumed subscribed per channel
    assert a.stats.duplicates == b.stats.duplicates == 0 and a.stats.resyncs == b.stats.resyncs == 0


async def test_a_resync_is_per_channel_and_continues_from_the_snapshot() -> None:
    broadcaster = Broadcaster("memory://")
    calls: list[ResyncInfo] = []

    async def reload(info: ResyncInfo) -> ResumePoint:
        calls.append(info)
        assert info.epoch is not None and info.seq is not None
        return ResumePoint(info.epoch, info.seq)  # a snapshot at the stream's current position

    async with serve(broadcast_app(broadcaster, channel=nothing)) as host:
        await post(broadcaster, "room:stale", range(3))
        async with Client(f"ws://{host}/ws", protocol=2, backoff=FAST) as client:
            stale = client.subscribe("room:stale", model=Posted, position=("an-old-epoch", 2), resync=reload)
            fresh = client.subscribe("room:fresh", model=Posted, resync=reload, position=None)
            fresh_position = fresh.position
            await stale.connected()
            await post(broadcaster, "room:stale", range(3, 5))
            got = await stale.take(2)
            [reason] = [info.reason for info in calls if info.channel == "room:stale"]
    assert reason == "epoch_changed"
    assert [(r.seq, r.event.n) for r in got] == [(4, 3), (5, 4)]
    # The other channel only loaded its initial snapshot: nothing of room:stale's resync reached it.
    assert [info.reason for info in calls if info.channel == "room:fresh"] == [] and fresh_position is None
    assert stale.stats.resyncs == 1 and client.stats.attempts == 1


async def test_a_refused_subscription_fails_alone_and_an_unsubscribed_one_ends() -> None:
    def authorize(request: ConnectionRequest, channel: str) -> bool | Deny:
        return Deny("not your room") if channel == "room:secret" else True

    broadcaster = Broadcaster("memory://")
    async with (
        serve(broadcast_app(broadcaster, channel=nothing, authorize=authorize)) as host,
        Client(f"ws://{host}/ws", protocol=2, backoff=FAST) as client,
    ):
        secret = client.subscribe("room:secret", model=Posted)
        open_ = client.subscribe("room:open", model=Posted)
        other = client.subscribe("room:other", model=Posted)
        with pytest.raises(SubscriptionDenied) as denied:
            await secret.connected()
        assert denied.value.error_code == "forbidden" and "not your room" in str(denied.value)
        await open_.connected()
        await other.connected()
        await other.close()
        await until(lambda: broadcaster.registry.count("room:other") == 0)
        await post(broadcaster, "room:other", range(1))
        await post(broadcaster, "room:open", range(2))
        got = await open_.take(2)
        with pytest.raises(StopAsyncIteration):
            await anext(other)
        assert "room:secret" not in client.subscriptions and "room:other" not in client.subscriptions
        assert client.stats.attempts == 1  # the connection stayed up through both
        with pytest.raises(ClientError):
            client.subscribe("room:open")  # one subscription per channel
    assert [r.event.n for r in got] == [0, 1]


async def test_server_side_subscriptions_arrive_and_resume_after_a_drop() -> None:
    def resolve(request: ConnectionRequest) -> list[str]:
        return ["user:42", "news"]  # made by the server at connect

    broadcaster = Broadcaster("memory://")
    made: list[ChannelSubscription[Any]] = []
    async with (
        serve(broadcast_app(broadcaster, channel=resolve)) as host,
        Client(
            f"ws://{host}/ws",
            protocol=2,
            backoff=FAST,
            on_server_subscription=lambda sub: made.append(sub),  # type: ignore[arg-type]
        ) as client,
    ):
        mine = client.subscribe("user:42", model=Posted, server_side=True)
        subscribed = await mine.connected()
        assert (
            isinstance(subscribed, Subscribed) and subscribed.id is None and subscribed.channel == "user:42"
        )
        await post(broadcaster, "user:42", range(2))
        first = await mine.take(2)
        await until(lambda: len(made) == 1)
        assert made[0].channel == "news" and made[0].server_side
        for connection in list(broadcaster.registry):
            connection.close(CloseCode.INTERNAL_ERROR, "test")
        await post(broadcaster, "user:42", range(2, 4))  # missed: the resume token brings them back
        later = await mine.take(2)
        await post(broadcaster, "news", range(1))
        [news] = await made[0].take(1)
    assert [r.event.n for r in first + later] == [0, 1, 2, 3]
    assert [r.seq for r in later] == [3, 4] and mine.stats.duplicates == 0
    assert news.event == {"type": "client2_posted", "n": 0, "timestamp": news.event["timestamp"]}
    assert client.stats.attempts == 2


async def test_presence_asked_of_a_channel_without_it_reports_and_subscribes() -> None:
    broadcaster = Broadcaster("memory://")  # no channel has presence
    errors: list[ClientError] = []
    async with (
        serve(broadcast_app(broadcaster, channel=nothing)) as host,
        Client(f"ws://{host}/ws", protocol=2, backoff=FAST, on_error=errors.append) as client,
    ):
        room = client.subscribe("room:p", model=Posted, presence=True)
        await room.connected()
        await post(broadcaster, "room:p", range(1))
        [got] = await room.take(1)
    assert got.event.n == 0 and room.presence is None
    assert [e.message for e in errors if "presence_unavailable" in e.message]


async def test_presence_frames_keep_the_subscriptions_presence_current() -> None:
    """Against a scripted protocol-2 server (the presence server side is another branch's work)."""
    member = {"client": "c2", "identity": "device-2", "info": {"name": "Bar"}}

    async def script(ws: ServerConnection) -> None:
        await ws.send(
            json.dumps({"type": "welcome", "protocol": 2, "heartbeat_interval": 30, "connection": "c1"})
        )
        request = json.loads(await ws.recv())
        assert request == {
            "type": "subscribe",
            "id": request["id"],
            "channel": "restaurant:R",
            "presence": True,
        }
        frames: list[dict[str, Any]] = [
            {"type": "subscribed", "id": request["id"], "channel": "restaurant:R", "epoch": "e", "seq": 0,
             "resumed": False, "presence": {"count": 1, "members": [
                 {"client": "c1", "identity": "device-1", "info": {"name": "Host"}}], "truncated": False}},
            {"type": "presence_join", "channel": "restaurant:R", "member": member},
            {"type": "event", "channel": "restaurant:R", "event": {"type": "client2_posted", "n": 7, "seq": 1}},
            {"type": "presence_leave", "channel": "restaurant:R", "member": member},
            {"type": "event", "channel": "restaurant:R", "event": {"type": "client2_posted", "n": 8, "seq": 2}},
        ]  # fmt: skip
        for frame in frames:
            await ws.send(json.dumps(frame))
        await ws.wait_closed()

    changes: list[tuple[str, int, list[str]]] = []

    def seen(change: PresenceChange) -> None:
        changes.append((change.kind, change.presence.count, list(change.presence.members)))

    async with ws_serve(script, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Client(f"ws://127.0.0.1:{port}/", protocol=2) as client:
            room = client.subscribe("restaurant:R", model=Posted, presence=True, on_presence=seen)
            got = await room.take(2)
            assert client.connection_id == "c1"
    assert [r.event.n for r in got] == [7, 8]
    assert changes == [("snapshot", 1, ["c1"]), ("join", 2, ["c1", "c2"]), ("leave", 1, ["c1"])]
    assert room.presence is not None and room.presence.count == 1


async def test_a_protocol_1_server_is_named_not_retried() -> None:
    async def old(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "channel": "c", "epoch": "e", "seq": 0,
                                  "heartbeat_interval": 30, "resumed": False, "protocol": 1}))  # fmt: skip
        await ws.wait_closed()

    async with ws_serve(old, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Client(f"ws://127.0.0.1:{port}/", protocol=2, backoff=FAST) as client:
            subscription = client.subscribe("room:x")
            with pytest.raises(ClientError, match="does not speak protocol 2"):
                await asyncio.wait_for(anext(subscription), 5_000 * MS)
    assert client.stats.attempts == 1


def test_protocol_options_are_checked() -> None:
    from rtbroadcast import ConfigurationError

    with pytest.raises(ConfigurationError, match="protocol must be 1 or 2"):
        Client("ws://127.0.0.1:1/", protocol=3)
    with pytest.raises(ConfigurationError, match="need protocol=2"):
        Client("ws://127.0.0.1:1/").subscribe(presence=True)
    with pytest.raises(ConfigurationError, match="by name"):
        Client("ws://127.0.0.1:1/", protocol=2).subscribe()
