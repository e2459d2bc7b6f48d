"""rtbroadcast.testing's capture and protocol client, used as a user's test suite would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import pytest

from rtbroadcast import Broadcaster, CloseCode, ConfigurationError, Event, ResumePoint
from rtbroadcast.protocol import ErrorFrameV2, ResyncRequired, Subscribed, Unsubscribed, Welcome, WelcomeV2
from rtbroadcast.testing import TestTimeout, capture, connect, serve

from .support import broadcast_app


class Noted(Event):
    type: Literal["helpers_noted"] = "helpers_noted"
    n: int


async def test_capture_collects_in_order_and_a_missing_event_fails_with_what_arrived() -> None:
    async with Broadcaster() as broadcaster, capture(broadcaster, "room:1", model=Noted) as room:
        for n in range(3):
            await broadcaster.publish("room:1", Noted(n=n))
        first, second = await room.take(2)
        assert (first.seq, first.event.n, second.seq) == (1, 0, 2)
        assert (await room.take_one()).n == 2
        assert [event.n for event in room.events] == [0, 1, 2]
        with pytest.raises(TestTimeout, match=r"waited 0.1 s for 1 event\(s\), got 0"):
            await room.take(1, timeout=0.1)


async def test_capture_reports_a_resync_and_a_closed_broadcaster() -> None:
    broadcaster = Broadcaster()
    async with broadcaster:
        async with capture(broadcaster, "room:2", resume=ResumePoint("elsewhere", 3)) as room:
            await broadcaster.publish("room:2", Noted(n=1))
            await room.take(1)
            assert [resync.reason for resync in room.resyncs] == ["epoch_changed"]
        async with capture(broadcaster, "room:3") as closing:
            await broadcaster.disconnect()
            with pytest.raises(Exception, match="shutdown"):
                await closing.take(1)


@asynccontextmanager
async def running(**options: object) -> AsyncIterator[tuple[Broadcaster, str]]:
    broadcaster = Broadcaster()
    async with serve(broadcast_app(broadcaster, **options)) as server:
        yield broadcaster, server.ws_url("/ws")


async def test_protocol_1_welcome_events_pings_and_a_refusal() -> None:
    async with running() as (broadcaster, url), connect(url + "?room=b") as ws:
        assert isinstance(ws.welcome, Welcome) and ws.welcome.channel == "room:b"
        await broadcaster.publish("room:b", Noted(n=8))
        event = await ws.event()
        assert (event["type"], event["n"], event["seq"]) == ("helpers_noted", 8, 1)
        assert (await ws.ping()).timestamp
        with pytest.raises(ConfigurationError, match="protocol-2"):
            await ws.subscribe("room:c")
        with pytest.raises(TestTimeout, match="for an event"):
            await ws.event(timeout=0.2)
    async with running() as (_, url), connect(url) as refused:  # no ?room=: no channel
        assert refused.welcome is None and refused.close_code == CloseCode.BAD_REQUEST


async def test_protocol_2_subscribe_events_and_unsubscribe() -> None:
    async with running() as (broadcaster, url), connect(url, protocol=2) as ws:
        assert isinstance(ws.welcome, WelcomeV2)
        subscribed = await ws.subscribe("room:x")
        assert (
            isinstance(subscribed, Subscribed) and subscribed.channel == "room:x" and not subscribed.resumed
        )
        assert isinstance(await ws.subscribe("room:y"), Subscribed)
        await broadcaster.publish("room:y", Noted(n=1))
        await broadcaster.publish("room:x", Noted(n=2))
        event = await ws.event(channel="room:x")  # the room:y event is skipped, and kept
        assert (event["n"], event["seq"]) == (2, 1)
        assert any(getattr(frame, "channel", None) == "room:y" for frame in ws.skipped)
        refused = await ws.subscribe("room:x")
        assert isinstance(refused, ErrorFrameV2) and refused.code == "already_subscribed"
        assert isinstance(await ws.unsubscribe("room:x"), Unsubscribed)
        resumed = await ws.subscribe("room:x", resume=ResumePoint("other", 5))
        assert isinstance(resumed, Subscribed) and not resumed.resumed
        assert (await ws.expect(ResyncRequired)).channel == "room:x"


async def test_closed_returns_the_servers_close_code() -> None:
    async with running(max_messages_per_second=2.0) as (_, url), connect(url + "?room=r") as ws:
        for _ in range(5):
            await ws.ws.send('{"type":"ping"}')
        assert (await ws.closed())[0] == CloseCode.RATE_LIMITED


def test_the_module_exports_what_the_api_page_documents() -> None:
    import re
    from pathlib import Path

    import rtbroadcast.testing as testing

    page = (Path(__file__).parent.parent / "docs/reference/api.md").read_text()
    documented = re.search(r"::: rtbroadcast.testing\n.*?members: \[(.*?)\]", page, re.DOTALL)
    assert documented is not None
    assert set(testing.__all__) == {name.strip() for name in documented[1].split(",")}
