"""Many subscriptions on one connection, in process: the broadcaster's add/remove API, its observers, the
per-cursor position check, and ``broadcaster.subscribe([...])``."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest

from rtbroadcast import (
    BackendUnavailable,
    Broadcaster,
    ConfigurationError,
    Connection,
    Event,
    Identity,
    PresenceSnapshot,
    Received,
    ResumePoint,
    ResyncRequired,
    StateError,
    SubscriptionRefused,
)
from rtbroadcast.backends.memory import MemoryBackend
from rtbroadcast.connection import item_text_v2
from rtbroadcast.cursor import Cursor
from rtbroadcast.protocol import decode_server_frame

from .support import MS

pytestmark = pytest.mark.asyncio_only


class Note(Event):
    type: Literal["subscriptions_note"] = "subscriptions_note"
    n: int


def frames(connection: Connection) -> list[dict[str, object]]:
    out = []
    while (item := connection.get_nowait()) is not None:
        out.append(json.loads(item_text_v2(item)))
    return out


async def test_one_queue_many_cursors_each_in_order() -> None:
    async with Broadcaster("memory://", position_check_interval=None) as broadcaster:
        connection = Connection(protocol=2, identity=Identity("u1"))
        await broadcaster.attach(connection)
        await broadcaster.add_subscription(connection, "a", request_id="r1")
        await broadcaster.add_subscription(connection, "b")
        with pytest.raises(SubscriptionRefused) as refused:
            await broadcaster.add_subscription(connection, "a")
        assert refused.value.code == "already_subscribed"
        for n in range(3):
            await broadcaster.publish("a", Note(n=n))
            await broadcaster.publish("b", Note(n=n))
        got = frames(connection)
        assert got[0]["type"] == "welcome" and got[0]["connection"] == connection.client_id
        assert [(f["type"], f["id"], f["channel"]) for f in got[1:3]] == [
            ("subscribed", "r1", "a"),
            ("subscribed", None, "b"),
        ]
        events = got[3:]
        for channel in ("a", "b"):
            mine = [f["event"] for f in events if f["channel"] == channel]
            assert [e["seq"] for e in mine] == [1, 2, 3]  # type: ignore[index]
        broadcaster.remove_subscription(connection, "a", request_id="r2")
        await broadcaster.publish("a", Note(n=9))
        await broadcaster.publish("b", Note(n=9))
        after = frames(connection)
        assert after[0] == {"type": "unsubscribed", "id": "r2", "channel": "a", "reason": "client"}
        assert [f["channel"] for f in after[1:]] == ["b"]
        with pytest.raises(SubscriptionRefused) as refused:
            broadcaster.remove_subscription(connection, "a")
        assert refused.value.code == "not_subscribed"
        assert broadcaster.connection_count("a") == 0
        connection.close()
        assert broadcaster.registry.channels() == []


async def test_a_protocol_1_connection_cannot_gain_or_lose_channels() -> None:
    async with Broadcaster("memory://") as broadcaster:
        connection = Connection("a")
        await broadcaster.attach(connection)
        with pytest.raises(StateError):
            await broadcaster.add_subscription(connection, "b")
        with pytest.raises(SubscriptionRefused):
            broadcaster.remove_subscription(connection, "a")
        connection.close()
    with pytest.raises(StateError):
        _ = Connection(protocol=2).cursor


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    async def subscription_started(self, cursor: Cursor) -> PresenceSnapshot | None:
        self.events.append(("start", cursor.channel, str(cursor.info.get("name"))))
        return PresenceSnapshot(1) if cursor.channel.startswith("p:") else None

    def subscription_ended(self, cursor: Cursor, reason: str) -> None:
        self.events.append(("end", cursor.channel, reason))


async def test_observers_hear_every_start_and_end_once_and_give_the_snapshot() -> None:
    async with Broadcaster("memory://", position_check_interval=None) as broadcaster:
        recorder = Recorder()
        broadcaster.add_subscription_observer(recorder)
        one = Connection("solo")
        one.cursor.info = {"name": "device"}
        await broadcaster.attach(one)
        two = Connection(protocol=2, identity=Identity("u", info={"name": "me"}))
        await broadcaster.attach(two)
        await broadcaster.add_subscription(two, "p:room", request_id="r1", presence=True)
        await broadcaster.add_subscription(two, "x", info={"name": "custom"})
        await broadcaster.add_subscription(two, "y", presence=True)
        got = frames(two)
        subscribed = {f["channel"]: f for f in got if f["type"] == "subscribed"}
        assert subscribed["p:room"]["presence"] == {"count": 1, "members": [], "truncated": False}
        assert "presence" not in subscribed["y"]
        assert [f["code"] for f in got if f["type"] == "error"] == ["presence_unavailable"]
        broadcaster.remove_subscription(two, "x", reason="server")
        two.close()
        one.close()
        assert recorder.events == [
            ("start", "solo", "device"),
            ("start", "p:room", "me"),
            ("start", "x", "custom"),
            ("start", "y", "me"),
            ("end", "x", "server"),
            ("end", "p:room", "disconnect"),
            ("end", "y", "disconnect"),
            ("end", "solo", "disconnect"),
        ]


async def test_position_check_repairs_each_cursor_of_one_connection() -> None:
    """Two cursors of one connection behind at once are both repaired (the check is keyed per cursor)."""
    async with Broadcaster("memory://", position_check_interval=None) as broadcaster:
        connection = Connection(protocol=2)
        await broadcaster.attach(connection)
        for channel in ("a", "b"):
            await broadcaster.add_subscription(connection, channel)
            await broadcaster.publish(channel, Note(n=1))
        frames(connection)
        # Lose the last event of each channel (what a dropped PUB/SUB message does).
        for cursor in connection.cursors:
            cursor.set_position(cursor.epoch, cursor.last_seq - 1)
        behind = await broadcaster.check_positions({})
        assert set(behind) == {(connection.id, "a"), (connection.id, "b")}
        assert await broadcaster.check_positions(behind) == {}
        await asyncio.sleep(0)
        for _ in range(100):
            if all(c.last_seq == 1 for c in connection.cursors) and not any(
                c.buffering for c in connection.cursors
            ):
                break
            await asyncio.sleep(MS)
        got = frames(connection)
        assert sorted((f["channel"], f["event"]["seq"]) for f in got) == [("a", 1), ("b", 1)]  # type: ignore[index]
        assert broadcaster.stats().lost_detected == 2
        connection.close()


async def test_subscribe_to_several_channels_in_process() -> None:
    backend = MemoryBackend(history_size=3)
    async with Broadcaster(backend=backend, position_check_interval=None) as broadcaster:
        async with broadcaster.subscribe(["a", "b"], model=Note) as sub:
            assert sub.channels == ("a", "b")
            await broadcaster.publish("a", Note(n=1))
            await broadcaster.publish("b", Note(n=2))
            await broadcaster.publish("a", Note(n=3))
            got = [await asyncio.wait_for(anext(sub), 1) for _ in range(3)]
            assert [(r.channel, r.seq, r.event.n) for r in got if isinstance(r, Received)] == [
                ("a", 1, 1),
                ("b", 1, 2),
                ("a", 2, 3),
            ]
            positions = sub.positions
            with pytest.raises(StateError):
                _ = sub.position
            with pytest.raises(StateError):
                _ = sub.channel
        for n in range(5):
            await broadcaster.publish("a", Note(n=10 + n))
        await broadcaster.publish("b", Note(n=20))
        # b resumes (1 missed), a cannot (5 missed, history 3): a resync naming a, then b's event, live ones.
        async with broadcaster.subscribe(["a", "b"], resume=positions, model=Note) as sub:
            first = await asyncio.wait_for(anext(sub), 1)
            second = await asyncio.wait_for(anext(sub), 1)
            top_a = await backend.position("a")
            assert first == ResyncRequired("history_trimmed", top_a.epoch, top_a.seq, "a")
            assert isinstance(second, Received) and (second.channel, second.event.n) == ("b", 20)
            assert sub.positions["a"] == ResumePoint(top_a.epoch, 7)
        assert broadcaster.connection_count() == 0


async def test_the_single_channel_form_is_unchanged() -> None:
    async with Broadcaster("memory://") as broadcaster, broadcaster.subscribe("a", model=Note) as sub:
        assert sub.channel == "a" and sub.channels == ("a",)
        assert sub.welcome is not None and sub.welcome.channel == "a"
        await broadcaster.publish("a", Note(n=1))
        item = await asyncio.wait_for(anext(sub), 1)
        assert isinstance(item, Received) and item.channel == "a"
        assert sub.position.seq == 1


@pytest.mark.parametrize(
    ("channels", "resume"),
    [
        ([], None),
        (["a", "a"], None),
        (["a", "\x00"], None),
        (["a"], ResumePoint("e", 1)),
        (["a"], {"b": ResumePoint("e", 1)}),
        (["a"], {"a": ("e", 1)}),
        ("a", {"a": ResumePoint("e", 1)}),
        (42, None),
    ],
)
async def test_subscribe_arguments_are_checked(channels: object, resume: object) -> None:
    broadcaster = Broadcaster("memory://")
    with pytest.raises(ConfigurationError):
        broadcaster.subscribe(channels, resume=resume)  # type: ignore[arg-type]


def test_decoding_an_in_process_resync_names_its_channel() -> None:
    frame = decode_server_frame('{"type":"resync_required","channel":"a","reason":"r","epoch":"e","seq":1}')
    assert frame == ResyncRequired("r", "e", 1, "a")


class Gate:
    """An observer that holds the first start of ``channel`` until released, then fails it."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.held = False

    async def subscription_started(self, cursor: Cursor) -> PresenceSnapshot | None:
        if cursor.channel == self.channel and not self.held:
            self.held = True
            self.entered.set()
            await self.release.wait()
            raise BackendUnavailable("presence store down")
        return None

    def subscription_ended(self, cursor: Cursor, reason: str) -> None:
        pass


async def test_a_subscription_left_and_made_again_while_the_first_was_starting_is_kept() -> None:
    async with Broadcaster("memory://", position_check_interval=None) as broadcaster:
        gate = Gate("a")
        broadcaster.add_subscription_observer(gate)
        connection = Connection(protocol=2)
        await broadcaster.attach(connection)
        first = asyncio.ensure_future(broadcaster.add_subscription(connection, "a", request_id="r1"))
        await asyncio.wait_for(gate.entered.wait(), 1)
        broadcaster.remove_subscription(connection, "a", reason="server")
        second = await broadcaster.add_subscription(connection, "a", request_id="r2")
        gate.release.set()
        with pytest.raises(BackendUnavailable):
            await first
        # The failed first start took nothing of the second subscription with it.
        assert connection.cursor_for("a") is second
        assert broadcaster.connection_count("a") == 1
        await broadcaster.publish("a", Note(n=1))
        got = frames(connection)
        kinds = [(f["type"], f.get("id")) for f in got]
        assert kinds == [("welcome", None), ("unsubscribed", None), ("subscribed", "r2"), ("event", None)]
        connection.close()
