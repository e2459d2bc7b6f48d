"""What only the Redis Cluster backend does: its URL, one subscriber per shard, failures that stay on their
shard, slot migration, and a primary killed while its replica takes over.

The shared backend contract and the resume properties run on a cluster too (tests/test_backends.py,
tests/test_resume_properties.py). Every cluster here is a throwaway one: 3 primaries, 3 replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
import redis
import redis.asyncio

from rtbroadcast import (
    BackendUnavailable,
    Broadcaster,
    ConfigurationError,
    Event,
    Received,
    SubscriptionClosed,
    load_backend,
)
from rtbroadcast.backends.redis_cluster import RedisClusterBackend
from rtbroadcast.protocol import ResyncRequired

from .redis_support import RedisClusterFixture, RedisServer, throwaway_cluster
from .support import MS, until
from .test_backends import Recorder, payload

pytestmark = pytest.mark.redis

FAST: dict[str, Any] = {"timeout": 2.0, "reconnect_delay": (0.05, 0.2)}


class Numbered(Event):
    type: Literal["cluster_test_numbered"] = "cluster_test_numbered"
    n: int


def seeds(cluster: RedisClusterFixture) -> list[tuple[str, int]]:
    return [("127.0.0.1", node.port) for node in cluster.nodes]


def spread(
    backend: RedisClusterBackend, cluster: RedisClusterFixture, per_shard: int = 2
) -> dict[int, list[str]]:
    """Return channel names grouped by the port of the primary that serves them (``per_shard`` each)."""
    groups: dict[int, list[str]] = {}
    n = 0
    while len(groups) < 3 or any(len(v) < per_shard for v in groups.values()):
        name = f"ch{n}"
        port = cluster.primary_of(backend.slot(name)).port
        if len(groups.setdefault(port, [])) < per_shard:
            groups[port].append(name)
        n += 1
    return groups


@pytest.fixture
async def connected(
    redis_cluster: RedisClusterFixture, redis_cluster_prefix: str
) -> AsyncIterator[tuple[RedisClusterBackend, Recorder]]:
    backend = RedisClusterBackend(seeds(redis_cluster), key_prefix=redis_cluster_prefix, **FAST)
    recorder = Recorder()
    await backend.connect(recorder)
    try:
        yield backend, recorder
    finally:
        await backend.disconnect()


# -- URLs -------------------------------------------------------------------------------------------------


def test_cluster_urls_name_their_seed_nodes_and_options() -> None:
    backend = load_backend(
        "redis+cluster://user:s%40cret@10.0.0.1:7000,10.0.0.2:7001/?key_prefix=app&timeout=2"
    )
    assert isinstance(backend, RedisClusterBackend)
    assert backend.stats()["server"] == "redis+cluster://10.0.0.1:7000,10.0.0.2:7001"
    assert "cret" not in repr(backend) and "cret" not in str(backend.stats())
    assert backend.keys("room:{1}") == {
        "meta": "app:{room:%7B1%7D}:meta",
        "stream": "app:{room:%7B1%7D}:stream",
        "idempotency": "app:{room:%7B1%7D}:idem:",
        "pubsub": "app:{room:%7B1%7D}",
    }
    tls = load_backend("rediss+cluster://h:7000?ssl_cert_reqs=none")
    assert isinstance(tls, RedisClusterBackend) and tls.stats()["server"].startswith("rediss+cluster://")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://h1:7000,h2/", "invalid node 'h2'"),
        ("redis+cluster://h1:70000", "invalid node 'h1:70000'"),
        ("redis+cluster://h1:7000/2", "database 0 only"),
        ("redis+cluster://h1:7000?key_prefx=a", "unknown Redis Cluster URL option 'key_prefx'"),
        ("redis+cluster://h1:7000?timeout=0", "timeout must be"),
        ("redis+cluster://h1:7000?ssl_cert_reqs=none", "ssl_\\* options need a rediss\\+cluster:// URL"),
        ("rediss+cluster://h1:7000?ssl_cert_reqs=maybe", "invalid value 'maybe'"),
        ("redis+cluster://h1:7000?history_size=1&history_size=2", "given twice"),
    ],
)
def test_a_wrong_cluster_url_is_refused_at_construction(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_backend(url)


async def test_connecting_to_no_node_fails_fast() -> None:
    from .support import free_port

    backend = RedisClusterBackend([("127.0.0.1", free_port())], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="cannot connect to Redis Cluster"):
        await backend.connect(Recorder())
    assert time.monotonic() - started < 1.5
    assert backend.stats()["state"] == "closed"


# -- shards -----------------------------------------------------------------------------------------------


async def test_one_subscriber_connection_per_shard_with_subscribed_channels(
    redis_cluster: RedisClusterFixture, connected: tuple[RedisClusterBackend, Recorder]
) -> None:
    backend, recorder = connected
    groups = spread(backend, redis_cluster)
    ports = sorted(groups)
    wanted = groups[ports[0]] + groups[ports[1]]  # two of the three shards
    for name in wanted:
        await backend.subscribe(name)
    assert sorted(
        f"{h}:{p}" for h, p in [(h, int(p)) for h, p in (k.split(":") for k in backend.stats()["shards"])]
    ) == sorted(f"127.0.0.1:{port}" for port in ports[:2])
    for port in ports:
        client = redis.Redis(port=port)
        try:
            subscribers = [c for c in client.client_list() if int(c.get("ssub", 0)) > 0]
        finally:
            client.close()
        assert len(subscribers) == (1 if port in ports[:2] else 0), port
    for name in wanted + groups[ports[2]]:
        await backend.publish(name, payload(1))
    await recorder.wait_for(lambda: all(recorder.seqs(name) == [1] for name in wanted))
    assert all(recorder.seqs(name) == [] for name in groups[ports[2]])
    # The last channel of a shard leaves: its connection goes.
    for name in groups[ports[1]]:
        await backend.unsubscribe(name)
    await until(lambda: len(backend.stats()["shards"]) == 1)  # type: ignore[arg-type]


async def test_a_dropped_shard_connection_interrupts_only_that_shards_channels(
    redis_cluster: RedisClusterFixture, connected: tuple[RedisClusterBackend, Recorder]
) -> None:
    backend, recorder = connected
    groups = spread(backend, redis_cluster)
    everything = [name for names in groups.values() for name in names]
    for name in everything:
        await backend.subscribe(name)
    victim = sorted(groups)[0]
    admin = redis.asyncio.Redis(port=victim)
    try:
        assert await admin.client_kill_filter(_type="pubsub") == 1
    finally:
        await admin.aclose()
    await recorder.wait_for(lambda: bool(recorder.interruptions))
    await asyncio.sleep(0.2)  # nothing else is reported
    assert recorder.interruptions == [(sorted(groups[victim]), "backend_reconnected")]
    assert backend.stats()["reconnects"] == 1
    for name in everything:
        await backend.publish(name, payload(1))
    await recorder.wait_for(lambda: all(recorder.seqs(name) == [1] for name in everything))


async def test_a_migrated_slot_moves_its_channels_to_the_new_shard(
    redis_cluster: RedisClusterFixture, redis_cluster_prefix: str
) -> None:
    backend = RedisClusterBackend(seeds(redis_cluster), key_prefix=redis_cluster_prefix, **FAST)
    recorder = Recorder()
    await backend.connect(recorder)
    try:
        groups = spread(backend, redis_cluster, per_shard=1)
        ports = sorted(groups)
        moving, staying = groups[ports[0]][0], groups[ports[1]][0]
        await backend.subscribe(moving)
        await backend.subscribe(staying)
        before = await backend.publish(moving, payload(1))
        await recorder.wait_for(lambda: recorder.seqs(moving) == [1])
        await asyncio.to_thread(migrate_slot, backend.slot(moving), ports[0], ports[2])
        await recorder.wait_for(lambda: bool(recorder.interruptions))
        assert recorder.interruptions == [([moving], "backend_reconnected")]
        after = await backend.publish(moving, payload(2))
        # Written by another primary now: a new epoch, so that clients resync rather than trust seqs.
        assert after.epoch != before.epoch and after.seq == 1
        await recorder.wait_for(lambda: len(recorder.seqs(moving)) == 2)
        assert recorder.envelopes[-1] == after
        await backend.publish(staying, payload(1))
        await recorder.wait_for(lambda: recorder.seqs(staying) == [1])
        assert sorted(backend.stats()["shards"]) == sorted(f"127.0.0.1:{p}" for p in (ports[1], ports[2]))  # type: ignore[arg-type]
    finally:
        await backend.disconnect()
        # Give the slot back, so that the session's cluster keeps its layout for the other tests.
        await asyncio.to_thread(migrate_slot, backend.slot(moving), ports[2], ports[0])


def migrate_slot(slot: int, source: int, target: int) -> None:
    """Move ``slot`` with its keys from the primary on port ``source`` to the one on ``target``."""
    src, dst = (
        redis.Redis(port=source, decode_responses=True),
        redis.Redis(port=target, decode_responses=True),
    )
    try:
        src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    finally:
        src.close()
        dst.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # every node agrees
        views = []
        for port in (source, target):
            client = redis.Redis(port=port)
            try:
                views.append(next(int(p[1]) for s, e, p, *_ in client.cluster("SLOTS") if s <= slot <= e))
            finally:
                client.close()
        if views == [target, target]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"slot {slot} did not settle on {target}")


# -- failover -------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_primary_leaves_no_silent_gap_and_no_vanished_publish() -> None:
    with throwaway_cluster() as cluster:
        await failover_scenario(cluster)


async def failover_scenario(cluster: RedisClusterFixture) -> None:
    subscriber = Broadcaster(backend=RedisClusterBackend(seeds(cluster), **FAST), position_check_interval=0.5)
    publisher = RedisClusterBackend(seeds(cluster), **FAST)
    await publisher.connect(Recorder())
    async with subscriber, contextlib.AsyncExitStack() as stack:
        probe = RedisClusterBackend(seeds(cluster))
        groups = spread(probe, cluster)
        victim_port = sorted(groups)[0]
        victim: RedisServer = next(n for n in cluster.nodes if n.port == victim_port)
        channels = [name for names in groups.values() for name in names]
        subscriptions = {
            name: await stack.enter_async_context(subscriber.subscribe(name, model=Numbered))
            for name in channels
        }
        received: dict[str, list[Received[Numbered] | ResyncRequired]] = {name: [] for name in channels}
        acknowledged: dict[str, list[tuple[int, str, int]]] = {
            name: [] for name in channels
        }  # (n, epoch, seq)
        failed: dict[str, list[int]] = {name: [] for name in channels}
        reconnects: dict[str, int] = {name: 0 for name in channels}

        async def consume(name: str) -> None:
            # What a client does: when the server closes it (a repair that met the failover closes with
            # 1011), it comes back with its position and resumes, or is told to resync.
            subscription = subscriptions[name]
            while True:
                try:
                    async for item in subscription:
                        received[name].append(item)
                    return
                except SubscriptionClosed:
                    position = subscription.position
                while True:
                    reconnects[name] += 1
                    assert reconnects[name] < 100, f"{name}: cannot resubscribe"
                    await asyncio.sleep(0.2)
                    try:
                        subscription = await stack.enter_async_context(
                            subscriber.subscribe(name, resume=position, model=Numbered)
                        )
                        break
                    except BackendUnavailable:
                        continue

        consumers = [asyncio.create_task(consume(name)) for name in channels]
        n = 0
        killed_at: float | None = None
        recovered = False
        recovered_at = 0
        started = time.monotonic()
        # Publish round-robin; kill the victim's primary after a while; go on until its channels take
        # publishes again (the replica took over), and a little longer. Bounded in count and time.
        while n < 20_000 and time.monotonic() - started < 40:
            n += 1
            name = channels[n % len(channels)]
            try:
                envelope = await publisher.publish(name, Numbered(n=n).to_json())
                acknowledged[name].append((n, envelope.epoch, envelope.seq))
                if killed_at is not None and name in groups[victim_port] and not recovered:
                    recovered = True
                    recovered_at = n
            except BackendUnavailable:
                failed[name].append(n)
            if killed_at is None and n == 300:
                victim.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
                victim.process.wait(10)  # type: ignore[union-attr]
                victim.process = None
                killed_at = time.monotonic()
            if recovered and n >= recovered_at + 300:
                break
        assert recovered, "the replica never took the dead primary's slots over"
        # The last event of each channel reaches its subscriber: after it, nothing more is in flight.
        for name in channels:
            last = acknowledged[name][-1]

            def arrived(name: str = name, last: tuple[int, str, int] = last) -> bool:
                # Delivered, or covered by a resync_required at or past it (the client reloads a snapshot
                # that includes it).
                return any(
                    (isinstance(r, Received) and r.event.n == last[0])
                    or (isinstance(r, ResyncRequired) and r.epoch == last[1] and r.seq >= last[2])
                    for r in received[name]
                )

            try:
                await until(arrived, timeout=15_000 * MS)
            except AssertionError:
                raise AssertionError(
                    f"{name} (victim shard: {name in groups[victim_port]}) never got its last event "
                    f"{last}; it got {received[name][-3:]}; subscriber backend: {subscriber.stats().backend}"
                ) from None
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    await publisher.disconnect()

    for name in channels:
        check_no_silent_gap(name, received[name], acknowledged[name], failed[name])
        resyncs = [r for r in received[name] if isinstance(r, ResyncRequired)]
        if name in groups[victim_port]:
            # The new primary started a new epoch: the channel's clients resynced, once.
            epochs = {epoch for _, epoch, _ in acknowledged[name]}
            assert len(epochs) == 2 and len(resyncs) == 1, (name, epochs, resyncs)
        else:
            # Other shards never noticed.
            assert resyncs == [] and failed[name] == [], (name, resyncs, failed[name])


def check_no_silent_gap(
    name: str,
    items: list[Received[Numbered] | ResyncRequired],
    acknowledged: list[tuple[int, str, int]],
    failed: list[int],
) -> None:
    """Every acknowledged publish reached the subscriber, unless a resync_required came after it; the
    subscriber got nothing twice, nothing out of order, and nothing that was not published."""
    seen = [r.event.n for r in items if isinstance(r, Received)]
    assert len(seen) == len(set(seen)), f"{name}: an event was delivered twice"
    assert seen == sorted(seen), f"{name}: events out of order"
    assert set(seen) <= {n for n, _, _ in acknowledged} | set(failed), f"{name}: an event nobody published"
    # Between resyncs, seqs are contiguous from the position the client was given: no gap it was not told of.
    last_resync = max((i for i, r in enumerate(items) if isinstance(r, ResyncRequired)), default=-1)
    expected = 1  # a fresh channel: the subscription started at seq 0
    for item in items:
        if isinstance(item, ResyncRequired):
            expected = item.seq + 1
            continue
        assert item.seq == expected, f"{name}: a silent gap: seq {item.seq}, expected {expected}"
        expected += 1
    # Every publish acknowledged after the last resync's position (in its epoch) was delivered.
    if last_resync >= 0:
        resync = items[last_resync]
        assert isinstance(resync, ResyncRequired)
        owed = {n for n, epoch, seq in acknowledged if epoch == resync.epoch and seq > resync.seq}
    else:
        owed = {n for n, _, _ in acknowledged}
    assert owed <= set(seen), (
        f"{name}: acknowledged publishes never delivered: {sorted(owed - set(seen))[:10]}"
    )
