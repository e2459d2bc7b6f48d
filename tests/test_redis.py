"""What only the Redis backend does: its key layout, keeping epoch and seq consistent, its URL options, and
its listener's behaviour when the connection drops, stalls or cannot come back."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest
import redis.asyncio

from rtbroadcast import (
    BackendUnavailable,
    Broadcaster,
    ConfigurationError,
    Envelope,
    Event,
    PresenceMember,
    Received,
    load_backend,
)
from rtbroadcast.backends._reconnect import reconnect_pause
from rtbroadcast.backends.redis import RedisBackend

from .redis_support import RedisServer, free_port, redis_server_binary
from .support import MS, no_task_left, until
from .test_backends import Recorder, payload

pytestmark = pytest.mark.redis


class Noted(Event):
    type: Literal["redis_test_noted"] = "redis_test_noted"
    n: int


# Short enough that fault tests run in seconds, long enough not to flake on a busy machine.
FAST = {"timeout": 1.0, "reconnect_delay": (0.05, 0.2)}


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def backend(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(redis_url, key_prefix=redis_prefix)
    await backend.connect(Recorder())
    yield backend
    await backend.disconnect()


async def round_trip(backend: RedisBackend, recorder: Recorder) -> None:
    """Subscribe channel ``c``, publish one event and wait until the listener delivers it as seq 1."""
    await backend.subscribe("c")
    await backend.publish("c", payload(1))
    await recorder.wait_for(lambda: recorder.seqs("c") == [1])


async def connected(url: str, **options: Any) -> tuple[RedisBackend, Recorder]:
    backend = RedisBackend(url, **options)
    recorder = Recorder()
    await backend.connect(recorder)
    return backend, recorder


#: The default meta_ttl, in ms.
MONTH = 30 * 24 * 3600 * 1000

# When the key expires, in ms of Redis's clock (within a ms or two: TIME and PTTL are two commands).
_EXPIRES_AT = """
local now = redis.call('TIME')
return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + redis.call('PTTL', KEYS[1])
"""


async def expires_at(raw: redis.asyncio.Redis, key: str) -> int:
    return int(await raw.eval(_EXPIRES_AT, 1, key))


# -- keys and consistency -------------------------------------------------------------------------------


async def test_keys_are_hash_tagged_per_channel_and_expire(
    backend: RedisBackend, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    keys = backend.keys("room:{1}")
    tag = "{room:%7B1%7D}"
    assert keys == {
        "meta": f"{redis_prefix}:{tag}:meta",
        "stream": f"{redis_prefix}:{tag}:stream",
        "idempotency": f"{redis_prefix}:{tag}:idem:",
        "pubsub": f"{redis_prefix}:{tag}",
        "presence": f"{redis_prefix}:{tag}:presence",
        "presence_order": f"{redis_prefix}:{tag}:presence:order",
        "presence_procs": f"{redis_prefix}:{tag}:presence:procs",
        "presence_version": f"{redis_prefix}:{tag}:presence:version",
    }
    envelope = await backend.publish("room:{1}", payload(1), idempotency_key="k")
    meta = await raw.hgetall(keys["meta"])
    assert meta == {b"epoch": envelope.epoch.encode(), b"seq": b"1"}
    entries = await raw.xrange(keys["stream"])
    assert entries[0][0] == b"1-0" and entries[0][1][b"d"] == envelope.data.encode()
    assert await raw.get(keys["idempotency"] + "k") == f"{envelope.epoch}:1".encode()
    # A key gets its ttl and an eighth more, so that a busy channel need not refresh it on every publish.
    assert MONTH <= await raw.pttl(keys["meta"]) <= MONTH * 9 // 8
    assert MONTH <= await raw.pttl(keys["stream"]) <= MONTH * 9 // 8  # no history_ttl: the channel's ttl
    assert 3_500_000 < await raw.pttl(keys["idempotency"] + "k") <= 3_600_000
    assert sorted(await raw.keys(f"{redis_prefix}:*")) == sorted(
        k.encode() for k in (keys["meta"], keys["stream"], keys["idempotency"] + "k")
    )


async def test_keys_name_the_presence_keys_a_join_writes(
    backend: RedisBackend, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    keys = backend.keys("room:{1}")
    presence = {keys[role] for role in ("presence", "presence_order", "presence_procs", "presence_version")}
    await backend.presence_join("room:{1}", PresenceMember("client-1", "user-1"), limit=0)
    written = {k.decode() for k in await raw.keys(f"{redis_prefix}:*")}
    assert written == presence
    await backend.presence_leave("room:{1}", "client-1")


async def test_ttls_follow_the_options(redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis) -> None:
    backend, _ = await connected(
        redis_url, key_prefix=redis_prefix, history_ttl=60, meta_ttl=600, idempotency_ttl=5
    )
    try:
        await backend.publish("c", payload(1), idempotency_key="k")
        keys = backend.keys("c")
        assert 600_000 <= await raw.pttl(keys["meta"]) <= 675_000
        assert 60_000 <= await raw.pttl(keys["stream"]) <= 67_500
        assert 4_000 < await raw.pttl(keys["idempotency"] + "k") <= 5_000
        await raw.pexpire(keys["meta"], 1000)
        await backend.position("c")  # a read keeps a channel in use alive
        assert 600_000 <= await raw.pttl(keys["meta"]) <= 675_000
    finally:
        await backend.disconnect()


async def test_every_key_lives_its_ttl_after_a_publish_however_the_keys_were_left(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis
) -> None:
    backend, _ = await connected(redis_url, key_prefix=redis_prefix, history_ttl=20, meta_ttl=40)
    keys = backend.keys("c")

    async def lives_its_ttl() -> None:
        assert 20_000 <= await raw.pttl(keys["stream"]) <= 22_500
        assert 40_000 <= await raw.pttl(keys["meta"]) <= 45_000

    try:
        await backend.publish("c", payload(1))  # a new channel
        await lives_its_ttl()
        await raw.delete(keys["stream"])  # evicted, or deleted by hand: XADD makes a new one, without ttl
        await backend.publish("c", payload(2))
        await lives_its_ttl()
        await raw.persist(keys["stream"])
        await raw.persist(keys["meta"])
        await backend.publish("c", payload(3))
        await lives_its_ttl()
        # What versions before this one left: the exact ttls of their last publish, some time ago.
        await raw.pexpire(keys["meta"], 5000)
        await raw.pexpire(keys["stream"], 5000)
        await backend.publish("c", payload(4))
        await lives_its_ttl()
        assert [e.seq for e in (await backend.history("c", 2, limit=10)).envelopes] == [3, 4]
    finally:
        await backend.disconnect()


async def test_a_busy_channel_refreshes_a_ttl_only_once_it_runs_short(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis
) -> None:
    backend, _ = await connected(redis_url, key_prefix=redis_prefix, history_ttl=60, meta_ttl=600)
    keys = backend.keys("c")
    try:
        await backend.publish("c", payload(0))
        meta_at, stream_at = await expires_at(raw, keys["meta"]), await expires_at(raw, keys["stream"])
        for n in range(1, 5):
            await backend.publish("c", payload(n))
        # Every key still lives its ttl more: nothing refreshed, nothing moved.
        assert abs(await expires_at(raw, keys["meta"]) - meta_at) <= 2
        assert abs(await expires_at(raw, keys["stream"]) - stream_at) <= 2
        # As if most of the ttls passed: the stream has a second more than its ttl left, the meta hash a
        # second less than its own. Only the meta hash is refreshed.
        await raw.pexpire(keys["stream"], 61_000)
        await raw.pexpire(keys["meta"], 599_000)
        await backend.publish("c", payload(5))
        assert await raw.pttl(keys["stream"]) <= 61_000
        assert 600_000 <= await raw.pttl(keys["meta"]) <= 675_000
        await raw.pexpire(keys["stream"], 59_000)
        await backend.publish("c", payload(6))
        assert 60_000 <= await raw.pttl(keys["stream"]) <= 67_500
    finally:
        await backend.disconnect()


async def test_a_read_keeps_a_channel_alive_and_never_shortens_it(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis
) -> None:
    long, _ = await connected(redis_url, key_prefix=redis_prefix, meta_ttl=600)
    short, _ = await connected(redis_url, key_prefix=redis_prefix, meta_ttl=60)
    meta = long.keys("c")["meta"]
    try:
        await long.publish("c", payload(1))
        before = await expires_at(raw, meta)
        for reader in (short, long):
            await reader.position("c")
            await reader.history("c", 0, limit=10)
        assert abs(await expires_at(raw, meta) - before) <= 2
        # A reader whose ttl is longer than what is left extends the channel to its ttl.
        await raw.pexpire(meta, 30_000)
        await short.position("c")
        assert 60_000 <= await raw.pttl(meta) <= 67_500
        await long.history("c", 0, limit=10)
        assert 600_000 <= await raw.pttl(meta) <= 675_000
    finally:
        await short.disconnect()
        await long.disconnect()


async def test_processes_with_different_ttls_each_keep_their_own(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis
) -> None:
    # A short history and a long meta ttl, against one ttl for both in between: whichever published last,
    # every key lives the ttl of each process that published to it, at least.
    split, _ = await connected(redis_url, key_prefix=redis_prefix, history_ttl=60, meta_ttl=600)
    one, _ = await connected(redis_url, key_prefix=redis_prefix, meta_ttl=120)
    forever, _ = await connected(redis_url, key_prefix=redis_prefix, meta_ttl=None)
    ttls = {split: (600_000, 60_000), one: (120_000, 120_000)}  # ms: meta hash, stream
    try:
        for channel, order in (("c", (split, one, split)), ("d", (one, split, one))):
            keys = split.keys(channel)
            meta_ms = stream_ms = 0
            for backend in order:
                await backend.publish(channel, payload(1))
                meta_ms, stream_ms = max(meta_ms, ttls[backend][0]), max(stream_ms, ttls[backend][1])
                assert await raw.pttl(keys["meta"]) >= meta_ms
                assert await raw.pttl(keys["stream"]) >= stream_ms
            await one.position(channel)
            assert await raw.pttl(keys["meta"]) >= 600_000
        # Between a process that keeps channels for good and one with a ttl, the last publish decides.
        keys = split.keys("c")
        await forever.publish("c", payload(2))
        assert await raw.pttl(keys["meta"]) == -1
        assert await raw.pttl(keys["stream"]) >= 120_000  # it keeps no stream for good: no history_ttl
        await split.publish("c", payload(3))
        assert 600_000 <= await raw.pttl(keys["meta"]) <= 675_000
        await forever.publish("c", payload(4))
        assert await raw.pttl(keys["meta"]) == -1
    finally:
        for backend in (split, one, forever):
            await backend.disconnect()


async def test_reading_a_channel_nobody_published_to_costs_little_for_long(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis
) -> None:
    backend, _ = await connected(redis_url, key_prefix=redis_prefix, meta_ttl=None, unpublished_ttl=60)
    try:
        meta = backend.keys("ghost")["meta"]
        epoch = (await backend.position("ghost")).epoch
        assert 59_000 < await raw.pttl(meta) <= 60_000
        assert (await backend.history("ghost", 0, limit=10)).position == (await backend.position("ghost"))
        assert await raw.exists(backend.keys("ghost")["stream"]) == 0
        # The first publish keeps the epoch that readers were given, and keeps the channel for good.
        assert (await backend.publish("ghost", payload(1))).epoch == epoch
        assert await raw.pttl(meta) == -1
        await backend.position("ghost")
        assert await raw.pttl(meta) == -1
    finally:
        await backend.disconnect()
    with_ttl, _ = await connected(redis_url, key_prefix=redis_prefix, meta_ttl=600, unpublished_ttl=60)
    try:
        meta = with_ttl.keys("ghost2")["meta"]
        await with_ttl.position("ghost2")
        assert 59_000 < await raw.pttl(meta) <= 60_000
        await with_ttl.publish("ghost2", payload(1))  # the first publish gives it the ttl of a channel in use
        assert 600_000 <= await raw.pttl(meta) <= 675_000
    finally:
        await with_ttl.disconnect()
    brief, _ = await connected(redis_url, key_prefix=redis_prefix, unpublished_ttl=0.2)
    try:
        for n in range(20):
            await brief.position(f"random-{n}")
        await asyncio.sleep(0.3)
        assert await raw.keys(f"{redis_prefix}:{{random-*") == []
    finally:
        await brief.disconnect()


async def test_a_lost_meta_hash_starts_a_new_epoch_without_the_old_history(
    backend: RedisBackend, raw: redis.asyncio.Redis
) -> None:
    old = [await backend.publish("c", payload(n)) for n in range(3)]
    await raw.delete(backend.keys("c")["meta"])
    fresh = await backend.position("c")
    assert fresh.epoch != old[0].epoch and fresh.seq == 0
    # The old stream went with the old epoch, so the new seq 1 cannot collide with the old entries.
    assert await raw.exists(backend.keys("c")["stream"]) == 0
    envelope = await backend.publish("c", payload(9))
    assert (envelope.seq, envelope.epoch) == (1, fresh.epoch)
    history = await backend.history("c", 0, limit=10)
    assert history.complete and [e.data for e in history.envelopes] == [envelope.data]


async def test_an_application_seeding_random_never_makes_a_lost_channel_reuse_its_epoch(
    backend: RedisBackend, raw: redis.asyncio.Redis
) -> None:
    # The same seed before each loss (a service that seeds `random` at start-up, restarted): if the epoch
    # came from the `random` module, the channel would get its old epoch back, and its clients, holding seq
    # 3 of that epoch, would take the new events 1..3 for ones they had.
    epochs = []
    for _ in range(3):
        random.seed(1234)
        epochs.append((await backend.publish("c", payload(1))).epoch)
        await raw.delete(backend.keys("c")["meta"], backend.keys("c")["stream"])
    assert len(set(epochs)) == 3, epochs


async def test_a_lost_stream_leaves_history_incomplete_and_seqs_going_on(
    backend: RedisBackend, raw: redis.asyncio.Redis
) -> None:
    for n in range(3):
        await backend.publish("c", payload(n))
    epoch = (await backend.position("c")).epoch
    await raw.delete(backend.keys("c")["stream"])
    assert not (await backend.history("c", 0, limit=10)).complete
    assert (await backend.history("c", 3, limit=10)).complete
    envelope = await backend.publish("c", payload(3))
    assert (envelope.seq, envelope.epoch) == (4, epoch)
    assert [e.seq for e in (await backend.history("c", 3, limit=10)).envelopes] == [4]


async def test_a_stream_ahead_of_its_counter_is_dropped_not_fatal(
    backend: RedisBackend, raw: redis.asyncio.Redis
) -> None:
    for n in range(3):
        await backend.publish("c", payload(n))
    await raw.hset(backend.keys("c")["meta"], "seq", 1)  # as if an old backup of the counter came back
    envelope = await backend.publish("c", payload(9))
    assert envelope.seq == 2
    assert await raw.pttl(backend.keys("c")["stream"]) >= MONTH  # the new stream has its ttl
    history = await backend.history("c", 0, limit=10)
    assert not history.complete and [e.seq for e in history.envelopes] == [2]


async def test_an_idempotency_key_of_an_old_epoch_publishes_again(
    backend: RedisBackend, raw: redis.asyncio.Redis
) -> None:
    first = await backend.publish("c", payload(1), idempotency_key="k")
    await raw.delete(backend.keys("c")["meta"])
    again = await backend.publish("c", payload(1), idempotency_key="k")
    assert again.seq == 1 and again.epoch != first.epoch
    assert (await backend.history("c", 0, limit=10)).envelopes == (again,)


async def test_a_duplicate_whose_history_is_gone_keeps_its_seq(redis_url: str, redis_prefix: str) -> None:
    backend, _ = await connected(redis_url, key_prefix=redis_prefix, history_size=0)
    try:
        first = await backend.publish("c", payload(1), idempotency_key="k")
        assert await backend.publish("c", payload(1), idempotency_key="k") == first
        assert (await backend.position("c")).seq == 1
    finally:
        await backend.disconnect()


# -- configuration --------------------------------------------------------------------------------------


def test_url_options_are_read_and_the_rest_goes_to_redis_py() -> None:
    backend = RedisBackend.from_url(
        "redis://127.0.0.1:1/2?key_prefix=app&history_size=5&history_ttl=60&meta_ttl=none&timeout=1.5"
        "&socket_keepalive=true"
    )
    assert backend.keys("c")["meta"] == "app:{c}:meta"
    assert backend.stats()["server"] == "redis://127.0.0.1:1/2?socket_keepalive=true"
    assert isinstance(load_backend("redis://127.0.0.1:1/0?key_prefix=x"), RedisBackend)
    assert isinstance(load_backend("rediss://127.0.0.1:1/0"), RedisBackend)
    assert isinstance(load_backend("unix:///tmp/redis.sock"), RedisBackend)
    with pytest.raises(ConfigurationError, match="history_size"):
        RedisBackend.from_url("redis://127.0.0.1/0?history_size=many")
    with pytest.raises(ConfigurationError, match="from_url"):
        RedisBackend("redis://127.0.0.1/0?key_prefix=app")
    with pytest.raises(ConfigurationError):
        RedisBackend("redis://127.0.0.1/0", key_prefix="a{b}")
    with pytest.raises(ConfigurationError):
        RedisBackend()
    with pytest.raises(ConfigurationError):
        RedisBackend("redis://127.0.0.1/0", reconnect_delay=(2.0, 1.0))


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("key_prefx=app", r"unknown Redis URL option 'key_prefx' \(did you mean 'key_prefix'\?\)"),
        ("socket_keepalive=ture", "invalid value 'ture' for Redis URL option 'socket_keepalive'"),
        ("max_connections=0", "'max_connections': expected a number >= 1"),
        ("protocol=4", "'protocol': expected one of 2, 3"),
        ("db=-1", "'db'"),
        ("ssl_ca_certs=/etc/ca.pem", "'ssl_ca_certs' applies to rediss:// URLs only"),
        ("decode_responses=false", "'decode_responses' cannot be given in a Redis URL; pass client="),
        ("timeout=1&timeout=2", "'timeout' is given twice"),
        ("socket_timeout=1&socket_timeout=2", "'socket_timeout' is given twice"),
        ("timeout=nan", "timeout must be a finite number"),
        ("history_size=-1", "history_size must be an integer >= 0"),
        ("max_reconnect_attempts=0", "max_reconnect_attempts must be an integer >= 1"),
    ],
)
def test_a_wrong_redis_url_option_is_refused_at_construction(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_backend(f"redis://127.0.0.1:1/0?{query}")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:port/0", "invalid Redis URL 'redis://127.0.0.1:port/0': Port"),
        ("redis://user:s3cret@127.0.0.1:port/0", r"'redis://user:\*\*\*@127.0.0.1:port/0'"),
        ("unix://", "unix:// Redis URL needs the socket's path"),
        ("unix:///tmp/redis.sock?socket_keepalive=true", "applies to redis:// and rediss:// URLs only"),
    ],
)
def test_a_wrong_redis_url_is_refused_at_construction(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_backend(url)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key_prefix": 7}, "key_prefix must be a non-empty string"),
        ({"history_size": "500"}, "history_size must be an integer >= 0"),
        ({"history_ttl": 0}, "history_ttl must be a finite number of seconds > 0 or None"),
        ({"meta_ttl": float("inf")}, "meta_ttl must be a finite number of seconds > 0 or None"),
        ({"timeout": float("nan")}, "timeout must be a finite number of seconds > 0"),
        ({"ping_interval": "10"}, "ping_interval must be a finite number of seconds > 0"),
        ({"reconnect_delay": 1.0}, "reconnect_delay must be \\(first, most\\)"),
        ({"reconnect_delay": (0.1, float("inf"))}, "reconnect_delay must be"),
        ({"reconnect_delay": (0.1, 1.0, 2.0)}, "reconnect_delay must be"),
        ({"max_reconnect_attempts": 2.5}, "max_reconnect_attempts must be an integer >= 1 or None"),
    ],
)
def test_nonsense_redis_backend_arguments_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisBackend("redis://127.0.0.1:1/0", **options)


async def test_a_client_that_is_not_asyncio_is_refused_and_redis_py_options_still_work(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis
) -> None:
    import redis as sync_redis

    sync_client = sync_redis.Redis()
    try:
        with pytest.raises(
            ConfigurationError, match=r"client must be a redis\.asyncio\.Redis, not redis\.client\.Redis"
        ):
            RedisBackend(client=sync_client)  # type: ignore[arg-type]
    finally:
        sync_client.close()
    # Options redis-py reads pass the checks and reach it: the backend connects and round-trips with them.
    options = "socket_keepalive=true&client_name=rtbtest&max_connections=5&health_check_interval=0"
    separator = "&" if "?" in redis_url else "?"
    backend, recorder = await connected(
        f"{redis_url}{separator}{options}&socket_connect_timeout=2", key_prefix=redis_prefix
    )
    try:
        await round_trip(backend, recorder)
        assert any(client["name"] == "rtbtest" for client in await raw.client_list())
    finally:
        await backend.disconnect()


def test_stats_never_show_the_password() -> None:
    backend = RedisBackend("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in json.dumps(dict(backend.stats()))
    assert "s3cret" not in repr(backend)


async def test_a_password_in_the_url_works(redis_server: RedisServer) -> None:
    redis_server.args += ["--requirepass", "s3cret w0rd"]
    redis_server.password = "s3cret w0rd"
    await asyncio.to_thread(redis_server.restart)
    backend, recorder = await connected(f"redis://:s3cret%20w0rd@127.0.0.1:{redis_server.port}/0")
    try:
        await round_trip(backend, recorder)
    finally:
        await backend.disconnect()
    wrong = RedisBackend(f"redis://:nope@127.0.0.1:{redis_server.port}/0")
    with pytest.raises(BackendUnavailable):
        await wrong.connect(Recorder())
    assert "nope" not in str(wrong.stats())


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_rediss_connects_over_tls(tls_cert: tuple[Path, Path]) -> None:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("needs redis-server")
    cert, key = tls_cert
    tls_port = free_port()
    server = RedisServer(
        binary,
        args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
              "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"],
    )  # fmt: skip
    try:
        try:
            await asyncio.to_thread(server.start)
        except RuntimeError as exc:
            pytest.skip(f"this redis-server has no TLS support: {exc}")
        backend, recorder = await connected(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}")
        try:
            await round_trip(backend, recorder)
        finally:
            await backend.disconnect()
    finally:
        server.close()


async def test_an_injected_client_stays_open(redis_url: str, redis_prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        backend = RedisBackend(client=client, key_prefix=redis_prefix)
        recorder = Recorder()
        await backend.connect(recorder)
        await backend.subscribe("c")
        sent = await backend.publish("c", payload(1))
        await recorder.wait_for(lambda: recorder.envelopes == [sent])
        assert (await backend.history("c", 0, limit=5)).envelopes == (sent,)
        await backend.disconnect()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_connecting_to_nothing_fails_fast_and_can_be_retried(redis_server: RedisServer) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{redis_server.port}/0", **FAST)  # type: ignore[arg-type]
    await asyncio.to_thread(redis_server.kill)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await backend.connect(Recorder())
    assert time.monotonic() - started < 1.5
    assert not backend.available and backend.stats()["state"] == "closed"
    await asyncio.to_thread(redis_server.start)
    await backend.connect(Recorder())
    assert backend.available
    await backend.disconnect()


async def test_databases_do_not_hear_each_other(redis_server: RedisServer) -> None:
    # PUB/SUB ignores database numbers: the channel names carry it.
    one, heard_one = await connected(f"redis://127.0.0.1:{redis_server.port}/1")
    two, heard_two = await connected(f"redis://127.0.0.1:{redis_server.port}/2")
    try:
        await one.subscribe("c")
        await two.subscribe("c")
        await one.publish("c", payload(1))
        await two.publish("c", payload(1))
        await two.publish("c", payload(2))
        await heard_two.wait_for(lambda: heard_two.seqs("c") == [1, 2])
        await heard_one.wait_for(lambda: heard_one.seqs("c") == [1])
        assert one.keys("c")["pubsub"].endswith(":db1")
        assert heard_one.envelopes[0].epoch != heard_two.envelopes[0].epoch
    finally:
        await one.disconnect()
        await two.disconnect()


# -- the listener ---------------------------------------------------------------------------------------


async def test_a_dropped_connection_is_restored_and_reported(redis_server: RedisServer) -> None:
    backend, recorder = await connected(redis_server.url, **FAST)  # type: ignore[arg-type]
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await backend.subscribe("a")
        await backend.subscribe("b")
        await backend.publish("a", payload(1))
        await recorder.wait_for(lambda: recorder.seqs("a") == [1])
        assert await admin.client_kill_filter(_type="pubsub") == 1
        await recorder.wait_for(lambda: recorder.interruptions == [(["a", "b"], "backend_reconnected")])
        stats = backend.stats()
        assert stats["state"] == "connected" and stats["reconnects"] == 1 and backend.available
        assert "Connection" in str(stats["last_error"]) or "closed" in str(stats["last_error"])
        await backend.publish("a", payload(2))
        await backend.publish("b", payload(1))
        await recorder.wait_for(lambda: recorder.seqs("a") == [1, 2] and recorder.seqs("b") == [1])
    finally:
        await admin.aclose()
        await backend.disconnect()


async def test_the_reconnect_jitter_leaves_the_random_module_alone(redis_server: RedisServer) -> None:
    # A service that seeds `random` (or tests that do) must not make every process back off alike.
    backend, recorder = await connected(redis_server.url, **FAST)  # type: ignore[arg-type]
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await backend.subscribe("a")
        before = random.getstate()
        assert await admin.client_kill_filter(_type="pubsub") == 1
        await recorder.wait_for(lambda: recorder.interruptions == [(["a"], "backend_reconnected")])
        assert random.getstate() == before
    finally:
        await admin.aclose()
        await backend.disconnect()


def test_reconnect_pauses_double_up_to_the_most_with_jitter_in_the_upper_half() -> None:
    rng = random.Random(7)
    for failures in (0, 1, 2, 5, 40, 10_000):
        delay = min(3.0, 0.1 * 2 ** min(failures, 32))
        pauses = [reconnect_pause(rng, failures, (0.1, 3.0)) for _ in range(200)]
        assert all(delay / 2 <= pause <= delay for pause in pauses), (failures, min(pauses), max(pauses))
        assert max(pauses) - min(pauses) > delay / 4  # jittered, not one fixed value


async def test_after_a_restart_that_kept_the_data_clients_catch_up_without_resync() -> None:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("needs redis-server")
    server = RedisServer(binary, args=["--appendonly", "yes", "--appendfsync", "always"])
    await asyncio.to_thread(server.start)
    # This process reconnects slowly, so that another process publishes before it is back.
    broadcaster = Broadcaster(backend=RedisBackend(server.url, timeout=1.0, reconnect_delay=(1.0, 1.0)))
    other, _ = await connected(server.url)
    try:
        async with broadcaster, broadcaster.subscribe("c") as subscription:
            epoch = subscription.position.epoch
            for n in range(3):
                await other.publish("c", Noted(n=n).to_json())
            received = [await anext(subscription) for _ in range(3)]
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            for n in range(3, 6):
                await other.publish("c", Noted(n=n).to_json())  # while this process is still away
            async with asyncio.timeout(5_000 * MS):
                received += [await anext(subscription) for _ in range(3)]
            assert all(isinstance(r, Received) for r in received)
            assert [(r.seq, r.event.n) for r in received] == [(n + 1, n) for n in range(6)]  # type: ignore[union-attr]
            assert subscription.position.epoch == epoch
            stats = broadcaster.stats()
            assert stats.interruptions == 1 and stats.resyncs == 0
    finally:
        await other.disconnect()
        server.close()


async def test_a_stalled_connection_is_detected_by_ping(redis_server: RedisServer) -> None:
    backend, recorder = await connected(redis_server.url, ping_interval=0.2, **FAST)  # type: ignore[arg-type]
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await backend.subscribe("c")
        await asyncio.sleep(0.7)  # silent intervals are answered PONGs, not reconnects
        assert backend.stats()["reconnects"] == 0
        # Redis stops answering anyone for 1.5 s: the PING goes unanswered and the listener starts over.
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        await recorder.wait_for(lambda: recorder.interruptions == [(["c"], "backend_reconnected")], timeout=8)
        assert "PING" in str(backend.stats()["last_error"]) or "Timeout" in str(backend.stats()["last_error"])
        await backend.publish("c", payload(1))
        await recorder.wait_for(lambda: recorder.seqs("c") == [1])
    finally:
        await admin.aclose()
        await backend.disconnect()


async def test_a_burst_of_commands_waits_for_pooled_connections(redis_url: str, redis_prefix: str) -> None:
    # Thousands of clients attaching at once read as many positions: past the pool's size they wait for a
    # connection instead of failing (redis-py's default pool raises "Too many connections" past 100).
    backend, _ = await connected(f"{redis_url}?max_connections=8", key_prefix=redis_prefix)
    try:
        positions = await asyncio.gather(*(backend.position(f"burst-{n}") for n in range(400)))
        assert all(p.seq == 0 for p in positions)
    finally:
        await backend.disconnect()


async def test_publish_fails_fast_and_subscribe_waits_while_redis_is_down(redis_server: RedisServer) -> None:
    backend, recorder = await connected(redis_server.url, **FAST)  # type: ignore[arg-type]
    try:
        await backend.subscribe("a")
        await asyncio.to_thread(redis_server.kill)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.publish("a", payload(1))
        assert time.monotonic() - started < 1.5
        await until(lambda: not backend.available)
        stats = backend.stats()
        assert stats["state"] == "reconnecting" and stats["publish_errors"] == 1
        assert stats["outage_seconds"] is not None and stats["last_error"]
        with pytest.raises(BackendUnavailable):
            await backend.subscribe("b")  # nobody brings Redis back within the timeout
        # A subscribe made during the outage completes once the listener is back.
        pending = asyncio.create_task(backend.subscribe("c"))
        await until(lambda: backend.stats()["subscribed"] == 2)  # "a" and the waiting "c"
        await asyncio.to_thread(redis_server.start)
        await asyncio.wait_for(pending, 2_000 * MS)
        await recorder.wait_for(lambda: bool(recorder.interruptions))
        assert recorder.interruptions[0][1] == "backend_reconnected"
        assert "a" in recorder.interruptions[0][0] and "b" not in recorder.interruptions[0][0]
        await backend.publish("c", payload(1))
        await recorder.wait_for(lambda: recorder.seqs("c") == [1])
        assert backend.stats()["reconnect_attempts"] == 0 and backend.stats()["outage_seconds"] is None
    finally:
        await backend.disconnect()


async def test_a_listener_that_gives_up_says_so(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(redis_server.url, max_reconnect_attempts=3, **FAST)  # type: ignore[arg-type]
    broadcaster = Broadcaster(backend=backend)
    async with broadcaster, broadcaster.subscribe("c"):
        await asyncio.to_thread(redis_server.kill)
        with caplog.at_level(logging.ERROR, logger="rtbroadcast.redis"):
            await until(lambda: backend.stats()["state"] == "failed")
        assert any("listener stopped" in r.getMessage() for r in caplog.records)
        stats = broadcaster.stats()
        assert stats.backend_available is False and stats.interruptions == 1
        assert stats.backend["state"] == "failed" and stats.backend["listener"] == "failed"
        assert stats.backend["reconnect_attempts"] == 3
        await asyncio.to_thread(redis_server.start)  # too late: the listener gave up, and subscribing says so
        with pytest.raises(BackendUnavailable, match="gave up"):
            await backend.subscribe("d")
    assert backend.stats()["state"] == "closed"


class Flaky(Recorder):
    """A listener with a bug: it fails on the first envelope."""

    def on_envelope(self, envelope: Envelope) -> None:
        if envelope.seq == 1:
            raise RuntimeError("a bug in the listener")
        super().on_envelope(envelope)


async def test_the_listener_survives_bad_messages_and_failing_callbacks(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(redis_url, key_prefix=redis_prefix)
    flaky = Flaky()
    await backend.connect(flaky)
    try:
        await backend.subscribe("c")
        with caplog.at_level(logging.ERROR, logger="rtbroadcast.redis"):
            await raw.publish(backend.keys("c")["pubsub"], "not an envelope")
            await backend.publish("c", payload(1))
            await backend.publish("c", payload(2))
            await flaky.wait_for(lambda: flaky.seqs("c") == [2])
        assert backend.stats()["listener_errors"] == 2 and backend.stats()["state"] == "connected"
        assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR"]
        assert "malformed" in caplog.records[0].getMessage() and caplog.records[1].exc_info is not None
    finally:
        await backend.disconnect()


async def test_disconnect_leaves_no_task_and_no_connection(redis_server: RedisServer) -> None:
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        clients_before = len(await admin.client_list())
        tasks_before = set(asyncio.all_tasks())
        backend, _ = await connected(redis_server.url)
        await backend.subscribe("c")
        await backend.publish("c", payload(1))
        assert [task.get_name() for task in asyncio.all_tasks() - tasks_before] == [
            "rtbroadcast-redis-listener"
        ]
        await backend.disconnect()
        await no_task_left(since=tasks_before, timeout=0)

        async def connections_closed() -> bool:
            return len(await admin.client_list()) <= clients_before

        await until(connections_closed)
    finally:
        await admin.aclose()


async def test_a_listener_that_gives_up_shows_in_the_broadcaster_state(redis_server: RedisServer) -> None:
    from rtbroadcast import Broadcaster, BroadcasterState

    backend = RedisBackend(redis_server.url, max_reconnect_attempts=1, timeout=0.5)
    async with Broadcaster(backend=backend) as broadcaster, broadcaster.subscribe("c"):
        assert broadcaster.state is BroadcasterState.CONNECTED
        redis_server.kill()
        await until(lambda: broadcaster.state is BroadcasterState.FAILED, timeout=15_000 * MS)
        assert broadcaster.stats().state is BroadcasterState.FAILED
        assert broadcaster.stats().backend_available is False
    assert broadcaster.state is BroadcasterState.CLOSED


# -- the wire: headers, and processes of the version before them ------------------------------------------

TRACED = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7",
}


async def test_without_headers_the_wire_is_the_one_before_them_and_with_them_old_readers_skip_it(
    backend: RedisBackend, raw: redis.asyncio.Redis
) -> None:
    keys = backend.keys("c")
    pubsub = raw.pubsub()
    await pubsub.subscribe(keys["pubsub"])
    try:
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"  # type: ignore[index]
        plain = await backend.publish("c", payload(1))
        traced = await backend.publish("c", payload(2), headers=TRACED)
        messages = [(await pubsub.get_message(timeout=5))["data"].decode() for _ in range(2)]  # type: ignore[index]
    finally:
        await pubsub.aclose()
    encoded = json.dumps(TRACED, separators=(",", ":"))
    assert messages == [
        f"1 {plain.epoch} {plain.data}",  # byte for byte what 0.1 publishes
        f"h 2 {traced.epoch} {encoded}\n{traced.data}",
    ]
    entries = await raw.xrange(keys["stream"])
    assert [sorted(fields) for _, fields in entries] == [[b"d", b"t"], [b"d", b"h", b"t"]]
    assert entries[1][1][b"h"] == encoded.encode() and entries[1][1][b"d"] == traced.data.encode()
    # 0.1's listener reads "<seq> <epoch> <data>" with int() on the first word: a headed message fails it,
    # and it logs the message as malformed and skips it (repairing from history) rather than deliver
    # "<epoch> <headers>..." as the event's text.
    with pytest.raises(ValueError, match="invalid literal for int"):
        int(messages[1].split(" ", 2)[0])


async def test_messages_of_the_old_format_and_headed_ones_with_bad_headers_are_delivered(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    backend, recorder = await connected(redis_url, key_prefix=redis_prefix)
    try:
        await backend.subscribe("c")
        name = backend.keys("c")["pubsub"]
        epoch = (await backend.position("c")).epoch
        with caplog.at_level(logging.WARNING):
            await raw.publish(name, f'1 {epoch} {{"type":"a","seq":1}}')  # as 0.1 publishes
            await raw.publish(name, f'h 2 {epoch} {{"traceparent":"x"}}\n{{"type":"a","seq":2}}')
            await raw.publish(name, f'h 3 {epoch} not json\n{{"type":"a","seq":3}}')
            await raw.publish(name, f"h 4 {epoch} no line break")
            await raw.publish(name, f'h x {epoch} {{}}\n{{"type":"a","seq":5}}')
            await raw.publish(name, f'6 {epoch} {{"type":"a","seq":6}}')
            await recorder.wait_for(lambda: recorder.seqs("c")[-1:] == [6])
        assert [(e.seq, e.data, e.headers) for e in recorder.envelopes] == [
            (1, '{"type":"a","seq":1}', None),
            (2, '{"type":"a","seq":2}', {"traceparent": "x"}),
            (3, '{"type":"a","seq":3}', None),
            (6, '{"type":"a","seq":6}', None),
        ]
        assert backend.stats()["listener_errors"] == 2
        assert [r.levelname for r in caplog.records] == ["WARNING", "ERROR", "ERROR"]
        assert caplog.records[0].getMessage() == "ignoring an envelope's malformed headers: 'not json'"
        assert all("malformed message" in r.getMessage() for r in caplog.records[1:])
    finally:
        await backend.disconnect()
