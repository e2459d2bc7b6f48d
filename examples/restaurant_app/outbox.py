"""A transactional outbox: events are written with the data change, then relayed to the broadcaster.

The write transaction inserts one outbox row per event, so an event exists exactly when its change
committed. Relays publish pending rows and record the seq each got. Each publish carries the idempotency
key ``outbox:<id>``: a relay that crashes between publishing and recording, or two relays at once, never
put an event on the wire twice. With the broadcast backend down, writes still succeed; the relay retries
with capped backoff and the events go out, in order, when it is back.

Locking, and what a stalled process (frozen, swapped out, stuck) costs the others:

- **Writes.** Every write of a restaurant starts by bumping its row (``RestaurantService._write``), and
  holds that row lock until it commits. So a channel's rows get ids in commit order: a row is inserted only
  after every earlier write of its restaurant committed. A process that stalls inside a write holds up the
  writes of *that restaurant* only, and on PostgreSQL for at most ``idle_in_transaction_session_timeout``
  (0.5 s, see :mod:`.db`): the server then ends its session and rolls its write back.
- **Relays take no lock in the database.** Every relay statement runs on its own (autocommit), so a relay
  that stops anywhere holds nothing another process waits for. A relay publishes a channel's pending rows
  in id order and stops at the first one it cannot publish: it never skips an older row of a channel to
  publish a newer one. Relays may overlap (the request and the relay task, two processes, a process that
  thawed holding rows it read before it froze): the idempotency key makes the backend publish each row
  once and hand the first publish's seq to the others, and since each relay publishes in id order, a row
  is first published only after every older row of its channel was. In one process, a lock per channel
  keeps the request and the relay task from doing the same work twice.
- **Every process relays every channel.** After a commit the request relays its restaurant's channel
  (the response follows the broadcast); the relay task of every process relays all channels every
  ``poll_interval``. So events that a stalled process committed but did not publish go out through the
  other processes within ``poll_interval`` (or with the next write to the restaurant), and nothing waits
  for the stalled one.
- **Leases.** A relay publishes only rows it read less than ``lease`` seconds ago; older ones it reads
  again. A process that thaws in the middle of a batch therefore re-publishes nothing the backend has
  forgotten the idempotency key of (``lease`` must stay well below the backend's idempotency window,
  one hour by default on Redis). What is left is a process stalled for longer than that window between
  the lease check and the write of the publish command to its socket.

Pruning: published rows are deleted once they were published more than ``retention`` seconds ago, by the
relay task of every process, ``prune_batch`` rows per statement (each its own autocommit transaction, so no
lock is held for long). Only rows with a ``published_seq`` are ever deleted, and rows are only ever
updated from pending to published, so a pending row is never deleted. Writers insert new rows and never
touch published ones, so pruning waits for no writer and no writer waits for it; on PostgreSQL two
processes pruning at once skip each other's locked rows (``FOR UPDATE SKIP LOCKED``) instead of waiting.
The row with the highest id is always kept: SQLite hands out ``max(id) + 1`` for a new row, so deleting
the newest row would let ids, and with them the idempotency keys ``outbox:<id>``, be used again, and the
backend would drop a new event as a repeat of an old one still in its idempotency window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import DateTime, Index, Integer, String, Text, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from rtbroadcast import BackendUnavailable, Broadcaster, utc_now

from .db import Base
from .events import RestaurantEvent

__all__ = ["DEFAULT_RETENTION", "MAX_PRUNE_INTERVAL", "OutboxRow", "TransactionalOutbox"]

logger = logging.getLogger(__name__)

#: Seconds a published row is kept by default (an hour: as long as Redis remembers idempotency keys).
DEFAULT_RETENTION = 3600.0
#: The longest wait between two prunes when ``prune_interval`` is not given.
MAX_PRUNE_INTERVAL = 10.0


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
        poll_interval: seconds between looks for pending rows when nothing woke the relay; also the
            longest that events committed by a stalled process wait for another process to relay them.
        batch_size: rows of one channel read per round.
        max_backoff: longest wait between retries while the backend is unavailable.
        lease: seconds after reading a batch that a relay may still publish from it (keep it well below
            the backend's idempotency window).
        retention: seconds a row is kept after it was published; ``0`` deletes it at the next prune.
        prune_batch: most rows one prune statement deletes.
        prune_interval: seconds between prunes while there is no backlog to delete; by default
            ``retention`` clamped between ``poll_interval`` and :data:`MAX_PRUNE_INTERVAL`.

    Raises:
        ValueError: ``lease``, ``prune_batch`` or ``prune_interval`` is not positive, or ``retention`` is
            negative or not finite.
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
        lease: float = 30.0,
        retention: float = DEFAULT_RETENTION,
        prune_batch: int = 1000,
        prune_interval: float | None = None,
    ) -> None:
        if lease <= 0:
            raise ValueError(f"lease must be positive, not {lease}")
        if not math.isfinite(retention) or retention < 0:
            raise ValueError(f"retention must be a finite number of seconds >= 0, not {retention}")
        if prune_batch < 1:
            raise ValueError(f"prune_batch must be a positive number of rows, not {prune_batch}")
        if prune_interval is None:
            prune_interval = min(MAX_PRUNE_INTERVAL, max(retention, poll_interval))
        if not prune_interval > 0:
            raise ValueError(f"prune_interval must be positive, not {prune_interval}")
        self.engine = engine
        self.broadcaster = broadcaster
        self.channel_for = channel_for
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.max_backoff = max_backoff
        self.lease = lease
        self.retention = retention
        self.prune_batch = prune_batch
        self.prune_interval = prune_interval
        self._next_prune = 0.0
        self._wake = asyncio.Event()
        # One relay per channel at a time in this process (the request's and the task's); across
        # processes relays may overlap, which the idempotency keys make safe.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.published = 0
        self.pruned = 0
        self.outage_since: float | None = None

    @contextlib.asynccontextmanager
    async def _autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection on which each statement commits on its own, so that a relay that stalls
        between two statements holds no lock.

        The switch to autocommit is made on the connection once it is ours, not by an engine with the
        option: that engine switches inside the pool checkout, and a task cancelled right then (the relay
        task at shutdown, a request's relay when its client goes away) stranded the connection, which
        nothing returned to the pool (SQLAlchemy's ``Connection`` does not give it back when its
        ``engine_connect`` handler raises), and the garbage collector later reported it. A switch
        interrupted here leaves the connection in an unknown isolation level: it is invalidated (closed,
        never reused) rather than returned to the pool as it is.
        """
        async with self.engine.connect() as connection:
            try:
                await connection.execution_options(isolation_level="AUTOCOMMIT")
            except BaseException:
                await connection.invalidate()
                raise
            yield connection

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
        """Relay the restaurant's channel right away, so that the response follows the broadcast.

        Failures are left to the relay task. During a known outage the request does not wait for the
        backend: the relay task retries.
        """
        if self.outage_since is None:
            try:
                await self.relay_channel(self.channel_for(restaurant_id))
                return
            except BackendUnavailable as exc:
                logger.warning("broadcast deferred to the outbox relay (the write stands): %s", exc)
            except Exception:
                logger.exception("broadcast deferred to the outbox relay (the write stands)")
        self._wake.set()

    async def pending(self) -> int:
        """Return how many events wait to be published."""
        async with self._autocommit() as connection:
            result = await connection.execute(
                select(func.count()).select_from(OutboxRow).where(OutboxRow.published_seq.is_(None))
            )
            return int(result.scalar_one())

    async def size(self) -> int:
        """Return how many rows the outbox table holds, pending and published."""
        async with self._autocommit() as connection:
            result = await connection.execute(select(func.count()).select_from(OutboxRow))
            return int(result.scalar_one())

    async def prune_once(self) -> int:
        """Delete up to ``prune_batch`` rows published more than ``retention`` seconds ago, oldest first.

        Never deletes a pending row, nor the row with the highest id (see the module's docstring). Returns
        how many rows this call deleted (rows another process deleted first are not counted).
        """
        cutoff = utc_now() - timedelta(seconds=self.retention)
        newest = select(func.max(OutboxRow.id)).scalar_subquery()
        batch = (
            select(OutboxRow.id)
            .where(
                OutboxRow.published_seq.is_not(None),
                OutboxRow.published_at < cutoff,
                OutboxRow.id < newest,
            )
            .order_by(OutboxRow.id)
            .limit(self.prune_batch)
            # PostgreSQL: rows another pruner is deleting are skipped, not waited for. SQLite has no row
            # locks (its writes take turns) and SQLAlchemy leaves the clause out there.
            .with_for_update(skip_locked=True)
        )
        async with self._autocommit() as connection:
            result = await connection.execute(delete(OutboxRow).where(OutboxRow.id.in_(batch)))
        deleted = max(result.rowcount, 0)
        self.pruned += deleted
        return deleted

    async def _prune_if_due(self) -> int:
        """Prune one batch if ``prune_interval`` passed since the last prune that found no backlog.

        Returns how many rows were deleted; a full batch means more may be waiting, so the next round
        prunes again at once. A failure is logged and retried after ``prune_interval``: it never stops
        the relay.
        """
        now = asyncio.get_running_loop().time()
        if now < self._next_prune:
            return 0
        try:
            deleted = await self.prune_once()
        except Exception:
            logger.exception("outbox prune failed; retrying in %.1f s", self.prune_interval)
            deleted = 0
        if deleted < self.prune_batch:
            self._next_prune = now + self.prune_interval
        return deleted

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
            pruned = await self._prune_if_due()
            if sent < self.batch_size and pruned < self.prune_batch:
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
        """Relay every channel that has pending rows (one round of the relay task).

        Returns how many rows this relay recorded as published. A channel whose relay fails with
        anything but :class:`BackendUnavailable` is logged and left for the next round; the others go on.

        Raises:
            BackendUnavailable: the backend cannot be reached; rows not yet published stay pending.
        """
        async with self._autocommit() as connection:
            channels = (
                await connection.execute(
                    select(OutboxRow.channel)
                    .where(OutboxRow.published_seq.is_(None))
                    .group_by(OutboxRow.channel)
                    .order_by(func.min(OutboxRow.id))
                )
            ).scalars()
            pending = list(channels)
        sent = 0
        for channel in pending:
            try:
                sent += await self.relay_channel(channel)
            except BackendUnavailable:
                raise
            except Exception:
                logger.exception("outbox relay of %s failed; retrying in the next round", channel)
        return sent

    async def relay_channel(self, channel: str) -> int:
        """Publish ``channel``'s pending rows in id order, recording each one's seq.

        Returns how many rows this relay recorded (a row another relay recorded first is not counted).

        Raises:
            BackendUnavailable: the backend cannot be reached; rows not yet published stay pending.
        """
        lock = self._locks.get(channel)
        if lock is None:
            lock = self._locks[channel] = asyncio.Lock()
        loop = asyncio.get_running_loop()
        async with lock, self._autocommit() as connection:
            rows = (
                await connection.execute(
                    select(OutboxRow.id, OutboxRow.restaurant_id, OutboxRow.event_type, OutboxRow.payload)
                    .where(OutboxRow.channel == channel, OutboxRow.published_seq.is_(None))
                    .order_by(OutboxRow.id)
                    .limit(self.batch_size)
                )
            ).all()
            read_at = loop.time()
            sent = 0
            for row_id, restaurant_id, event_type, payload in rows:
                if loop.time() - read_at > self.lease:
                    break  # stale: another relay may have published these long ago; read them again
                seq = await self.broadcaster.publish_json(
                    channel, payload, idempotency_key=f"outbox:{row_id}"
                )
                # Recorded one by one: after a crash at most one row is published again, and the
                # idempotency key turns that into a no-op.
                result = await connection.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id == row_id, OutboxRow.published_seq.is_(None))
                    .values(published_seq=seq, published_at=utc_now())
                )
                if result.rowcount == 0:
                    continue  # another relay published and recorded it first
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
