"""A write the database cannot complete in time answers 503 with Retry-After, and changes nothing."""

from __future__ import annotations

import asyncio

import pytest
from examples.restaurant_app.db import GuestRow, RestaurantRow
from examples.restaurant_app.service import channel_for
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .conftest import Running

RID = "r-locked"


async def test_a_write_that_waits_past_the_lock_timeout_gets_503_and_changes_nothing(
    service: Running, engine: AsyncEngine
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no lock timeout: one writer at a time")
    http = service.http
    assert (
        await http.post(f"/restaurants/{RID}/guests", json={"guestName": "A", "partySize": 2})
    ).status_code == 201
    broadcaster = service.app.state.broadcaster
    before = await broadcaster.backend.position(channel_for(RID))
    holder_has_lock = asyncio.Event()

    async def hold_the_restaurant_row() -> None:
        # Busy (not idle) in its transaction, so the 0.5 s idle timeout does not end it: the write waits
        # for the row lock until its own 2 s lock_timeout.
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(
                update(RestaurantRow).where(RestaurantRow.id == RID).values(version=RestaurantRow.version + 1)
            )
            holder_has_lock.set()
            await session.execute(text("SELECT pg_sleep(3.5)"))

    holder = asyncio.create_task(hold_the_restaurant_row())
    try:
        await asyncio.wait_for(holder_has_lock.wait(), 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await http.post(f"/restaurants/{RID}/guests", json={"guestName": "B", "partySize": 2})
        waited = loop.time() - started
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert "nothing was changed" in response.json()["detail"]
        assert 1.5 < waited < 3.4  # the lock_timeout (2 s), not the holder's 3.5 s
    finally:
        await holder
    async with engine.connect() as connection:
        query = select(func.count()).select_from(GuestRow).where(GuestRow.guest_name == "B")
        assert (await connection.execute(query)).scalar_one() == 0
    assert (await broadcaster.backend.position(channel_for(RID))) == before  # nothing was broadcast
    retried = await http.post(f"/restaurants/{RID}/guests", json={"guestName": "B", "partySize": 2})
    assert retried.status_code == 201
