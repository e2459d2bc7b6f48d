"""What the PostgreSQL backend adds to the contract: publishing inside the caller's transaction, trimming,
the schema as a migration, its URL options. (The contract itself: tests/test_backends.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from rtbroadcast import Broadcaster, ConfigurationError, Event, Received
from rtbroadcast.backends import load_backend
from rtbroadcast.backends.postgres import PostgresBackend, schema_sql

from .support import MS, until

pytestmark = [pytest.mark.asyncio_only, pytest.mark.postgresql]

ROOT = Path(__file__).resolve().parent.parent


class Bid(Event):
    type: Literal["bid"] = "bid"
    n: int


@pytest.fixture
async def broadcaster(postgres_url: str, postgres_schema: str) -> AsyncIterator[Broadcaster]:
    async with Broadcaster(backend=PostgresBackend(postgres_url, schema=postgres_schema)) as broadcaster:
        yield broadcaster


@pytest.fixture
async def db(postgres_url: str, postgres_schema: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{postgres_schema}"')
        await conn.execute(f'CREATE TABLE "{postgres_schema}".bids (n int PRIMARY KEY)')
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def trimmable(
    postgres_url: str, postgres_schema: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., PostgresBackend]:
    """Make backends on the test's schema with these options, whose rows may be trimmed at once.

    Without the delivery grace a trim does not wait for rows a listener may still be reading.
    """
    monkeypatch.setattr("rtbroadcast.backends.postgres.DELIVERY_GRACE", 0.0)

    def make(**options: Any) -> PostgresBackend:
        return PostgresBackend(postgres_url, schema=postgres_schema, **options)

    return make


async def rows(pool: asyncpg.Pool, query: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return list(await conn.fetch(query))


async def test_an_event_published_in_a_committed_transaction_is_delivered_with_the_write(
    broadcaster: Broadcaster, db: asyncpg.Pool, postgres_schema: str
) -> None:
    async with broadcaster.subscribe("auction", model=Bid) as subscription:
        async with db.acquire() as conn, conn.transaction():
            await conn.execute(f'INSERT INTO "{postgres_schema}".bids VALUES (1)')
            seq = await broadcaster.publish("auction", Bid(n=1), transaction=conn)
            # Not before the commit: the position is still the old one.
            assert (await broadcaster.backend.position("auction")).seq == 0
        assert seq == 1
        item = await asyncio.wait_for(anext(subscription), 5_000 * MS)
        assert isinstance(item, Received) and (item.seq, item.event.n) == (1, 1)


async def test_a_rolled_back_transaction_leaves_no_event_and_wakes_no_one(
    broadcaster: Broadcaster, db: asyncpg.Pool, postgres_schema: str
) -> None:
    backend = broadcaster.backend
    async with broadcaster.subscribe("auction", model=Bid) as subscription:
        with contextlib.suppress(ZeroDivisionError):
            async with db.acquire() as conn, conn.transaction():
                await conn.execute(f'INSERT INTO "{postgres_schema}".bids VALUES (1)')
                await broadcaster.publish("auction", Bid(n=1), transaction=conn)
                1 / 0  # noqa: B018  # the write fails after the publish
        received = backend.stats()["received"]
        # The next publish takes seq 1: the rolled-back one used nothing up.
        assert await broadcaster.publish("auction", Bid(n=2)) == 1
        item = await asyncio.wait_for(anext(subscription), 5_000 * MS)
        assert isinstance(item, Received) and (item.seq, item.event.n) == (1, 2)
        assert backend.stats()["received"] == received + 1  # one notification: the committed publish
    history = await backend.history("auction", 0, limit=10)
    assert [json.loads(e.data)["n"] for e in history.envelopes] == [2]
    assert await rows(db, f'SELECT n FROM "{postgres_schema}".bids') == []


async def test_sqlalchemy_sessions_publish_in_their_transaction(
    broadcaster: Broadcaster, db: asyncpg.Pool, postgres_url: str, postgres_schema: str
) -> None:
    engine = create_async_engine(postgres_url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with broadcaster.subscribe("auction", model=Bid) as subscription:
            async with AsyncSession(engine) as session, session.begin():
                await session.execute(text(f'INSERT INTO "{postgres_schema}".bids VALUES (7)'))
                assert await broadcaster.publish("auction", Bid(n=7), transaction=session) == 1
            with contextlib.suppress(RuntimeError):
                async with AsyncSession(engine) as session, session.begin():
                    await broadcaster.publish("auction", Bid(n=8), transaction=session)
                    raise RuntimeError("rolled back")
            async with engine.begin() as connection:
                await broadcaster.publish("auction", Bid(n=9), transaction=connection)
            got = [await asyncio.wait_for(anext(subscription), 5_000 * MS) for _ in range(2)]
            assert [(i.seq, i.event.n) for i in got if isinstance(i, Received)] == [(1, 7), (2, 9)]
    finally:
        await engine.dispose()


async def test_transaction_is_refused_clearly_where_it_cannot_work(
    broadcaster: Broadcaster, db: asyncpg.Pool, tmp_path: Path
) -> None:
    async with Broadcaster("memory://") as memory:
        with pytest.raises(ConfigurationError, match="memory backend cannot publish inside a database"):
            await memory.publish("c", Bid(n=1), transaction=object())
    async with db.acquire() as conn:
        with pytest.raises(ConfigurationError, match="outside a transaction"):
            await broadcaster.publish("c", Bid(n=1), transaction=conn)
    with pytest.raises(ConfigurationError, match="takes an asyncpg connection"):
        await broadcaster.publish("c", Bid(n=1), transaction="BEGIN")
    sqlite = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        async with AsyncSession(sqlite) as session, session.begin():
            with pytest.raises(ConfigurationError, match="not on sqlite"):
                await broadcaster.publish("c", Bid(n=1), transaction=session)
    finally:
        await sqlite.dispose()
    assert (await broadcaster.backend.position("c")).seq == 0


async def test_a_transaction_waits_for_the_one_that_published_first_so_seq_order_is_commit_order(
    broadcaster: Broadcaster, db: asyncpg.Pool
) -> None:
    first_published = asyncio.Event()
    release_first = asyncio.Event()
    order: list[str] = []

    async def first() -> int:
        async with db.acquire() as conn, conn.transaction():
            seq = await broadcaster.publish("auction", Bid(n=1), transaction=conn)
            first_published.set()
            async with asyncio.timeout(10_000 * MS):
                await release_first.wait()
            order.append("first commits")
        return seq

    async def second() -> int:
        await first_published.wait()
        async with db.acquire() as conn, conn.transaction():
            seq = await broadcaster.publish("auction", Bid(n=2), transaction=conn)
            order.append("second published")
        return seq

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await first_published.wait()
    await asyncio.sleep(200 * MS)  # the second transaction is waiting for the channel's row
    assert order == []
    release_first.set()
    assert await asyncio.gather(*tasks) == [1, 2]
    assert order == ["first commits", "second published"]


async def test_an_idempotency_key_in_a_transaction_publishes_once(
    broadcaster: Broadcaster, db: asyncpg.Pool
) -> None:
    async with db.acquire() as conn, conn.transaction():
        first = await broadcaster.publish("c", Bid(n=1), idempotency_key="k", transaction=conn)
    async with db.acquire() as conn, conn.transaction():
        again = await broadcaster.publish("c", Bid(n=1), idempotency_key="k", transaction=conn)
    assert first == again == 1
    assert (await broadcaster.backend.position("c")).seq == 1


async def test_trimming_deletes_old_rows_and_never_waits_for_a_publisher(
    trimmable: Callable[..., PostgresBackend], postgres_schema: str, db: asyncpg.Pool
) -> None:
    backend = trimmable(history_size=10, trim_interval=3600)
    async with Broadcaster(backend=backend) as broadcaster:
        for n in range(50):
            await broadcaster.publish("a", Bid(n=n))
            await broadcaster.publish("b", Bid(n=n))
        # A transaction holds channel a's row (it published and has not committed yet).
        async with db.acquire() as conn, conn.transaction():
            await broadcaster.publish("a", Bid(n=50), transaction=conn)
            async with asyncio.timeout(2_000 * MS):
                deleted = await backend.trim()
        assert deleted == 80
        counts = await rows(
            db, f'SELECT channel, count(*), min(seq) FROM "{postgres_schema}".events GROUP BY 1 ORDER BY 1'
        )
        assert [tuple(r) for r in counts] == [("a", 11, 41), ("b", 10, 41)]
        # Reads keep to the size whatever the table holds still.
        assert not (await backend.history("a", 40, limit=100)).complete
        history = await backend.history("a", 41, limit=100)
        assert history.complete and [e.seq for e in history.envelopes] == list(range(42, 52))
        assert await backend.trim() == 1
        # Later passes look at recently published channels only, and at all of them now and then.
        await broadcaster.publish("b", Bid(n=51))
        assert await backend.trim() == 1


async def test_trimming_by_age(
    trimmable: Callable[..., PostgresBackend], postgres_schema: str, db: asyncpg.Pool
) -> None:
    backend = trimmable(history_ttl=0.3, trim_interval=3600)
    async with Broadcaster(backend=backend) as broadcaster:
        await broadcaster.publish("a", Bid(n=1), idempotency_key="old")
        await asyncio.sleep(0.4)
        await broadcaster.publish("a", Bid(n=2))
        assert await backend.trim() == 1
        assert [r["seq"] for r in await rows(db, f'SELECT seq FROM "{postgres_schema}".events')] == [2]


async def test_the_trimmer_runs_by_itself(
    trimmable: Callable[..., PostgresBackend], postgres_schema: str, db: asyncpg.Pool
) -> None:
    backend = trimmable(history_size=2, trim_interval=0.1)
    async with Broadcaster(backend=backend) as broadcaster:
        for n in range(10):
            await broadcaster.publish("a", Bid(n=n))

        await until(lambda: backend.stats()["trimmed"] == 8, 5_000 * MS)
        assert len(await rows(db, f'SELECT 1 FROM "{postgres_schema}".events')) == 2


async def test_the_migration_creates_what_the_backend_needs(
    postgres_url: str, postgres_schema: str, db: asyncpg.Pool
) -> None:
    async with db.acquire() as conn:
        await conn.execute(schema_sql(postgres_schema))
        await conn.execute(schema_sql(postgres_schema))  # idempotent
    backend = PostgresBackend(postgres_url, schema=postgres_schema, create_schema=False)
    async with Broadcaster(backend=backend) as broadcaster:
        assert await broadcaster.publish("c", Bid(n=1)) == 1


async def test_without_the_migration_and_create_schema_false_publishing_fails_clearly(
    postgres_url: str, postgres_schema: str
) -> None:
    backend = PostgresBackend(postgres_url, schema=postgres_schema, create_schema=False)
    async with Broadcaster(backend=backend) as broadcaster:
        with pytest.raises(Exception, match="PostgreSQL refused to publish"):
            await broadcaster.publish("c", Bid(n=1))


def test_the_howto_shows_the_migration_the_code_runs() -> None:
    page = (ROOT / "docs/howto/postgresql.md").read_text()
    block = page.split("<!-- migration -->\n```sql\n", 1)[1].split("```", 1)[0]
    assert block == schema_sql()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://h/db?schema=Bad-Name", "schema must be a lower-case SQL identifier"),
        ("postgresql://h/db?histroy_size=5", r"option 'histroy_size' \(did you mean 'history_size'\?\)"),
        ("postgresql://h/db?sslmod=require", r"option 'sslmod' \(did you mean 'sslmode'\?\)"),
        ("postgresql://h/db?history_size=-1", "history_size must be"),
        ("postgresql://h/db?timeout=nan", "timeout must be"),
        ("postgresql://h/db?schema=a&schema=b", "'schema' is given twice"),
        ("postgresql://u:s3cret@h/db?timeout=x", "invalid value 'x' for PostgreSQL URL option 'timeout'"),
    ],
)
def test_a_wrong_postgresql_url_is_refused_saying_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        load_backend(url)
    assert "s3cret" not in str(caught.value)


def test_postgresql_urls_load_the_backend_with_their_options() -> None:
    backend = load_backend("postgres://app@db:5432/app?schema=rtb&history_size=5&sslmode=prefer")
    assert isinstance(backend, PostgresBackend)
    assert backend.schema == "rtb"
    assert backend.stats()["server"] == "postgres://app@db:5432/app?sslmode=prefer"


async def test_the_howto_snippet_publishes_a_bid_with_its_write(
    postgres_url: str, postgres_schema: str, broadcaster: Broadcaster
) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from .test_docs_snippets import snippet

    module = snippet("postgres_publish")
    engine = create_async_engine(
        postgres_url.replace("postgresql://", "postgresql+asyncpg://"),
        connect_args={"server_settings": {"search_path": postgres_schema}},
    )
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("CREATE TABLE bids (auction_id text, amount int CHECK (amount > 0))")
            )
        sessions = async_sessionmaker(engine)
        async with broadcaster.subscribe("auction:a1") as subscription:
            assert await module.place_bid(sessions, broadcaster, "a1", 100) == 1
            with pytest.raises(Exception, match="check"):  # the write fails: no event
                await module.place_bid(sessions, broadcaster, "a1", -5)
            assert await module.place_bid(sessions, broadcaster, "a1", 120) == 2
            got = [await asyncio.wait_for(anext(subscription), 5_000 * MS) for _ in range(2)]
            assert [
                (i.seq, json.loads(i.event.model_dump_json())["amount"])
                for i in got
                if isinstance(i, Received)
            ] == [(1, 100), (2, 120)]
    finally:
        await engine.dispose()


async def test_tables_emptied_under_a_running_stream_start_a_new_epoch_and_subscribers_resync(
    broadcaster: Broadcaster, db: asyncpg.Pool, postgres_schema: str
) -> None:
    from rtbroadcast import ResyncRequired

    async with broadcaster.subscribe("c", model=Bid) as subscription:
        for n in (1, 2):
            await broadcaster.publish("c", Bid(n=n))
        got = [await asyncio.wait_for(anext(subscription), 5_000 * MS) for _ in range(2)]
        assert [i.seq for i in got if isinstance(i, Received)] == [1, 2]
        old = (await broadcaster.backend.position("c")).epoch
        async with db.acquire() as conn:  # an operator empties the tables (or restores an old backup)
            await conn.execute(f'TRUNCATE "{postgres_schema}".channels, "{postgres_schema}".events')
        assert await broadcaster.publish("c", Bid(n=3)) == 1
        new = (await broadcaster.backend.position("c")).epoch
        assert new != old
        item = await asyncio.wait_for(anext(subscription), 5_000 * MS)
        assert item == ResyncRequired("epoch_changed", new, 1)
    history = await broadcaster.backend.history("c", 0, limit=10)
    assert [e.seq for e in history.envelopes] == [1] and history.position.epoch == new


# -- headers, and the upgrade from 0.1 (whose DDL tests/data/postgres_schema_0_1.sql keeps) ---------------

OLD_DDL = (ROOT / "tests/data/postgres_schema_0_1.sql").read_text()
# The statements 0.1 runs, verbatim but for the schema (its _Statements: publish, tail, history).
OLD_PUBLISH = 'SELECT * FROM "{s}".publish($1, $2, $3, $4, $5, $6)'
OLD_TAIL = (
    'SELECT seq, data FROM "{s}".events WHERE channel = $1 AND epoch = $2 AND seq > $3 AND seq <= $4'
    " ORDER BY seq LIMIT $5"
)
OLD_HISTORY = """
    SELECT c.epoch, c.seq, e.seq, e.data FROM "{s}".channels c
    LEFT JOIN LATERAL (
        SELECT e.seq, e.data FROM "{s}".events e
        WHERE e.channel = c.channel AND e.epoch = c.epoch AND e.seq > $2 AND e.seq <= c.seq
          AND e.seq > c.seq - $4
          AND ($5::float8 IS NULL OR e.created_at >= clock_timestamp() - make_interval(secs => $5))
        ORDER BY e.seq LIMIT $3
    ) e ON true
    WHERE c.channel = $1 ORDER BY e.seq"""
TRACED = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


async def old_publish(conn: asyncpg.Connection, backend: PostgresBackend, channel: str, n: int) -> int:
    """Publish as a process of 0.1 does: the six-argument function."""
    row = await conn.fetchrow(
        OLD_PUBLISH.format(s=backend.schema),
        channel, "0123456789abcdef", f'{{"type":"bid","n":{n},"seq":', backend.notify_channel(channel),
        None, 3600.0,
    )  # fmt: skip
    assert row is not None
    return int(row["seq"])


async def test_an_upgrade_from_0_1_keeps_old_and_new_processes_publishing_and_reading_each_other(
    postgres_url: str, postgres_schema: str
) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(OLD_DDL.replace("__SCHEMA__", postgres_schema))
        backend = PostgresBackend(postgres_url, schema=postgres_schema)
        assert await old_publish(conn, backend, "c", 1) == 1  # before the upgrade
        async with Broadcaster(backend=backend) as broadcaster:  # connecting migrates
            columns = await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = $1"
                " AND table_name = 'events' ORDER BY ordinal_position",
                postgres_schema,
            )
            assert [c["column_name"] for c in columns][-1] == "headers"
            async with broadcaster.subscribe("c", model=Bid) as subscription:
                # An old process publishes: this one delivers it, without headers.
                assert await old_publish(conn, backend, "c", 2) == 2
                got = await asyncio.wait_for(anext(subscription), 5_000 * MS)
                assert isinstance(got, Received) and got.event.n == 2 and got.seq == 2
            new = await backend.publish("c", '{"type":"bid","n":3}', headers=TRACED)
            assert new.seq == 3
            # An old process reads the new row with its own statements: the text clients get, intact.
            epoch = new.epoch
            tail = await conn.fetch(OLD_TAIL.format(s=postgres_schema), "c", epoch, 0, 3, 10)
            assert [(r["seq"], r["data"]) for r in tail][-1] == (3, '{"type":"bid","n":3,"seq":3}')
            old_history = await conn.fetch(OLD_HISTORY.format(s=postgres_schema), "c", 0, 10, 1000, None)
            assert [r[2] for r in old_history] == [1, 2, 3]
            history = await backend.history("c", 0, limit=10)
            assert [e.headers for e in history.envelopes] == [None, None, TRACED]
            # An old process that (re)connects re-runs its own DDL, after the upgrade: both versions still
            # publish, and the migration of this one then runs again, as a no-op.
            await conn.execute(OLD_DDL.replace("__SCHEMA__", postgres_schema))
            assert await old_publish(conn, backend, "c", 4) == 4
            assert (await backend.publish("c", '{"type":"bid","n":5}', headers=TRACED)).seq == 5
            await conn.execute(schema_sql(postgres_schema))
            assert await old_publish(conn, backend, "c", 6) == 6
            history = await backend.history("c", 3, limit=10)
            assert [(e.seq, e.headers) for e in history.envelopes] == [(4, None), (5, TRACED), (6, None)]
    finally:
        await conn.close()


async def test_a_traced_publish_notifies_the_same_payload_and_stores_its_headers_as_json(
    broadcaster: Broadcaster, postgres_url: str, postgres_schema: str
) -> None:
    backend = broadcaster.backend
    assert isinstance(backend, PostgresBackend)
    conn = await asyncpg.connect(postgres_url)
    notified: asyncio.Queue[str] = asyncio.Queue()
    try:
        await conn.add_listener(backend.notify_channel("c"), lambda *args: notified.put_nowait(args[3]))
        plain = await backend.publish("c", '{"type":"bid","n":1}')
        traced = await backend.publish("c", '{"type":"bid","n":2}', headers=TRACED)
        payloads = [await asyncio.wait_for(notified.get(), 5) for _ in range(2)]
        assert payloads == [f"1 {plain.epoch} c", f"2 {traced.epoch} c"]
        stored = await conn.fetch(f'SELECT seq, headers FROM "{postgres_schema}".events ORDER BY seq')
        assert [(r["seq"], r["headers"]) for r in stored] == [
            (1, None),
            (2, json.dumps(TRACED, separators=(",", ":"))),
        ]
        # Headers that are not what this version writes (a hand edit, a future version) are dropped with
        # a warning; the event is still delivered.
        await conn.execute(f"UPDATE \"{postgres_schema}\".events SET headers = '[1]' WHERE seq = 2")
        history = await backend.history("c", 0, limit=10)
        assert [e.headers for e in history.envelopes] == [None, None]
    finally:
        await conn.close()


async def test_a_publish_in_a_transaction_carries_headers(
    broadcaster: Broadcaster, db: asyncpg.Pool, postgres_url: str
) -> None:
    backend = broadcaster.backend
    assert isinstance(backend, PostgresBackend)
    async with db.acquire() as conn, conn.transaction():
        envelope = await backend.publish_in_transaction(conn, "c", '{"type":"bid","n":1}', headers=TRACED)
    assert envelope.headers == TRACED
    engine = create_async_engine(postgres_url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with AsyncSession(engine) as session, session.begin():
            via_sqlalchemy = await backend.publish_in_transaction(
                session, "c", '{"type":"bid","n":2}', headers=TRACED
            )
    finally:
        await engine.dispose()
    assert via_sqlalchemy.seq == 2
    history = await backend.history("c", 0, limit=10)
    assert [e.headers for e in history.envelopes] == [TRACED, TRACED]


def test_processes_forked_after_import_draw_different_jitter() -> None:
    # A server that imports the app and then forks its workers must not make them reconnect in step.
    from rtbroadcast.backends import postgres

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first draw, to the parent
        os.write(write, repr(postgres._JITTER.random()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = float(os.read(read, 64))
    os.close(read)
    assert child != postgres._JITTER.random()
