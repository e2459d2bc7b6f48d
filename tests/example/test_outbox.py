"""The transactional outbox: events exist exactly when their write committed, and go out once, in order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from examples.restaurant_app.db import create_schema, session_factory
from examples.restaurant_app.events import GuestCreated
from examples.restaurant_app.outbox import OutboxRow, TransactionalOutbox
from examples.restaurant_app.service import channel_for
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from rtbroadcast import Broadcaster, Received
from tests.support import MS

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
