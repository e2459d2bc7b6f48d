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


# -- channels ---------------------------------------------------------------------------------------------


async def test_a_channel_records_its_primary_and_another_primary_starts_a_new_epoch_with_its_ttls(
    redis_cluster: RedisClusterFixture, connected: tuple[RedisClusterBackend, Recorder]
) -> None:
    backend, _ = connected
    keys = backend.keys("c")
    month = 30 * 24 * 3600 * 1000
    client = redis.Redis(port=redis_cluster.primary_of(backend.slot("c")).port)
    try:
        first = await backend.publish("c", payload(1))
        meta = client.hgetall(keys["meta"])
        assert meta == {
            b"epoch": first.epoch.encode(),
            b"seq": b"1",
            b"node": client.execute_command("CLUSTER MYID"),
        }
        assert month <= client.pttl(keys["meta"]) <= month * 9 // 8
        assert month <= client.pttl(keys["stream"]) <= month * 9 // 8
        # What a failover leaves behind, made by hand: a new epoch, whose first publish gives its keys their
        # ttls (the read gave the hash the unpublished_ttl of a channel nobody published to).
        client.hset(keys["meta"], "node", "0" * 40)
        after = await backend.position("c")
        assert after.epoch != first.epoch and after.seq == 0
        assert (await backend.publish("c", payload(2))).seq == 1
        assert client.pttl(keys["meta"]) >= month
        assert client.pttl(keys["stream"]) >= month
    finally:
        client.close()


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


def migrate_slot(slot: int, source: int, target: int, *, pause: float = 0.0) -> None:
    """Move ``slot`` with its keys from the primary on port ``source`` to the one on ``target``, as
    ``redis-cli --cluster reshard`` does.

    With ``pause``, it waits that long after each step and moves one key per ``MIGRATE``, so that commands
    sent meanwhile meet every intermediate state: both nodes flagged, some keys moved (``TRYAGAIN``), all
    moved (``ASK``), the new owner set on the target only, then on both.
    """
    src, dst = (
        redis.Redis(port=source, decode_responses=True),
        redis.Redis(port=target, decode_responses=True),
    )
    try:
        src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        time.sleep(pause)
        batch = 1 if pause else 100
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            time.sleep(pause)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        time.sleep(pause)
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


# -- under traffic: a broadcaster's subscriptions while a publisher numbers its events --------------------


class Traffic:
    """A broadcaster subscribed in-process to ``channels``, and a publisher numbering its events round-robin.

    Keeps what each side saw, per channel: what the subscription yielded, the publishes acknowledged (with
    their epoch and seq) and those that failed. The subscriptions do what a client does: when the server
    closes one (a repair that met an outage closes with 1011), it comes back with its position and resumes,
    or is told to resync.
    """

    def __init__(self, subscriber: Broadcaster, publisher: RedisClusterBackend, channels: list[str]) -> None:
        self.subscriber = subscriber
        self.publisher = publisher
        self.channels = channels
        self.received: dict[str, list[Received[Numbered] | ResyncRequired]] = {name: [] for name in channels}
        self.acknowledged: dict[str, list[tuple[int, str, int]]] = {name: [] for name in channels}
        self.failed: dict[str, list[int]] = {name: [] for name in channels}
        self.reconnects: dict[str, int] = {name: 0 for name in channels}
        self.n = 0
        self._consumers: list[asyncio.Task[None]] = []

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Subscribe to every channel (confirmed) and start reading."""
        for name in self.channels:
            subscription = await stack.enter_async_context(self.subscriber.subscribe(name, model=Numbered))
            self._consumers.append(asyncio.create_task(self._consume(name, subscription, stack)))

    async def _consume(self, name: str, subscription: Any, stack: contextlib.AsyncExitStack) -> None:
        while True:
            try:
                async for item in subscription:
                    self.received[name].append(item)
                return
            except SubscriptionClosed:
                position = subscription.position
            while True:
                self.reconnects[name] += 1
                assert self.reconnects[name] < 100, f"{name}: cannot resubscribe"
                await asyncio.sleep(0.2)
                try:
                    subscription = await stack.enter_async_context(
                        self.subscriber.subscribe(name, resume=position, model=Numbered)
                    )
                    break
                except BackendUnavailable:
                    continue

    async def publish_next(self) -> tuple[str, bool]:
        """Publish event ``n + 1`` to the next channel; return the channel and whether it was acknowledged."""
        self.n += 1
        name = self.channels[self.n % len(self.channels)]
        try:
            envelope = await self.publisher.publish(name, Numbered(n=self.n).to_json())
        except BackendUnavailable:
            self.failed[name].append(self.n)
            return name, False
        self.acknowledged[name].append((self.n, envelope.epoch, envelope.seq))
        return name, True

    async def drain(self, timeout: float = 15_000 * MS) -> None:
        """Wait until the last acknowledged event of every channel reached its subscription, or a
        ``resync_required`` at or past it did (the client reloads a snapshot that includes it): after it,
        nothing more is in flight."""
        for name in self.channels:
            if not self.acknowledged[name]:
                continue
            last = self.acknowledged[name][-1]

            def arrived(name: str = name, last: tuple[int, str, int] = last) -> bool:
                return any(
                    (isinstance(r, Received) and r.event.n == last[0])
                    or (isinstance(r, ResyncRequired) and r.epoch == last[1] and r.seq >= last[2])
                    for r in self.received[name]
                )

            try:
                await until(arrived, timeout=timeout)
            except AssertionError:
                raise AssertionError(
                    f"{name} never got its last event {last}; it got {self.received[name][-3:]}; "
                    f"subscriber backend: {self.subscriber.stats().backend}"
                ) from None

    async def stop(self) -> None:
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)

    def resyncs(self, name: str) -> list[ResyncRequired]:
        return [r for r in self.received[name] if isinstance(r, ResyncRequired)]

    def epochs(self, name: str) -> set[str]:
        return {epoch for _, epoch, _ in self.acknowledged[name]}

    def check(self, name: str) -> None:
        """No silent gap, nothing twice, nothing out of order on ``name`` (see :func:`check_no_silent_gap`)."""
        check_no_silent_gap(name, self.received[name], self.acknowledged[name], self.failed[name])


def pubsub_clients(port: int) -> int:
    """Return how many connections to the node on ``port`` have sharded subscriptions."""
    client = redis.Redis(port=port)
    try:
        return sum(1 for c in client.client_list() if int(c.get("ssub", 0)) > 0)
    finally:
        client.close()


async def test_a_shard_subscriber_killed_under_traffic_repairs_only_that_shards_clients(
    redis_cluster: RedisClusterFixture, redis_cluster_prefix: str
) -> None:
    options: dict[str, Any] = {**FAST, "key_prefix": redis_cluster_prefix}
    groups = spread(RedisClusterBackend(seeds(redis_cluster), **options), redis_cluster)
    victim = sorted(groups)[0]
    channels = [name for names in groups.values() for name in names]
    # No periodic position check: every repair counted below is one the interruption asked for.
    subscriber = Broadcaster(
        backend=RedisClusterBackend(seeds(redis_cluster), **options), position_check_interval=None
    )
    publisher = RedisClusterBackend(seeds(redis_cluster), **options)
    await publisher.connect(Recorder())
    try:
        async with subscriber, contextlib.AsyncExitStack() as stack:
            traffic = Traffic(subscriber, publisher, channels)
            await traffic.start(stack)
            for _ in range(120):
                await traffic.publish_next()
            admin = redis.asyncio.Redis(port=victim)
            try:
                assert await admin.client_kill_filter(_type="pubsub") == 1  # the subscriber's, nobody else's
            finally:
                await admin.aclose()
            # Go on publishing while the shard's subscriber reconnects (its first delay is 25-50 ms).
            for _ in range(300):
                await traffic.publish_next()
            await traffic.drain()
            await traffic.stop()
            stats = subscriber.stats()
    finally:
        await publisher.disconnect()
    for name in channels:
        traffic.check(name)
        # Same shard, same data: the victim's clients were repaired from history, nobody resynced.
        assert traffic.resyncs(name) == [] and traffic.failed[name] == [], name
    assert stats.interruptions == 1 and stats.interruptions_by_reason == {"backend_reconnected": 1}
    assert stats.repairs == len(groups[victim]), "a repair for a channel of another shard"
    assert stats.resyncs == 0 and stats.backend["reconnects"] == 1


async def test_a_slot_migrated_under_traffic_resyncs_its_clients_once_and_loses_nothing(
    redis_cluster: RedisClusterFixture, redis_cluster_prefix: str
) -> None:
    """Resharding one slot, step by step (IMPORTING/MIGRATING, MIGRATE key by key, SETSLOT NODE on both
    primaries), while events are published to it and its subscriber listens on the old primary."""
    options: dict[str, Any] = {**FAST, "key_prefix": redis_cluster_prefix}
    probe = RedisClusterBackend(seeds(redis_cluster), **options)
    groups = spread(probe, redis_cluster)
    source, elsewhere, target = sorted(groups)
    moving, neighbour = groups[source]  # the neighbour stays on the old primary, in another slot
    assert probe.slot(moving) != probe.slot(neighbour)
    channels = [moving, neighbour, groups[elsewhere][0], groups[target][0]]
    subscriber = Broadcaster(
        backend=RedisClusterBackend(seeds(redis_cluster), **options), position_check_interval=None
    )
    publisher = RedisClusterBackend(seeds(redis_cluster), **options)
    await publisher.connect(Recorder())
    migrated = False
    try:
        async with subscriber, contextlib.AsyncExitStack() as stack:
            traffic = Traffic(subscriber, publisher, channels)
            await traffic.start(stack)
            assert pubsub_clients(target) == 1  # for groups[target][0]
            for _ in range(100):
                await traffic.publish_next()
            migration = asyncio.create_task(
                asyncio.to_thread(migrate_slot, probe.slot(moving), source, target, pause=0.3)
            )
            started = time.monotonic()
            while not migration.done() and time.monotonic() - started < 30 and traffic.n < 50_000:
                await traffic.publish_next()
            await migration
            migrated = True
            during = traffic.n
            for _ in range(200):
                await traffic.publish_next()
            await traffic.drain()
            # The subscriber listens to the moved channel on the new primary, on the connection it already
            # had there; the old primary keeps the neighbour's.
            assert sorted(subscriber.stats().backend["shards"]) == sorted(  # type: ignore[arg-type]
                f"127.0.0.1:{port}" for port in (source, elsewhere, target)
            )
            assert pubsub_clients(target) == 1 and pubsub_clients(source) == 1
            await traffic.stop()
            stats = subscriber.stats()
    finally:
        await publisher.disconnect()
        if migrated:  # give the slot back, so that the session's cluster keeps its layout
            await asyncio.to_thread(migrate_slot, probe.slot(moving), target, source)
    assert during > 100 + 20, "too few publishes during the migration to mean anything"
    for name in channels:
        traffic.check(name)
        assert traffic.failed[name] == [], (name, traffic.failed[name])
    # Written by another primary now: one new epoch, one resync for the moved channel's clients ...
    assert len(traffic.epochs(moving)) == 2, (traffic.epochs(moving), traffic.resyncs(moving), stats)
    assert [r.reason for r in traffic.resyncs(moving)] == ["epoch_changed"]
    # ... and nothing at all for the others, on the old primary, the new one or the third.
    for name in channels[1:]:
        assert traffic.resyncs(name) == [] and len(traffic.epochs(name)) == 1, name
    assert stats.interruptions == 1 and stats.repairs == 1 and stats.resyncs == 1


async def test_presence_is_refused_on_a_cluster() -> None:
    with pytest.raises(ConfigurationError, match="redis\\+cluster backend does not keep presence"):
        Broadcaster("redis+cluster://127.0.0.1:7000", presence=("room:",))
    backend = RedisClusterBackend([("127.0.0.1", 7000)])
    assert not backend.supports_presence
    with pytest.raises(ConfigurationError, match="does not keep presence"):
        await backend.presence_count("room:1")


# -- failover -------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_primary_leaves_no_silent_gap_and_no_vanished_publish() -> None:
    with throwaway_cluster() as cluster:
        await failover_scenario(cluster)


async def failover_scenario(cluster: RedisClusterFixture) -> dict[str, float]:
    """Kill a primary under traffic, check what every subscriber got; return how long the victim's channels
    took publishes again after the kill, and how many publishes failed meanwhile (for the docs' figures)."""
    subscriber = Broadcaster(backend=RedisClusterBackend(seeds(cluster), **FAST), position_check_interval=0.5)
    publisher = RedisClusterBackend(seeds(cluster), **FAST)
    await publisher.connect(Recorder())
    groups = spread(RedisClusterBackend(seeds(cluster)), cluster)
    victim_port = sorted(groups)[0]
    victim: RedisServer = next(n for n in cluster.nodes if n.port == victim_port)
    channels = [name for names in groups.values() for name in names]
    async with subscriber, contextlib.AsyncExitStack() as stack:
        traffic = Traffic(subscriber, publisher, channels)
        await traffic.start(stack)
        killed = recovered = False
        recovered_at = 0
        killed_at = outage = 0.0
        started = time.monotonic()
        # Publish round-robin; kill the victim's primary after a while; go on until its channels take
        # publishes again (the replica took over), and a little longer. Bounded in count and time.
        while traffic.n < 20_000 and time.monotonic() - started < 40:
            name, acknowledged = await traffic.publish_next()
            if killed and acknowledged and name in groups[victim_port] and not recovered:
                recovered = True
                recovered_at = traffic.n
                outage = time.monotonic() - killed_at
            if not killed and traffic.n == 300:
                victim.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
                victim.process.wait(10)  # type: ignore[union-attr]
                victim.process = None
                killed = True
                killed_at = time.monotonic()
            if recovered and traffic.n >= recovered_at + 300:
                break
        assert recovered, "the replica never took the dead primary's slots over"
        await traffic.drain()
        await traffic.stop()
    await publisher.disconnect()

    for name in channels:
        traffic.check(name)
        if name in groups[victim_port]:
            # The new primary started a new epoch: the channel's clients resynced, once.
            assert len(traffic.epochs(name)) == 2 and len(traffic.resyncs(name)) == 1, (
                name,
                traffic.epochs(name),
                traffic.resyncs(name),
            )
        else:
            # Other shards never noticed.
            assert traffic.resyncs(name) == [] and traffic.failed[name] == [], (
                name,
                traffic.resyncs(name),
                traffic.failed[name],
            )
    return {"outage_s": outage, "failed": sum(len(f) for f in traffic.failed.values())}


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
