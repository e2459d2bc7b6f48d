"""Broadcaster.stats() (a typed, frozen snapshot) and Broadcaster.position(channel)."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import pytest
from fastapi.encoders import jsonable_encoder

from rtbroadcast import (
    Broadcaster,
    BroadcasterState,
    BroadcasterStats,
    ConfigurationError,
    Event,
    QueueLimits,
    ResumePoint,
    StateError,
    StreamPosition,
)

pytestmark = pytest.mark.asyncio_only


class Tick(Event):
    type: Literal["stats_tick"] = "stats_tick"
    n: int


async def test_stats_is_a_typed_snapshot_that_moves_with_the_broadcaster() -> None:
    async with Broadcaster() as broadcaster:
        before = broadcaster.stats()
        assert isinstance(before, BroadcasterStats)
        assert before.state is BroadcasterState.CONNECTED
        assert before.backend_name == "memory" and before.backend_available is True
        assert before.published == 0 and before.connections == 0 and before.channels == {}
        async with broadcaster.subscribe("room:1") as subscription:
            for n in range(3):
                await broadcaster.publish("room:1", Tick(n=n))
            async for _ in subscription:
                if subscription.position.seq == 3:
                    break
            during = broadcaster.stats()
            assert during.published == 3 and during.connections == 1
            assert during.channels == {"room:1": 1}
            assert during.backend["backend"] == "memory" and during.backend["subscribed"] == 1
        # A snapshot does not move afterwards, and cannot be changed.
        assert before.published == 0 and during.connections == 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            during.published = 9  # type: ignore[misc]
        # The mappings are copies: changing one changes neither the broadcaster nor a later snapshot.
        during.channels["room:1"] = 99  # type: ignore[index]
        assert broadcaster.stats().channels == {}
    assert broadcaster.stats().state is BroadcasterState.CLOSED


async def test_slow_consumer_counters_reach_the_snapshot() -> None:
    broadcaster = Broadcaster(queue_limits=QueueLimits(max_messages=2))
    async with broadcaster, broadcaster.subscribe("room:1"):
        for n in range(4):  # nobody reads: the welcome and two events fill the queue, then it closes
            await broadcaster.publish("room:1", Tick(n=n))
        stats = broadcaster.stats()
    assert stats.slow_consumers_closed == 1 and stats.messages_dropped >= 3 and stats.queue_high_water == 3


async def test_as_dict_is_json_with_the_shape_stats_had_as_a_dict() -> None:
    async with Broadcaster() as broadcaster:
        await broadcaster.publish("room:1", Tick(n=1))
        body = json.loads(json.dumps(broadcaster.stats().as_dict()))
    assert body == {
        "state": "connected",
        "backend": {
            "backend": "memory",
            "channels": 1,
            "subscribed": 0,
            "evicted": 0,
            "presence_channels": 0,
        },
        "backend_name": "memory",
        "backend_available": True,
        "published": 1,
        "interruptions": 0,
        "repairs": 0,
        "lost_detected": 0,
        "resyncs": 0,
        "resumes": 0,
        "resyncs_by_reason": {},
        "interruptions_by_reason": {},
        "control_applied": 0,
        "control_lost": 0,
        "presence_members": 0,
        "presence_watchers": 0,
        "connections": 0,
        "channels": {},
        "messages_sent": 0,
        "messages_dropped": 0,
        "queue_high_water": 0,
        "slow_consumers_closed": 0,
    }


async def test_a_fastapi_route_returning_stats_still_answers_the_same_json() -> None:
    async with Broadcaster() as broadcaster:
        stats = broadcaster.stats()
        assert jsonable_encoder(stats) == stats.as_dict()


async def test_the_dict_interface_still_works_for_one_release_with_a_deprecation_warning() -> None:
    async with Broadcaster() as broadcaster:
        await broadcaster.publish("room:1", Tick(n=1))
        stats = broadcaster.stats()
    with pytest.warns(
        DeprecationWarning, match=r"stats\(\)\['published'\] is deprecated.*stats\(\)\.published"
    ):
        assert stats["published"] == 1
    with pytest.warns(DeprecationWarning, match=r"use stats\(\)\.as_dict\(\)"):
        assert stats["state"] == "connected"  # the old value, not the enum
    with pytest.warns(DeprecationWarning, match="get"):
        assert stats.get("backend_available") is True
    with pytest.warns(DeprecationWarning, match="as_dict"):
        assert stats.get("no_such_counter", 7) == 7
    with pytest.warns(DeprecationWarning, match="deprecated") as caught:  # keys(), then one per key
        assert {**stats} == stats.as_dict() == dict(stats)
    assert "use stats().as_dict()" in str(caught[0].message)
    with pytest.warns(DeprecationWarning, match="no_such_counter"), pytest.raises(KeyError):
        stats["no_such_counter"]


async def test_the_deprecation_warning_points_at_the_caller() -> None:
    async with Broadcaster() as broadcaster:
        with pytest.warns(DeprecationWarning, match="connections") as caught:
            broadcaster.stats()["connections"]
    assert caught[0].filename == __file__


async def test_position_is_the_top_of_the_channels_stream() -> None:
    broadcaster = Broadcaster()
    with pytest.raises(StateError, match="read a position"):
        await broadcaster.position("room:1")
    async with broadcaster:
        empty = await broadcaster.position("room:1")
        assert isinstance(empty, StreamPosition) and empty.seq == 0
        await broadcaster.publish("room:1", Tick(n=1))
        seq = await broadcaster.publish("room:1", Tick(n=2))
        top = await broadcaster.position("room:1")
        assert top == StreamPosition(empty.epoch, seq) and seq == 2
        # What a subscription resuming from it sees: nothing missed, the next publish next.
        async with broadcaster.subscribe("room:1") as subscription:
            assert subscription.welcome is not None and subscription.welcome.seq == top.seq
        with pytest.raises(ConfigurationError, match="channel"):
            await broadcaster.position("bad\nchannel")


async def test_resumes_and_resyncs_are_counted_by_reason() -> None:
    async with Broadcaster() as broadcaster:
        await broadcaster.publish("room:1", Tick(n=1))
        top = await broadcaster.position("room:1")
        async with broadcaster.subscribe("room:1", resume=ResumePoint(top.epoch, 0)):
            pass
        async with broadcaster.subscribe("room:1", resume=ResumePoint("other-epoch", 1)):
            pass
        async with broadcaster.subscribe("room:1", resume=ResumePoint(top.epoch, 5)):
            pass
        stats = broadcaster.stats()
    assert stats.resumes == 1 and stats.resyncs == 2
    assert stats.resyncs_by_reason == {"epoch_changed": 1, "seq_ahead": 1}
