"""The broadcaster on the memory backend: lifecycle, in-process subscriptions, resume and gaps."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any, Literal

import pytest
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from rtbroadcast import (
    Broadcaster,
    BroadcasterState,
    ConfigurationError,
    Event,
    InvalidEvent,
    QueueLimits,
    Received,
    ResumePoint,
    ResyncRequired,
    StateError,
    StreamPosition,
    SubscriptionClosed,
)
from rtbroadcast.backends import Envelope
from rtbroadcast.backends.memory import MemoryBackend

from .support import MS, no_task_left

pytestmark = pytest.mark.asyncio_only


class Tick(Event):
    type: Literal["tick"] = "tick"
    n: int


async def test_lifecycle_states_and_misuse() -> None:
    broadcaster = Broadcaster()
    assert broadcaster.state is BroadcasterState.NEW
    with pytest.raises(StateError, match="async with broadcaster"):
        await broadcaster.publish("c", Tick(n=1))
    async with broadcaster:
        assert broadcaster.state is BroadcasterState.CONNECTED
        with pytest.raises(StateError, match="connect\\(\\) once"):
            await broadcaster.connect()
    assert broadcaster.state is BroadcasterState.CLOSED
    with pytest.raises(StateError):
        await broadcaster.publish("c", Tick(n=1))
    # A closed broadcaster can be connected again (tests and reloaders do this).
    async with broadcaster:
        assert await broadcaster.publish("c", Tick(n=1)) == 1


async def test_bad_arguments_fail_loudly() -> None:
    with pytest.raises(ConfigurationError, match="unknown backend"):
        Broadcaster("kafka://x")
    with pytest.raises(ConfigurationError, match="not both"):
        Broadcaster("memory://", backend=MemoryBackend())
    with pytest.raises(ConfigurationError, match="history_size"):
        Broadcaster("memory://?history_size=-1")
    async with Broadcaster() as broadcaster:
        with pytest.raises(ConfigurationError, match="channel"):
            await broadcaster.publish("", Tick(n=1))
        with pytest.raises(ConfigurationError, match="channel"):
            await broadcaster.publish("a\nb", Tick(n=1))
        with pytest.raises(InvalidEvent):
            await broadcaster.publish("c", {"type": "tick"})  # type: ignore[arg-type]
        with pytest.raises(InvalidEvent):
            await broadcaster.publish_json("c", "[1]")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ('{"type":"tick","seq":4}', "may not carry 'seq'"),
        ('{"n":1}', "needs a non-empty string 'type'"),
        ('{"type":null}', "needs a non-empty string 'type'"),
        ('{"type":"pong"}', "'pong' is reserved"),
        ('{"type":"tick","n":NaN}', "contains NaN"),
        ('{"type":"tick","type":"tock"}', "'type' twice"),
        ('{"type":"tick"} {"type":"tock"}', "not valid JSON"),
        ("{ }", "needs a non-empty string 'type'"),
        ('{"type":"tick","s":"\ud800"}', "not valid Unicode"),
        (b'{"type":"tick"}', "must be str"),
    ],
)
async def test_publish_json_refuses_what_clients_could_not_read(payload: object, message: str) -> None:
    async with Broadcaster() as broadcaster:
        with pytest.raises(InvalidEvent, match=message):
            await broadcaster.publish_json("c", payload)  # type: ignore[arg-type]
        # Nothing was published: the next event still gets seq 1.
        assert await broadcaster.publish_json("c", '  {"type":"tick","n":1}\n') == 1


class Serialised(Event):
    type: Literal["serialised_test"] = "serialised_test"
    n: int

    @model_serializer(mode="wrap")
    def _add(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.n < 0:
            data["seq"] = self.n
        return data


class Shared(Event):
    """A base of other events: it declares no type."""

    n: int


class SharedTick(Shared):
    # Another right spelling of the rule: Annotated, with the default in a Field.
    type: Annotated[Literal["shared_tick"], "wire type"] = Field("shared_tick", description="the type")


async def test_publish_refuses_an_event_clients_could_not_tell_apart() -> None:
    async with Broadcaster() as broadcaster:
        with pytest.raises(InvalidEvent, match="Shared declares no type"):
            await broadcaster.publish("c", Shared(type="anything", n=1))
        with pytest.raises(InvalidEvent, match="Event declares no type"):
            await broadcaster.publish("c", Event(type="tick"))
        with pytest.raises(InvalidEvent, match="not the class Tick"):
            await broadcaster.publish("c", Tick)  # type: ignore[arg-type]
        changed = Tick(n=1)
        changed.type = "tock"  # type: ignore[assignment]
        with pytest.raises(InvalidEvent, match="has type 'tock', but its class declares 'tick'"):
            await broadcaster.publish("c", changed)
        with pytest.raises(InvalidEvent, match="cannot be serialised"):
            await broadcaster.publish("c", SharedTick(n=1).model_copy(update={"n": "\ud800"}))
        # A custom serializer's output is checked at every publish.
        with pytest.raises(InvalidEvent, match="may not carry 'seq'"):
            await broadcaster.publish("c", Serialised(n=-1))
        with pytest.raises(ConfigurationError, match="idempotency_key"):
            await broadcaster.publish("c", Tick(n=1), idempotency_key=7)  # type: ignore[arg-type]
        assert await broadcaster.publish("c", Serialised(n=1)) == 1
        assert await broadcaster.publish("c", SharedTick(n=2)) == 2


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"heartbeat_interval": math.nan}, "heartbeat_interval"),
        ({"heartbeat_interval": math.inf}, "heartbeat_interval"),
        ({"heartbeat_interval": "25"}, "heartbeat_interval"),
        ({"heartbeat_interval": True}, "heartbeat_interval"),
        ({"position_check_interval": math.nan}, "position_check_interval"),
        ({"position_check_interval": "10"}, "position_check_interval"),
        ({"max_resume": 1.5}, "max_resume"),
        ({"max_resume": "1000"}, "max_resume"),
        ({"max_resume": None}, "max_resume"),
        ({"max_connections": 2.5}, "max_connections"),
        ({"max_connections": "10"}, "max_connections"),
        ({"max_connections_per_channel": True}, "max_connections_per_channel"),
        ({"queue_limits": {"max_messages": 10}}, "queue_limits"),
        ({"queue_limits": 10}, "queue_limits"),
        ({"backend": "memory://"}, "backend"),
        ({"url": 6379}, "url"),
        ({"url": ""}, "url"),
    ],
)
def test_nonsense_broadcaster_options_are_refused_naming_the_option(
    options: dict[str, Any], option: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"^{option} must be"):
        Broadcaster(**options)


async def test_subscribe_refuses_a_resume_or_model_of_the_wrong_kind() -> None:
    async with Broadcaster() as broadcaster:
        with pytest.raises(ConfigurationError, match="resume must be a ResumePoint"):
            broadcaster.subscribe("c", resume=("epoch", 3))  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="model must be Event or a subclass"):
            broadcaster.subscribe("c", model=dict)  # type: ignore[type-var]
        with pytest.raises(ConfigurationError, match="model must be Event or a subclass"):
            broadcaster.subscribe("c", model=Tick(n=1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"max_messages": 1.5}, "max_messages"),
        ({"max_messages": "10"}, "max_messages"),
        ({"max_size": True}, "max_size"),
        ({"max_size": 0}, "max_size"),
    ],
)
def test_nonsense_queue_limits_are_refused_naming_the_limit(options: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^QueueLimits.{option} must be an integer >= 1"):
        QueueLimits(**options)


async def test_publish_returns_contiguous_seqs_per_channel() -> None:
    async with Broadcaster() as broadcaster:
        assert [await broadcaster.publish("a", Tick(n=i)) for i in range(3)] == [1, 2, 3]
        assert await broadcaster.publish("b", Tick(n=0)) == 1
        assert await broadcaster.publish("a", Tick(n=9), idempotency_key="k") == 4
        assert await broadcaster.publish("a", Tick(n=9), idempotency_key="k") == 4


async def test_subscription_yields_typed_events_in_order() -> None:
    async with Broadcaster() as broadcaster:
        async with broadcaster.subscribe("c", model=Tick) as sub:
            assert sub.welcome is not None
            assert sub.welcome.seq == 0
            for i in range(5):
                await broadcaster.publish("c", Tick(n=i))
            got = [await anext(sub) for _ in range(5)]
        assert all(isinstance(item, Received) for item in got)
        received = [item for item in got if isinstance(item, Received)]
        assert [r.event.n for r in received] == [0, 1, 2, 3, 4]
        assert [r.seq for r in received] == [1, 2, 3, 4, 5]
        assert broadcaster.connection_count() == 0


async def test_resume_replays_exactly_what_was_missed() -> None:
    async with Broadcaster() as broadcaster:
        async with broadcaster.subscribe("c") as sub:
            await broadcaster.publish("c", Tick(n=1))
            await anext(sub)
            position = sub.position
        for i in range(2, 6):
            await broadcaster.publish("c", Tick(n=i))
        async with broadcaster.subscribe("c", resume=position, model=Tick) as sub:
            assert sub.welcome is not None and sub.welcome.resumed
            await broadcaster.publish("c", Tick(n=6))
            got = [await anext(sub) for _ in range(5)]
        assert [g.event.n for g in got if isinstance(g, Received)] == [2, 3, 4, 5, 6]


async def test_resume_that_cannot_be_served_says_resync() -> None:
    async with Broadcaster("memory://?history_size=3") as broadcaster:
        epoch = (await broadcaster.backend.position("c")).epoch
        for i in range(10):
            await broadcaster.publish("c", Tick(n=i))
        cases = {
            ResumePoint(epoch, 2): "history_trimmed",
            ResumePoint("other-epoch", 2): "epoch_changed",
            ResumePoint(epoch, 99): "seq_ahead",
        }
        for point, reason in cases.items():
            top = (await broadcaster.backend.position("c")).seq
            async with broadcaster.subscribe("c", resume=point, model=Tick) as sub:
                assert sub.welcome is not None and not sub.welcome.resumed
                first = await anext(sub)
                assert first == ResyncRequired(reason, epoch, top)
                await broadcaster.publish("c", Tick(n=100))
                after = await anext(sub)
                assert isinstance(after, Received)
                assert after.event.n == 100


async def test_slow_in_process_subscriber_is_closed_not_unbounded() -> None:
    async with Broadcaster(queue_limits=QueueLimits(max_messages=10)) as broadcaster:
        async with broadcaster.subscribe("c") as slow, broadcaster.subscribe("c") as fast:
            for i in range(11):
                await broadcaster.publish("c", Tick(n=i))
                await anext(fast)
            with pytest.raises(SubscriptionClosed, match="slow_consumer"):
                await anext(slow)
        assert broadcaster.stats().slow_consumers_closed == 1


async def test_disconnect_ends_subscriptions_and_tasks() -> None:
    # Taken before connect: the broadcaster's own position checker must end too. (A count taken after
    # connect let a leaked task pass, since the checker's end made up for it.)
    before = set(asyncio.all_tasks())
    broadcaster = Broadcaster()
    await broadcaster.connect()
    sub = broadcaster.subscribe("c")
    await sub.__aenter__()
    await broadcaster.disconnect()
    with pytest.raises(SubscriptionClosed, match="shutdown"):
        await anext(sub)
    await no_task_left(since=before, timeout=0)


async def test_naming_channels_does_not_grow_the_memory_backend() -> None:
    async with Broadcaster() as broadcaster:
        backend = broadcaster.backend
        for i in range(1000):
            await backend.position(f"nobody:{i}")
            await backend.history(f"nobody:{i}", 0, limit=10)
            async with broadcaster.subscribe(f"nobody:{i}"):
                pass
        assert backend.stats()["channels"] == 0
        epoch = (await backend.position("later")).epoch
        await broadcaster.publish("later", Tick(n=1))
        # The first publish keeps the epoch a client saw before it: no spurious resync.
        assert await backend.position("later") == StreamPosition(epoch, 1)


class LossyMemoryBackend(MemoryBackend):
    """A memory backend whose delivery to subscribers loses chosen seqs, as a dropped PUB/SUB message would.

    History keeps them, as a Redis Stream written by the same script does.
    """

    def __init__(self, lose: set[int]) -> None:
        super().__init__()
        self.lose = lose

    async def connect(self, listener: Any) -> None:
        lossy = self

        class Filter:
            def on_envelope(self, envelope: Envelope) -> None:
                if envelope.seq not in lossy.lose:
                    listener.on_envelope(envelope)

            def on_interruption(self, channels: Any, reason: str) -> None:
                listener.on_interruption(channels, reason)

        await super().connect(Filter())


async def test_a_gap_while_live_is_filled_from_history() -> None:
    async with Broadcaster(backend=LossyMemoryBackend(lose={2, 3})) as broadcaster:
        async with broadcaster.subscribe("c", model=Tick) as sub:
            for i in range(1, 5):
                await broadcaster.publish("c", Tick(n=i))
            got = [await asyncio.wait_for(anext(sub), 2_000 * MS) for _ in range(4)]
        assert [(g.seq, g.event.n) for g in got if isinstance(g, Received)] == [(i, i) for i in range(1, 5)]
        assert broadcaster.stats().repairs == 1


async def test_a_lost_last_message_is_caught_by_the_position_check() -> None:
    backend = LossyMemoryBackend(lose={2})
    async with Broadcaster(backend=backend, position_check_interval=0.05) as broadcaster:
        async with broadcaster.subscribe("c", model=Tick) as sub:
            await broadcaster.publish("c", Tick(n=1))
            await broadcaster.publish("c", Tick(n=2))
            got = [await asyncio.wait_for(anext(sub), 2_000 * MS) for _ in range(2)]
        assert [g.seq for g in got if isinstance(g, Received)] == [1, 2]
        assert broadcaster.stats().lost_detected == 1


class CountingMemoryBackend(MemoryBackend):
    """The memory backend, counting history reads."""

    history_reads = 0

    async def history(self, channel: str, since: int, *, limit: int) -> Any:
        self.history_reads += 1
        await asyncio.sleep(0.01)  # a round trip, so that concurrent repairs overlap as they would on Redis
        return await super().history(channel, since, limit=limit)


async def test_an_interruption_repairs_a_channel_with_one_history_read() -> None:
    backend = CountingMemoryBackend()
    async with Broadcaster(backend=backend, position_check_interval=None) as broadcaster:
        subscriptions = [broadcaster.subscribe("c", model=Tick) for _ in range(50)]
        for sub in subscriptions:
            await sub.__aenter__()
        await broadcaster.publish("c", Tick(n=1))
        for sub in subscriptions:
            assert isinstance(await anext(sub), Received)
        broadcaster.on_interruption(["c"], "test")
        await broadcaster.publish("c", Tick(n=2))
        for sub in subscriptions:
            item = await asyncio.wait_for(anext(sub), 2_000 * MS)
            assert isinstance(item, Received)
            assert item.seq == 2
            await sub.__aexit__(None, None, None)
        assert backend.history_reads == 1
        assert broadcaster.stats().repairs == 50
