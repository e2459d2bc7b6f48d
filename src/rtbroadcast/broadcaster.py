"""The :class:`Broadcaster`: publish events, and keep every subscriber of a channel in order."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from . import _config
from .backends import Backend, Envelope, History, load_backend
from .connection import DEFAULT_LIMITS, Connection, QueueLimits, item_text
from .cursor import Cursor
from .errors import (
    BackendUnavailable,
    ConfigurationError,
    InvalidEvent,
    StateError,
    SubscriptionClosed,
)
from .events import Event, decode_event, encode_event
from .protocol import (
    CloseCode,
    ResumePoint,
    ResyncRequired,
    Welcome,
    check_event_payload,
    decode_server_frame,
    encode_server_frame,
    is_valid_channel,
    resync_reason,
    validate_channel,
)
from .registry import ConnectionRegistry

# is_valid_channel and validate_channel are re-exported: they lived here before the wire rules moved to the
# protocol module.
__all__ = [
    "Broadcaster",
    "BroadcasterState",
    "Received",
    "Subscription",
    "is_valid_channel",
    "validate_channel",
]

logger = logging.getLogger("rtbroadcast")

E = TypeVar("E", bound=Event)

#: Most events a resume or gap repair reads from history; beyond it the client resyncs.
DEFAULT_MAX_RESUME = 1000


class BroadcasterState(enum.Enum):
    """Lifecycle of a :class:`Broadcaster`: NEW -> CONNECTING -> CONNECTED -> DISCONNECTING -> CLOSED.

    ``FAILED`` replaces ``CONNECTED`` when the backend gave up for good (see :attr:`Backend.failed`):
    publishes and new subscriptions fail until :meth:`Broadcaster.disconnect` and a new connect.
    ``DRAINING`` sits between ``CONNECTED`` and ``DISCONNECTING`` after :meth:`Broadcaster.drain` (ahead
    of a shutdown): every connection has been closed with ``1001``; publishing still works, new
    connections are refused.
    """

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    FAILED = "failed"
    DRAINING = "draining"
    DISCONNECTING = "disconnecting"
    CLOSED = "closed"


class Broadcaster:
    """Publish events to channels and fan them out to every subscriber, in order.

    Args:
        url: backend URL, ``memory://`` (the default) or ``redis://host:port/db``.
        backend: a backend instance, instead of ``url``.
        queue_limits: bounds of each connection's outbound queue.
        heartbeat_interval: seconds between heartbeats, announced to clients in the welcome frame.
        max_resume: most events a resume may replay from history; past it the client resyncs.
        max_connections: connections allowed in this process (``None``: unlimited).
        max_connections_per_channel: connections allowed on one channel (``None``: unlimited).
        position_check_interval: seconds between checks of every subscribed channel's stream top against
            what its connections have received, catching a lost last message that no later event would
            reveal as a gap (``None`` disables the check).

    Raises:
        ConfigurationError: an option has the wrong type or an impossible value (a zero, negative, ``NaN``
            or infinite interval; a negative ``max_resume``; a connection limit below 1), or the URL is
            wrong (see :func:`~rtbroadcast.backends.load_backend`). The message names the option.

    Use it as an async context manager, or call :meth:`connect` and :meth:`disconnect`::

        async with Broadcaster("memory://") as broadcaster:
            seq = await broadcaster.publish("room:1", MyEvent(...))
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        backend: Backend | None = None,
        queue_limits: QueueLimits = DEFAULT_LIMITS,
        heartbeat_interval: float = 25.0,
        max_resume: int = DEFAULT_MAX_RESUME,
        max_connections: int | None = None,
        max_connections_per_channel: int | None = None,
        position_check_interval: float | None = 10.0,
    ) -> None:
        if url is not None and backend is not None:
            raise ConfigurationError("pass either a backend URL or a backend instance, not both")
        if url is not None and not isinstance(url, str):
            raise ConfigurationError(f"url must be a backend URL string, not {type(url).__name__}")
        if url is not None and not url.strip():
            # An unset environment variable, most likely: falling back to memory:// would split a
            # multi-process service into processes that never see each other's events.
            raise ConfigurationError(
                "url must be a backend URL, not an empty string; leave it out (or None) for memory://"
            )
        if backend is not None and not isinstance(backend, Backend):
            raise ConfigurationError(
                f"backend must be a Backend instance, not {type(backend).__name__}"
                + ("; pass a URL as url= (the first argument)" if isinstance(backend, str) else "")
            )
        if not isinstance(queue_limits, QueueLimits):
            raise ConfigurationError(
                f"queue_limits must be a QueueLimits(max_messages=..., max_size=...), "
                f"not {type(queue_limits).__name__}"
            )
        self.heartbeat_interval = _config.seconds("heartbeat_interval", heartbeat_interval)
        self.max_resume = _config.count("max_resume", max_resume, minimum=0)
        self.position_check_interval = _config.optional_seconds(
            "position_check_interval", position_check_interval
        )
        self.backend: Backend = backend if backend is not None else load_backend(url or "memory://")
        self.queue_limits = queue_limits
        self.registry = ConnectionRegistry(
            max_connections=max_connections, max_connections_per_channel=max_connections_per_channel
        )
        self._state = BroadcasterState.NEW
        self._subscribed: set[str] = set()
        self._channel_locks: dict[str, asyncio.Lock] = {}
        self._history_reads: dict[tuple[str, int], asyncio.Future[History]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serving = 0
        self._drained: asyncio.Future[None] | None = None
        self._published = 0
        self._interruptions = 0
        self._repairs = 0
        self._lost_detected = 0
        self._resyncs = 0

    def __repr__(self) -> str:
        return f"<Broadcaster {self.backend.name} {self._state.value}>"

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def state(self) -> BroadcasterState:
        """The lifecycle state (``FAILED`` while connected to a backend that gave up)."""
        if self._state is BroadcasterState.CONNECTED and self.backend.failed:
            return BroadcasterState.FAILED
        return self._state

    async def connect(self) -> None:
        """Connect the backend; after this, :meth:`publish` and subscriptions work.

        Raises:
            StateError: the broadcaster is already connected or connecting.
            BackendUnavailable: the backend cannot be reached (the state returns to what it was).
        """
        if self._state not in (BroadcasterState.NEW, BroadcasterState.CLOSED):
            raise StateError(
                f"cannot connect a broadcaster that is {self._state.value}; "
                "connect() once, then disconnect() before connecting again"
            )
        previous, self._state = self._state, BroadcasterState.CONNECTING
        try:
            await self.backend.connect(self)
        except BaseException:
            self._state = previous
            raise
        self._state = BroadcasterState.CONNECTED
        if self.position_check_interval is not None:
            self._spawn(self._check_positions_forever(self.position_check_interval))
        logger.debug("broadcaster connected to %s backend", self.backend.name)

    # The timeout bounds the wait for the clients, after which draining still completes: not a deadline
    # for the call that asyncio.timeout() around it could express.
    async def drain(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Close every connection with ``1001`` ahead of a shutdown, and wait for the transports to finish.

        Run it when the process is told to stop and before the ASGI server closes its connections itself
        (the lifespan helper does, on SIGTERM or SIGINT): every WebSocket client then gets ``1001`` and
        every Server-Sent Events stream ends with a ``retry:`` line, so that clients reconnect, to the next
        process, and resume. Publishing keeps working, for requests still in flight; new connections are
        refused (WebSocket ``1001``, SSE ``503``). :meth:`disconnect` follows as usual.

        Args:
            timeout: how long to wait, in seconds, for the endpoints' handlers (see :meth:`serving`) to
                end: a WebSocket's closing handshake, an SSE stream's last write. Clients that do not
                answer in time are left to the server.

        Calling it on a broadcaster that is not connected does nothing.
        """
        if self._state is not BroadcasterState.CONNECTED:
            return
        self._state = BroadcasterState.DRAINING
        connections = list(self.registry)
        for connection in connections:
            connection.close(CloseCode.GOING_AWAY, "server shutting down")
        if self._serving:
            drained = self._drained = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await drained
            except TimeoutError:
                logger.info("drain: %d connection(s) still open after %.1f s", self._serving, timeout)
            finally:
                self._drained = None
        logger.debug("drained %d connection(s)", len(connections))

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Count a transport's handler (one WebSocket or SSE request) while it runs, for :meth:`drain`.

        For ASGI adapters: :class:`~rtbroadcast.asgi.BroadcastEndpoint` wraps every request in it.
        """
        self._serving += 1
        try:
            yield
        finally:
            self._serving -= 1
            drained = self._drained
            if not self._serving and drained is not None and not drained.done():
                drained.set_result(None)

    async def disconnect(self) -> None:
        """Close every connection (code 1001), stop background work and disconnect the backend.

        Calling it on a broadcaster that is not connected (or draining) does nothing.
        """
        if self._state not in (BroadcasterState.CONNECTED, BroadcasterState.DRAINING):
            return
        self._state = BroadcasterState.DISCONNECTING
        try:
            for connection in list(self.registry):
                connection.close(CloseCode.GOING_AWAY, "server shutting down")
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._subscribed.clear()
            self._channel_locks.clear()
            await self.backend.disconnect()
        finally:
            self._state = BroadcasterState.CLOSED

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    def _require_connected(self, action: str, *, draining: bool = False) -> None:
        """Raise :class:`StateError` unless connected (or draining, where ``draining`` allows it)."""
        if self._state is BroadcasterState.DRAINING and not draining:
            raise StateError(f"cannot {action}: the broadcaster is draining ahead of a shutdown")
        if self._state not in (BroadcasterState.CONNECTED, BroadcasterState.DRAINING):
            raise StateError(
                f"cannot {action}: the broadcaster is {self._state.value}; "
                "use 'async with broadcaster:' or 'await broadcaster.connect()' first"
            )

    # -- publishing -------------------------------------------------------------------------------

    async def publish(
        self, channel: str, event: Event, *, idempotency_key: str | None = None, transaction: Any = None
    ) -> int:
        """Publish ``event`` on ``channel`` and return the ``seq`` the backend assigned to it.

        The event is serialised once; every subscriber receives the same text plus ``"seq"``. With an
        ``idempotency_key`` already used recently on this channel, nothing is published again and the first
        publish's seq is returned.

        With ``transaction`` (PostgreSQL backend only: an asyncpg connection inside a transaction, or a
        SQLAlchemy ``AsyncSession`` / ``AsyncConnection``), the event is stored in that transaction and
        sent if and only if it commits, in commit order; the seq returned is the event's once it commits.
        See :meth:`~rtbroadcast.backends.Backend.publish_in_transaction`.

        Raises:
            StateError: the broadcaster is not connected.
            InvalidEvent: ``event`` is not an instance of an :class:`Event` subclass that declares its
                ``type`` (see :func:`~rtbroadcast.events.encode_event`).
            ConfigurationError: ``channel`` is not a valid channel name, ``idempotency_key`` is not a
                non-empty string, or ``transaction`` is given to a backend that cannot publish inside
                one (memory, Redis) or is not a transaction the backend can use.
            BackendUnavailable: the backend cannot be reached; the event was not published (or, if the
                backend timed out mid-request, may have been: retry with the same ``idempotency_key``).
        """
        self._require_connected("publish", draining=True)
        validate_channel(channel)
        return await self._publish(channel, encode_event(event), idempotency_key, transaction)

    async def publish_json(
        self, channel: str, payload: str, *, idempotency_key: str | None = None, transaction: Any = None
    ) -> int:
        """Publish ``payload``, the text of a JSON object with a string ``type``, as it is.

        For events that are already serialised (an outbox row, a relay); ``transaction`` as for
        :meth:`publish`. The text is sent as it is, once checked: a JSON object with a non-empty string
        ``type`` that the protocol does not reserve, without ``seq`` (the server adds it), without a key
        given twice and without ``NaN`` or ``Infinity``.

        Raises:
            StateError: the broadcaster is not connected.
            InvalidEvent: ``payload`` breaks one of these rules (see
                :func:`~rtbroadcast.protocol.check_event_payload`); the message says which.
            ConfigurationError: ``channel`` is not a valid channel name, or ``idempotency_key`` is not a
                non-empty string.
            BackendUnavailable: the backend cannot be reached; the event was not published (or, if the
                backend timed out mid-request, may have been: retry with the same ``idempotency_key``).
        """
        self._require_connected("publish", draining=True)
        validate_channel(channel)
        return await self._publish(channel, check_event_payload(payload), idempotency_key, transaction)

    async def _publish(self, channel: str, text: str, idempotency_key: str | None, transaction: Any) -> int:
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key):
            raise ConfigurationError(
                f"idempotency_key must be a non-empty string or None, not {idempotency_key!r}"
            )
        if transaction is not None:
            envelope = await self.backend.publish_in_transaction(
                transaction, channel, text, idempotency_key=idempotency_key
            )
        else:
            envelope = await self.backend.publish(channel, text, idempotency_key=idempotency_key)
        self._published += 1
        return envelope.seq

    # -- backend listener -------------------------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """Fan an envelope out to this process's connections of its channel (called by the backend).

        Each cursor of the channel queues the same envelope (encoded once) on its connection.
        """
        for cursor in self.registry.cursors(envelope.channel):
            cursor.push(envelope)

    def on_interruption(self, channels: Collection[str], reason: str) -> None:
        """Bring every connection of ``channels`` up to date after the backend may have lost envelopes."""
        self._interruptions += 1
        logger.warning(
            "backend interruption (%s): checking %d channel(s) for missed events", reason, len(channels)
        )
        for channel in channels:
            for cursor in self.registry.cursors(channel):
                if not cursor.connection.closed and not cursor.buffering:
                    self._schedule_repair(cursor)

    # -- connections ------------------------------------------------------------------------------

    async def attach(self, connection: Connection, resume: ResumePoint | None = None) -> None:
        """Register ``connection`` and queue its welcome frame, its missed events, then live ones.

        With ``resume``, the events after ``resume.seq`` are replayed from history when possible; otherwise
        a ``resync_required`` frame follows the welcome. Live events published meanwhile are held back and
        merged by seq, so nothing is missed or doubled.

        Raises:
            StateError: the broadcaster is not connected, or is draining.
            ConnectionLimitReached: a connection limit would be passed.
            BackendUnavailable: the backend cannot be reached (the connection is not registered).
        """
        self._require_connected("attach a connection")
        cursor = connection.cursor
        validate_channel(cursor.channel)
        cursor.begin_buffering()
        self.registry.add(connection)
        connection.add_close_callback(self.detach)
        cursor.set_gap_handler(self._on_gap)
        try:
            await self._ensure_subscribed(cursor.channel)
            await self._bring_up_to_date(cursor, resume, welcome=True)
        except BaseException:
            self.detach(connection)
            raise

    def detach(self, connection: Connection) -> None:
        """Unregister ``connection``; a channel's backend subscription ends with its last connection."""
        for cursor in connection.cursors:
            cursor.set_gap_handler(None)
        emptied = self.registry.remove(connection)
        if self._state is BroadcasterState.CONNECTED:
            for channel in emptied:
                self._spawn(self._release(channel))

    def connection_count(self, channel: str | None = None) -> int:
        """Return how many connections this process has, on ``channel`` or in all."""
        return self.registry.count(channel)

    async def _ensure_subscribed(self, channel: str) -> None:
        async with self._lock(channel):
            if channel not in self._subscribed:
                await self.backend.subscribe(channel)
                self._subscribed.add(channel)

    async def _release(self, channel: str) -> None:
        async with self._lock(channel):
            if channel in self._subscribed and not self.registry.count(channel):
                self._subscribed.discard(channel)
                await self.backend.unsubscribe(channel)
        if not self.registry.count(channel):
            self._channel_locks.pop(channel, None)

    def _lock(self, channel: str) -> asyncio.Lock:
        lock = self._channel_locks.get(channel)
        if lock is None:
            lock = self._channel_locks[channel] = asyncio.Lock()
        return lock

    def _on_gap(self, cursor: Cursor, envelope: Envelope) -> None:
        logger.debug(
            "gap on %r: connection #%d at %s/%d got %s/%d",
            cursor.channel,
            cursor.connection.id,
            cursor.epoch,
            cursor.last_seq,
            envelope.epoch,
            envelope.seq,
        )
        self._schedule_repair(cursor)

    def _schedule_repair(self, cursor: Cursor) -> None:
        """Hold the cursor's live envelopes back and bring it up to date from history."""
        cursor.begin_buffering()
        self._spawn(self._repair(cursor))

    async def _repair(self, cursor: Cursor) -> None:
        self._repairs += 1
        try:
            await self._bring_up_to_date(cursor, ResumePoint(cursor.epoch, cursor.last_seq), welcome=False)
        except BackendUnavailable as exc:
            connection = cursor.connection
            logger.warning("cannot repair connection #%d on %r: %s", connection.id, cursor.channel, exc)
            connection.close(CloseCode.INTERNAL_ERROR, "backend unavailable; reconnect and resume")

    async def _bring_up_to_date(self, cursor: Cursor, resume: ResumePoint | None, *, welcome: bool) -> None:
        """Queue what ``cursor`` missed since ``resume`` (buffering live envelopes meanwhile).

        The I/O half of a resume: the decision is :func:`~rtbroadcast.protocol.resync_reason`'s.
        """
        channel = cursor.channel
        connection = cursor.connection
        if resume is None:
            position = await self.backend.position(channel)
            cursor.set_position(position.epoch, position.seq)
            if welcome:
                connection.push_frame(self._welcome(channel, position.epoch, position.seq, False))
            cursor.end_buffering()
            return
        history = await self._history(channel, resume.seq)
        position = history.position
        missed = history.envelopes
        # Missed events are queued at once, before anything is written: more than the queue holds would
        # close the connection as a slow consumer on every reconnect, so the client resyncs instead.
        fits = connection.has_room(len(missed) + 1, sum(len(envelope.data) for envelope in missed))
        reason = resync_reason(resume, position.epoch, position.seq, complete=history.complete, fits=fits)
        if reason is None:
            if welcome:
                connection.push_frame(self._welcome(channel, resume.epoch, resume.seq, True))
            cursor.set_position(resume.epoch, resume.seq)
            for envelope in missed:
                cursor.deliver_history(envelope)
        else:
            self._resyncs += 1
            if welcome:
                connection.push_frame(self._welcome(channel, position.epoch, position.seq, False))
            connection.push_frame(encode_server_frame(ResyncRequired(reason, position.epoch, position.seq)))
            cursor.set_position(position.epoch, position.seq)
        cursor.end_buffering()

    async def _check_positions_forever(self, interval: float) -> None:
        # A connection still behind the stream top at the same seq one interval later did not merely race
        # an in-flight publish: its event was lost on the way (a PUB/SUB message dropped during a
        # reconnect, say). Bring it up to date from history like any other gap.
        behind: dict[int, tuple[str, int]] = {}
        while True:
            await asyncio.sleep(interval)
            try:
                behind = await self.check_positions(behind)
            except Exception:
                logger.exception("position check failed; retrying in %.1f s", interval)

    async def check_positions(self, behind: dict[int, tuple[str, int]]) -> dict[int, tuple[str, int]]:
        """Compare each subscribed channel's top with its connections; repair those behind twice running.

        ``behind`` maps connection ids to the position they were behind at in the previous check; the
        result is the same for this check. Runs by itself every ``position_check_interval`` seconds.
        """
        still_behind: dict[int, tuple[str, int]] = {}
        for channel in list(self._subscribed):
            try:
                top = await self.backend.position(channel)
            except BackendUnavailable:
                continue
            for cursor in self.registry.cursors(channel):
                connection = cursor.connection
                if connection.closed or cursor.buffering:
                    continue
                if cursor.epoch == top.epoch and cursor.last_seq >= top.seq:
                    continue
                here = (cursor.epoch, cursor.last_seq)
                if behind.get(connection.id) == here:
                    self._lost_detected += 1
                    self._schedule_repair(cursor)
                else:
                    still_behind[connection.id] = here
        return still_behind

    async def _history(self, channel: str, since: int) -> History:
        """Read history once for every connection that needs the same range at the same time.

        After a backend interruption every connection of a channel is repaired at once, and they mostly
        stand at the same seq: one read serves them all instead of one per connection.
        """
        key = (channel, since)
        shared = self._history_reads.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self.backend.history(channel, since, limit=self.max_resume))
            self._history_reads[key] = shared
            shared.add_done_callback(lambda done: self._history_read_done(key, done))
        return await asyncio.shield(shared)

    def _history_read_done(self, key: tuple[str, int], done: asyncio.Future[History]) -> None:
        if self._history_reads.get(key) is done:
            del self._history_reads[key]
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have been cancelled meanwhile

    def _welcome(self, channel: str, epoch: str, seq: int, resumed: bool) -> str:
        return encode_server_frame(Welcome(channel, epoch, seq, self.heartbeat_interval, resumed))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("broadcaster background task failed", exc_info=task.exception())

    # -- in-process subscriptions -----------------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        *,
        resume: ResumePoint | None = None,
        model: type[E] = Event,  # type: ignore[assignment]
    ) -> Subscription[E]:
        """Subscribe this process to ``channel``: ``async with broadcaster.subscribe(ch) as sub:``.

        Iterating the subscription yields a :class:`Received` per event, in seq order, and a
        :class:`~rtbroadcast.protocol.ResyncRequired` where events could not be replayed. Events decode into
        their registered models; ``model`` is the class every event on the channel is expected to be.

        Raises:
            ConfigurationError: ``channel`` is not a valid channel name, ``resume`` is not a
                :class:`~rtbroadcast.ResumePoint` or ``None``, or ``model`` is not :class:`Event` or a
                subclass of it.
        """
        validate_channel(channel)
        if resume is not None and not isinstance(resume, ResumePoint):
            raise ConfigurationError(
                f"resume must be a ResumePoint(epoch, seq) or None, not {type(resume).__name__}; "
                "pass subscription.position from an earlier subscription"
            )
        if not (isinstance(model, type) and issubclass(model, Event)):
            raise ConfigurationError(f"model must be Event or a subclass of it, not {model!r}")
        return Subscription(self, channel, resume=resume, model=model)

    # -- stats ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Return counters for health endpoints (JSON-serialisable)."""
        return {
            "state": self.state.value,
            "backend": dict(self.backend.stats()),
            "backend_available": self.backend.available,
            "published": self._published,
            "interruptions": self._interruptions,
            "repairs": self._repairs,
            "lost_detected": self._lost_detected,
            "resyncs": self._resyncs,
            **self.registry.stats().as_dict(),
        }


@dataclass(frozen=True, slots=True)
class Received(Generic[E]):
    """An event received by an in-process subscription, with its place in the stream."""

    channel: str
    seq: int
    event: E


class Subscription(Generic[E]):
    """An in-process subscription to one channel, with the same order and resume guarantees as a socket.

    Created by :meth:`Broadcaster.subscribe`; enter it with ``async with``, then iterate.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        channel: str,
        *,
        resume: ResumePoint | None,
        model: type[E],
    ) -> None:
        self._broadcaster = broadcaster
        self._resume = resume
        self._model = model
        self.connection = Connection(channel, limits=broadcaster.queue_limits)
        self.welcome: Welcome | None = None

    @property
    def channel(self) -> str:
        """The channel subscribed to."""
        return self.connection.channel

    @property
    def position(self) -> ResumePoint:
        """The stream position reached so far; pass it as ``resume`` to continue later."""
        cursor = self.connection.cursor
        return ResumePoint(cursor.epoch, cursor.last_seq)

    async def __aenter__(self) -> Self:
        await self._broadcaster.attach(self.connection, self._resume)
        first = self.connection.get_nowait()
        if first is not None:
            frame = decode_server_frame(item_text(first))
            if isinstance(frame, Welcome):
                self.welcome = frame
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.connection.close(CloseCode.NORMAL, "unsubscribed")

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received[E] | ResyncRequired:
        """Return the next event, or a resync notice.

        Raises:
            SubscriptionClosed: the subscription fell behind its queue bound or the broadcaster shut down.
            InvalidEvent: an event does not decode into ``model``.
        """
        item = await self.connection.get()
        if item is None:
            code = self.connection.close_code
            if code == CloseCode.NORMAL:
                raise StopAsyncIteration
            reason = "slow_consumer" if code == CloseCode.SLOW_CONSUMER else "shutdown"
            raise SubscriptionClosed(reason)
        if isinstance(item, str):
            frame = decode_server_frame(item)
            if isinstance(frame, ResyncRequired):
                return frame
            return await self.__anext__()
        event, _ = decode_event(item.data)
        if not isinstance(event, self._model):
            raise InvalidEvent(
                f"event of type {item.data[:64]!r}... on {item.channel!r} is not a "
                f"{self._model.__qualname__}; subscribe with the base class of every event on the channel"
            )
        return Received(item.channel, item.seq, event)
