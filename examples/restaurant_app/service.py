"""The service layer: every database write and the events it broadcasts, in one place.

Routes call :class:`RestaurantService` and never touch the broadcaster for writes. A write runs in one
database transaction; the events it produced go to an :class:`EventDispatcher` in two steps:
:meth:`~EventDispatcher.stage` inside the transaction, :meth:`~EventDispatcher.committed` after the
commit. :class:`PublishAfterCommit` publishes in the second step (a failed publish is logged, the write
stands). A transactional outbox is a dispatcher whose ``stage`` writes the events to an outbox table in
the same transaction and whose ``committed`` wakes the relay; the routes do not change.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import and_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from rtbroadcast import Broadcaster, RTBroadcastError, StreamPosition, utc_now

from .db import GuestRow, RestaurantRow, TableRow, session_factory
from .events import (
    AtomicTransactionComplete,
    GuestAction,
    GuestCreated,
    GuestDeleted,
    GuestUpdated,
    GuestUpdatedData,
    RestaurantEvent,
    TableCreated,
    TableUpdated,
    TableUpdatedData,
)
from .schemas import (
    AtomicOperation,
    AtomicResult,
    CreateGuestOp,
    Guest,
    GuestCreate,
    GuestStatus,
    GuestUpdate,
    OperationResult,
    Table,
    TableCreate,
    TableStatus,
    TableUpdate,
    UpdateGuestOp,
    UpdateTableOp,
)

__all__ = [
    "CHANNEL_PREFIX",
    "EventDispatcher",
    "NotFound",
    "PublishAfterCommit",
    "RestaurantService",
    "Snapshot",
    "channel_for",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A restaurant's events go to the channel ``restaurant:<restaurant_id>``.
CHANNEL_PREFIX = "restaurant:"


def channel_for(restaurant_id: str) -> str:
    """Return the channel of a restaurant's events."""
    return CHANNEL_PREFIX + restaurant_id


class NotFound(LookupError):
    """A guest or table id that the restaurant does not have.

    ``operation_index`` is set when the id came from an operation of an atomic transaction.
    """

    def __init__(self, kind: str, entity_id: str, *, operation_index: int | None = None) -> None:
        message = f"{kind} {entity_id!r} not found"
        if operation_index is not None:
            message = f"operation {operation_index}: {message}"
        super().__init__(message)
        self.kind = kind
        self.entity_id = entity_id
        self.operation_index = operation_index
        self.message = message


class EventDispatcher(Protocol):
    """Where the events of a write go: staged inside its transaction, released after its commit."""

    async def stage(
        self, session: AsyncSession, restaurant_id: str, events: Sequence[RestaurantEvent]
    ) -> None:
        """Record ``events`` inside the write's transaction (before the commit)."""

    async def committed(self, restaurant_id: str, events: Sequence[RestaurantEvent]) -> None:
        """Deliver ``events`` after the transaction committed. Must not raise: the write stands."""


class PublishAfterCommit:
    """Publish each event on the restaurant's channel once the transaction has committed.

    A publish that fails is logged and skipped; the API call still succeeds. Clients that missed the
    event see its effect in the next snapshot (the issue on resume and the outbox closes this gap).
    """

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.broadcaster = broadcaster

    async def stage(
        self, session: AsyncSession, restaurant_id: str, events: Sequence[RestaurantEvent]
    ) -> None:
        """Nothing to record: the events are published after the commit."""

    async def committed(self, restaurant_id: str, events: Sequence[RestaurantEvent]) -> None:
        """Publish ``events`` in order, logging one line per broadcast."""
        channel = channel_for(restaurant_id)
        for event in events:
            try:
                seq = await self.broadcaster.publish(channel, event)
            except RTBroadcastError as exc:
                logger.error(
                    "broadcast of %s to restaurant %s failed after commit (the write stands): %s",
                    event.type,
                    restaurant_id,
                    exc,
                )
                continue
            except Exception:
                logger.exception(
                    "broadcast of %s to restaurant %s failed after commit (the write stands)",
                    event.type,
                    restaurant_id,
                )
                continue
            logger.info(
                "broadcast %s restaurant=%s recipients=%d seq=%d",
                event.type,
                restaurant_id,
                self.broadcaster.connection_count(channel),
                seq,
            )


@dataclass(frozen=True, slots=True)
class Snapshot(Generic[T]):
    """What a read returned, and where the restaurant's stream stood just before it was read.

    Every event up to ``position.seq`` is reflected in ``items``; events after it may be too (apply events
    idempotently, by id). ``position`` is ``None`` when the broadcast backend could not be asked.
    """

    restaurant_id: str
    items: list[T]
    version: int
    position: StreamPosition | None

    @property
    def etag(self) -> str:
        """A strong ETag: equal exactly when the data and the stream position are equal."""
        if self.position is None:
            return f'"db.{self.version}"'
        return f'"{self.position.epoch}.{self.position.seq}.{self.version}"'


@dataclass(slots=True)
class _Write:
    """One write transaction in progress: its session, its clock, the events it will broadcast."""

    session: AsyncSession
    restaurant_id: str
    now: datetime
    events: list[RestaurantEvent] = field(default_factory=list)


class RestaurantService:
    """Reads and writes of guests and tables; each write broadcasts after it commits.

    Args:
        engine: the database engine (SQLite or PostgreSQL).
        broadcaster: for the stream position of snapshots, and the default dispatcher.
        dispatcher: where the events of writes go (default: :class:`PublishAfterCommit`).
    """

    def __init__(
        self, engine: AsyncEngine, broadcaster: Broadcaster, *, dispatcher: EventDispatcher | None = None
    ) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")
        self.engine = engine
        self.broadcaster = broadcaster
        self.dispatcher: EventDispatcher = dispatcher or PublishAfterCommit(broadcaster)
        self._sessions = session_factory(engine)
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        # Writes of one restaurant commit and publish one at a time in this process, so that its
        # clients receive events in commit order. Across processes that takes the outbox.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- transactions -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self, restaurant_id: str) -> AsyncIterator[_Write]:
        """Run a write: commit if it produced events (then dispatch them), roll back otherwise."""
        lock = self._locks.get(restaurant_id)
        if lock is None:
            lock = self._locks[restaurant_id] = asyncio.Lock()
        async with lock:
            async with self._sessions() as session:
                unit = _Write(session, restaurant_id, utc_now())
                await self._touch_restaurant(unit)
                yield unit
                if not unit.events:
                    await session.rollback()
                    return
                await self.dispatcher.stage(session, restaurant_id, unit.events)
                await session.commit()
            await self.dispatcher.committed(restaurant_id, unit.events)

    async def _touch_restaurant(self, unit: _Write) -> None:
        """Create the restaurant or bump its version: the first statement of every write."""
        statement = (
            self._insert(RestaurantRow)
            .values(id=unit.restaurant_id, version=1, created_at=unit.now)
            .on_conflict_do_update(
                index_elements=[RestaurantRow.id], set_={"version": RestaurantRow.version + 1}
            )
        )
        await unit.session.execute(statement)

    async def _position(self, restaurant_id: str) -> StreamPosition | None:
        try:
            return await self.broadcaster.position(channel_for(restaurant_id))
        except RTBroadcastError as exc:
            logger.debug("no stream position for restaurant %s: %s", restaurant_id, exc)
            return None

    # -- reads ------------------------------------------------------------------------------------

    async def list_guests(self, restaurant_id: str, status: GuestStatus | None = None) -> Snapshot[Guest]:
        """Return the restaurant's guests (oldest first), optionally only those with ``status``."""
        # The position is read before the data: every event up to it was published after its commit,
        # so the data read next reflects it.
        position = await self._position(restaurant_id)
        condition = GuestRow.restaurant_id == RestaurantRow.id
        if status is not None:
            condition = and_(condition, GuestRow.status == status.value)
        # One statement, so the version and the rows come from the same database snapshot.
        statement = (
            select(RestaurantRow.version, GuestRow)
            .select_from(RestaurantRow)
            .outerjoin(GuestRow, condition)
            .where(RestaurantRow.id == restaurant_id)
            .order_by(GuestRow.created_at, GuestRow.id)
        )
        async with self._sessions() as session:
            rows = (await session.execute(statement)).all()
        guests = [Guest.model_validate(row) for _, row in rows if row is not None]
        return Snapshot(restaurant_id, guests, rows[0][0] if rows else 0, position)

    async def list_tables(self, restaurant_id: str) -> Snapshot[Table]:
        """Return the restaurant's tables (oldest first)."""
        position = await self._position(restaurant_id)
        statement = (
            select(RestaurantRow.version, TableRow)
            .select_from(RestaurantRow)
            .outerjoin(TableRow, TableRow.restaurant_id == RestaurantRow.id)
            .where(RestaurantRow.id == restaurant_id)
            .order_by(TableRow.created_at, TableRow.id)
        )
        async with self._sessions() as session:
            rows = (await session.execute(statement)).all()
        tables = [Table.model_validate(row) for _, row in rows if row is not None]
        return Snapshot(restaurant_id, tables, rows[0][0] if rows else 0, position)

    async def get_guest(self, restaurant_id: str, guest_id: str) -> tuple[Guest, StreamPosition | None]:
        """Return one guest and the stream position read before it.

        Raises:
            NotFound: the restaurant has no such guest.
        """
        position = await self._position(restaurant_id)
        async with self._sessions() as session:
            row = await _guest(session, restaurant_id, guest_id)
        return Guest.model_validate(row), position

    async def get_table(self, restaurant_id: str, table_id: str) -> tuple[Table, StreamPosition | None]:
        """Return one table and the stream position read before it.

        Raises:
            NotFound: the restaurant has no such table.
        """
        position = await self._position(restaurant_id)
        async with self._sessions() as session:
            row = await _table(session, restaurant_id, table_id)
        return Table.model_validate(row), position

    async def check_database(self) -> None:
        """Run a trivial query; raises whatever the driver raises when the database is unreachable."""
        async with self._sessions() as session:
            await session.execute(text("SELECT 1"))

    # -- guests -----------------------------------------------------------------------------------

    async def create_guest(self, restaurant_id: str, body: GuestCreate) -> Guest:
        """Add a ``waiting`` guest; broadcasts ``guest_created``."""
        async with self._write(restaurant_id) as unit:
            row = self._create_guest(unit, body)
            return Guest.model_validate(row)

    async def update_guest(self, restaurant_id: str, guest_id: str, body: GuestUpdate) -> Guest:
        """Change the fields sent; broadcasts ``guest_updated`` if anything changed.

        Raises:
            NotFound: no such guest, or ``table_id`` names no table of the restaurant.
        """
        async with self._write(restaurant_id) as unit:
            row, event = await self._update_guest(unit, guest_id, body)
            if event is not None:
                unit.events.append(event)
            return Guest.model_validate(row)

    async def delete_guest(self, restaurant_id: str, guest_id: str) -> None:
        """Remove a guest; broadcasts ``guest_deleted``, then ``table_updated`` for a table it was at.

        Raises:
            NotFound: no such guest.
        """
        async with self._write(restaurant_id) as unit:
            row = await _guest(unit.session, restaurant_id, guest_id)
            unit.events.append(
                GuestDeleted(restaurant_id=restaurant_id, guest_id=row.id, data={"id": row.id})
            )
            at_tables = await unit.session.scalars(
                select(TableRow)
                .where(TableRow.restaurant_id == restaurant_id, TableRow.guest_id == row.id)
                .order_by(TableRow.created_at, TableRow.id)
            )
            for table in at_tables:
                table.guest_id = None
                table.updated_at = unit.now
                unit.events.append(_table_updated(table, {"guest_id"}))
            await unit.session.delete(row)

    # -- tables -----------------------------------------------------------------------------------

    async def create_table(self, restaurant_id: str, body: TableCreate) -> Table:
        """Add an ``available`` table; broadcasts ``table_created``."""
        async with self._write(restaurant_id) as unit:
            row = TableRow(
                id=f"table-{uuid.uuid4().hex}",
                restaurant_id=restaurant_id,
                name=body.name,
                capacity=body.capacity,
                status=TableStatus.AVAILABLE.value,
                guest_id=None,
                created_at=unit.now,
                updated_at=unit.now,
            )
            unit.session.add(row)
            unit.events.append(
                TableCreated(
                    restaurant_id=restaurant_id,
                    table_id=row.id,
                    data={
                        "id": row.id,
                        "name": row.name,
                        "capacity": row.capacity,
                        "status": row.status,
                        "guest_id": row.guest_id,
                    },
                )
            )
            return Table.model_validate(row)

    async def update_table(self, restaurant_id: str, table_id: str, body: TableUpdate) -> Table:
        """Change the fields sent; broadcasts ``table_updated`` if anything changed.

        Raises:
            NotFound: no such table, or ``guest_id`` names no guest of the restaurant.
        """
        async with self._write(restaurant_id) as unit:
            row, event = await self._update_table(unit, table_id, body)
            if event is not None:
                unit.events.append(event)
            return Table.model_validate(row)

    async def seed_tables(self, restaurant_id: str, tables: Iterable[TableCreate]) -> int:
        """Create ``tables`` if the restaurant has none yet; return how many were created."""
        existing = await self.list_tables(restaurant_id)
        if existing.items:
            return 0
        created = 0
        for table in tables:
            await self.create_table(restaurant_id, table)
            created += 1
        return created

    # -- atomic transactions ----------------------------------------------------------------------

    async def run_atomic(self, restaurant_id: str, operations: Sequence[AtomicOperation]) -> AtomicResult:
        """Apply ``operations`` in one transaction, all or none; broadcast ``atomic_transaction_complete``.

        ``affected_entities`` lists each entity the transaction changed once, in the order of the first
        operation that changed it. Operations that change nothing are not listed; when none changes
        anything, nothing is written or broadcast.

        Raises:
            NotFound: an operation names an unknown id (``operation_index`` says which); nothing is written.
        """
        async with self._write(restaurant_id) as unit:
            affected: list[str] = []
            rows: list[tuple[str, GuestRow | TableRow]] = []
            for index, operation in enumerate(operations):
                changed: bool
                row: GuestRow | TableRow
                if isinstance(operation, UpdateGuestOp):
                    row, event = await self._update_guest(unit, operation.guest_id, operation.changes, index)
                    changed = event is not None
                elif isinstance(operation, UpdateTableOp):
                    row, table_event = await self._update_table(
                        unit, operation.table_id, operation.changes, index
                    )
                    changed = table_event is not None
                else:
                    assert isinstance(operation, CreateGuestOp)
                    row = self._create_guest(unit, operation.guest, emit=False)
                    changed = True
                rows.append((operation.op, row))
                if changed and row.id not in affected:
                    affected.append(row.id)
            if affected:
                unit.events.append(
                    AtomicTransactionComplete(restaurant_id=restaurant_id, affected_entities=affected)
                )
            # After every operation ran, so that each result shows the entity's final state.
            results = [_result(op, row) for op, row in rows]
            return AtomicResult(restaurant_id=restaurant_id, affected_entities=affected, results=results)

    # -- shared by the endpoints and the atomic operations ----------------------------------------

    def _create_guest(self, unit: _Write, body: GuestCreate, *, emit: bool = True) -> GuestRow:
        row = GuestRow(
            id=f"guest-{uuid.uuid4().hex}",
            restaurant_id=unit.restaurant_id,
            guest_name=body.guest_name,
            party_size=body.party_size,
            phone=body.phone,
            notes=body.notes,
            status=GuestStatus.WAITING.value,
            table_id=None,
            created_at=unit.now,
            updated_at=unit.now,
        )
        unit.session.add(row)
        if emit:
            unit.events.append(
                GuestCreated(
                    restaurant_id=unit.restaurant_id,
                    guest_id=row.id,
                    data={
                        "id": row.id,
                        "guestName": row.guest_name,
                        "partySize": row.party_size,
                        "status": row.status,
                    },
                )
            )
        return row

    async def _update_guest(
        self, unit: _Write, guest_id: str, body: GuestUpdate, index: int | None = None
    ) -> tuple[GuestRow, GuestUpdated | None]:
        row = await _guest(unit.session, unit.restaurant_id, guest_id, index)
        requested = body.changes()
        table_id = requested.get("table_id")
        if table_id is not None:
            await _table(unit.session, unit.restaurant_id, table_id, index)
        changed = _apply(row, requested)
        if not changed:
            return row, None
        row.updated_at = unit.now
        return row, _guest_updated(row, changed)

    async def _update_table(
        self, unit: _Write, table_id: str, body: TableUpdate, index: int | None = None
    ) -> tuple[TableRow, TableUpdated | None]:
        row = await _table(unit.session, unit.restaurant_id, table_id, index)
        requested = body.changes()
        guest_id = requested.get("guest_id")
        if guest_id is not None:
            await _guest(unit.session, unit.restaurant_id, guest_id, index)
        changed = _apply(row, requested)
        if not changed:
            return row, None
        row.updated_at = unit.now
        return row, _table_updated(row, changed)


async def _guest(
    session: AsyncSession, restaurant_id: str, guest_id: str, index: int | None = None
) -> GuestRow:
    row = await session.scalar(
        select(GuestRow).where(GuestRow.id == guest_id, GuestRow.restaurant_id == restaurant_id)
    )
    if row is None:
        raise NotFound("guest", guest_id, operation_index=index)
    return row


async def _table(
    session: AsyncSession, restaurant_id: str, table_id: str, index: int | None = None
) -> TableRow:
    row = await session.scalar(
        select(TableRow).where(TableRow.id == table_id, TableRow.restaurant_id == restaurant_id)
    )
    if row is None:
        raise NotFound("table", table_id, operation_index=index)
    return row


def _apply(row: GuestRow | TableRow, requested: dict[str, Any]) -> set[str]:
    """Set the requested attributes on ``row``; return the names of those whose value changed."""
    changed: set[str] = set()
    for name, value in requested.items():
        plain = value.value if isinstance(value, GuestStatus | TableStatus) else value
        if getattr(row, name) != plain:
            setattr(row, name, plain)
            changed.add(name)
    return changed


def _guest_updated(row: GuestRow, changed: set[str]) -> GuestUpdated:
    action: GuestAction
    if "status" in changed:
        action = "status_change"
    elif "table_id" in changed:
        action = "table_assigned" if row.table_id is not None else "table_unassigned"
    else:
        action = "details_change"
    data: GuestUpdatedData = {"id": row.id, "status": row.status, "table_id": row.table_id}
    if "guest_name" in changed:
        data["guestName"] = row.guest_name
    if "party_size" in changed:
        data["partySize"] = row.party_size
    if "phone" in changed:
        data["phone"] = row.phone
    if "notes" in changed:
        data["notes"] = row.notes
    return GuestUpdated(restaurant_id=row.restaurant_id, guest_id=row.id, action=action, data=data)


def _table_updated(row: TableRow, changed: set[str]) -> TableUpdated:
    data: TableUpdatedData = {"id": row.id, "status": row.status, "guest_id": row.guest_id}
    if "name" in changed:
        data["name"] = row.name
    if "capacity" in changed:
        data["capacity"] = row.capacity
    return TableUpdated(restaurant_id=row.restaurant_id, table_id=row.id, data=data)


def _result(op: str, row: GuestRow | TableRow) -> OperationResult:
    if isinstance(row, GuestRow):
        return OperationResult(op=op, guest=Guest.model_validate(row))
    return OperationResult(op=op, table=Table.model_validate(row))
