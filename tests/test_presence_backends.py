"""Presence, the backend half: the contract on memory and Redis, and Redis across processes.

The contract tests use ``test_backends``'s harness (a "peer" on Redis is a second backend on the same
server and prefix, standing in for another process). The ``kill -9`` test runs a real second process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path

import pytest
import redis.asyncio

from rtbroadcast import Backend, Broadcaster, ConfigurationError, Envelope, History, StreamPosition
from rtbroadcast.backends.base import BackendListener
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.presence import PresenceChange, PresenceMember, PresenceMode, PresenceSnapshot

from .redis_support import RedisServer
from .support import MS, until
from .test_backends import BACKENDS, Harness

#: Every backend that keeps presence: Redis Cluster does not (yet), and says so (supports_presence).
PRESENCE_BACKENDS = [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "redis-cluster"]


@pytest.fixture(params=PRESENCE_BACKENDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with contextlib.AsyncExitStack() as stack:
        yield Harness(request.param, request, stack)


pytestmark = pytest.mark.asyncio_only

ROOT = Path(__file__).resolve().parent.parent


class Watcher(BackendListener):
    """A listener that keeps the presence changes it hears."""

    def __init__(self) -> None:
        self.changes: list[PresenceChange] = []
        self.changed = asyncio.Event()

    def on_envelope(self, envelope: Envelope) -> None:
        pass

    def on_interruption(self, channels: Collection[str], reason: str) -> None:
        pass

    def on_presence(self, change: PresenceChange) -> None:
        self.changes.append(change)
        self.changed.set()

    def seen(self, channel: str) -> list[tuple[str, str]]:
        return [(c.kind, c.member.client) for c in self.changes if c.channel == channel]


def member(n: int, identity: str | None = "user", **info: object) -> PresenceMember:
    return PresenceMember(f"client-{n}", identity, {"n": n, **info})


async def open_watched(harness: Harness, **options: object) -> tuple[Backend, Watcher]:
    backend = harness.build(**options)
    watcher = Watcher()
    await backend.connect(watcher)
    harness._stack.push_async_callback(backend.disconnect)
    return backend, watcher


async def peer_of(harness: Harness, backend: Backend, **options: object) -> tuple[Backend, Watcher | None]:
    if not harness.shares_store:
        return backend, None
    return await open_watched(harness, **options)


async def test_a_join_returns_the_snapshot_that_includes_it(harness: Harness) -> None:
    backend, _ = await open_watched(harness)
    assert backend.supports_presence
    first = await backend.presence_join("room", member(1), limit=100)
    assert first.count == 1 and first.members == (member(1),) and not first.truncated
    second = await backend.presence_join("room", member(2, None), limit=100)
    assert second.count == 2 and second.members == (member(1), member(2, None))
    assert second.version > first.version
    assert await backend.presence_count("room") == 2
    assert await backend.presence_count("elsewhere") == 0
    assert (await backend.presence_snapshot("elsewhere", limit=10)) == PresenceSnapshot(0)


async def test_snapshots_keep_join_order_and_are_capped(harness: Harness) -> None:
    backend, _ = await open_watched(harness)
    for n in range(12):
        await backend.presence_join("room", member(n), limit=0)
    snapshot = await backend.presence_snapshot("room", limit=5)
    assert snapshot.count == 12 and snapshot.truncated
    assert [m.client for m in snapshot.members] == [f"client-{n}" for n in range(5)]
    counted = await backend.presence_snapshot("room", limit=0)
    assert counted.count == 12 and counted.members == () and counted.truncated
    # Joining again replaces the member in its place.
    await backend.presence_join("room", member(3, info="new"), limit=0)
    again = await backend.presence_snapshot("room", limit=5)
    assert again.count == 12 and again.members[3] == member(3, info="new")


async def test_a_leave_removes_the_member_and_an_unknown_leave_is_ignored(harness: Harness) -> None:
    backend, _ = await open_watched(harness)
    peer, _ = await peer_of(harness, backend)
    await backend.presence_join("room", member(1), limit=0)
    await peer.presence_join("room", member(2), limit=0)
    await backend.presence_leave("room", "client-1")
    await backend.presence_leave("room", "nobody")
    await backend.presence_leave("never-joined", "client-1")
    snapshot = await peer.presence_snapshot("room", limit=10)
    assert snapshot.members == (member(2),) and snapshot.count == 1


async def test_subscribed_processes_hear_joins_and_leaves_in_order(harness: Harness) -> None:
    backend, watcher = await open_watched(harness)
    peer, peer_watcher = await peer_of(harness, backend)
    await backend.subscribe("room")
    if peer_watcher is not None:
        await peer.subscribe("room")
    joined = await backend.presence_join("room", member(1), limit=10)
    await peer.presence_join("room", member(2), limit=10)
    await peer.presence_leave("room", "client-2")
    await backend.presence_leave("room", "client-1")
    await backend.presence_join("other", member(9), limit=10)  # nobody subscribed to it
    expected = [("join", "client-1"), ("join", "client-2"), ("leave", "client-2"), ("leave", "client-1")]
    for heard in (watcher, peer_watcher):
        if heard is None:
            continue
        await until(lambda heard=heard: len(heard.changes) >= 4, changed=heard.changed)  # type: ignore[misc]
        assert heard.seen("room") == expected
        versions = [c.version for c in heard.changes]
        assert versions == sorted(versions) and versions[0] == joined.version
        assert heard.changes[1].member == member(2) and heard.changes[1].data == member(2).to_json()
        assert heard.seen("other") == []


async def test_changes_without_notify_are_not_heard(harness: Harness) -> None:
    backend, watcher = await open_watched(harness)
    await backend.subscribe("room")
    await backend.presence_join("room", member(1), limit=0, notify=False)
    await backend.presence_leave("room", "client-1", notify=False)
    await backend.presence_join("room", member(2), limit=0)
    await until(lambda: watcher.changes, changed=watcher.changed)
    assert watcher.seen("room") == [("join", "client-2")]


async def test_info_that_is_not_json_is_refused(harness: Harness) -> None:
    backend, _ = await open_watched(harness)
    with pytest.raises(ConfigurationError, match="JSON-serialisable"):
        await backend.presence_join("room", PresenceMember("c", None, {"when": object()}), limit=0)
    assert await backend.presence_count("room") == 0


class NoPresence(Backend):
    """A complete backend without presence (as a PostgreSQL backend may be)."""

    async def connect(self, listener: BackendListener) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    async def publish(self, channel: str, payload: str, *, idempotency_key: str | None = None) -> Envelope:
        raise NotImplementedError

    async def subscribe(self, channel: str) -> None:
        pass

    async def unsubscribe(self, channel: str) -> None:
        pass

    async def position(self, channel: str) -> StreamPosition:
        return StreamPosition("e", 0)

    async def history(self, channel: str, since: int, *, limit: int) -> History:
        return History(StreamPosition("e", 0), (), True)


async def test_a_backend_without_presence_is_valid_and_refused_for_presence() -> None:
    backend = NoPresence()
    assert not backend.supports_presence
    Broadcaster(backend=backend)  # no presence configured: fine
    with pytest.raises(ConfigurationError, match="does not keep presence"):
        Broadcaster(backend=NoPresence(), presence=("room:",))
    with pytest.raises(ConfigurationError, match="does not keep presence"):
        Broadcaster(backend=NoPresence(), presence_count_only=lambda channel: True)
    with pytest.raises(ConfigurationError, match="does not keep presence"):
        await backend.presence_join("c", member(1), limit=1)


@pytest.mark.parametrize(
    "rule", ["room:", 42, ["room:", ""], [b"room:"]], ids=["str", "int", "empty", "bytes"]
)
def test_presence_rules_are_checked(rule: object) -> None:
    with pytest.raises(ConfigurationError, match="presence"):
        Broadcaster(presence=rule)  # type: ignore[arg-type]


def test_presence_modes() -> None:
    broadcaster = Broadcaster(
        presence=("room:", "desk:"), presence_count_only=lambda c: c.startswith("hall:")
    )
    assert broadcaster.presence_mode("room:1") is PresenceMode.MEMBERS
    assert broadcaster.presence_mode("desk:2") is PresenceMode.MEMBERS
    assert broadcaster.presence_mode("hall:3") is PresenceMode.COUNT
    assert broadcaster.presence_mode("user:4") is PresenceMode.NONE
    assert Broadcaster().presence_mode("room:1") is PresenceMode.NONE
    with pytest.raises(ConfigurationError, match="presence_snapshot_limit"):
        Broadcaster(presence=("room:",), presence_snapshot_limit=-1)


async def test_the_python_api_reads_presence() -> None:
    async with Broadcaster(
        presence=("room:",), presence_count_only=("hall:",), presence_snapshot_limit=2
    ) as b:
        for n in range(3):
            await b.presence_join("room:1", member(n))
            await b.presence_join("hall:1", member(n))
        snapshot = await b.presence("room:1")
        assert snapshot.count == 3 and len(snapshot.members) == 2 and snapshot.truncated
        assert len((await b.presence("room:1", limit=10)).members) == 3
        counted = await b.presence("hall:1")
        assert counted.count == 3 and counted.members == ()
        assert await b.presence_count("hall:1") == 3
        with pytest.raises(ConfigurationError, match="has no presence"):
            await b.presence("user:1")
        with pytest.raises(ConfigurationError, match="has no presence"):
            await b.presence_count("user:1")
        with pytest.raises(ConfigurationError):
            await b.presence("bad channel name with spaces")


# -- Redis across processes -----------------------------------------------------------------------------


def redis_backend(url: str, prefix: str, heartbeat: float) -> RedisBackend:
    return RedisBackend(url, key_prefix=prefix, presence_heartbeat=heartbeat)


@pytest.mark.redis
async def test_the_keys_share_the_channel_hash_tag(redis_url: str, redis_prefix: str) -> None:
    backend = redis_backend(redis_url, redis_prefix, 1.0)
    await backend.connect(Watcher())
    try:
        await backend.presence_join("room:{1}", member(1), limit=0)
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            keys = sorted(k.decode() for k in await client.keys(f"{redis_prefix}:*presence*"))
            base = f"{redis_prefix}:{{room:%7B1%7D}}"
            assert keys == sorted(
                f"{base}:presence{suffix}" for suffix in ("", ":order", ":procs", ":version")
            )
            ttls = [await client.pttl(key) for key in keys]
            # 3 x heartbeat: nothing outlives the last process.
            assert all(0 < ttl <= 3000 for ttl in ttls), ttls
            procs = f"{base}:presence:procs"
            assert await client.zcard(procs) == 1
            await backend.presence_join("room:{1}", member(2), limit=0)
            await backend.presence_leave("room:{1}", "client-1")
            assert await client.zcard(procs) == 1  # client-2 is still this process's
            await backend.presence_leave("room:{1}", "client-2")
            assert await client.zcard(procs) == 0  # nothing left to reap later
        finally:
            await client.aclose()
    finally:
        await backend.disconnect()


@pytest.mark.redis
@pytest.mark.slow
async def test_members_of_a_process_killed_with_sigkill_leave_within_two_heartbeats(
    redis_url: str, redis_prefix: str
) -> None:
    heartbeat = 1.0
    survivor = redis_backend(redis_url, redis_prefix, heartbeat)
    watcher = Watcher()
    await survivor.connect(watcher)
    try:
        await survivor.subscribe("room")
        await survivor.presence_join("room", member(0), limit=0)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.presence_member", redis_url, redis_prefix, "room", "3", str(heartbeat),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 20_000 * MS)
            assert line.strip() == b"ready"
        finally:
            process.kill()  # SIGKILL: no leave, no cleanup
            await process.wait()
        killed = time.monotonic()
        assert (await survivor.presence_count("room")) == 4
        await until(lambda: len([c for c in watcher.changes if c.kind == "leave"]) == 3, 10_000 * MS,
                    changed=watcher.changed)  # fmt: skip
        gone_after = time.monotonic() - killed
        assert gone_after <= 2 * heartbeat + 0.5, gone_after  # the documented bound, plus latency slack
        assert sorted(c.member.client for c in watcher.changes if c.kind == "leave") == [
            "doomed-0", "doomed-1", "doomed-2",
        ]  # fmt: skip
        snapshot = await survivor.presence_snapshot("room", limit=10)
        assert snapshot.members == (member(0),)
        # The survivor's own member lives on through its heartbeat, well past the dead one's deadline.
        await asyncio.sleep(2 * heartbeat)
        assert (await survivor.presence_snapshot("room", limit=10)).members == (member(0),)
    finally:
        await survivor.disconnect()


@pytest.mark.redis
async def test_a_process_that_lost_its_members_joins_them_again(redis_url: str, redis_prefix: str) -> None:
    heartbeat = 0.4
    backend = redis_backend(redis_url, redis_prefix, heartbeat)
    watcher = Watcher()
    await backend.connect(watcher)
    try:
        await backend.subscribe("room")
        await backend.presence_join("room", member(1), limit=0)
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            await client.delete(*backend._presence.keys("room"))  # as a Redis restart without persistence
        finally:
            await client.aclose()
        assert await backend.presence_count("room") == 0
        await until(lambda: backend.presence_count("room"), 5_000 * MS)  # type: ignore[arg-type,return-value]
        assert (await backend.presence_snapshot("room", limit=5)).members == (member(1),)
        assert backend.stats()["presence_rejoins"] == 1
        await until(lambda: watcher.seen("room") == [("join", "client-1"), ("join", "client-1")],
                    changed=watcher.changed)  # fmt: skip
        # The versions still rise: a watcher never ignores a change after the data was lost.
        assert watcher.changes[1].version > watcher.changes[0].version
    finally:
        await backend.disconnect()


@pytest.mark.redis
async def test_a_leave_that_cannot_reach_redis_is_retried(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, presence_heartbeat=0.4, timeout=0.5)
    await backend.connect(Watcher())
    try:
        await backend.presence_join("room", member(1), limit=0)
        await backend.presence_join("room", member(2), limit=0)
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            await backend.presence_leave("room", "client-1")  # never raises
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert backend.stats()["presence_errors"] == 1

        async def only_client_2() -> bool:
            snapshot = await backend.presence_snapshot("room", limit=100)
            return [m.client for m in snapshot.members] == ["client-2"]

        await until(only_client_2, 5_000 * MS)
    finally:
        await backend.disconnect()


@pytest.mark.redis
async def test_ten_thousand_members_snapshot_is_capped(redis_url: str, redis_prefix: str) -> None:
    async with Broadcaster(backend=redis_backend(redis_url, redis_prefix, 10.0), presence=("big:",)) as b:
        started = time.monotonic()
        for start in range(0, 10_000, 500):
            await asyncio.gather(
                *(b.presence_join("big:1", member(n), snapshot=n % 2 == 0) for n in range(start, start + 500))
            )
        joined = time.monotonic() - started
        started = time.monotonic()
        snapshot = await b.presence_join("big:1", member(10_000))
        one_join = time.monotonic() - started
        assert snapshot.count == 10_001 and len(snapshot.members) == 100 and snapshot.truncated
        # Join order: the first 100 are of the first batch (joins within a batch land in any order).
        assert {m.client for m in snapshot.members} <= {f"client-{n}" for n in range(500)}
        read = await b.presence("big:1")
        assert read.count == 10_001 and len(read.members) == 100
        assert await b.presence_count("big:1") == 10_001
        print(  # noqa: T201  (the figures, for -s)
            f"10,000 joins in {joined:.2f} s; one more join with its capped snapshot in {one_join * 1000:.1f} ms"
        )
