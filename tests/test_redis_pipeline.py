"""The Redis backend's shared command connection: publishes made in one loop turn share one round trip, and
each keeps its own result, error, deadline and idempotency."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

from rtbroadcast import BackendError, BackendUnavailable
from rtbroadcast.backends._redis_pipe import bulks
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.backends.redis._keys import KeyLayout
from rtbroadcast.backends.redis._scripts import CLUSTER_SCRIPTS, NODE_SCRIPTS, SCRIPTS
from rtbroadcast.backends.redis._shared import ChannelScripts, ChannelSettings
from rtbroadcast.protocol import with_seq

from .redis_support import RedisServer
from .support import MS, until
from .test_backends import Recorder, payload

pytestmark = pytest.mark.redis


@pytest.fixture
async def own(redis_server: RedisServer) -> AsyncIterator[tuple[RedisBackend, redis.asyncio.Redis]]:
    """A backend on a server of the test's own (so that the server's counters are this test's alone)."""
    backend = RedisBackend(redis_server.url, timeout=1.0, reconnect_delay=(0.05, 0.2))
    await backend.connect(Recorder())
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        yield backend, admin
    finally:
        await admin.aclose()
        await backend.disconnect()


async def reads_processed(admin: redis.asyncio.Redis) -> int:
    return int((await admin.info("stats"))["total_reads_processed"])


async def test_concurrent_publishes_share_round_trips(own: tuple[RedisBackend, redis.asyncio.Redis]) -> None:
    backend, admin = own
    await backend.publish("warm", payload(0))
    before = await reads_processed(admin)
    envelopes = await asyncio.gather(*(backend.publish(f"c{n % 8}", payload(n)) for n in range(200)))
    reads = await reads_processed(admin) - before - 1  # the INFO below is one read of the admin's
    # Writes of up to 16 requests: 200 publishes reach Redis in a dozen reads or so, not 200.
    assert reads <= 20, reads
    for n in range(8):
        assert [e.seq for e in envelopes[n::8]] == list(range(1, 26))


async def test_publishes_of_one_turn_keep_call_order_per_channel(
    own: tuple[RedisBackend, redis.asyncio.Redis],
) -> None:
    backend, _ = own
    tasks = [asyncio.create_task(backend.publish("ordered", payload(n))) for n in range(300)]
    envelopes = await asyncio.gather(*tasks)
    assert [e.seq for e in envelopes] == list(range(1, 301))
    history = await backend.history("ordered", 0, limit=300)
    assert [e.data for e in history.envelopes] == [e.data for e in envelopes]


async def test_one_failing_publish_fails_alone(own: tuple[RedisBackend, redis.asyncio.Redis]) -> None:
    backend, admin = own
    await admin.set(backend.keys("broken")["meta"], "not a hash")  # the script's HGET fails: WRONGTYPE
    results = await asyncio.gather(
        backend.publish("fine", payload(1)),
        backend.publish("broken", payload(1)),
        backend.publish("fine", payload(2)),
        return_exceptions=True,
    )
    assert isinstance(results[1], BackendError) and not isinstance(results[1], BackendUnavailable)
    assert "WRONGTYPE" in str(results[1])
    assert [getattr(r, "seq", None) for r in results] == [1, None, 2]
    assert backend.stats()["publish_errors"] == 1


async def test_idempotency_holds_within_one_turn(own: tuple[RedisBackend, redis.asyncio.Redis]) -> None:
    backend, _ = own
    first, again, other = await asyncio.gather(
        backend.publish("idem", payload(1), idempotency_key="k1"),
        backend.publish("idem", payload(1), idempotency_key="k1"),
        backend.publish("idem", payload(2), idempotency_key="k2"),
    )
    assert first == again and first.seq == 1 and other.seq == 2
    assert (await backend.position("idem")).seq == 2


async def test_a_cancelled_publish_leaves_the_others_in_step(
    own: tuple[RedisBackend, redis.asyncio.Redis],
) -> None:
    backend, _ = own
    tasks = [asyncio.create_task(backend.publish("steps", payload(n))) for n in range(10)]
    await asyncio.sleep(0)  # written, not answered yet
    tasks[4].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[4], asyncio.CancelledError)
    seqs = [getattr(r, "seq", None) for r in results]
    # The cancelled one was already on its way: Redis applied it (seq 5), only its answer was dropped.
    assert seqs == [1, 2, 3, 4, None, 6, 7, 8, 9, 10]
    assert (await backend.publish("steps", payload(11))).seq == 11
    assert (await backend.position("other")).seq == 0


async def test_publishes_fail_at_their_deadline_when_redis_stalls_then_work_again(
    own: tuple[RedisBackend, redis.asyncio.Redis],
) -> None:
    backend, admin = own
    await backend.publish("stall", payload(0))
    await admin.client_pause(2500)
    started = time.monotonic()
    results = await asyncio.gather(
        *(backend.publish("stall", payload(n)) for n in range(20)), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    assert "no answer" in str(results[0])
    assert 0.9 < elapsed < 2.0, elapsed  # each at its own 1 s deadline, none waiting for the pause to end
    await admin.client_unpause()
    # A stalled connection is not trusted again: the next publish opens a new one and works.
    async with asyncio.timeout(3_000 * MS):
        sent = await backend.publish("stall", payload(99))
    # The stalled ones were applied when Redis resumed, or not; the seq says how many were.
    assert sent.seq >= 2
    assert (await backend.history("stall", 0, limit=100)).complete


async def test_a_flushed_script_cache_is_refilled(own: tuple[RedisBackend, redis.asyncio.Redis]) -> None:
    backend, admin = own
    await backend.publish("flushed", payload(1))
    await admin.script_flush()
    envelopes = await asyncio.gather(*(backend.publish("flushed", payload(n)) for n in range(2, 6)))
    assert [e.seq for e in envelopes] == [2, 3, 4, 5]


async def test_a_restart_fails_in_flight_publishes_and_the_next_ones_reconnect(
    redis_server: RedisServer,
) -> None:
    backend = RedisBackend(redis_server.url, timeout=1.0, reconnect_delay=(0.05, 0.2))
    await backend.connect(Recorder())
    try:
        await backend.publish("r", payload(1))
        await asyncio.to_thread(redis_server.restart)
        # The first publish may meet the dead connection (BackendUnavailable), never a wrong answer.
        outcome: list[int | str] = []
        for n in range(3):
            try:
                outcome.append((await backend.publish("r", payload(n))).seq)
            except BackendUnavailable:
                outcome.append("unavailable")
        assert outcome[-1] != "unavailable"
        await until(lambda: backend.available)
    finally:
        await backend.disconnect()


channel_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30)
header_maps = st.none() | st.dictionaries(
    st.sampled_from(["traceparent", "tracestate"]), st.text(max_size=40)
)


@given(
    channel_names,
    st.text(max_size=300),
    st.none() | st.text(min_size=1, max_size=20),
    header_maps,
    st.integers(min_value=0, max_value=3),
)
def test_a_publish_packed_from_its_channels_parts_is_the_command_packed_whole(
    channel: str, text: str, idempotency_key: str | None, headers: dict[str, str] | None, repeat: int
) -> None:
    # The publish keeps each channel's fixed arguments packed (a cache) and packs only what changes: it
    # must send exactly the bytes that packing every argument would, first time and from the cache.
    for scripts, extra in ((SCRIPTS, None), (CLUSTER_SCRIPTS, b"a" * 40), (NODE_SCRIPTS, b"r" * 40)):
        layout = KeyLayout("rtb-test")
        settings = ChannelSettings(
            history_size=100, history_ttl=None, meta_ttl=60.0, unpublished_ttl=5.0, idempotency_ttl=30.0
        )
        channel_scripts = ChannelScripts(_never_run, scripts, layout, settings)
        payload = json.dumps({"type": "t", "text": text})
        for _ in range(repeat + 1):
            keys, args, packed, head = channel_scripts.publish_request(
                channel, payload, idempotency_key, headers
            )
            assert head + "1}" == with_seq(payload, 1)
            if extra is not None:
                args, packed = [*args, extra], packed + bulks(extra)
            script = scripts["publish"]
            assert script.evalsha(keys, args, packed=packed) == script.evalsha(keys, args)


async def _never_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("no script runs in this test")


def test_a_publish_packed_after_the_layout_changed_names_the_new_keys() -> None:
    # connect() configures the layout (the database's PUB/SUB suffix, the client's encoding): what was
    # packed under the old names must not be sent under the new ones.
    layout = KeyLayout("rtb-test")
    settings = ChannelSettings(
        history_size=10, history_ttl=None, meta_ttl=None, unpublished_ttl=5.0, idempotency_ttl=30.0
    )
    channel_scripts = ChannelScripts(_never_run, SCRIPTS, layout, settings)
    payload = json.dumps({"type": "t"})
    channel_scripts.publish_request("c", payload, None, None)
    layout.configure(pubsub_suffix=":db3", encoding=("utf-8", "strict"))
    keys, args, packed, _ = channel_scripts.publish_request("c", payload, None, None)
    assert args[2] == layout.pubsub("c").encode()
    assert SCRIPTS["publish"].evalsha(keys, args, packed=packed) == SCRIPTS["publish"].evalsha(keys, args)
