"""A transactional outbox: events are written with the data change, then relayed to the broadcaster.

The write transaction inserts one outbox row per event, so an event exists exactly when its change
committed. A relay task publishes pending rows in id order and records the seq each got. Each publish
carries the idempotency key ``outbox:<id>``: a relay that crashes between publishing and recording, or
two processes relaying at once, never publish an event twice. With the broadcast backend down, writes
still succeed; the relay retries with capped backoff and the events go out, in order, when it is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import DateTime, Index, Integer, String, Text, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from rtbroadcast import BackendUnavailable, Broadcaster, utc_now

from .db import Base
from .events import RestaurantEvent

__all__ = ["OutboxRow", "TransactionalOutbox"]

logger = logging.getLogger(__name__)

#: Key of the PostgreSQL advisory lock that lets one relay at a time publish (any constant would do).
_RELAY_LOCK = 0x72746263


class OutboxRow(Base):
    """An event waiting to be published (``published_seq`` is null) or already published."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "published_seq", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    restaurant_id: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(100))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_seq: Mapped[int | None] = mapped_column(Integer, default=None)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class TransactionalOutbox:
    """The service's event dispatcher: stage events in the write's transaction, relay them after.

    Args:
        engine: the service's database engine.
        broadcaster: where the relay publishes.
        channel_for: maps a restaurant id to its channel.
        poll_interval: seconds between looks for pending rows when nothing woke the relay.
        batch_size: rows read per round.
        max_backoff: longest wait between retries while the backend is unavailable.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        broadcaster: Broadcaster,
        *,
        channel_for: Callable[[str], str],
        poll_interval: float = 1.0,
        batch_size: int = 100,
        max_backoff: float = 5.0,
    ) -> None:
        self.engine = engine
        self.broadcaster = broadcaster
        self.channel_for = channel_for
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.max_backoff = max_backoff
        self._wake = asyncio.Event()
        # One relay at a time in this process (requests relay too); PostgreSQL's advisory lock extends
        # that across processes. Two relays at once would still be safe (idempotency keys), only wasteful.
        self._lock = asyncio.Lock()
        self._postgres = engine.dialect.name == "postgresql"
        self.published = 0
        self.outage_since: float | None = None

    async def stage(
        self, session: AsyncSession, restaurant_id: str, events: Sequence[RestaurantEvent]
    ) -> None:
        """Insert one outbox row per event, inside the write's transaction."""
        now = utc_now()
        channel = self.channel_for(restaurant_id)
        session.add_all(
            OutboxRow(
                restaurant_id=restaurant_id,
                channel=channel,
                event_type=event.type,
                payload=event.to_json(),
                created_at=now,
            )
            for event in events
        )

    async def committed(self, restaurant_id: str, events: Sequence[RestaurantEvent]) -> None:
        """Relay right away, so that the response follows the broadcast; leave failures to the relay task.

        During a known outage the request does not wait for the backend: the relay task retries.
        """
        if self.outage_since is None:
            try:
                await self.relay_once()
                return
            except BackendUnavailable as exc:
                logger.warning("broadcast deferred to the outbox relay (the write stands): %s", exc)
            except Exception:
                logger.exception("broadcast deferred to the outbox relay (the write stands)")
        self._wake.set()

    async def pending(self) -> int:
        """Return how many events wait to be published."""
        async with self.engine.connect() as connection:
            result = await connection.execute(
                select(func.count()).select_from(OutboxRow).where(OutboxRow.published_seq.is_(None))
            )
            return int(result.scalar_one())

    async def run(self) -> None:
        """Relay until cancelled; never dies on an error (it logs and retries)."""
        backoff = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                sent = await self.relay_once()
            except BackendUnavailable as exc:
                if self.outage_since is None:
                    self.outage_since = loop.time()
                    logger.warning("outbox relay: broadcast backend unavailable, will retry: %s", exc)
                backoff = min(self.max_backoff, max(0.1, backoff * 2))
                await self._sleep(backoff)
                continue
            except Exception:
                logger.exception("outbox relay failed; retrying in %.1f s", self.poll_interval)
                await asyncio.sleep(self.poll_interval)
                continue
            if self.outage_since is not None:
                logger.info("outbox relay: backend back after %.1f s", loop.time() - self.outage_since)
                self.outage_since = None
            backoff = 0.0
            if sent < self.batch_size:
                await self._sleep(self.poll_interval)

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a commit wakes the relay."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def relay_once(self) -> int:
        """Publish pending rows in id order, recording each one's seq; return how many were published.

        Raises:
            BackendUnavailable: the backend cannot be reached; rows not yet published stay pending.
        """
        async with self._lock, self.engine.connect() as connection:
            if self._postgres:
                await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _RELAY_LOCK})
            try:
                return await self._relay(connection)
            finally:
                if self._postgres:
                    await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _RELAY_LOCK})
                    await connection.commit()

    async def _relay(self, connection: AsyncConnection) -> int:
        rows = (
            await connection.execute(
                select(
                    OutboxRow.id,
                    OutboxRow.restaurant_id,
                    OutboxRow.channel,
                    OutboxRow.event_type,
                    OutboxRow.payload,
                )
                .where(OutboxRow.published_seq.is_(None))
                .order_by(OutboxRow.id)
                .limit(self.batch_size)
            )
        ).all()
        await connection.commit()
        sent = 0
        for row_id, restaurant_id, channel, event_type, payload in rows:
            seq = await self.broadcaster.publish_json(channel, payload, idempotency_key=f"outbox:{row_id}")
            # Recorded one by one: after a crash at most one row is published again, and the
            # idempotency key turns that into a no-op.
            await connection.execute(
                update(OutboxRow)
                .where(OutboxRow.id == row_id)
                .values(published_seq=seq, published_at=utc_now())
            )
            await connection.commit()
            sent += 1
            self.published += 1
            logger.info(
                "broadcast %s restaurant=%s recipients=%d seq=%d",
                event_type,
                restaurant_id,
                self.broadcaster.connection_count(channel),
                seq,
            )
        return sent
