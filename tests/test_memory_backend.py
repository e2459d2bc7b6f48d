"""What only the memory backend does: drop idle streams, and never let a client resume into a new one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Collection
from typing import Literal

import pytest

from rtbroadcast import (
    Broadcaster,
    ConfigurationError,
    Event,
    Received,
    ResumePoint,
    ResyncRequired,
    StreamPosition,
)
from rtbroadcast.backends import Envelope
from rtbroadcast.backends.memory import DEFAULT_IDLE_TTL, MemoryBackend

from .support import MS

pytestmark = pytest.mark.asyncio_only  # in-process: nothing here depends on the loop

TTL = 100 * MS
#: Comfortably past TTL, so that a loaded machine cannot make an idle channel look fresh.
PAST_TTL = 3 * TTL


class Tick(Event):
    type: Literal["memory_test.tick"] = "memory_test.tick"
    n: int


class Listener:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def on_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def on_interruption(self, channels: Collection[str], reason: str) -> None:
        raise AssertionError("the memory backend is never interrupted")


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    backend = MemoryBackend(idle_ttl=TTL)
    await backend.connect(Listener())
    yield backend
    await backend.disconnect()


def payload(n: int) -> str:
    return json.dumps({"type": "item", "n": n})


async def test_a_channel_idle_past_its_ttl_with_no_subscriber_is_dropped(backend: MemoryBackend) -> None:
    for n in range(3):
        await backend.publish("old", payload(n))
    before = await backend.position("old")
    await asyncio.sleep(PAST_TTL)
    await backend.publish("new", payload(0))  # any use of the backend drops what has been idle too long
    assert backend.stats()["channels"] == 1
    assert backend.stats()["evicted"] == 1
    after = await backend.position("old")
    assert after.seq == 0
    # Its next stream restarts at seq 1, so it must be another epoch: (epoch, seq) never names two events.
    assert after.epoch != before.epoch
    again = await backend.publish("old", payload(9))
    assert (again.seq, again.epoch) == (1, after.epoch)
    history = await backend.history("old", 0, limit=10)
    assert [e.seq for e in history.envelopes] == [1] and history.complete


async def test_publishes_and_reads_keep_a_channel(backend: MemoryBackend) -> None:
    await backend.publish("read", payload(0))
    await backend.publish("written", payload(0))
    top = await backend.position("read")
    for _ in range(4):
        await asyncio.sleep(TTL / 2)
        await backend.history("read", 0, limit=10)
        await backend.publish("written", payload(1))
    assert await backend.position("read") == top
    assert backend.stats()["evicted"] == 0


async def test_a_subscribed_channel_is_never_dropped(backend: MemoryBackend) -> None:
    await backend.subscribe("live")
    await backend.publish("live", payload(1))
    top = await backend.position("live")
    await asyncio.sleep(PAST_TTL)
    await backend.publish("other", payload(1))
    assert await backend.position("live") == top
    assert backend.stats()["evicted"] == 0
    # Once nobody here listens, it ages like any other channel.
    await backend.unsubscribe("live")
    await asyncio.sleep(PAST_TTL)
    await backend.publish("other", payload(2))
    assert (await backend.position("live")).seq == 0
    assert backend.stats()["evicted"] == 2  # "live", and "other" idle as long


async def test_a_client_told_the_epoch_before_the_first_publish_keeps_it(backend: MemoryBackend) -> None:
    await backend.subscribe("quiet")
    told = await backend.position("quiet")
    # Another channel's stream is dropped meanwhile, which moves the epoch new streams get.
    await backend.publish("gone", payload(1))
    await asyncio.sleep(PAST_TTL)
    await backend.publish("trigger", payload(1))
    assert backend.epoch != told.epoch
    first = await backend.publish("quiet", payload(1))
    assert StreamPosition(first.epoch, first.seq) == StreamPosition(told.epoch, 1)


@pytest.mark.parametrize("published_after", [0, 1, 5])
async def test_resuming_on_a_dropped_channel_resyncs_never_a_silent_gap(published_after: int) -> None:
    async with Broadcaster(f"memory://?idle_ttl={TTL}") as broadcaster:
        for n in range(3):
            await broadcaster.publish("c", Tick(n=n))
        left_at = await broadcaster.backend.position("c")  # a client had seq 1..3, then went away
        await asyncio.sleep(PAST_TTL)
        await broadcaster.publish("elsewhere", Tick(n=0))
        # The channel's new stream: its seqs 1..5 are not the old stream's, and 4, 5 are not what was missed.
        for n in range(published_after):
            await broadcaster.publish("c", Tick(n=100 + n))
        top = await broadcaster.backend.position("c")
        async with broadcaster.subscribe("c", resume=ResumePoint(left_at.epoch, 3), model=Tick) as sub:
            assert sub.welcome is not None and not sub.welcome.resumed
            assert await anext(sub) == ResyncRequired("epoch_changed", top.epoch, top.seq)
            await broadcaster.publish("c", Tick(n=7))
            after = await anext(sub)
            assert isinstance(after, Received) and after.event.n == 7


def test_the_url_configures_the_idle_ttl() -> None:
    assert MemoryBackend.from_url("memory://")._idle_ttl == DEFAULT_IDLE_TTL
    assert MemoryBackend.from_url("memory://?idle_ttl=30")._idle_ttl == 30.0
    assert MemoryBackend.from_url("memory://?idle_ttl=none")._idle_ttl is None
    for bad in ("0", "-5", "nan"):
        with pytest.raises(ConfigurationError, match="idle_ttl"):
            MemoryBackend.from_url(f"memory://?idle_ttl={bad}")
    with pytest.raises(ConfigurationError, match="idle_ttl"):
        MemoryBackend.from_url("memory://?idle_ttl=soon")
    with pytest.raises(ConfigurationError, match="idle_ttl"):
        MemoryBackend(idle_ttl=0)


async def test_without_an_idle_ttl_streams_stay() -> None:
    backend = MemoryBackend.from_url("memory://?idle_ttl=none")
    await backend.connect(Listener())
    await backend.publish("kept", payload(1))
    await asyncio.sleep(PAST_TTL)
    await backend.publish("other", payload(1))
    assert (await backend.position("kept")).seq == 1
    await backend.disconnect()
