"""The PostgreSQL backend: channels shared through the database the service already runs.

Each channel has one row in ``channels`` (its epoch and the seq of its last event) and its events in
``events``; both live in a schema of their own (``rtbroadcast`` unless configured), created on connect or
by the migration :func:`schema_sql` prints. A publish is one call of the schema's ``publish()`` function:
it locks the channel's row, takes the next seq, stores the event and ``NOTIFY``\\ s its position. A
notification carries ``"<seq> <epoch> <channel>"`` only (PostgreSQL limits a payload to 8000 bytes); each
process's listener reads the rows it was told about.

Because the row lock is held until the publishing transaction ends, a publish inside the caller's own
transaction (:meth:`PostgresBackend.publish_in_transaction`) makes the event exist if and only if the
transaction commits, and the channel's seq order is its commit order: PostgreSQL delivers notifications
at commit, in commit order, and never those of a transaction that rolled back.

Tables (``<schema>`` is the configured schema)::

    <schema>.channels          channel (key), epoch, seq, touched_at
    <schema>.events            channel, epoch, seq (key), data (the envelope's text), created_at,
                               headers (the envelope's headers as a JSON object, NULL without)
    <schema>.idempotency_keys  channel, key (key), epoch, seq, data, created_at

History is trimmed by size and age in the background, a batch at a time, by one process at a time. It
deletes event rows, which publishers never update, and the rows of channels nobody published to only when
no transaction holds them (``SKIP LOCKED``): trimming never waits for a publisher.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import hashlib
import logging
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import asyncpg.exceptions

from .._config import (
    count,
    did_you_mean,
    optional_count,
    optional_seconds,
    redact_url,
    seconds,
)
from ..errors import BackendError, BackendUnavailable, ConfigurationError, StateError
from ..protocol import seq_prefix
from ._reconnect import check_reconnect_delay, reconnect_pause
from .base import Backend, BackendListener, Envelope, History, StreamPosition, decode_headers, encode_headers

__all__ = ["DEFAULT_SCHEMA", "PostgresBackend", "schema_sql"]

logger = logging.getLogger("rtbroadcast.postgres")

DEFAULT_SCHEMA: Final = "rtbroadcast"
DEFAULT_HISTORY_SIZE: Final = 1000
DEFAULT_IDEMPOTENCY_TTL: Final = 3600.0
DEFAULT_UNPUBLISHED_TTL: Final = 24 * 3600.0
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_PING_INTERVAL: Final = 10.0
DEFAULT_TRIM_INTERVAL: Final = 5.0
DEFAULT_RECONNECT_DELAY: Final = (0.1, 3.0)
DEFAULT_MAX_CONNECTIONS: Final = 10
#: Seconds an event's row outlives its trimming by size, so that every listener can still read it after
#: the notification (history reads apply ``history_size`` themselves, whatever the table holds).
DELIVERY_GRACE: Final = 60.0
#: Rows one trimming statement deletes at most; the trimmer repeats it, so no statement runs long.
TRIM_BATCH: Final = 5000
#: Seconds a trimming pass looks back before the previous one (for transactions that published long before
#: they committed); every FULL_TRIM_EVERY-th pass looks at every channel.
TRIM_MARGIN: Final = 600.0
FULL_TRIM_EVERY: Final = 100
#: Rows one read of a listener fetches at most.
FETCH_BATCH: Final = 500

#: The reason given to the listener after the listening connection was re-established.
RECONNECTED: Final = "backend_reconnected"

# Jitter of our own: the application's global random state is left alone (and Hypothesis, say, notices when
# another thread draws from it).
_JITTER = random.Random()
# Processes forked after import (a pre-loading server's workers) must not back off in step.
os.register_at_fork(after_in_child=_JITTER.seed)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Errors that mean "PostgreSQL cannot be reached right now": a refused or lost connection, a server
# shutting down or starting up, a timeout.
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def schema_sql(schema: str = DEFAULT_SCHEMA) -> str:
    """Return the DDL that creates the backend's tables and function in ``schema``, for a migration.

    The backend runs it on connect unless ``create_schema=False``; it is idempotent (``IF NOT EXISTS``,
    ``CREATE OR REPLACE``).

    Raises:
        ConfigurationError: ``schema`` is not a lower-case SQL identifier (letters, digits, ``_``).
    """
    s = _check_schema(schema)
    return f"""\
CREATE SCHEMA IF NOT EXISTS {s};

-- One row per channel: its epoch and the seq of its last event. A publish locks it until its
-- transaction ends: that lock is what makes seq order commit order.
CREATE TABLE IF NOT EXISTS {s}.channels (
    channel    text PRIMARY KEY,
    epoch      text NOT NULL,
    seq        bigint NOT NULL DEFAULT 0,
    touched_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The events of each channel's epoch, for the listeners and for resume; trimmed in the background.
-- headers: what the publisher sent along for the servers (trace context, publish time), as a JSON
-- object; NULL when it sent none.
CREATE TABLE IF NOT EXISTS {s}.events (
    channel    text NOT NULL,
    epoch      text NOT NULL,
    seq        bigint NOT NULL,
    data       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    headers    text,
    PRIMARY KEY (channel, epoch, seq)
);
CREATE INDEX IF NOT EXISTS events_created_at ON {s}.events (created_at);
-- Tables made before headers existed (0.1) get the column. A nullable column without a default is a
-- change of the catalogue only (no rewrite), but ALTER TABLE waits for an exclusive lock even when the
-- column exists: look first, so that only the first run after the upgrade takes that lock.
DO $migrate$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = '{s}.events'::regclass AND attname = 'headers' AND NOT attisdropped
    ) THEN
        ALTER TABLE {s}.events ADD COLUMN headers text;
    END IF;
END
$migrate$;

-- Idempotency keys seen recently, with the envelope of the publish they named.
CREATE TABLE IF NOT EXISTS {s}.idempotency_keys (
    channel    text NOT NULL,
    key        text NOT NULL,
    epoch      text NOT NULL,
    seq        bigint NOT NULL,
    data       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (channel, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON {s}.idempotency_keys (created_at);

-- Publish one event: lock the channel's row (creating it with the candidate epoch), answer a recent
-- idempotency key with its first publish, else take the next seq, store the event (with its headers)
-- and notify its position. Runs in the caller's transaction when there is one.
CREATE OR REPLACE FUNCTION {s}.publish(
    p_channel text, p_epoch text, p_head text, p_notify text, p_key text, p_key_ttl double precision,
    p_headers text
) RETURNS TABLE (epoch text, seq bigint, data text, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_epoch text;
    v_seq bigint;
    v_data text;
BEGIN
    SELECT c.epoch, c.seq INTO v_epoch, v_seq FROM {s}.channels c WHERE c.channel = p_channel FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO {s}.channels AS c (channel, epoch, seq) VALUES (p_channel, p_epoch, 0)
            ON CONFLICT (channel) DO NOTHING;
        SELECT c.epoch, c.seq INTO v_epoch, v_seq FROM {s}.channels c WHERE c.channel = p_channel FOR UPDATE;
    END IF;
    IF p_key IS NOT NULL THEN
        SELECT k.seq, k.data INTO v_seq, v_data FROM {s}.idempotency_keys k
            WHERE k.channel = p_channel AND k.key = p_key AND k.epoch = v_epoch
            AND k.created_at > clock_timestamp() - make_interval(secs => p_key_ttl);
        IF FOUND THEN
            RETURN QUERY SELECT v_epoch, v_seq, v_data, true;
            RETURN;
        END IF;
        SELECT c.seq INTO v_seq FROM {s}.channels c WHERE c.channel = p_channel;
    END IF;
    v_seq := v_seq + 1;
    v_data := p_head || v_seq || '}}';
    UPDATE {s}.channels c SET seq = v_seq, touched_at = clock_timestamp() WHERE c.channel = p_channel;
    INSERT INTO {s}.events (channel, epoch, seq, data, headers)
        VALUES (p_channel, v_epoch, v_seq, v_data, p_headers);
    IF p_key IS NOT NULL THEN
        INSERT INTO {s}.idempotency_keys AS k (channel, key, epoch, seq, data)
            VALUES (p_channel, p_key, v_epoch, v_seq, v_data)
            ON CONFLICT (channel, key) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq,
                data = excluded.data, created_at = excluded.created_at;
    END IF;
    PERFORM pg_notify(p_notify, v_seq || ' ' || v_epoch || ' ' || p_channel);
    RETURN QUERY SELECT v_epoch, v_seq, v_data, false;
END
$$;

-- The publish of processes older than headers (0.1), which call it with six arguments during a rolling
-- upgrade: the same publish, without headers. (No DEFAULT on p_headers above: with one, a call with six
-- arguments would match both functions and fail as ambiguous.)
CREATE OR REPLACE FUNCTION {s}.publish(
    p_channel text, p_epoch text, p_head text, p_notify text, p_key text, p_key_ttl double precision
) RETURNS TABLE (epoch text, seq bigint, data text, duplicate boolean)
LANGUAGE sql AS $$
    SELECT * FROM {s}.publish(p_channel, p_epoch, p_head, p_notify, p_key, p_key_ttl, NULL::text)
$$;
"""


def _check_schema(schema: object) -> str:
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            "schema must be a lower-case SQL identifier (a letter or _, then letters, digits or _; at "
            f"most 63), not {schema!r}"
        )
    return f'"{schema}"'


class _State(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    CLOSED = "closed"


class _ListenerGaveUp(Exception):
    """The listener stopped reconnecting after ``max_reconnect_attempts``."""


@dataclass(slots=True)
class _Tail:
    """What the listener delivered of one subscribed channel, and what it was told exists."""

    notify: str
    epoch: str | None = None
    delivered: int | None = None  # None: not known yet (subscribing)
    target: int = 0
    target_epoch: str | None = None
    reader: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class PostgresBackend(Backend):
    """Share channels between processes through PostgreSQL: tables for seq and history, LISTEN/NOTIFY.

    Pass a URL: ``postgresql://user:password@host:5432/db`` (``postgres://`` too). The backend opens a
    pool of its own for queries and one more connection, the listener's, for LISTEN.

    Args:
        url: the PostgreSQL URL; libpq options asyncpg reads may follow in the query (``?sslmode=require``).
        schema: the schema of the backend's tables and function (a lower-case identifier); give each
            application sharing a database its own.
        create_schema: create the schema, tables and function on connect if they do not exist; with
            ``False``, run :func:`schema_sql` as a migration first.
        history_size: events per channel a resume can read; 0 disables resume (events are still stored
            for the listeners, for a while).
        history_ttl: seconds an event stays in history; ``None`` keeps it until pushed out by size.
        idempotency_ttl: seconds an idempotency key is remembered.
        unpublished_ttl: seconds the row of a channel nobody published to outlives its last read. Reads
            create it, so that a client connecting before the first publish keeps its epoch.
        timeout: seconds a publish, read, subscribe or connect may take before
            :class:`~rtbroadcast.BackendUnavailable` is raised.
        ping_interval: seconds between checks that the listening connection still answers.
        trim_interval: seconds between two trimming passes over the history.
        reconnect_delay: ``(first, most)`` seconds to wait between reconnect attempts; the delay doubles
            after each failure, with random jitter.
        max_reconnect_attempts: consecutive failed attempts after which the listener gives up (``None``:
            never). Once it gave up, the backend reports ``failed`` and subscribing raises.
        max_connections: connections of the pool this backend creates for queries (the listener's is
            one more).

    Raises:
        ConfigurationError: an argument has the wrong type or an impossible value, or the URL has an
            unknown option (see :meth:`from_url`).
    """

    name = "postgresql"
    supports_headers = True

    def __init__(
        self,
        url: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        create_schema: bool = True,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_ttl: float | None = None,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        unpublished_ttl: float = DEFAULT_UNPUBLISHED_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        trim_interval: float = DEFAULT_TRIM_INTERVAL,
        reconnect_delay: tuple[float, float] = DEFAULT_RECONNECT_DELAY,
        max_reconnect_attempts: int | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not isinstance(url, str):
            raise ConfigurationError(f"url must be a PostgreSQL URL string, not {type(url).__name__}")
        if urlsplit(url).scheme not in _SCHEMES:
            raise ConfigurationError(
                f"a PostgreSQL URL starts with postgresql:// or postgres://, not {redact_url(url)!r}"
            )
        _check_libpq_options(url)
        self._schema = _check_schema(schema)
        self._schema_name = schema
        if not isinstance(create_schema, bool):
            raise ConfigurationError(f"create_schema must be True or False, not {create_schema!r}")
        self._create_schema = create_schema
        self._history_size = count("history_size", history_size, minimum=0)
        self._history_ttl = optional_seconds("history_ttl", history_ttl)
        self._idempotency_ttl = seconds("idempotency_ttl", idempotency_ttl)
        self._unpublished_ttl = seconds("unpublished_ttl", unpublished_ttl)
        self._timeout = seconds("timeout", timeout)
        self._ping_interval = seconds("ping_interval", ping_interval)
        self._trim_interval = seconds("trim_interval", trim_interval)
        self._reconnect_delay = check_reconnect_delay(reconnect_delay)
        self._max_attempts = optional_count("max_reconnect_attempts", max_reconnect_attempts, minimum=1)
        self._max_connections = count("max_connections", max_connections, minimum=1)
        self._url = url
        self._pool: asyncpg.Pool | None = None
        self._sql = _Statements(self._schema)
        self._state = _State.NEW
        self._listener: BackendListener | None = None
        # The listening connection while it is up; None while reconnecting. One operation at a time on it.
        self._conn: asyncpg.Connection | None = None
        self._conn_lock = asyncio.Lock()
        self._lost: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._restored_event: asyncio.Event | None = None
        # Subscribed channels and the way back from notification channel names.
        self._tails: dict[str, _Tail] = {}
        self._names: dict[str, str] = {}
        # Counters and the last failure, for stats().
        self._reconnects = 0
        self._attempts = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._down_since: float | None = None
        self._publish_errors = 0
        self._received = 0
        self._read_rows = 0
        self._listener_errors = 0
        self._trimmed = 0
        # Trimming by size looks at channels published to since this process's previous pass (minus a
        # margin), and at every channel once every FULL_TRIM_EVERY passes.
        self._trim_since: datetime.datetime | None = None
        self._trim_passes = 0

    def __repr__(self) -> str:
        return f"<PostgresBackend {self._where()} schema={self._schema_name} {self._state.value}>"

    @classmethod
    def from_url(cls, url: str) -> PostgresBackend:
        """Build from a URL; rtbroadcast options may be given in its query.

        ``postgresql://app@db:5432/app?schema=rtb&history_size=500&history_ttl=3600&timeout=2``; the
        libpq options asyncpg reads (``sslmode``, ``application_name``...) are passed on to asyncpg.

        Raises:
            ConfigurationError: an option is unknown (the message suggests the closest known one), given
                twice, or has an invalid value.
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"url must be a PostgreSQL URL string, not {type(url).__name__}")
        parts = urlsplit(url)
        ours: dict[str, Any] = {}
        theirs: list[tuple[str, str]] = []
        seen: set[str] = set()
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in seen:
                raise ConfigurationError(f"PostgreSQL URL option {key!r} is given twice")
            seen.add(key)
            convert = _URL_OPTIONS.get(key)
            if convert is None:
                theirs.append((key, value))
                continue
            try:
                ours[key] = convert(value)
            except ValueError:
                raise ConfigurationError(
                    f"invalid value {value!r} for PostgreSQL URL option {key!r}"
                ) from None
        rest = urlunsplit(parts._replace(query=urlencode(theirs)))
        return cls(rest, **ours)

    # -- naming -------------------------------------------------------------------------------------

    @property
    def schema(self) -> str:
        """The schema of the backend's tables."""
        return self._schema_name

    def notify_channel(self, channel: str) -> str:
        """Return the name ``channel``'s notifications are sent on (for operators, tests)."""
        digest = hashlib.sha1(f"{self._schema_name}\0{channel}".encode(), usedforsecurity=False)
        return f"rtb_{digest.hexdigest()}"

    def _where(self) -> str:
        return redact_url(self._url)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def connect(self, listener: BackendListener) -> None:
        """Open the pool and the listening connection, create the schema if asked, start the tasks.

        Raises:
            StateError: already connected.
            BackendUnavailable: PostgreSQL cannot be reached within the timeout.
            BackendError: PostgreSQL refused to create the schema (say, no permission).
        """
        if self._state not in (_State.NEW, _State.CLOSED):
            raise StateError(
                f"cannot connect a PostgreSQL backend that is {self._state.value}; disconnect() first"
            )
        self._state = _State.CONNECTING
        try:
            async with asyncio.timeout(self._timeout):
                self._pool = await asyncpg.create_pool(
                    self._url, min_size=1, max_size=self._max_connections, timeout=self._timeout
                )
                if self._create_schema:
                    await self._migrate()
                conn = await self._open()
        except BaseException as exc:
            await self._close_pool()
            self._state = _State.CLOSED
            if isinstance(exc, _UNREACHABLE):
                self._note_error(exc)
                raise BackendUnavailable(f"cannot connect to PostgreSQL at {self._where()}: {exc}") from exc
            if isinstance(exc, asyncpg.PostgresError):
                self._note_error(exc)
                raise BackendError(f"PostgreSQL refused to set up the backend's schema: {exc}") from exc
            raise
        self._listener = listener
        self._state = _State.CONNECTED
        self._restored_event = asyncio.Event()
        self._restored_event.set()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._listen(conn), name="rtbroadcast-postgres-listener")
        self._task.add_done_callback(self._listener_done)
        self._trimmer = loop.create_task(self._trim_forever(), name="rtbroadcast-postgres-trimmer")
        logger.debug("connected to PostgreSQL at %s (schema %s)", self._where(), self._schema_name)

    async def _migrate(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            # One process at a time: concurrent CREATE ... IF NOT EXISTS can still collide.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"rtbroadcast:{self._schema_name}"
            )
            await conn.execute(schema_sql(self._schema_name))

    async def disconnect(self) -> None:
        """Stop the listener and the trimmer and close connections. Never raises."""
        if self._state in (_State.NEW, _State.CLOSED):
            return
        self._state = _State.CLOSED
        for task in (self._task, self._trimmer, *(t.reader for t in self._tails.values())):
            if task is not None:
                task.cancel()
        tasks = [t for t in (self._task, self._trimmer) if t is not None]
        tasks += [t.reader for t in self._tails.values() if t.reader is not None]
        self._task = self._trimmer = None
        if tasks:
            await asyncio.wait(tasks)
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn, broken=False)
        self._tails.clear()
        self._names.clear()
        self._listener = None
        if self._restored_event is not None:
            self._restored_event.set()  # wakes subscribers waiting for a reconnect; they see CLOSED
        await self._close_pool()

    async def _close_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                async with asyncio.timeout(self._timeout):
                    await pool.close()
            except Exception as exc:
                logger.debug("closing the PostgreSQL pool failed: %r", exc)
                pool.terminate()

    @property
    def available(self) -> bool:
        """Whether the listening connection is up."""
        return self._state is _State.CONNECTED

    @property
    def failed(self) -> bool:
        """Whether the listener gave up reconnecting (only with ``max_reconnect_attempts``)."""
        return self._state is _State.FAILED

    def stats(self) -> Mapping[str, object]:
        """Return the connection state, reconnect counters and the last error (JSON-serialisable)."""
        down = self._down_since
        return {
            "backend": self.name,
            "server": self._where(),
            "schema": self._schema_name,
            "state": self._state.value,
            "listener": _task_status(self._task),
            "listener_pid": self._conn.get_server_pid() if self._conn is not None else None,
            "subscribed": len(self._tails),
            "received": self._received,
            "read_rows": self._read_rows,
            "reconnects": self._reconnects,
            "reconnect_attempts": self._attempts,
            "outage_seconds": None if down is None else round(time.monotonic() - down, 3),
            "publish_errors": self._publish_errors,
            "listener_errors": self._listener_errors,
            "trimmed": self._trimmed,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
        }

    def _require(self, action: str) -> asyncpg.Pool:
        if self._state in (_State.NEW, _State.CLOSED, _State.CONNECTING) or self._pool is None:
            raise StateError(
                f"cannot {action}: the PostgreSQL backend is not connected; call connect() first"
            )
        return self._pool

    def _note_error(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._last_error_at = time.time()

    def _translate(self, exc: BaseException, action: str) -> BackendError:
        self._note_error(exc)
        if isinstance(exc, TimeoutError):
            return BackendUnavailable(
                f"cannot {action} on PostgreSQL at {self._where()}: no answer within {self._timeout} s"
            )
        if isinstance(exc, _UNREACHABLE):
            detail = str(exc) or type(exc).__name__
            return BackendUnavailable(f"cannot {action} on PostgreSQL at {self._where()}: {detail}")
        if isinstance(
            exc, asyncpg.exceptions.TransactionRollbackError | asyncpg.exceptions.LockNotAvailableError
        ):
            return BackendUnavailable(f"cannot {action} on PostgreSQL right now: {exc}")
        return BackendError(f"PostgreSQL refused to {action}: {exc}")

    async def _fetch(self, query: str, *args: object, action: str, retry: bool = False) -> list[Any]:
        """Run ``query`` on a pooled connection within the timeout, translating errors.

        With ``retry``, a lost connection is retried once (within the same timeout): a pooled connection
        may have died with a server restart that nobody used it through yet. Only reads retry.

        Raises:
            BackendUnavailable: PostgreSQL cannot be reached, or asked to retry (serialization, lock).
            BackendError: PostgreSQL refused the statement for another reason.
        """
        pool = self._require(action)
        try:
            async with asyncio.timeout(self._timeout):
                for attempt in (1, 2):
                    try:
                        async with pool.acquire() as conn:
                            rows: list[Any] = await conn.fetch(query, *args)
                            return rows
                    except (asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.InterfaceError):
                        if not retry or attempt == 2:
                            raise
                raise AssertionError("unreachable")  # pragma: no cover
        except (*_UNREACHABLE, asyncpg.PostgresError) as exc:
            raise self._translate(exc, action) from exc

    # -- publishing and reading ---------------------------------------------------------------------

    def _publish_args(
        self, channel: str, payload: str, idempotency_key: str | None, headers: Mapping[str, str] | None
    ) -> tuple[object, ...]:
        return (
            channel,
            secrets.token_hex(8),
            seq_prefix(payload),
            self.notify_channel(channel),
            idempotency_key,
            self._idempotency_ttl,
            encode_headers(headers) if headers else None,
        )

    async def publish(
        self,
        channel: str,
        payload: str,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Publish in a transaction of its own: lock the channel's row, store the event, NOTIFY.

        A publish that times out after PostgreSQL received it may still have been applied; retry with the
        same ``idempotency_key`` to be sure it is applied once.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: PostgreSQL cannot be reached within the timeout.
            BackendError: PostgreSQL refused the statement.
        """
        args = self._publish_args(channel, payload, idempotency_key, headers)
        try:
            rows = await self._fetch(self._sql.publish, *args, action="publish")
        except BackendError:
            self._publish_errors += 1
            raise
        epoch, seq, data, duplicate = rows[0]
        return Envelope(channel, int(seq), epoch, data, None if duplicate else headers)

    async def publish_in_transaction(
        self,
        transaction: object,
        channel: str,
        payload: str,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Publish inside the caller's open transaction: the event exists if and only if it commits.

        ``transaction`` is an ``asyncpg`` connection inside a transaction (``async with
        conn.transaction():``), or a SQLAlchemy ``AsyncSession`` or ``AsyncConnection`` on PostgreSQL
        (the session's transaction begins if it has not yet). The channel's row stays locked until the
        transaction ends: another transaction publishing on the same channel waits for it, so seq order
        is commit order. Keep such transactions short.

        Errors of the statement are the caller's database errors and are raised as the driver raises them
        (asyncpg's, or SQLAlchemy's): the transaction is then aborted, as after any failed statement.

        Raises:
            ConfigurationError: ``transaction`` is none of these, an asyncpg connection not inside a
                transaction, or a SQLAlchemy session on another database.
        """
        self._require("publish")
        args = self._publish_args(channel, payload, idempotency_key, headers)
        if isinstance(transaction, asyncpg.connection.Connection | asyncpg.pool.PoolConnectionProxy):
            if not transaction.is_in_transaction():
                raise ConfigurationError(
                    "transaction= got an asyncpg connection outside a transaction; publish inside "
                    "'async with connection.transaction():', or call publish() without transaction="
                )
            row = await transaction.fetchrow(self._sql.publish, *args)
            assert row is not None
            epoch, seq, data, duplicate = row[0], row[1], row[2], row[3]
        else:
            epoch, seq, data, duplicate = await _publish_with_sqlalchemy(transaction, self._sql, args)
        return Envelope(channel, int(seq), epoch, data, None if duplicate else headers)

    async def position(self, channel: str) -> StreamPosition:
        """Return the channel's epoch and seq; creates the row (and so the epoch) of a new channel.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: PostgreSQL cannot be reached within the timeout.
        """
        for _ in range(3):
            rows = await self._fetch(
                self._sql.position, channel, self._unpublished_ttl / 2, action="read position", retry=True
            )
            if rows:
                epoch, seq, stale = rows[0]
                if stale:
                    await self._fetch(self._sql.touch, channel, action="read position", retry=True)
                return StreamPosition(epoch, int(seq))
            await self._ensure_channel(channel)
        raise BackendError(f"the row of channel {channel!r} keeps disappearing")  # pragma: no cover

    async def _ensure_channel(self, channel: str) -> None:
        await self._fetch(self._sql.ensure, channel, secrets.token_hex(8), action="read position", retry=True)

    async def history(self, channel: str, since: int, *, limit: int) -> History:
        """Read the position and the envelopes after ``since`` in one statement (one snapshot).

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: PostgreSQL cannot be reached within the timeout.
        """
        for _ in range(3):
            rows = await self._fetch(
                self._sql.history,
                channel,
                max(since, 0),
                max(min(limit, self._history_size), 0),
                self._history_size,
                self._history_ttl,
                action="read history",
                retry=True,
            )
            if rows:
                break
            await self._ensure_channel(channel)
        else:  # pragma: no cover
            raise BackendError(f"the row of channel {channel!r} keeps disappearing")
        epoch, top = rows[0][0], int(rows[0][1])
        envelopes = tuple(
            Envelope(channel, int(r[2]), epoch, r[3], decode_headers(r[4]) if r[4] is not None else None)
            for r in rows
            if r[2] is not None
        )
        missed = top - since
        complete = missed <= 0 or (missed <= limit and len(envelopes) == missed)
        return History(StreamPosition(epoch, top), envelopes, complete)

    # -- subscriptions ------------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """LISTEN for the channel's notifications; returns once PostgreSQL confirmed it.

        While the listener is reconnecting, waits (up to the timeout) for the reconnect to LISTEN.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: no confirmation within the timeout, or the listener gave up.
        """
        self._require("subscribe")
        if self._state is _State.FAILED:
            raise BackendUnavailable(f"the PostgreSQL listener gave up reconnecting: {self._last_error}")
        if channel in self._tails:
            return
        tail = _Tail(self.notify_channel(channel))
        self._tails[channel] = tail
        self._names[tail.notify] = channel
        try:
            async with asyncio.timeout(self._timeout):
                while not tail.ready.is_set():
                    if self._state in (_State.CLOSED, _State.FAILED):
                        raise BackendUnavailable(f"the PostgreSQL listener is {self._state.value}")
                    conn, lost, restored = self._conn, self._lost, self._restored_event
                    assert restored is not None
                    if conn is None or lost is None or self._state is not _State.CONNECTED:
                        # The reconnect LISTENs for every channel in _tails and readies it.
                        await restored.wait()
                        await asyncio.sleep(0)
                        continue
                    try:
                        async with self._conn_lock:
                            await conn.add_listener(tail.notify, self._on_notification)
                    except _UNREACHABLE as exc:
                        # The listener sees the broken connection too; its reconnect LISTENs again.
                        logger.debug("LISTEN for %r failed, waiting for the reconnect: %r", channel, exc)
                        await lost.wait()
                        continue
                    await self._start_tail(channel, tail)
        except TimeoutError:
            self._drop_tail(channel, tail)
            raise BackendUnavailable(
                f"cannot subscribe to {channel!r} on PostgreSQL at {self._where()}: "
                f"not confirmed within {self._timeout} s ({self._last_error or 'no error recorded'})"
            ) from None
        except BaseException:
            self._drop_tail(channel, tail)
            raise

    async def _start_tail(self, channel: str, tail: _Tail) -> None:
        """Read where the channel stands, so that later notifications say what to read from there."""
        position = await self.position(channel)
        if self._tails.get(channel) is not tail:
            return
        if tail.delivered is None or tail.epoch != position.epoch:
            tail.epoch, tail.delivered = position.epoch, position.seq
        tail.ready.set()
        self._wake(channel, tail)

    def _drop_tail(self, channel: str, tail: _Tail) -> None:
        if self._tails.get(channel) is tail:
            del self._tails[channel]
            self._names.pop(tail.notify, None)
        if tail.reader is not None:
            tail.reader.cancel()

    async def unsubscribe(self, channel: str) -> None:
        """UNLISTEN the channel's notifications. Never raises."""
        tail = self._tails.get(channel)
        if tail is None:
            return
        self._drop_tail(channel, tail)
        conn = self._conn
        if conn is None:
            return  # the reconnect LISTENs only what is still wanted
        try:
            async with asyncio.timeout(self._timeout), self._conn_lock:
                await conn.remove_listener(tail.notify, self._on_notification)
        except (*_UNREACHABLE, asyncpg.PostgresError) as exc:
            logger.debug("UNLISTEN for %r failed (the reconnect will not LISTEN again): %r", channel, exc)

    # -- the listener -------------------------------------------------------------------------------

    def _on_notification(self, conn: object, pid: int, name: str, payload: object) -> None:
        channel = self._names.get(name)
        if channel is None:
            return  # unsubscribed while the notification was on its way
        tail = self._tails[channel]
        self._received += 1
        try:
            seq_text, epoch, named = str(payload).split(" ", 2)
            seq = int(seq_text)
        except ValueError:
            self._listener_errors += 1
            logger.error("ignoring a malformed notification on %r: %.80r", name, payload)
            return
        if named != channel:
            return  # another channel whose name hashes alike: not ours
        if epoch != tail.target_epoch:
            tail.target_epoch, tail.target = epoch, seq
        else:
            tail.target = max(tail.target, seq)
        self._wake(channel, tail)

    def _wake(self, channel: str, tail: _Tail) -> None:
        if tail.delivered is None or (tail.reader is not None and not tail.reader.done()):
            return
        if tail.target_epoch is None:
            return
        if tail.target_epoch == tail.epoch and tail.target <= tail.delivered:
            return
        tail.reader = asyncio.get_running_loop().create_task(self._read_tail(channel, tail))

    async def _read_tail(self, channel: str, tail: _Tail) -> None:
        """Read and deliver the rows of ``channel`` the notifications announced, in seq order."""
        failures = 0
        while self._tails.get(channel) is tail and tail.delivered is not None:
            epoch = tail.target_epoch
            if epoch is None:
                return
            if epoch != tail.epoch:
                # A new epoch (the channel's row was recreated): its stream starts again at seq 1.
                tail.epoch, tail.delivered = epoch, 0
            upto = tail.target
            if upto <= tail.delivered:
                return
            try:
                rows = await self._fetch(
                    self._sql.tail, channel, epoch, tail.delivered, upto, FETCH_BATCH,
                    action="read events", retry=True,
                )  # fmt: skip
            except BackendError as exc:
                failures += 1
                delay = min(self._reconnect_delay[1], self._reconnect_delay[0] * 2 ** min(failures, 16))
                logger.warning("cannot read the events of %r (%s); retrying in %.1f s", channel, exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if self._tails.get(channel) is not tail or tail.epoch != epoch:
                continue
            if not rows:
                # Trimmed before this process read them: the cursor sees the gap at the next event, or
                # the broadcaster's position check sees it; either repairs from history or resyncs.
                tail.delivered = max(tail.delivered, upto)
                continue
            listener = self._listener
            for seq, data, headers in rows:
                tail.delivered = int(seq)
                self._read_rows += 1
                if listener is None:
                    continue
                try:
                    listener.on_envelope(
                        Envelope(
                            channel,
                            int(seq),
                            epoch,
                            data,
                            decode_headers(headers) if headers is not None else None,
                        )
                    )
                except Exception:
                    # One failing callback must not take the listener, and every other channel, down.
                    self._listener_errors += 1
                    logger.exception("the backend listener failed in on_envelope() for %r", channel)
            if len(rows) < FETCH_BATCH and tail.delivered < upto:
                tail.delivered = upto  # the rest was trimmed; see above

    async def _open(self) -> asyncpg.Connection:
        """Open the listening connection, outside the pool.

        Raises:
            OSError, TimeoutError, asyncpg errors: PostgreSQL cannot be reached.
        """
        conn: asyncpg.Connection = await asyncpg.connect(self._url, timeout=self._timeout)
        return conn

    async def _listen(self, first: asyncpg.Connection) -> None:
        """Keep a listening connection up, LISTENing for every subscribed channel."""
        conn: asyncpg.Connection | None = first
        reconnected = False
        while True:
            if conn is None:
                conn = await self._reconnect()
            lost = self._lost = asyncio.Event()
            broken = True
            try:
                await self._serve(conn, lost, announce=reconnected)
            except asyncio.CancelledError:
                broken = False
                raise
            except Exception as exc:
                self._note_error(exc)
                if not isinstance(exc, (*_UNREACHABLE, asyncpg.PostgresError, BackendError)):
                    self._listener_errors += 1
                    logger.error("PostgreSQL listener failed unexpectedly; reconnecting", exc_info=exc)
                else:
                    logger.warning(
                        "lost the PostgreSQL listening connection to %s (%s); reconnecting",
                        self._where(),
                        exc,
                    )
            finally:
                # Before anything awaits: subscribe() must see at once that there is no connection.
                self._conn = None
                lost.set()
                if self._state is _State.CONNECTED:
                    self._state = _State.RECONNECTING
                    assert self._restored_event is not None
                    self._restored_event.clear()
                await _close(conn, broken=broken)
            conn = None
            reconnected = True
            if self._down_since is None:
                self._down_since = time.monotonic()

    async def _serve(self, conn: asyncpg.Connection, lost: asyncio.Event, *, announce: bool) -> None:
        """LISTEN for every wanted channel on ``conn``, catch up on them, then watch the connection."""
        conn.add_termination_listener(lambda _conn: lost.set())
        async with asyncio.timeout(self._timeout), self._conn_lock:
            for tail in list(self._tails.values()):
                await conn.add_listener(tail.notify, self._on_notification)
        self._conn = conn
        # Everything is LISTENed for: read each channel's top, so that what was published while nobody
        # listened is read from the table and delivered.
        channels = list(self._tails)
        for channel in channels:
            wanted = self._tails.get(channel)
            if wanted is None:
                continue
            tail = wanted
            position = await self.position(channel)
            if tail.delivered is None:
                tail.epoch, tail.delivered = position.epoch, position.seq
            if tail.target_epoch != position.epoch:
                tail.target_epoch, tail.target = position.epoch, position.seq
            else:
                tail.target = max(tail.target, position.seq)
            tail.ready.set()
            self._wake(channel, tail)
        self._restored(channels, announce)
        while not lost.is_set():
            try:
                async with asyncio.timeout(self._ping_interval):
                    await lost.wait()
            except TimeoutError:
                async with asyncio.timeout(self._ping_interval), self._conn_lock:
                    await conn.fetchval("SELECT 1")
        raise ConnectionResetError("the listening connection was closed")

    def _restored(self, channels: list[str], announce: bool) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CONNECTED
        assert self._restored_event is not None
        self._restored_event.set()
        if not announce:
            return
        self._reconnects += 1
        down, self._down_since = self._down_since, None
        self._attempts = 0
        logger.info(
            "reconnected to PostgreSQL at %s after %.1f s; listening on %d channel(s) again",
            self._where(),
            0.0 if down is None else time.monotonic() - down,
            len(channels),
        )
        listener = self._listener
        wanted = [channel for channel in channels if channel in self._tails]
        if listener is not None and wanted:
            try:
                listener.on_interruption(wanted, RECONNECTED)
            except Exception:
                self._listener_errors += 1
                logger.exception("the backend listener failed in on_interruption()")

    async def _reconnect(self) -> asyncpg.Connection:
        """Open a new connection, waiting with capped exponential backoff and jitter between attempts.

        Raises:
            _ListenerGaveUp: ``max_reconnect_attempts`` failed in a row.
        """
        while True:
            await asyncio.sleep(reconnect_pause(_JITTER, self._attempts, self._reconnect_delay))
            self._attempts += 1
            try:
                return await self._open()
            except Exception as exc:
                self._note_error(exc)
                logger.debug("PostgreSQL reconnect attempt %d failed: %r", self._attempts, exc)
                if self._attempts in (1, 10) or self._attempts % 100 == 0:
                    logger.warning(
                        "cannot reach PostgreSQL at %s (attempt %d): %s", self._where(), self._attempts, exc
                    )
                if self._max_attempts is not None and self._attempts >= self._max_attempts:
                    raise _ListenerGaveUp(self._attempts) from exc

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._state is _State.CLOSED:
            return
        exc = task.exception()
        self._state = _State.FAILED
        self._conn = None
        if self._restored_event is not None:
            self._restored_event.set()
        if exc is not None:
            self._note_error(exc.__cause__ or exc)
        logger.error(
            "the PostgreSQL listener stopped after %d failed reconnect attempt(s); channels get no events "
            "until the broadcaster is restarted. Last error: %s",
            self._attempts,
            self._last_error,
            exc_info=exc if not isinstance(exc, _ListenerGaveUp) else None,
        )
        listener = self._listener
        if listener is not None and self._tails:
            try:
                listener.on_interruption(list(self._tails), "backend_failed")
            except Exception:
                logger.exception("the backend listener failed in on_interruption()")

    # -- trimming -----------------------------------------------------------------------------------

    async def _trim_forever(self) -> None:
        while True:
            await asyncio.sleep(self._trim_interval * _JITTER.uniform(0.8, 1.2))
            try:
                self._trimmed += await self.trim()
            except BackendError as exc:
                logger.debug(
                    "trimming the history failed (next pass in %.1f s): %s", self._trim_interval, exc
                )

    async def trim(self) -> int:
        """Delete events past ``history_size`` or ``history_ttl``, expired idempotency keys and unpublished
        channels; return how many rows went. Runs every ``trim_interval`` by itself.

        Events younger than :data:`DELIVERY_GRACE` seconds stay whatever the size, so that every listener
        can read them after their notification. One process trims at a time (the others skip their pass),
        and no statement waits for a publisher's lock.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: PostgreSQL cannot be reached within the timeout.
        """
        pool = self._require("trim history")
        total = 0
        try:
            async with asyncio.timeout(self._timeout * 4), pool.acquire() as conn:
                if not await conn.fetchval(self._sql.trim_lock, f"rtbroadcast-trim:{self._schema_name}"):
                    return 0
                try:
                    started: datetime.datetime = await conn.fetchval("SELECT clock_timestamp()")
                    since = self._trim_since if self._trim_passes % FULL_TRIM_EVERY else None
                    ttl = self._history_ttl
                    # Age first, by the index; then what is past the size (or of an old epoch).
                    statements: list[tuple[str, tuple[object, ...]]] = [
                        (self._sql.trim_size, (self._history_size, DELIVERY_GRACE, TRIM_BATCH, since)),
                        (self._sql.trim_keys, (self._idempotency_ttl, TRIM_BATCH)),
                        (self._sql.trim_channels, (self._unpublished_ttl, TRIM_BATCH)),
                    ]
                    if ttl is not None:
                        statements.insert(0, (self._sql.trim_age, (max(ttl, DELIVERY_GRACE), TRIM_BATCH)))
                    for statement, args in statements:
                        for _ in range(100):  # bounded: the next pass goes on
                            status = await conn.execute(statement, *args)
                            deleted = int(status.rsplit(" ", 1)[-1])
                            total += deleted
                            if deleted < TRIM_BATCH:
                                break
                    # A publish touched its channel inside its transaction, maybe well before it
                    # committed; rows younger than the grace stayed: both are looked at again next time.
                    self._trim_since = started - datetime.timedelta(seconds=DELIVERY_GRACE + TRIM_MARGIN)
                    self._trim_passes += 1
                finally:
                    await conn.fetchval(self._sql.trim_unlock, f"rtbroadcast-trim:{self._schema_name}")
        except (*_UNREACHABLE, asyncpg.PostgresError) as exc:
            raise self._translate(exc, "trim history") from exc
        return total


class _Statements:
    """The SQL of one schema, built once."""

    def __init__(self, s: str) -> None:
        self.publish = f"SELECT * FROM {s}.publish($1, $2, $3, $4, $5, $6, $7::text)"
        self.position = (
            f"SELECT epoch, seq, (seq = 0 AND touched_at < clock_timestamp() - make_interval(secs => $2))"
            f" FROM {s}.channels WHERE channel = $1"
        )
        self.touch = f"UPDATE {s}.channels SET touched_at = clock_timestamp() WHERE channel = $1 AND seq = 0"
        self.ensure = (
            f"INSERT INTO {s}.channels (channel, epoch, seq) VALUES ($1, $2, 0)"
            " ON CONFLICT (channel) DO NOTHING"
        )
        # $2 since, $3 limit, $4 history size, $5 history ttl (NULL: none)
        self.history = f"""
            SELECT c.epoch, c.seq, e.seq, e.data, e.headers FROM {s}.channels c
            LEFT JOIN LATERAL (
                SELECT e.seq, e.data, e.headers FROM {s}.events e
                WHERE e.channel = c.channel AND e.epoch = c.epoch AND e.seq > $2 AND e.seq <= c.seq
                  AND e.seq > c.seq - $4
                  AND ($5::float8 IS NULL OR e.created_at >= clock_timestamp() - make_interval(secs => $5))
                ORDER BY e.seq LIMIT $3
            ) e ON true
            WHERE c.channel = $1 ORDER BY e.seq"""
        self.tail = (
            f"SELECT seq, data, headers FROM {s}.events"
            " WHERE channel = $1 AND epoch = $2 AND seq > $3 AND seq <= $4"
            " ORDER BY seq LIMIT $5"
        )
        self.trim_lock = "SELECT pg_try_advisory_lock(hashtext($1))"
        self.trim_unlock = "SELECT pg_advisory_unlock(hashtext($1))"
        self.trim_age = f"""
            DELETE FROM {s}.events WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM {s}.events
                WHERE created_at < clock_timestamp() - make_interval(secs => $1) LIMIT $2))"""
        self.trim_size = f"""
            DELETE FROM {s}.events WHERE ctid = ANY(ARRAY(
                SELECT e.ctid FROM {s}.events e JOIN {s}.channels c ON c.channel = e.channel
                WHERE (e.epoch <> c.epoch OR e.seq <= c.seq - $1)
                  AND e.created_at < clock_timestamp() - make_interval(secs => $2)
                  AND ($4::timestamptz IS NULL OR c.touched_at >= $4) LIMIT $3))"""
        self.trim_keys = f"""
            DELETE FROM {s}.idempotency_keys WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM {s}.idempotency_keys
                WHERE created_at < clock_timestamp() - make_interval(secs => $1) LIMIT $2))"""
        # A channel row is deleted only if nobody holds it (SKIP LOCKED): a publish never waits for this.
        self.trim_channels = f"""
            DELETE FROM {s}.channels WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM {s}.channels
                WHERE seq = 0 AND touched_at < clock_timestamp() - make_interval(secs => $1)
                LIMIT $2 FOR UPDATE SKIP LOCKED))"""


async def _publish_with_sqlalchemy(
    transaction: object, sql: _Statements, args: tuple[object, ...]
) -> tuple[str, int, str, bool]:
    """Run the publish through a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``, in its transaction.

    Raises:
        ConfigurationError: ``transaction`` is neither, or is not on PostgreSQL.
    """
    what = f"{type(transaction).__module__}.{type(transaction).__qualname__}"
    if not type(transaction).__module__.startswith("sqlalchemy"):
        raise ConfigurationError(
            "transaction= takes an asyncpg connection inside a transaction, or a SQLAlchemy AsyncSession "
            f"or AsyncConnection on PostgreSQL, not {what}"
        )
    from sqlalchemy import text  # only when the caller uses SQLAlchemy
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if not isinstance(transaction, AsyncSession | AsyncConnection):
        raise ConfigurationError(
            f"transaction= takes a SQLAlchemy AsyncSession or AsyncConnection, not {what}"
        )
    bind = transaction.get_bind() if isinstance(transaction, AsyncSession) else transaction
    dialect = bind.dialect.name
    if dialect != "postgresql":
        raise ConfigurationError(
            f"transaction= needs a session on the PostgreSQL database of the postgresql:// backend, not on "
            f"{dialect}"
        )
    names = ("channel", "epoch", "head", "notify", "key", "key_ttl", "headers")
    statement = text(
        sql.publish.replace("$1", ":channel").replace("$2", ":epoch").replace("$3", ":head")
        .replace("$4", ":notify").replace("$5", ":key").replace("$6", ":key_ttl")
        .replace("$7::text", "CAST(:headers AS text)")
    )  # fmt: skip
    result = await transaction.execute(statement, dict(zip(names, args, strict=True)))
    row = result.one()
    return row[0], int(row[1]), row[2], bool(row[3])


async def _close(conn: asyncpg.Connection, *, broken: bool) -> None:
    if broken:
        conn.terminate()
        return
    try:
        async with asyncio.timeout(1.0):
            await conn.close()
    except Exception as exc:
        logger.debug("closing the PostgreSQL listening connection failed: %r", exc)
        conn.terminate()


def _task_status(task: asyncio.Task[None] | None) -> str:
    if task is None:
        return "stopped"
    if not task.done():
        return "running"
    return "failed" if not task.cancelled() and task.exception() is not None else "stopped"


# -- URL options ----------------------------------------------------------------------------------------

_SCHEMES: Final = frozenset({"postgresql", "postgres"})


def _seconds_or_none(value: str) -> float | None:
    return None if value.strip().lower() in ("", "none", "0") else float(value)


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


#: rtbroadcast's own options, with their conversion from text; PostgresBackend() checks the values.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "schema": str,
    "create_schema": _flag,
    "history_size": int,
    "history_ttl": _seconds_or_none,
    "idempotency_ttl": float,
    "unpublished_ttl": float,
    "timeout": float,
    "ping_interval": float,
    "trim_interval": float,
    "max_reconnect_attempts": int,
    "max_connections": int,
}

#: The libpq options asyncpg reads from a URL's query; asyncpg sends any other as a server setting,
#: and these are the settings a URL may sensibly carry.
_LIBPQ_OPTIONS: Final = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "passfile",
        "dbname",
        "database",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "service",
        "application_name",
        "search_path",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
    }
)


def _check_libpq_options(url: str) -> None:
    """Refuse options in ``url``'s query that neither rtbroadcast nor asyncpg knows.

    Raises:
        ConfigurationError: naming the option, with the closest known one.
    """
    for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key in _URL_OPTIONS:
            raise ConfigurationError(
                f"URL option {key!r} is read by PostgresBackend.from_url() (or Broadcaster(url)); "
                "pass it as an argument to PostgresBackend() instead"
            )
        if key not in _LIBPQ_OPTIONS:
            known = set(_URL_OPTIONS) | _LIBPQ_OPTIONS
            raise ConfigurationError(
                f"unknown PostgreSQL URL option {key!r}{did_you_mean(key, known)}; rtbroadcast's options: "
                f"{', '.join(sorted(_URL_OPTIONS))}; asyncpg's: {', '.join(sorted(_LIBPQ_OPTIONS))}"
            )
