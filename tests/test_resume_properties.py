"""Property: whatever the interleaving of publishes, disconnects and resumes, every subscriber receives
exactly the channel's published sequence from its resume point, or a ``resync_required`` exactly where
history could not cover the gap. No gap, no duplicate, no reordering."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtbroadcast import Backend, Broadcaster, Event, Received, ResumePoint, ResyncRequired, Subscription
from rtbroadcast.backends.memory import MemoryBackend
from rtbroadcast.backends.postgres import PostgresBackend
from rtbroadcast.backends.redis import RedisBackend, RedisSentinelBackend
from rtbroadcast.backends.redis_cluster import RedisClusterBackend

from .postgres_support import drop_schema, new_schema
from .redis_support import RedisClusterFixture, RedisSentinelFixture, delete_cluster_keys, delete_keys
from .support import MS

HISTORY = 5
CHANNEL = "prop"


class Step(Event):
    type: Literal["prop_step"] = "prop_step"
    n: int


Publish = tuple[Literal["publish"], int]
Connect = tuple[Literal["connect"], int, str, int]
Disconnect = tuple[Literal["disconnect"], int]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 8)),
        st.tuples(
            st.just("connect"),
            st.integers(0, 2),
            st.sampled_from(["fresh", "resume", "stale", "future", "wrong_epoch"]),
            st.integers(1, 9),
        ),
        st.tuples(st.just("disconnect"), st.integers(0, 2)),
    ),
    max_size=30,
)


@dataclass
class Client:
    subscription: Subscription[Step] | None = None
    position: ResumePoint | None = None
    expected_next: int = 0
    received: list[int] = field(default_factory=list)


async def drain(client: Client, top: int) -> None:
    """Read until the client has everything up to ``top``; check order and contiguity on the way."""
    assert client.subscription is not None
    async with asyncio.timeout(5_000 * MS):
        while client.expected_next <= top:
            item = await anext(client.subscription)
            assert isinstance(item, Received), f"unexpected {item!r}"
            assert item.seq == client.expected_next, (item.seq, client.expected_next)
            assert item.event.n == item.seq
            client.received.append(item.seq)
            client.expected_next += 1


async def run(ops: list[Publish | Connect | Disconnect], backend: Backend, *, exact_trim: bool) -> None:
    async with Broadcaster(backend=backend) as broadcaster:
        epoch = (await backend.position(CHANNEL)).epoch
        top = 0
        clients = [Client() for _ in range(3)]
        for op in ops:
            if op[0] == "publish":
                for _ in range(op[1]):
                    top = await broadcaster.publish(CHANNEL, Step(n=top + 1))
            elif op[0] == "connect":
                _, index, mode, delta = op
                client = clients[index]
                if client.subscription is not None:
                    continue
                last = client.position.seq if client.position else 0
                point = {
                    "fresh": None,
                    "resume": ResumePoint(epoch, last),
                    "stale": ResumePoint(epoch, max(0, top - delta)),
                    "future": ResumePoint(epoch, top + delta),
                    "wrong_epoch": ResumePoint("not-" + epoch, last),
                }[mode]
                subscription = broadcaster.subscribe(CHANNEL, resume=point, model=Step)
                await subscription.__aenter__()
                welcome = subscription.welcome
                assert welcome is not None
                client.subscription = subscription
                # Redis trims streams approximately (XADD MAXLEN ~): it may keep more than HISTORY events,
                # so past the window it may still resume. Within the window it must.
                coverable = point is not None and point.epoch == epoch and point.seq <= top
                within = coverable and point is not None and top - point.seq <= HISTORY
                if point is None:
                    assert (welcome.seq, welcome.resumed) == (top, False)
                    client.expected_next = top + 1
                elif within or (coverable and not exact_trim and welcome.resumed):
                    assert (welcome.seq, welcome.resumed) == (point.seq, True)
                    client.expected_next = point.seq + 1
                else:
                    reason = (
                        "epoch_changed"
                        if point.epoch != epoch
                        else "seq_ahead"
                        if point.seq > top
                        else "history_trimmed"
                    )
                    assert not welcome.resumed
                    first = await asyncio.wait_for(anext(subscription), 5_000 * MS)
                    assert first == ResyncRequired(reason, epoch, top)
                    client.expected_next = top + 1
            else:
                client = clients[op[1]]
                if client.subscription is None:
                    continue
                await drain(client, top)
                client.position = client.subscription.position
                assert client.position == ResumePoint(epoch, top)
                await client.subscription.__aexit__(None, None, None)
                client.subscription = None
        for client in clients:
            if client.subscription is not None:
                await drain(client, top)
                await client.subscription.__aexit__(None, None, None)
        assert broadcaster.connection_count() == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_every_subscriber_sees_the_exact_stream_on_memory(ops: list[Publish | Connect | Disconnect]) -> None:
    asyncio.run(run(ops, MemoryBackend(history_size=HISTORY), exact_trim=True))


@pytest.mark.redis
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_every_subscriber_sees_the_exact_stream_on_redis(
    redis_url: str, ops: list[Publish | Connect | Disconnect]
) -> None:
    prefix = f"rtbprop-{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(
            run(ops, RedisBackend(redis_url, key_prefix=prefix, history_size=HISTORY), exact_trim=False)
        )
    finally:
        delete_keys(redis_url, prefix)


@pytest.mark.postgresql
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_every_subscriber_sees_the_exact_stream_on_postgresql(
    postgres_url: str, ops: list[Publish | Connect | Disconnect]
) -> None:
    schema = new_schema()
    try:
        asyncio.run(
            run(ops, PostgresBackend(postgres_url, schema=schema, history_size=HISTORY), exact_trim=True)
        )
    finally:
        asyncio.run(drop_schema(postgres_url, schema))


@pytest.mark.redis
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_every_subscriber_sees_the_exact_stream_on_redis_cluster(
    redis_cluster: RedisClusterFixture, ops: list[Publish | Connect | Disconnect]
) -> None:
    prefix = f"rtbprop-{uuid.uuid4().hex[:12]}"
    seeds = [("127.0.0.1", node.port) for node in redis_cluster.nodes]
    try:
        asyncio.run(
            run(ops, RedisClusterBackend(seeds, key_prefix=prefix, history_size=HISTORY), exact_trim=False)
        )
    finally:
        delete_cluster_keys(redis_cluster, prefix)


@pytest.mark.redis
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_every_subscriber_sees_the_exact_stream_on_redis_sentinel(
    redis_sentinel: RedisSentinelFixture, ops: list[Publish | Connect | Disconnect]
) -> None:
    prefix = f"rtbprop-{uuid.uuid4().hex[:12]}"
    backend = RedisSentinelBackend(
        redis_sentinel.addresses, redis_sentinel.service, key_prefix=prefix, history_size=HISTORY
    )
    try:
        asyncio.run(run(ops, backend, exact_trim=False))
    finally:
        delete_keys(f"redis://127.0.0.1:{redis_sentinel.current_master().port}/0", prefix)
