"""The transactional outbox: events exist exactly when their write committed, and go out once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import warnings
from datetime import timedelta
from typing import Any

import pytest
from examples.restaurant_app import Settings
from examples.restaurant_app.db import RestaurantRow, create_engine, create_schema, session_factory
from examples.restaurant_app.events import GuestCreated
from examples.restaurant_app.outbox import OutboxRow, TransactionalOutbox
from examples.restaurant_app.schemas import GuestCreate
from examples.restaurant_app.service import RestaurantService, channel_for
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from rtbroadcast import Broadcaster, Received, utc_now
from tests.example.conftest import TEST_SECRET, StartService
from tests.support import MS, connect, recv_json, until

pytestmark = pytest.mark.asyncio_only


def guest_event(n: int) -> GuestCreated:
    return GuestCreated(
        restaurant_id="r1",
        guest_id=f"g{n}",
        data={"id": f"g{n}", "guestName": f"Guest {n}", "partySize": 2, "status": "waiting"},
    )


async def stage(outbox: TransactionalOutbox, engine: AsyncEngine, events: list[Any]) -> None:
    async with session_factory(engine)() as session:
        await outbox.stage(session, "r1", events)
        await session.commit()


async def test_rows_are_published_in_order_exactly_once(engine: AsyncEngine) -> None:
    await create_schema(engine)
    async with Broadcaster() as broadcaster:
        outbox = TransactionalOutbox(engine, broadcaster, channel_for=channel_for)
        async with broadcaster.subscribe(channel_for("r1"), model=GuestCreated) as sub:
            await stage(outbox, engine, [guest_event(n) for n in range(1, 6)])
            # A relay that crashed after publishing row 1 but before recording it:
            async with engine.connect() as connection:
                first_id = (await connection.execute(select(func.min(OutboxRow.id)))).scalar_one()
                payload = (
                    await connection.execute(select(OutboxRow.payload).where(OutboxRow.id == first_id))
                ).scalar_one()
            await broadcaster.publish_json(channel_for("r1"), payload, idempotency_key=f"outbox:{first_id}")
            # Two relays at once (a request and the background task, or two processes).
            sent = await asyncio.gather(outbox.relay_once(), outbox.relay_once())
            assert sum(sent) == 5
            assert await outbox.pending() == 0
            got = [await asyncio.wait_for(anext(sub), 2_000 * MS) for _ in range(5)]
        assert [(g.seq, g.event.guest_id) for g in got if isinstance(g, Received)] == [
            (n, f"g{n}") for n in range(1, 6)
        ]
        async with engine.connect() as connection:
            seqs = (
                await connection.execute(select(OutboxRow.published_seq).order_by(OutboxRow.id))
            ).scalars()
            assert list(seqs) == [1, 2, 3, 4, 5]
        assert (await broadcaster.backend.position(channel_for("r1"))).seq == 5


async def test_rolled_back_writes_leave_no_event(engine: AsyncEngine) -> None:
    await create_schema(engine)
    async with Broadcaster() as broadcaster:
        outbox = TransactionalOutbox(engine, broadcaster, channel_for=channel_for)
        async with session_factory(engine)() as session:
            await outbox.stage(session, "r1", [guest_event(1)])
            await session.rollback()
        assert await outbox.pending() == 0
        assert await outbox.relay_once() == 0
        assert (await broadcaster.backend.position(channel_for("r1"))).seq == 0


async def test_relays_go_on_with_other_channels_when_one_fails(engine: AsyncEngine) -> None:
    await create_schema(engine)
    async with Broadcaster() as broadcaster:
        outbox = TransactionalOutbox(engine, broadcaster, channel_for=channel_for)
        async with session_factory(engine)() as session:
            # A row the broadcaster refuses (not an event: no "type"), then a good one on another channel.
            session.add(
                OutboxRow(
                    restaurant_id="bad",
                    channel=channel_for("bad"),
                    event_type="x",
                    payload="[]",
                    created_at=utc_now(),
                )
            )
            await session.commit()
        await stage(outbox, engine, [guest_event(1)])
        assert await outbox.relay_once() == 1
        assert (await broadcaster.backend.position(channel_for("r1"))).seq == 1
        assert await outbox.pending() == 1


async def test_a_write_stalled_in_its_transaction_holds_up_the_restaurant_for_half_a_second(
    engine: AsyncEngine,
) -> None:
    """PostgreSQL ends a session idle in its transaction after 0.5 s, freeing the restaurant's row lock."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has a single process, and no session timeouts")
    await create_schema(engine)
    async with Broadcaster() as broadcaster:
        outbox = TransactionalOutbox(engine, broadcaster, channel_for=channel_for)
        service = RestaurantService(engine, broadcaster, dispatcher=outbox)
        await service.create_guest("r1", GuestCreate(guestName="First", partySize=2))
        async with broadcaster.subscribe(channel_for("r1"), model=GuestCreated) as sub:
            async with session_factory(engine)() as stalled:
                # What a process frozen inside a write holds: the restaurant's row lock, and nothing happens.
                await stalled.execute(
                    update(RestaurantRow)
                    .where(RestaurantRow.id == "r1")
                    .values(version=RestaurantRow.version + 1)
                )
                loop = asyncio.get_running_loop()
                started = loop.time()
                async with asyncio.timeout(5):
                    await service.create_guest("r1", GuestCreate(guestName="Second", partySize=2))
                waited = loop.time() - started
                assert 0.3 < waited < 1.0
                with pytest.raises(DBAPIError):  # its session was ended: the stalled write is rolled back
                    await stalled.execute(select(func.count()).select_from(RestaurantRow))
            got = await asyncio.wait_for(anext(sub), 2)
            assert isinstance(got, Received) and got.event.data["guestName"] == "Second"
        async with engine.connect() as connection:
            version = (await connection.execute(select(RestaurantRow.version))).scalar_one()
            assert version == 2  # the two writes that committed


async def test_postgresql_sessions_get_the_timeouts_and_the_url_s_settings(engine: AsyncEngine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL session settings")
    async with engine.connect() as connection:
        assert (
            await connection.execute(text("SHOW idle_in_transaction_session_timeout"))
        ).scalar_one() == "500ms"
        assert (await connection.execute(text("SHOW lock_timeout"))).scalar_one() == "2s"
    url = engine.url.set(query={"application_name": "outbox-test", "lock_timeout": "750"})
    configured = create_engine(url.render_as_string(hide_password=False))
    try:
        async with configured.connect() as connection:
            assert (await connection.execute(text("SHOW application_name"))).scalar_one() == "outbox-test"
            assert (await connection.execute(text("SHOW lock_timeout"))).scalar_one() == "750ms"
    finally:
        await configured.dispose()


class StallingBroadcaster(Broadcaster):
    """A real broadcaster whose publishes wait at ``gate`` while it is closed: a relay frozen mid-batch."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = asyncio.Event()
        self.stalled = asyncio.Event()
        self.calls = 0

    async def publish_json(self, channel: str, payload: str, *, idempotency_key: str | None = None) -> int:
        self.calls += 1
        self.stalled.set()
        await self.gate.wait()
        return await super().publish_json(channel, payload, idempotency_key=idempotency_key)


@pytest.mark.redis
@pytest.mark.parametrize("stall", [0.1, 1.0], ids=["within-the-lease", "past-the-lease"])
async def test_a_relay_stalled_mid_batch_holds_up_no_other_relay_and_sends_nothing_twice(
    engine: AsyncEngine, redis_url: str, redis_prefix: str, stall: float
) -> None:
    """Two processes' relays on one Redis; the first stops after reading its batch, the second goes on."""
    await create_schema(engine)
    separator = "&" if "?" in redis_url else "?"
    url = f"{redis_url}{separator}key_prefix={redis_prefix}"
    async with StallingBroadcaster(url) as frozen, Broadcaster(url) as other:
        stalled = TransactionalOutbox(engine, frozen, channel_for=channel_for, lease=0.5)
        outbox = TransactionalOutbox(engine, other, channel_for=channel_for)
        async with other.subscribe(channel_for("r1"), model=GuestCreated) as sub:
            await stage(outbox, engine, [guest_event(n) for n in range(1, 4)])
            stuck = asyncio.create_task(stalled.relay_channel(channel_for("r1")))
            await asyncio.wait_for(frozen.stalled.wait(), 5)  # it read rows 1-3 and is publishing row 1
            async with asyncio.timeout(1):
                assert await outbox.relay_channel(channel_for("r1")) == 3
                await stage(outbox, engine, [guest_event(4)])
                assert await outbox.relay_channel(channel_for("r1")) == 1
            await asyncio.sleep(stall)
            frozen.gate.set()  # it thaws, holding rows 1-3
            assert await asyncio.wait_for(stuck, 5) == 0  # it recorded none: the other had
            # Within the lease it publishes the rows it holds again (each a no-op, by its key); past the
            # lease it publishes the one it was in the middle of and reads again for the rest.
            assert frozen.calls == (3 if stall < stalled.lease else 1)
            got = [await asyncio.wait_for(anext(sub), 2) for _ in range(4)]
            assert [(g.seq, g.event.guest_id) for g in got if isinstance(g, Received)] == [
                (n, f"g{n}") for n in range(1, 5)
            ]
            assert await outbox.pending() == 0
            assert (await other.backend.position(channel_for("r1"))).seq == 4


async def outbox_rows(engine: AsyncEngine) -> list[tuple[int, str, int | None]]:
    """Every outbox row as (id, channel, published_seq), in id order."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(OutboxRow.id, OutboxRow.channel, OutboxRow.published_seq).order_by(OutboxRow.id)
        )
        return [(row_id, channel, seq) for row_id, channel, seq in rows]


async def age_published_rows(engine: AsyncEngine, seconds: float, *, up_to_id: int | None = None) -> None:
    """Pretend the published rows (up to ``up_to_id``) were published ``seconds`` ago."""
    condition = OutboxRow.published_seq.is_not(None)
    if up_to_id is not None:
        condition = condition & (OutboxRow.id <= up_to_id)
    async with engine.begin() as connection:
        await connection.execute(
            update(OutboxRow).where(condition).values(published_at=utc_now() - timedelta(seconds=seconds))
        )


async def test_published_rows_past_the_retention_are_pruned_in_batches_pending_ones_never(
    engine: AsyncEngine,
) -> None:
    await create_schema(engine)
    async with Broadcaster() as broadcaster:
        outbox = TransactionalOutbox(
            engine, broadcaster, channel_for=channel_for, retention=60, prune_batch=3
        )
        # Two pending rows of a restaurant whose channel is never relayed here, older than all the rest.
        async with session_factory(engine)() as session:
            await outbox.stage(session, "r2", [guest_event(100), guest_event(101)])
            await session.commit()
        await stage(outbox, engine, [guest_event(n) for n in range(1, 11)])
        assert await outbox.relay_channel(channel_for("r1")) == 10
        r1_ids = [row_id for row_id, channel, _ in await outbox_rows(engine) if channel == channel_for("r1")]
        # Seven published two minutes ago, three just now (inside the retention).
        await age_published_rows(engine, 120, up_to_id=r1_ids[6])
        async with engine.begin() as connection:  # pending rows as old as can be: still kept
            await connection.execute(
                update(OutboxRow)
                .where(OutboxRow.published_seq.is_(None))
                .values(created_at=utc_now() - timedelta(days=30))
            )
        assert [await outbox.prune_once() for _ in range(4)] == [3, 3, 1, 0]
        assert outbox.pruned == 7
        left = await outbox_rows(engine)
        assert [(channel, seq) for _, channel, seq in left] == [
            (channel_for("r2"), None),
            (channel_for("r2"), None),
            *((channel_for("r1"), seq) for seq in (8, 9, 10)),
        ]
        assert await outbox.pending() == 2 and await outbox.size() == 5
        # The pending rows still go out afterwards.
        assert await outbox.relay_channel(channel_for("r2")) == 2


async def test_the_newest_row_is_kept_so_that_ids_and_idempotency_keys_are_never_reused(
    engine: AsyncEngine,
) -> None:
    await create_schema(engine)
    async with Broadcaster() as broadcaster:
        outbox = TransactionalOutbox(engine, broadcaster, channel_for=channel_for, retention=0)
        async with broadcaster.subscribe(channel_for("r1"), model=GuestCreated) as sub:
            await stage(outbox, engine, [guest_event(1), guest_event(2)])
            assert await outbox.relay_once() == 2
            await age_published_rows(engine, 1)
            deleted = await outbox.prune_once()
            # SQLite numbers a new row max(id) + 1: had the newest row gone, this one would be id 1 again,
            # its key outbox:1 a repeat in the backend's eyes, and its event silently dropped.
            await stage(outbox, engine, [guest_event(3)])
            assert await outbox.relay_once() == 1
            got = [await asyncio.wait_for(anext(sub), 2_000 * MS) for _ in range(3)]
        assert deleted == 1
        ids = [row_id for row_id, _, _ in await outbox_rows(engine)]
        assert len(ids) == 2 and ids[1] == ids[0] + 1
        assert [g.event.guest_id for g in got if isinstance(g, Received)] == ["g1", "g2", "g3"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retention": -1}, "retention must be a finite number of seconds >= 0, not -1"),
        ({"retention": float("nan")}, "retention must be a finite number"),
        ({"retention": float("inf")}, "retention must be a finite number"),
        ({"prune_batch": 0}, "prune_batch must be a positive number of rows, not 0"),
        ({"prune_interval": 0}, "prune_interval must be positive, not 0"),
    ],
)
async def test_nonsense_pruning_options_are_refused(
    engine: AsyncEngine, options: dict[str, Any], message: str
) -> None:
    async with Broadcaster() as broadcaster:
        with pytest.raises(ValueError, match=re.escape(message)):
            TransactionalOutbox(engine, broadcaster, channel_for=channel_for, **options)


async def test_the_relay_task_prunes_while_writes_go_on_and_health_shows_the_size(
    start_service: StartService,
) -> None:
    running = await start_service(settings=Settings(token_secret=TEST_SECRET, outbox_retention=0))
    outbox = running.app.state.outbox
    if outbox is None:
        pytest.skip("writes publish inside their transaction on this database: there is no outbox")
    assert outbox.retention == 0 and outbox.prune_interval == outbox.poll_interval == 1.0
    ws = await connect(running.ws_url("r1"))
    try:
        assert (await recv_json(ws))["type"] == "welcome"
        for n in range(12):
            guest = {"guestName": f"G{n}", "partySize": 2}
            response = await running.http.post("/restaurants/r1/guests", json=guest)
            assert response.status_code == 201, response.text
        events = [await recv_json(ws) for _ in range(12)]
    finally:
        await ws.close()
    assert [e["data"]["guestName"] for e in events] == [f"G{n}" for n in range(12)]

    async def pruned() -> bool:
        health = (await running.http.get("/health")).json()["outbox"]
        return bool(health["rows"] == 1 and health["pending"] == 0)

    await until(pruned, 10_000 * MS)
    health = (await running.http.get("/health")).json()["outbox"]
    assert health["pruned"] == 11 and health["published"] == 12


async def test_relay_statements_cancelled_at_any_moment_leave_no_connection_to_the_garbage_collector(
    engine: AsyncEngine,
) -> None:
    # The relay task is cancelled at every shutdown, and a request's relay when its client goes away. A
    # cancellation while a connection was being switched to autocommit once stranded that connection:
    # nothing returned it to the pool, and the garbage collector reported it (SAWarning) during
    # whichever test ran next.
    if engine.dialect.name != "sqlite":
        # Only aiosqlite switches isolation levels with I/O. On PostgreSQL a query cancelled midway has
        # asyncpg report "unexpected connection_lost() call" to the loop's exception handler: asyncpg's
        # own matter, not this test's.
        pytest.skip("the stranded connection was aiosqlite's (switching to autocommit awaits its thread)")
    await create_schema(engine)
    async with Broadcaster() as broadcaster:
        outbox = TransactionalOutbox(engine, broadcaster, channel_for=channel_for)
        await stage(outbox, engine, [guest_event(1)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for attempt in range(300):
                statement = (outbox.pending, outbox.size, outbox.prune_once, outbox.relay_once)[attempt % 4]
                task = asyncio.create_task(statement())
                await asyncio.sleep((attempt % 50) * 0.0001)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            gc.collect()
        stranded = [str(w.message) for w in caught if "non-checked-in connection" in str(w.message)]
        assert stranded == []
        # The connections that went back to the pool are in the isolation level they were taken in: a
        # write still rolls back as a whole, on every pooled connection.
        for _ in range(engine.pool.size()):  # type: ignore[attr-defined]
            async with session_factory(engine)() as session:
                await outbox.stage(session, "r1", [guest_event(2)])
                await session.flush()
                await session.rollback()
            assert await outbox.size() == 1
