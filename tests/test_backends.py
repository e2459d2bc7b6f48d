"""The backend contract, run against every backend: memory, Redis, Redis Cluster and PostgreSQL.

A new backend is one module plus one entry in ``_BUILDERS`` (and one line in ``BACKENDS``). A "peer" is a
second backend instance on the same store, standing in for another process: for Redis a second
:class:`RedisBackend` on the same server and prefix; for memory, where no other process can share the
store, the backend itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rtbroadcast import Backend, BackendListener, ConfigurationError, Envelope, StateError
from rtbroadcast._control import CONTROL_CHANNEL
from rtbroadcast.backends import PUBLISHED_AT, load_backend
from rtbroadcast.backends.memory import MemoryBackend
from rtbroadcast.backends.postgres import PostgresBackend
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.backends.redis_cluster import RedisClusterBackend
from rtbroadcast.events import with_seq

from .support import MS, until

pytestmark = pytest.mark.asyncio_only

BACKENDS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", marks=pytest.mark.redis),
    pytest.param("postgresql", marks=pytest.mark.postgresql),
]


class Recorder(BackendListener):
    """A listener that keeps what it is told."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.interruptions: list[tuple[list[str], str]] = []
        self._changed = asyncio.Event()

    def on_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        self._changed.set()

    def on_interruption(self, channels: Collection[str], reason: str) -> None:
        self.interruptions.append((sorted(channels), reason))
        self._changed.set()

    def seqs(self, channel: str) -> list[int]:
        return [e.seq for e in self.envelopes if e.channel == channel]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 5_000 * MS) -> None:
        """Wait until ``condition()`` holds, checking it again whenever the backend tells this listener."""
        await until(condition, timeout, changed=self._changed)


def _memory(request: pytest.FixtureRequest, options: dict[str, Any]) -> Backend:
    return MemoryBackend(**options)


def _redis(request: pytest.FixtureRequest, options: dict[str, Any]) -> Backend:
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    return RedisBackend(url, key_prefix=prefix, **options)


def _postgres(request: pytest.FixtureRequest, options: dict[str, Any]) -> Backend:
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("postgres_schema")
    return PostgresBackend(url, schema=schema, **options)


def _redis_cluster(request: pytest.FixtureRequest, options: dict[str, Any]) -> Backend:
    cluster = request.getfixturevalue("redis_cluster")
    prefix = request.getfixturevalue("redis_cluster_prefix")
    seeds = [("127.0.0.1", node.port) for node in cluster.nodes]
    return RedisClusterBackend(seeds, key_prefix=prefix, **options)


#: kind -> (build a backend, whether two instances share one store)
_BUILDERS: dict[str, tuple[Callable[[pytest.FixtureRequest, dict[str, Any]], Backend], bool]] = {
    "memory": (_memory, False),
    "redis": (_redis, True),
    "postgresql": (_postgres, True),
    "redis-cluster": (_redis_cluster, True),
}


class Harness:
    """Builds connected backends of one kind and disconnects them after the test."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, stack: contextlib.AsyncExitStack) -> None:
        self.kind = kind
        self._build, self.shares_store = _BUILDERS[kind]
        self._request = request
        self._stack = stack
        self._options: dict[int, dict[str, Any]] = {}

    def build(self, **options: Any) -> Backend:
        """Return an unconnected backend."""
        backend = self._build(self._request, options)
        self._options[id(backend)] = options
        return backend

    async def open(self, **options: Any) -> tuple[Backend, Recorder]:
        """Return a connected backend and the listener it reports to."""
        backend = self.build(**options)
        recorder = Recorder()
        await backend.connect(recorder)
        self._stack.push_async_callback(backend.disconnect)
        return backend, recorder

    async def peer(self, backend: Backend) -> tuple[Backend, Recorder | None]:
        """Return another connected instance on ``backend``'s store (memory: ``backend`` itself)."""
        if not self.shares_store:
            return backend, None
        return await self.open(**self._options[id(backend)])


@pytest.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with contextlib.AsyncExitStack() as stack:
        yield Harness(request.param, request, stack)


def payload(n: int, kind: str = "item") -> str:
    return json.dumps({"type": kind, "n": n}, separators=(",", ":"))


async def test_publish_before_connect_fails(harness: Harness) -> None:
    backend = harness.build()
    with pytest.raises(StateError):
        await backend.publish("c", payload(1))


async def test_seqs_start_at_one_and_are_contiguous(harness: Harness) -> None:
    backend, _ = await harness.open()
    envelopes = [await backend.publish("c", payload(n)) for n in range(10)]
    assert [e.seq for e in envelopes] == list(range(1, 11))
    assert {e.epoch for e in envelopes} == {(await backend.position("c")).epoch}
    assert all(e.channel == "c" for e in envelopes)
    assert [e.data for e in envelopes] == [with_seq(payload(n), n + 1) for n in range(10)]
    assert json.loads(envelopes[3].data) == {"type": "item", "n": 3, "seq": 4}


async def test_empty_object_and_unicode_payloads_keep_their_text(harness: Harness) -> None:
    backend, _ = await harness.open()
    assert (await backend.publish("c", "{}")).data == '{"seq":1}'
    text = '{"type":"note","text":"crème brûlée 🍮 \\"quoted\\" {braces}"}'
    envelope = await backend.publish("c", text)
    assert envelope.data == with_seq(text, 2)
    history = await backend.history("c", 0, limit=10)
    assert [e.data for e in history.envelopes] == ['{"seq":1}', with_seq(text, 2)]


async def test_concurrent_publishes_get_unique_contiguous_seqs(harness: Harness) -> None:
    backend, _ = await harness.open()
    peer, _ = await harness.peer(backend)
    publishers = [backend, peer] * 50
    envelopes = await asyncio.gather(*(b.publish("c", payload(n)) for n, b in enumerate(publishers)))
    assert sorted(e.seq for e in envelopes) == list(range(1, 101))
    assert len({e.epoch for e in envelopes}) == 1
    assert (await peer.position("c")).seq == 100


async def test_epoch_is_fixed_from_the_first_read_on(harness: Harness) -> None:
    backend, _ = await harness.open()
    before = await backend.position("fresh")
    assert before.seq == 0
    # A client that connected before the first publish must not see the epoch change at that publish.
    first = await backend.publish("fresh", payload(1))
    assert first.epoch == before.epoch
    peer, _ = await harness.peer(backend)
    assert await peer.position("fresh") == (await backend.position("fresh"))
    assert (await peer.position("fresh")).seq == 1
    assert (await backend.history("fresh", 0, limit=10)).position.epoch == before.epoch


async def test_history_on_a_new_channel_fixes_its_epoch_too(harness: Harness) -> None:
    backend, _ = await harness.open()
    history = await backend.history("new", 0, limit=10)
    assert history.complete and history.envelopes == () and history.position.seq == 0
    assert (await backend.publish("new", payload(1))).epoch == history.position.epoch


async def test_channels_are_independent_whatever_their_names(harness: Harness) -> None:
    backend, _ = await harness.open()
    names = ["a", "a}b", "{a}", "a{b", "a%7Bb%7D", "ünï cödé", "room:1", "room:1:x", "a b"]
    for round_ in range(3):
        for name in names:
            assert (await backend.publish(name, payload(round_))).seq == round_ + 1
    # Whether channels share an epoch is the backend's business (memory: shared until idle channels are dropped; Redis: one per
    # channel); their seqs and histories are always their own.
    for name in names:
        history = await backend.history(name, 0, limit=10)
        assert history.complete
        assert [e.seq for e in history.envelopes] == [1, 2, 3]
        assert all(e.channel == name for e in history.envelopes)


async def test_the_broadcasters_reserved_channel_is_carried_like_any_other(harness: Harness) -> None:
    # Server-side subscription commands travel on a channel whose name holds a control character (so no
    # client can name it): a backend must publish, deliver and keep history for it like any other.
    backend, recorder = await harness.open()
    peer, _ = await harness.peer(backend)
    await backend.subscribe(CONTROL_CHANNEL)
    sent = [await peer.publish(CONTROL_CHANNEL, payload(n, "rtb_control")) for n in range(3)]
    await recorder.wait_for(lambda: len(recorder.seqs(CONTROL_CHANNEL)) == 3)
    assert [e for e in recorder.envelopes if e.channel == CONTROL_CHANNEL] == sent
    history = await backend.history(CONTROL_CHANNEL, 1, limit=10)
    assert history.complete and [e.seq for e in history.envelopes] == [2, 3]
    # ... and apart from every channel a client can name.
    assert (await backend.position(CONTROL_CHANNEL.strip("\x1f"))).seq == 0


async def test_history_returns_what_was_missed(harness: Harness) -> None:
    backend, _ = await harness.open()
    for n in range(10):
        await backend.publish("c", payload(n))
    everything = await backend.history("c", 0, limit=100)
    assert everything.complete
    assert [e.seq for e in everything.envelopes] == list(range(1, 11))
    assert everything.position.seq == 10
    tail = await backend.history("c", 7, limit=100)
    assert tail.complete and [e.seq for e in tail.envelopes] == [8, 9, 10]
    assert [e.data for e in tail.envelopes] == [with_seq(payload(n), n + 1) for n in (7, 8, 9)]
    up_to_date = await backend.history("c", 10, limit=100)
    assert up_to_date.complete and up_to_date.envelopes == ()
    ahead = await backend.history("c", 50, limit=100)
    assert ahead.envelopes == () and ahead.position.seq == 10


async def test_history_longer_than_the_limit_is_incomplete(harness: Harness) -> None:
    backend, _ = await harness.open()
    for n in range(10):
        await backend.publish("c", payload(n))
    history = await backend.history("c", 0, limit=4)
    assert not history.complete
    assert len(history.envelopes) <= 4
    exact = await backend.history("c", 6, limit=4)
    assert exact.complete and [e.seq for e in exact.envelopes] == [7, 8, 9, 10]
    none = await backend.history("c", 9, limit=0)
    assert not none.complete


async def test_history_trimmed_by_size_is_incomplete(harness: Harness) -> None:
    backend, _ = await harness.open(history_size=5)
    # Redis trims streams approximately (whole nodes of ~100 entries), so publish well past the size.
    for n in range(400):
        await backend.publish("c", payload(n))
    assert not (await backend.history("c", 0, limit=1000)).complete
    recent = await backend.history("c", 395, limit=1000)
    assert recent.complete and [e.seq for e in recent.envelopes] == [396, 397, 398, 399, 400]


async def test_no_history_when_its_size_is_zero(harness: Harness) -> None:
    backend, _ = await harness.open(history_size=0)
    await backend.publish("c", payload(1))
    await backend.publish("c", payload(2))
    assert not (await backend.history("c", 1, limit=10)).complete
    assert (await backend.history("c", 2, limit=10)).complete
    assert (await backend.position("c")).seq == 2


async def test_history_forgets_events_older_than_its_ttl(harness: Harness) -> None:
    backend, _ = await harness.open(history_ttl=0.3)
    await backend.publish("c", payload(1))
    await backend.publish("c", payload(2))
    await asyncio.sleep(0.45)
    await backend.publish("c", payload(3))
    assert not (await backend.history("c", 0, limit=10)).complete
    fresh = await backend.history("c", 2, limit=10)
    assert fresh.complete and [e.seq for e in fresh.envelopes] == [3]
    assert (await backend.position("c")).seq == 3


async def test_an_idempotency_key_publishes_once(harness: Harness) -> None:
    backend, recorder = await harness.open()
    peer, _ = await harness.peer(backend)
    await backend.subscribe("c")
    first = await backend.publish("c", payload(1), idempotency_key="outbox-1")
    again = await peer.publish("c", payload(1), idempotency_key="outbox-1")
    assert again == first
    other = await backend.publish("c", payload(2), idempotency_key="outbox-2")
    assert other.seq == 2
    elsewhere = await backend.publish("d", payload(1), idempotency_key="outbox-1")
    assert elsewhere.seq == 1
    assert (await backend.position("c")).seq == 2
    # A later event on the same channel arrives after anything the duplicate could have sent.
    await backend.publish("c", payload(3))
    await recorder.wait_for(lambda: len(recorder.seqs("c")) == 3)
    assert recorder.seqs("c") == [1, 2, 3]


async def test_subscribers_get_every_envelope_in_order(harness: Harness) -> None:
    backend, recorder = await harness.open()
    peer, _ = await harness.peer(backend)
    await backend.subscribe("c")
    sent = [await peer.publish("c", payload(n)) for n in range(20)]
    await backend.publish("other", payload(0))
    await recorder.wait_for(lambda: len(recorder.seqs("c")) == 20)
    received = [e for e in recorder.envelopes if e.channel == "c"]
    assert received == sent
    assert recorder.seqs("other") == []


#: Headers as a traced, stamped publish sends them, plus what a wire format could trip on.
HEADERS = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7",  # a space inside: allowed by W3C
    PUBLISHED_AT: "1764600000.123456",
    "odd": 'ünï \n "quoted" {braces} \u2028',
}


async def test_headers_travel_with_the_envelope_live_and_into_history(harness: Harness) -> None:
    backend, recorder = await harness.open()
    assert backend.supports_headers
    peer, peer_recorder = await harness.peer(backend)
    listener = peer_recorder or recorder
    await peer.subscribe("c")
    sent = await backend.publish("c", payload(1), headers=HEADERS)
    plain = await backend.publish("c", payload(2))
    assert sent.headers == HEADERS and plain.headers is None
    await listener.wait_for(lambda: len(listener.seqs("c")) == 2)
    live = [e for e in listener.envelopes if e.channel == "c"]
    assert [e.headers for e in live] == [HEADERS, None]
    assert [e.data for e in live] == [with_seq(payload(1), 1), with_seq(payload(2), 2)]
    assert live[0].published_at == 1764600000.123456
    history = await peer.history("c", 0, limit=10)
    assert [e.headers for e in history.envelopes] == [HEADERS, None]
    assert [e.data for e in history.envelopes] == [e.data for e in live]


async def test_unsubscribe_stops_delivery(harness: Harness) -> None:
    backend, recorder = await harness.open()
    peer, _ = await harness.peer(backend)
    await backend.subscribe("c")
    await peer.publish("c", payload(1))
    await recorder.wait_for(lambda: recorder.seqs("c") == [1])
    await backend.unsubscribe("c")
    await peer.publish("c", payload(2))
    await backend.subscribe("d")
    await peer.publish("d", payload(1))
    # "d" arrives after anything still in flight on "c", so waiting for it is enough.
    await recorder.wait_for(lambda: recorder.seqs("d") == [1])
    assert recorder.seqs("c") == [1]
    await backend.unsubscribe("never-subscribed")
    await backend.subscribe("c")
    await peer.publish("c", payload(3))
    await recorder.wait_for(lambda: recorder.seqs("c") == [1, 3])


async def test_subscribe_then_position_misses_nothing(harness: Harness) -> None:
    """What the broadcaster relies on: after subscribe() returns, a position read covers the rest."""
    backend, recorder = await harness.open()
    peer, _ = await harness.peer(backend)
    stop = asyncio.Event()
    published: list[int] = []

    async def publish_continuously() -> None:
        n = 0
        while not stop.is_set():
            published.append((await peer.publish("busy", payload(n))).seq)
            n += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(publish_continuously())
    try:
        await until(lambda: len(published) >= 5)  # publishing is under way
        await backend.subscribe("busy")
        start = (await backend.position("busy")).seq
        await until(lambda: len(published) >= start + 20)  # and goes on after the position read
    finally:
        stop.set()
        await task
    last = published[-1]
    await recorder.wait_for(lambda: bool(recorder.seqs("busy")) and recorder.seqs("busy")[-1] == last)
    received = [s for s in recorder.seqs("busy") if s > start]
    assert received == list(range(start + 1, last + 1))


async def test_disconnect_is_idempotent_and_stats_are_json(harness: Harness) -> None:
    backend, _ = await harness.open()
    await backend.subscribe("c")
    assert backend.available
    stats = backend.stats()
    assert stats["backend"] == backend.name
    json.dumps(dict(stats))
    await backend.disconnect()
    await backend.disconnect()
    json.dumps(dict(backend.stats()))
    with pytest.raises(StateError):
        await backend.publish("c", payload(1))


# -- backend URLs: every mistake is refused when the backend is created ------------------------------------

#: Each backend URL with the options its query takes (for Redis: rtbroadcast's and redis-py's; for
#: PostgreSQL: rtbroadcast's and some of the libpq options asyncpg reads).
URL_OPTIONS: dict[str, tuple[str, ...]] = {
    "memory://": ("history_size", "history_ttl"),
    "redis://127.0.0.1:1/0": (
        "key_prefix",
        "history_size",
        "history_ttl",
        "meta_ttl",
        "unpublished_ttl",
        "idempotency_ttl",
        "timeout",
        "ping_interval",
        "max_reconnect_attempts",
        "presence_heartbeat",
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "max_connections",
        "health_check_interval",
        "client_name",
        "protocol",
    ),
    "postgresql://127.0.0.1:1/db": (
        "schema",
        "create_schema",
        "history_size",
        "history_ttl",
        "idempotency_ttl",
        "unpublished_ttl",
        "timeout",
        "ping_interval",
        "trim_interval",
        "max_reconnect_attempts",
        "max_connections",
        "sslmode",
        "sslrootcert",
        "application_name",
        "target_session_attrs",
    ),
}
_KNOWN = {name for names in URL_OPTIONS.values() for name in names}


@st.composite
def misspelt_options(draw: st.DrawFn) -> tuple[str, str, str]:
    """A backend URL and one of its options with one typing mistake: a letter dropped, doubled, swapped..."""
    url = draw(st.sampled_from(sorted(URL_OPTIONS)))
    name = draw(st.sampled_from(URL_OPTIONS[url]))
    at = draw(st.integers(0, len(name) - 1))
    letter = draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"))
    mistake = draw(st.sampled_from(["drop", "double", "swap", "replace", "insert"]))
    misspelt = {
        "drop": name[:at] + name[at + 1 :],
        "double": name[: at + 1] + name[at:],
        "swap": name[:at] + name[at + 1 : at + 2] + name[at : at + 1] + name[at + 2 :],
        "replace": name[:at] + letter + name[at + 1 :],
        "insert": name[:at] + letter + name[at:],
    }[mistake]
    assume(misspelt and misspelt not in _KNOWN)
    return url, name, misspelt


@settings(max_examples=300)
@given(misspelt_options(), st.sampled_from(["1", "x", ""]))
def test_a_misspelt_url_option_is_refused_naming_it(option: tuple[str, str, str], value: str) -> None:
    url, name, misspelt = option
    with pytest.raises(ConfigurationError) as caught:
        load_backend(f"{url}?{misspelt}={value}")
    message = str(caught.value)
    assert f"option {misspelt!r} (did you mean {name!r}?)" in message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "reddis://127.0.0.1/0",
            r"unknown backend URL 'reddis://127.0.0.1/0' \(scheme 'reddis' \(did you mean 'redis'",
        ),
        (
            "127.0.0.1:6379",
            r"\(no scheme\); expected one of memory://, postgres://, postgresql://, redis://, redis\+cluster://, "
            r"rediss://, rediss\+cluster://, unix://",
        ),
        ("kafka://user:s3cret@host", r"'kafka://user:\*\*\*@host'"),
        ("memory://?history_size=10&history_size=20", "'history_size' is given twice"),
        ("memory://?history_size=many", "invalid value 'many' for memory:// option 'history_size'"),
        ("memory://?history_ttl=nan", "history_ttl must be a finite number"),
        ("memory://localhost", "memory:// takes no host"),
    ],
)
def test_a_wrong_backend_url_is_refused_saying_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_backend(url)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"history_size": 1.5}, "history_size"),
        ({"history_size": "10"}, "history_size"),
        ({"history_ttl": math.nan}, "history_ttl"),
        ({"history_ttl": "60"}, "history_ttl"),
        ({"idempotency_keys": 0}, "idempotency_keys"),
    ],
)
def test_nonsense_memory_backend_options_are_refused(options: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{option} must be"):
        MemoryBackend(**options)


def test_a_redis_url_without_the_redis_extra_says_what_to_install() -> None:
    # A real interpreter in which redis-py cannot be imported, as after `pip install rtbroadcast`.
    script = (
        "import sys; sys.modules['redis'] = None\n"
        "from rtbroadcast import ConfigurationError, load_backend\n"
        "try:\n"
        "    load_backend('redis://127.0.0.1:6379/0')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "redis:// backend" in result.stdout
    assert "pip install 'rtbroadcast[redis]'" in result.stdout
