"""Storage: SQLAlchemy 2 ORM tables and the async engine (SQLite file by default, PostgreSQL by URL).

Every write transaction starts by bumping its restaurant's ``version`` (creating the restaurant on its
first write). That row lock serialises writes per restaurant in both databases, makes SQLite take its
write lock at the first statement (so two writers never deadlock upgrading a read lock), and gives the
list endpoints a counter that changes exactly when the restaurant's data does.

On PostgreSQL every session runs with ``idle_in_transaction_session_timeout`` and ``lock_timeout``
(:data:`POSTGRES_SESSION_DEFAULTS`): a process that stalls inside a write transaction (frozen, swapped
out, stuck in a loop) holds its restaurant's row lock for at most the first, because the server then ends
its session and rolls the write back; no write waits for a lock longer than the second.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry

__all__ = [
    "POSTGRES_SESSION_DEFAULTS",
    "POSTGRES_SESSION_SETTINGS",
    "Base",
    "GuestRow",
    "RestaurantRow",
    "TableRow",
    "create_engine",
    "create_schema",
    "normalize_database_url",
    "session_factory",
]


#: Session settings every PostgreSQL connection of the service gets, unless the URL or ``connect_args``
#: set them. A write transaction idle for longer than 0.5 s (its process stalled) is rolled back by the
#: server, which frees the restaurant's row lock for the other processes; a lock wait longer than 2 s (a
#: lock held by some other client, e.g. a psql session) fails the write instead of hanging it.
POSTGRES_SESSION_DEFAULTS: dict[str, str] = {
    "idle_in_transaction_session_timeout": "500",
    "lock_timeout": "2000",
}

#: Query parameters of a PostgreSQL URL that are sent as session settings rather than to asyncpg, e.g.
#: ``postgresql://app@db/restaurants?search_path=tenant_a&idle_in_transaction_session_timeout=2000``.
POSTGRES_SESSION_SETTINGS = (
    "application_name",
    "search_path",
    "idle_in_transaction_session_timeout",
    "lock_timeout",
    "statement_timeout",
)


class Base(DeclarativeBase):
    """Declarative base of the service's tables."""


class RestaurantRow(Base):
    """A restaurant, created by its first write; ``version`` counts committed write transactions."""

    __tablename__ = "restaurants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class GuestRow(Base):
    """A party on a restaurant's waitlist."""

    __tablename__ = "guests"
    __table_args__ = (Index("ix_guests_restaurant_created", "restaurant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    restaurant_id: Mapped[str] = mapped_column(String(64), ForeignKey("restaurants.id", ondelete="CASCADE"))
    guest_name: Mapped[str] = mapped_column(String(100))
    party_size: Mapped[int] = mapped_column(Integer)
    phone: Mapped[str | None] = mapped_column(String(32), default=None)
    notes: Mapped[str | None] = mapped_column(String(500), default=None)
    status: Mapped[str] = mapped_column(String(16))
    # Guest and table refer to each other; the service checks both ends (no FK: the cycle would need
    # ALTER TABLE, which SQLite lacks).
    table_id: Mapped[str | None] = mapped_column(String(48), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TableRow(Base):
    """A table of a restaurant's floor."""

    __tablename__ = "dining_tables"
    __table_args__ = (Index("ix_dining_tables_restaurant_created", "restaurant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    restaurant_id: Mapped[str] = mapped_column(String(64), ForeignKey("restaurants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    capacity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    guest_id: Mapped[str | None] = mapped_column(String(48), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def normalize_database_url(url: str | URL) -> URL:
    """Parse ``url`` and give ``sqlite`` and ``postgresql`` URLs their async drivers.

    ``sqlite:///x.db`` becomes ``sqlite+aiosqlite:///x.db``; ``postgres://`` and ``postgresql://`` become
    ``postgresql+asyncpg://``. Other URLs are returned as they are.
    """
    parsed = make_url(url)
    if parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    return parsed


def create_engine(url: str | URL, **options: Any) -> AsyncEngine:
    """Create the async engine for ``url``; ``options`` go to :func:`create_async_engine`.

    A SQLite file runs in WAL mode (readers do not block the writer) with a 30 s busy timeout and
    foreign keys on. An in-memory SQLite database is refused: every pooled connection would get its own.

    A PostgreSQL session gets :data:`POSTGRES_SESSION_DEFAULTS`; the URL's query parameters named in
    :data:`POSTGRES_SESSION_SETTINGS` become session settings too (asyncpg's ``server_settings``), and
    ``connect_args={"server_settings": {...}}`` overrides both.

    Raises:
        ValueError: the URL names an in-memory SQLite database.
    """
    parsed = normalize_database_url(url)
    if parsed.get_backend_name() == "postgresql":
        from_url = {
            name: str(value) for name, value in parsed.query.items() if name in POSTGRES_SESSION_SETTINGS
        }
        parsed = parsed.difference_update_query(from_url)
        connect_args = dict(options.get("connect_args", {}))
        connect_args["server_settings"] = {
            **POSTGRES_SESSION_DEFAULTS,
            **from_url,
            **connect_args.get("server_settings", {}),
        }
        options["connect_args"] = connect_args
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(parsed, **options)
    if parsed.database in (None, "", ":memory:"):
        raise ValueError("use a SQLite file (sqlite+aiosqlite:///./restaurant.db), not an in-memory database")
    options.setdefault("connect_args", {}).setdefault("timeout", 30)
    engine = create_async_engine(parsed, **options)

    @event.listens_for(engine.sync_engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Return the session factory the service uses (objects stay readable after commit)."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine) -> None:
    """Create the tables that do not exist yet (an example service; a real one would use migrations)."""
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
