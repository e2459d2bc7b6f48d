"""What only the Redis Sentinel backend does: its URL, finding the master through the Sentinels, the
master's ID on every channel, and a master killed while the Sentinels promote its replica.

The shared backend contract, presence and the resume properties run on a Sentinel deployment too
(tests/test_backends.py, tests/test_presence_backends.py, tests/test_resume_properties.py). The deployments here are the test's own: a master, a replica and three
Sentinels on free loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any, Literal

import pytest
import redis

from rtbroadcast import (
    BackendUnavailable,
    Broadcaster,
    ConfigurationError,
    Event,
    Received,
    SubscriptionClosed,
    load_backend,
)
from rtbroadcast.backends.redis import RedisSentinelBackend
from rtbroadcast.backends.redis._shared import error_code
from rtbroadcast.protocol import ResyncRequired

from .redis_support import RedisSentinelFixture, throwaway_sentinel
from .support import MS, free_port, until
from .test_backends import Recorder, payload
from .test_redis_cluster import check_no_silent_gap

pytestmark = pytest.mark.redis

FAST: dict[str, Any] = {"timeout": 2.0, "reconnect_delay": (0.05, 0.2)}


class Numbered(Event):
    type: Literal["sentinel_test_numbered"] = "sentinel_test_numbered"
    n: int


def unique_prefix() -> str:
    return f"rtbtest-{uuid.uuid4().hex[:12]}"


def backend_of(deployment: RedisSentinelFixture, **options: Any) -> RedisSentinelBackend:
    return RedisSentinelBackend(deployment.addresses, deployment.service, **{**FAST, **options})


# -- URLs -------------------------------------------------------------------------------------------------


def test_sentinel_urls_name_the_sentinels_the_service_and_options() -> None:
    backend = load_backend("redis+sentinel://s1:26380,s2,[::1]:26381/orders?key_prefix=app&timeout=2")
    assert isinstance(backend, RedisSentinelBackend)
    assert backend.sentinels == [("s1", 26380), ("s2", 26379), ("::1", 26381)]
    assert backend.service == "orders"
    assert backend.stats()["server"] == "redis+sentinel://s1:26380,s2:26379,[::1]:26381/orders"
    assert backend.keys("c")["meta"] == "app:{c}:meta"
    on_db = RedisSentinelBackend.from_url("redis+sentinel://user:s3cret@h:1/orders/3")
    assert on_db.stats()["server"] == "redis+sentinel://h:1/orders/3"
    assert "s3cret" not in repr(on_db) and "s3cret" not in str(on_db.stats())
    tls = RedisSentinelBackend.from_url(
        "rediss+sentinel://h:1/orders?ssl_ca_certs=/ca.pem&sentinel_password=x&sentinel_username=u"
    )
    assert tls.stats()["server"] == "rediss+sentinel://h:1/orders"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:1", "names the service"),
        ("redis+sentinel://h:1/", "names the service"),
        ("redis+sentinel://h:1/orders/x", "takes only a database number"),
        ("redis+sentinel://h:1/orders/0/1", "takes only a database number"),
        ("redis+sentinel://h:x/orders", "invalid Sentinel address 'h:x'"),
        ("redis+sentinel://h:1,,h:2/orders", "invalid Sentinel address ''"),
        ("redis+sentinel://h:70000/orders", "invalid Sentinel address 'h:70000'"),
        ("redis+sentinel://h:1/orders?key_prefx=a", r"option 'key_prefx' \(did you mean 'key_prefix'\?\)"),
        ("redis+sentinel://h:1/orders?sentinel_pasword=a", r"did you mean 'sentinel_password'"),
        ("redis+sentinel://h:1/orders?db=1", r"unknown redis\+sentinel:// option 'db'.*\(/service/db\)"),
        ("redis+sentinel://h:1/orders?timeout=1&timeout=2", "'timeout' is given twice"),
        ("redis+sentinel://h:1/orders?timeout=soon", "invalid value 'soon'"),
        ("redis+sentinel://h:1/orders?timeout=0", "timeout must be a finite number of seconds > 0"),
        ("redis+sentinel://h:1/orders?ssl_ca_certs=/ca.pem", r"ssl_\* options need a rediss\+sentinel://"),
        ("rediss+sentinel://h:1/orders?ssl_cert_reqs=maybe", "'ssl_cert_reqs'"),
        ("redis+sentinel://u:s3cret@h:x/orders", r"'redis\+sentinel://u:\*\*\*@h:x/orders'"),
    ],
)
def test_a_wrong_sentinel_url_is_refused_at_construction(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_backend(url)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sentinels": [], "service_name": "m"}, "sentinels must be a non-empty list"),
        ({"sentinels": "h:26379", "service_name": "m"}, "sentinels must be a non-empty list"),
        ({"sentinels": [("h", "26379")], "service_name": "m"}, "sentinels must be a non-empty list"),
        ({"sentinels": [("h", 26379)], "service_name": ""}, "service_name must be"),
        ({"sentinels": [("h", 26379)], "service_name": "m", "db": -1}, "db must be an integer >= 0"),
        ({"sentinels": [("h", 26379)], "service_name": "m", "timeout": 0}, "timeout must be"),
        ({"sentinels": [("h", 26379)], "service_name": "m", "key_prefix": "a b"}, "key_prefix must be"),
    ],
)
def test_nonsense_constructor_arguments_are_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisSentinelBackend(**arguments)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("READONLY You can't write against a read only replica.", "READONLY"),
        (
            "NOREPLICAS Not enough good replicas to write. script: fdbf, on @user_script:49.",
            "NOREPLICAS",
        ),
        (
            "ERR Error running script (call to f_fdbf): @user_script:49: @user_script: 49: "
            "-NOREPLICAS Not enough good replicas to write.",
            "NOREPLICAS",
        ),
        ("ERR Error running script (call to f_fdbf): @user_script:3: wrong number of args", "ERR"),
        ("NOSCRIPT No matching script. Please use EVAL.", "NOSCRIPT"),
    ],
)
def test_error_codes_are_read_inside_script_errors_of_redis_6_and_7(message: str, code: str) -> None:
    # Redis 6 wraps the error of a command inside a script; a demoted master's READONLY must still be
    # "not now" (BackendUnavailable) and make the Sentinel backend ask the Sentinels again.
    assert error_code(message) == code


# -- finding the master -----------------------------------------------------------------------------------


@pytest.fixture
def deployment(redis_sentinel: RedisSentinelFixture) -> RedisSentinelFixture:
    """The session's deployment (tests/conftest.py); tests here use key prefixes of their own."""
    return redis_sentinel


async def test_connecting_without_any_sentinel_fails_fast() -> None:
    backend = RedisSentinelBackend([("127.0.0.1", free_port()), ("127.0.0.1", free_port())], "m", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="No master found for 'm'"):
        await backend.connect(Recorder())
    assert time.monotonic() - started < 3
    assert backend.stats()["state"] == "closed"


async def test_an_unknown_service_is_refused_naming_it(deployment: RedisSentinelFixture) -> None:
    backend = RedisSentinelBackend(deployment.addresses, "no-such-service", timeout=1.0)
    with pytest.raises(BackendUnavailable, match="No master found for 'no-such-service'"):
        await backend.connect(Recorder())


async def test_both_connections_go_to_the_master_and_channels_record_its_id(
    deployment: RedisSentinelFixture,
) -> None:
    backend = backend_of(deployment, key_prefix=unique_prefix())
    recorder = Recorder()
    await backend.connect(recorder)
    try:
        master = deployment.current_master()
        await backend.subscribe("c")
        envelope = await backend.publish("c", payload(1))
        await recorder.wait_for(lambda: recorder.seqs("c") == [1])
        client = redis.Redis(port=master.port)
        try:
            replid = client.info("replication")["master_replid"]
            meta = client.hgetall(backend.keys("c")["meta"])
            assert meta == {b"epoch": envelope.epoch.encode(), b"seq": b"1", b"node": replid.encode()}
            # Both of the backend's connections are on the master (and none on the replica).
            names = {
                c["addr"] for c in client.client_list() if c.get("cmd") in ("subscribe", "evalsha", "eval")
            }
            assert len(names) >= 2, client.client_list()
        finally:
            client.close()
        stats = backend.stats()
        assert stats["master"] == f"127.0.0.1:{master.port}"
        assert stats["state"] == "connected"
    finally:
        await backend.disconnect()
        client = redis.Redis(port=deployment.current_master().port)
        client.delete(*backend.keys("c").values())
        client.close()


async def test_a_channel_written_by_another_master_starts_a_new_epoch(
    deployment: RedisSentinelFixture,
) -> None:
    # What a failover leaves behind, made by hand: the meta hash names a master that is not this one.
    backend = backend_of(deployment, key_prefix=unique_prefix())
    await backend.connect(Recorder())
    try:
        first = await backend.publish("c", payload(1))
        await backend.publish("c", payload(2))
        client = redis.Redis(port=deployment.current_master().port)
        try:
            client.hset(backend.keys("c")["meta"], "node", "0" * 40)
        finally:
            client.close()
        after = await backend.position("c")
        assert after.epoch != first.epoch and after.seq == 0
        assert (await backend.history("c", 0, limit=10)).envelopes == ()
        assert (await backend.publish("c", payload(3))).seq == 1
        # The new epoch's first publish gives its keys their ttls (the reads above gave the hash the
        # unpublished_ttl of a channel nobody published to).
        client = redis.Redis(port=deployment.current_master().port)
        try:
            assert client.pttl(backend.keys("c")["meta"]) >= 30 * 24 * 3600 * 1000
            assert client.pttl(backend.keys("c")["stream"]) >= 30 * 24 * 3600 * 1000
        finally:
            client.close()
    finally:
        await backend.disconnect()


async def test_a_master_that_refuses_writes_fails_publishes_as_unavailable(
    deployment: RedisSentinelFixture,
) -> None:
    # min-replicas-to-write above the replicas it has: the master answers NOREPLICAS, as one cut off from
    # its replicas would. Publishes fail with BackendUnavailable (never a silent loss), the command
    # connection asks the Sentinels again, and publishes succeed once the master takes writes again.
    backend = backend_of(deployment, key_prefix=unique_prefix())
    await backend.connect(Recorder())
    master = redis.Redis(port=deployment.current_master().port)
    try:
        first = await backend.publish("c", payload(1))
        master.config_set("min-replicas-to-write", 2)
        with pytest.raises(BackendUnavailable, match="NOREPLICAS"):
            await backend.publish("c", payload(2))
        master.config_set("min-replicas-to-write", 0)
        again = await backend.publish("c", payload(3))
        assert (again.epoch, again.seq) == (first.epoch, 2)
        assert backend.stats()["master_changes"] == 0
    finally:
        master.config_set("min-replicas-to-write", 0)
        master.close()
        await backend.disconnect()


# -- failover -----------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_master_leaves_no_silent_gap_and_no_vanished_publish() -> None:
    with throwaway_sentinel() as fresh:
        await failover_scenario(fresh)


async def failover_scenario(deployment: RedisSentinelFixture) -> None:
    subscriber = Broadcaster(backend=backend_of(deployment), position_check_interval=0.5)
    publisher = backend_of(deployment)
    await publisher.connect(Recorder())
    channels = [f"ch{n}" for n in range(4)]
    async with subscriber, contextlib.AsyncExitStack() as stack:
        subscriptions = {
            name: await stack.enter_async_context(subscriber.subscribe(name, model=Numbered))
            for name in channels
        }
        received: dict[str, list[Received[Numbered] | ResyncRequired]] = {name: [] for name in channels}
        acknowledged: dict[str, list[tuple[int, str, int]]] = {name: [] for name in channels}
        failed: dict[str, list[int]] = {name: [] for name in channels}
        reconnects: dict[str, int] = dict.fromkeys(channels, 0)

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
        recovered_at = 0
        started = time.monotonic()
        old = deployment.current_master()
        # Publish round-robin; kill the master after a while; go on until publishes succeed again (the
        # Sentinels promoted the replica), and a little longer. Bounded in count and time.
        while n < 20_000 and time.monotonic() - started < 40:
            n += 1
            name = channels[n % len(channels)]
            try:
                envelope = await publisher.publish(name, Numbered(n=n).to_json())
                acknowledged[name].append((n, envelope.epoch, envelope.seq))
                if killed_at is not None and not recovered_at:
                    recovered_at = n
            except BackendUnavailable:
                failed[name].append(n)
                await asyncio.sleep(0.01)  # as a caller that retries later would
            if killed_at is None and n == 300:
                old.kill()
                killed_at = time.monotonic()
            if recovered_at and n >= recovered_at + 300:
                break
        assert recovered_at, f"publishes never succeeded again after the kill: {publisher.stats()}"
        new = deployment.current_master()
        assert new is not old
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
                    f"{name} never got its last event {last}; it got {received[name][-3:]}; "
                    f"subscriber backend: {subscriber.stats().backend}"
                ) from None
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    publisher_stats = publisher.stats()
    await publisher.disconnect()

    assert publisher_stats["master"] == f"127.0.0.1:{new.port}", publisher_stats
    assert sum(map(len, failed.values())) > 0, "no publish failed: the kill happened after the run?"
    for name in channels:
        check_no_silent_gap(name, received[name], acknowledged[name], failed[name])
        # The new master started a new epoch: the channel's clients resynced, once, told why.
        epochs = {epoch for _, epoch, _ in acknowledged[name]}
        resyncs = [r for r in received[name] if isinstance(r, ResyncRequired)]
        assert len(epochs) == 2, (name, epochs)
        assert [r.reason for r in resyncs] == ["epoch_changed"], (name, resyncs)


@pytest.mark.slow
async def test_a_planned_failover_moves_both_connections_to_the_new_master() -> None:
    # SENTINEL FAILOVER: the old master stays up, is demoted (its clients disconnected, writes refused with
    # READONLY), and the replica takes over. The backend must find the new master on its own.
    with throwaway_sentinel() as fresh:
        backend = backend_of(fresh, db=1)
        recorder = Recorder()
        await backend.connect(recorder)
        try:
            await backend.subscribe("c")
            before = await backend.publish("c", payload(1))
            old = fresh.current_master()
            sentinel = redis.Redis(port=fresh.sentinels[0].port)
            try:
                assert sentinel.execute_command("SENTINEL", "FAILOVER", fresh.service)
            finally:
                sentinel.close()
            new = fresh.wait_for_failover(old)
            # Until the Sentinels demote it, the old master still takes writes (Sentinel does not pause
            # it): a publish may succeed there, in the old epoch, and be lost with the demotion; its
            # clients resync when the new master's epoch reaches them. Publish on, as a service would.
            started = time.monotonic()
            after = before
            while after.epoch == before.epoch:
                assert time.monotonic() - started < 20, backend.stats()
                await asyncio.sleep(0.05)
                with contextlib.suppress(BackendUnavailable):
                    after = await backend.publish("c", payload(2))
            assert after.seq == 1
            stats = backend.stats()
            assert stats["master"] == f"127.0.0.1:{new.port}" and stats["master_changes"] == 1, stats
            # The listener followed too: it resubscribed on the new master and reported the interruption.
            await recorder.wait_for(lambda: bool(recorder.interruptions))
            third = await backend.publish("c", payload(3))
            await recorder.wait_for(lambda: third in recorder.envelopes)
            # On database 1, as asked; the demoted master holds the new master's data as its replica.
            client = redis.Redis(port=new.port, db=1)
            try:
                assert client.hget(backend.keys("c")["meta"], "epoch") == after.epoch.encode()
            finally:
                client.close()
            assert backend.keys("c")["pubsub"].endswith(":db1")
        finally:
            await backend.disconnect()
