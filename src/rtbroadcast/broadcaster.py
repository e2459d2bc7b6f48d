"""The :class:`Broadcaster`: publish events, and keep every subscriber of a channel in order."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final, Generic, Protocol, Self, TypeAlias, TypeVar

from . import _config
from ._control import CONTROL_CHANNEL, ControlAction, ControlCommand, decode_control, encode_control
from .backends import PUBLISHED_AT, Backend, Envelope, History, StreamPosition, load_backend
from .connection import DEFAULT_LIMITS, Connection, QueueLimits, item_text
from .cursor import Cursor
from .errors import (
    BackendUnavailable,
    ConfigurationError,
    ConnectionLimitReached,
    InvalidEvent,
    StateError,
    SubscriptionClosed,
    SubscriptionRefused,
)
from .events import Event, decode_event, encode_event
from .identity import Allow, Identity, presence_info
from .presence import (
    DEFAULT_PRESENCE_SNAPSHOT_LIMIT,
    PresenceChange,
    PresenceMember,
    PresenceMode,
    PresencePolicy,
    PresenceRule,
    PresenceSnapshot,
    PresenceWatcher,
    presence_frame,
)
from .protocol import (
    CloseCode,
    ErrorFrameV2,
    ResumePoint,
    ResyncRequired,
    Subscribed,
    SubscriptionErrorCode,
    Unsubscribed,
    UnsubscribeReason,
    Welcome,
    WelcomeV2,
    check_event_payload,
    decode_server_frame,
    encode_server_frame,
    is_valid_channel,
    resync_reason,
    validate_channel,
)
from .registry import ConnectionRegistry
from .stats import BroadcasterStats, MetricsObserver, TracingHook

# is_valid_channel and validate_channel are re-exported: they lived here before the wire rules moved to the
# protocol module.
__all__ = [
    "Broadcaster",
    "BroadcasterState",
    "Received",
    "Subscription",
    "SubscriptionObserver",
    "is_valid_channel",
    "validate_channel",
]

logger = logging.getLogger("rtbroadcast")

E = TypeVar("E", bound=Event)

#: Seconds :meth:`Broadcaster.disconnect` waits for the presence leaves of the connections it closed.
_LEAVE_GRACE = 2.0

#: Most events a resume or gap repair reads from history; beyond it the client resyncs.
DEFAULT_MAX_RESUME = 1000

#: Builds the frames that open a subscription's stream, from ``(channel, epoch, seq, resumed)``: protocol
#: 1's welcome, or protocol 2's subscribed (and, where presence was asked for in vain, its error).
_FirstFrame: TypeAlias = Callable[[str, str, int, bool], list[str]]


class SubscriptionObserver(Protocol):
    """Hears each subscription of a process start and end; the seam presence plugs into.

    Register one with :meth:`Broadcaster.add_subscription_observer`. The ``cursor`` tells the channel
    (``cursor.channel``), the connection (``cursor.connection``: its ``client_id``, ``identity`` and
    ``protocol``), the subscription's presence info (``cursor.info``) and whether the subscriber asked
    for presence frames (``cursor.presence``).
    """

    async def subscription_started(self, cursor: Cursor) -> PresenceSnapshot | None:
        """A subscription starts (before its first frame); return the channel's presence, if it has any.

        Raises:
            BackendUnavailable: the subscription then fails as if the backend could not subscribe.
        """

    def subscription_ended(self, cursor: Cursor, reason: str) -> None:
        """A started subscription ended (``"client"``, ``"server"`` or ``"disconnect"``). Must not block."""


def _push_all(connection: Connection, frames: list[str]) -> None:
    for frame in frames:
        connection.push_frame(frame)


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
        presence: the channels with presence (see :doc:`presence </concepts/presence>`): a predicate
            ``Callable[[str], bool]`` on the channel name, or a collection of channel-name prefixes such
            as ``("restaurant:",)``. Default: none.
        presence_count_only: the channels whose presence is only counted (same forms): their snapshots
            hold no members and no join/leave frames are sent. Default: none.
        presence_snapshot_limit: most members a snapshot lists (in a ``subscribed`` frame and from
            :meth:`presence`); ``count`` is always the full count and ``truncated`` says when members
            were left out.
        stamp_publish_time: send each publish's wall-clock time with its envelope
            (:attr:`Envelope.published_at`), so that every process that delivers it can time
            publish-to-write across processes (``rtbroadcast_publish_to_write_seconds`` in
            :mod:`rtbroadcast.metrics`). Turn it on once every process runs a version that reads it (see
            the metrics how-to).

    Raises:
        ConfigurationError: an option has the wrong type or an impossible value (a zero, negative, ``NaN``
            or infinite interval; a negative ``max_resume``; a connection limit below 1; a presence rule
            that is neither a predicate nor prefixes; presence on a backend without it), or the URL is
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
        presence: PresenceRule | None = None,
        presence_count_only: PresenceRule | None = None,
        presence_snapshot_limit: int = DEFAULT_PRESENCE_SNAPSHOT_LIMIT,
        stamp_publish_time: bool = False,
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
        self._presence = PresencePolicy(presence, presence_count_only)
        self.presence_snapshot_limit = _config.count(
            "presence_snapshot_limit", presence_snapshot_limit, minimum=0
        )
        if self._presence.enabled and not self.backend.supports_presence:
            raise ConfigurationError(
                f"presence is configured but the {self.backend.name} backend does not keep presence; "
                "use the memory:// or redis:// backend, or leave presence= out"
            )
        if not isinstance(stamp_publish_time, bool):
            raise ConfigurationError(f"stamp_publish_time must be True or False, not {stamp_publish_time!r}")
        if stamp_publish_time and not self.backend.supports_headers:
            raise ConfigurationError(
                f"stamp_publish_time=True needs a backend that carries headers, and the {self.backend.name} "
                "backend does not (Backend.supports_headers); leave it out"
            )
        self.stamp_publish_time = stamp_publish_time
        self.queue_limits = queue_limits
        self.registry = ConnectionRegistry(
            max_connections=max_connections, max_connections_per_channel=max_connections_per_channel
        )
        self._state = BroadcasterState.NEW
        self._subscribed: set[str] = set()
        self._channel_locks: dict[str, asyncio.Lock] = {}
        self._history_reads: dict[tuple[str, int], asyncio.Future[History]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._observers: list[SubscriptionObserver] = []
        self._serving = 0
        self._drained: asyncio.Future[None] | None = None
        self._published = 0
        self._interruptions = 0
        self._repairs = 0
        self._lost_detected = 0
        self._resyncs = 0
        self._control = _ControlInbox(self)
        self._resumes = 0
        self._resync_reasons: Counter[str] = Counter()
        self._interruption_reasons: Counter[str] = Counter()
        self._metrics_observer: MetricsObserver | None = None
        self._tracing: TracingHook | None = None
        # Presence: the subscriptions that asked for join/leave frames, per channel and client; the leaves
        # on their way to the backend, so that a join of the same member waits for them.
        self._watchers: dict[str, dict[str, PresenceWatcher]] = {}
        self._leaving: dict[tuple[str, str], asyncio.Task[None]] = {}
        # The members this process joined (channel, client), each with its join while it is in flight: a
        # subscription that ends meanwhile leaves once the join is done, never before it.
        self._members: dict[tuple[str, str], asyncio.Future[None]] = {}
        # Connections of in-process subscriptions: the service's own code, not members.
        self._in_process: set[int] = set()

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
            self._control.stop()
            await self._finish_leaves()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._subscribed.clear()
            self._channel_locks.clear()
            self._watchers.clear()
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
        if self._tracing is not None or self.stamp_publish_time:
            envelope = await self._publish_with_headers(channel, text, idempotency_key, transaction)
        else:
            # The path of every publish without tracing: as short as it was before headers existed.
            request = self._request(channel, text, idempotency_key, transaction)
            if self._metrics_observer is None:
                envelope = await request
            else:
                envelope = await self._timed(channel, request)
        self._published += 1
        return envelope.seq

    def _request(
        self,
        channel: str,
        text: str,
        idempotency_key: str | None,
        transaction: Any,
        headers: dict[str, str] | None = None,
    ) -> Coroutine[Any, Any, Envelope]:
        backend = self.backend
        if transaction is None:
            if headers:
                return backend.publish(channel, text, idempotency_key=idempotency_key, headers=headers)
            return backend.publish(channel, text, idempotency_key=idempotency_key)
        if headers:
            return backend.publish_in_transaction(
                transaction, channel, text, idempotency_key=idempotency_key, headers=headers
            )
        return backend.publish_in_transaction(transaction, channel, text, idempotency_key=idempotency_key)

    async def _publish_with_headers(
        self, channel: str, text: str, idempotency_key: str | None, transaction: Any
    ) -> Envelope:
        """Publish with the headers of a stamp and of a span: the path taken when either is on."""
        headers: dict[str, str] = {}
        if self.stamp_publish_time:
            headers[PUBLISHED_AT] = f"{time.time():.6f}"
        tracing = self._tracing
        span = None if tracing is None else tracing.start_publish(channel, headers)
        if not self.backend.supports_headers:
            headers.clear()  # the span is still this process's; its context goes no further
        request = self._request(channel, text, idempotency_key, transaction, headers)
        if span is None:
            return await self._timed(channel, request)
        try:
            envelope = await self._timed(channel, request)
        except Exception as exc:
            span.end(None, exc)
            raise
        except BaseException:
            span.end(None, None)  # cancelled: not a failure of the publish
            raise
        span.end(envelope, None)
        return envelope

    async def _timed(self, channel: str, request: Awaitable[Envelope]) -> Envelope:
        observer = self._metrics_observer
        if observer is None:
            return await request
        start = time.perf_counter()
        try:
            envelope = await request
        except Exception as exc:  # a cancelled publish (the request went away) is not a failure
            observer.publish_failed(channel, time.perf_counter() - start, exc)
            raise
        observer.published(channel, time.perf_counter() - start)
        return envelope

    async def position(self, channel: str) -> StreamPosition:
        """Return the top of ``channel``'s stream: its ``epoch`` and the ``seq`` of its last event.

        What a REST snapshot should carry, so that a client can resume the stream exactly after it: read
        the position *before* the data (an event published in between is then replayed, not missed).
        A channel never published to has seq 0.

        Raises:
            StateError: the broadcaster is not connected.
            ConfigurationError: ``channel`` is not a valid channel name.
            BackendUnavailable: the backend cannot be reached.
        """
        self._require_connected("read a position", draining=True)
        validate_channel(channel)
        return await self.backend.position(channel)

    # -- backend listener -------------------------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """Fan an envelope out to this process's connections of its channel (called by the backend).

        Each cursor of the channel queues the same envelope (encoded once) on its connection.
        """
        observer = self._metrics_observer
        if observer is None and self._tracing is None:
            for cursor in self.registry.cursors(envelope.channel):
                cursor.push(envelope)
            return
        tracing = self._tracing if envelope.headers is not None else None
        wall = time.time_ns() if tracing is not None else 0
        start = time.perf_counter()
        cursors = self.registry.cursors(envelope.channel)
        for cursor in cursors:
            cursor.push(envelope)
        if observer is not None:
            observer.fanned_out(envelope, len(cursors), time.perf_counter() - start)
        if tracing is not None:
            tracing.delivered(envelope, len(cursors), wall, time.time_ns())

    def on_interruption(self, channels: Collection[str], reason: str) -> None:
        """Bring every connection of ``channels`` up to date after the backend may have lost envelopes."""
        self._interruptions += 1
        self._interruption_reasons[reason] += 1
        logger.warning(
            "backend interruption (%s): checking %d channel(s) for missed events", reason, len(channels)
        )
        for channel in channels:
            for cursor in self.registry.cursors(channel):
                if not cursor.connection.closed and not cursor.buffering:
                    self._schedule_repair(cursor)

    def on_presence(self, change: PresenceChange) -> None:
        """Queue a join/leave frame on every subscription of the channel that asked (called by the backend).

        The frame is built once per change; count-only channels send none.
        """
        watchers = self._watchers.get(change.channel)
        if not watchers:
            return
        frame = presence_frame(change.kind, change.channel, change.data)
        for watcher in list(watchers.values()):
            watcher.offer(change, frame)

    # -- presence ---------------------------------------------------------------------------------

    def presence_mode(self, channel: str) -> PresenceMode:
        """Return how ``channel`` keeps presence (:attr:`PresenceMode.NONE` without it)."""
        return self._presence.mode(channel)

    async def presence(self, channel: str, *, limit: int | None = None) -> PresenceSnapshot:
        """Return who is present on ``channel``, across every process: the count and the first members.

        Args:
            channel: a channel with presence.
            limit: most members to list (default: ``presence_snapshot_limit``); a count-only channel lists
                none.

        Raises:
            StateError: the broadcaster is not connected.
            ConfigurationError: ``channel`` is not a valid channel name, has no presence, or ``limit`` is
                not a count.
            BackendUnavailable: the backend cannot be reached.
        """
        self._require_connected("read presence", draining=True)
        mode = self._presence_mode_of(channel)
        limit = self.presence_snapshot_limit if limit is None else _config.count("limit", limit, minimum=0)
        if mode is PresenceMode.COUNT:
            limit = 0
        return await self.backend.presence_snapshot(channel, limit=limit)

    async def presence_count(self, channel: str) -> int:
        """Return how many members ``channel`` has, across every process.

        Raises:
            StateError: the broadcaster is not connected.
            ConfigurationError: ``channel`` is not a valid channel name or has no presence.
            BackendUnavailable: the backend cannot be reached.
        """
        self._require_connected("read presence", draining=True)
        self._presence_mode_of(channel)
        return await self.backend.presence_count(channel)

    def _presence_mode_of(self, channel: str) -> PresenceMode:
        validate_channel(channel)
        mode = self._presence.mode(channel)
        if mode is PresenceMode.NONE:
            raise ConfigurationError(
                f"channel {channel!r} has no presence; choose the channels with Broadcaster(presence=...)"
            )
        return mode

    def presence_watch(self, channel: str, client: str, push: Callable[[str], None]) -> PresenceWatcher:
        """Register a subscription for join/leave frames, holding them back until ``watcher.start()``.

        For transports: call it before :meth:`presence_join` so that no change is lost between the
        snapshot and the first frame, push the ``subscribed`` frame, then ``start(snapshot.version)``.
        """
        watcher = PresenceWatcher(channel, client, push)
        self._watchers.setdefault(channel, {})[client] = watcher
        return watcher

    async def presence_join(
        self, channel: str, member: PresenceMember, *, snapshot: bool = True
    ) -> PresenceSnapshot:
        """Make ``member`` present on ``channel`` (a presence channel) and return the capped snapshot.

        With ``snapshot=False`` (a subscription that did not ask for presence) the snapshot holds only the
        count, which spares reading members nobody will see.

        Waits for a leave of the same member still on its way, so that a quick unsubscribe and subscribe
        never ends with the member absent.

        Raises:
            ConfigurationError: ``channel`` has no presence, or ``member.info`` is not JSON-serialisable.
            BackendUnavailable: the backend cannot be reached; the member did not join.
        """
        mode = self._presence_mode_of(channel)
        leaving = self._leaving.get((channel, member.client))
        if leaving is not None:
            await asyncio.wait([leaving])
        limit = self.presence_snapshot_limit if snapshot and mode is PresenceMode.MEMBERS else 0
        return await self.backend.presence_join(
            channel, member, limit=limit, notify=mode is PresenceMode.MEMBERS
        )

    def presence_leave(self, channel: str, client: str) -> None:
        """Stop ``client``'s presence on ``channel`` (its join/leave frames end at once). Never raises."""
        self._unwatch(channel, client)
        key = (channel, client)
        previous = self._leaving.get(key)
        joined = self._members.pop(key, None)
        task = asyncio.get_running_loop().create_task(self._leave(channel, client, previous, joined))
        self._leaving[key] = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        task.add_done_callback(lambda done: self._leave_done(key, done))

    async def _leave(
        self,
        channel: str,
        client: str,
        previous: asyncio.Task[None] | None,
        joined: asyncio.Future[None] | None = None,
    ) -> None:
        for before in (previous, joined):
            if before is not None and not before.done():
                await asyncio.wait([before])
        notify = self._presence.mode(channel) is PresenceMode.MEMBERS
        await self.backend.presence_leave(channel, client, notify=notify)

    def _leave_done(self, key: tuple[str, str], done: asyncio.Task[None]) -> None:
        if self._leaving.get(key) is done:
            del self._leaving[key]

    async def _finish_leaves(self) -> None:
        """Give the leaves of the connections just closed a moment to reach the backend."""
        if self._leaving:
            await asyncio.wait(list(self._leaving.values()), timeout=_LEAVE_GRACE)

    # -- connections ------------------------------------------------------------------------------

    async def attach(self, connection: Connection, resume: ResumePoint | None = None) -> None:
        """Register ``connection`` and queue its welcome frame, its missed events, then live ones.

        With ``resume``, the events after ``resume.seq`` are replayed from history when possible; otherwise
        a ``resync_required`` frame follows the welcome. Live events published meanwhile are held back and
        merged by seq, so nothing is missed or doubled.

        A protocol-2 connection (made without a channel) is registered with no subscription and gets
        protocol 2's welcome; :meth:`add_subscription` then gives it its channels (``resume`` must be
        ``None``).

        Raises:
            StateError: the broadcaster is not connected, or is draining.
            ConnectionLimitReached: a connection limit would be passed.
            BackendUnavailable: the backend cannot be reached (the connection is not registered).
        """
        self._require_connected("attach a connection")
        if not connection.cursors and connection.protocol >= 2:
            if resume is not None:
                raise ConfigurationError("a protocol-2 connection resumes per subscription, not at attach")
            self.registry.add(connection)
            connection.add_close_callback(self.detach)
            if connection.identity is not None:
                try:
                    await self._control.start()
                except BaseException:
                    self.detach(connection)
                    raise
            connection.push_frame(
                encode_server_frame(WelcomeV2(self.heartbeat_interval, connection.client_id))
            )
            return
        cursor = connection.cursor
        validate_channel(cursor.channel)
        cursor.begin_buffering()
        self.registry.add(connection)
        connection.add_close_callback(self.detach)
        cursor.set_gap_handler(self._on_gap)
        try:
            if connection.identity is not None:
                await self._control.start()
            await self._ensure_subscribed(cursor.channel)
            await self._observe_start(cursor)
            await self._bring_up_to_date(cursor, resume, self._welcome)
        except BaseException:
            self.detach(connection)
            raise

    async def add_subscription(
        self,
        connection: Connection,
        channel: str,
        resume: ResumePoint | None = None,
        *,
        request_id: str | None = None,
        info: Mapping[str, Any] | None = None,
        presence: bool = False,
    ) -> Cursor:
        """Subscribe an attached protocol-2 ``connection`` to ``channel``: subscribed, missed events, live.

        Queues the ``subscribed`` frame (with ``request_id``; ``None`` for a subscription the server makes),
        the events missed since ``resume`` (or, when they cannot be replayed, one ``resync_required`` for
        this channel), then live events, exactly as :meth:`attach` does for protocol 1. Authorization is
        the caller's (the endpoint asks its ``authorize`` hook first).

        Args:
            connection: an attached connection made with ``Connection(protocol=2)``.
            channel: the channel to follow.
            resume: where the subscriber left off in ``channel``'s stream, if it did.
            request_id: the client's request id, echoed in ``subscribed``.
            info: this subscription's presence info (``None``: the identity's, else ``{}``).
            presence: whether the subscriber wants the presence snapshot and join/leave frames.

        Returns:
            The subscription's cursor (also ``connection.cursor_for(channel)``).

        Raises:
            StateError: the broadcaster is not connected or is draining, the connection is closed or is a
                protocol-1 connection.
            ConfigurationError: ``channel`` is not a valid channel name.
            SubscriptionRefused: the connection already follows ``channel`` (``already_subscribed``) or has
                ``max_subscriptions`` (``too_many_subscriptions``).
            ConnectionLimitReached: the channel's connection limit is reached.
            BackendUnavailable: the backend cannot be reached (nothing stays subscribed).
        """
        self._require_connected("subscribe a connection")
        validate_channel(channel)
        cursor = connection.add_cursor(channel)
        cursor.info = presence_info(Allow(info) if info is not None else None, connection.identity)
        cursor.presence = presence
        try:
            self.registry.add_cursor(cursor)
        except BaseException:
            connection.remove_cursor(channel)
            raise
        cursor.set_gap_handler(self._on_gap)
        try:
            await self._ensure_subscribed(channel)
            snapshot = await self._observe_start(cursor)
            if connection.cursor_for(channel) is not cursor:
                return cursor  # unsubscribed meanwhile: the unsubscribed frame said so

            def subscribed(_channel: str, epoch: str, seq: int, resumed: bool) -> list[str]:
                frame = Subscribed(request_id, channel, epoch, seq, resumed, snapshot if presence else None)
                frames = [encode_server_frame(frame)]
                if presence and snapshot is None:
                    refusal = ErrorFrameV2(
                        request_id,
                        SubscriptionErrorCode.PRESENCE_UNAVAILABLE,
                        f"channel {channel!r} has no presence",
                        channel,
                    )
                    frames.append(encode_server_frame(refusal))
                frames.extend(self._presence_frames(cursor, snapshot))
                return frames

            await self._bring_up_to_date(cursor, resume, subscribed)
        except BaseException:
            self._drop_cursor(cursor, UnsubscribeReason.SERVER)
            raise
        return cursor

    def remove_subscription(
        self,
        connection: Connection,
        channel: str,
        *,
        request_id: str | None = None,
        reason: str = UnsubscribeReason.CLIENT,
    ) -> None:
        """End ``connection``'s subscription to ``channel`` and queue its ``unsubscribed`` frame.

        No event of ``channel`` is queued on the connection after the ``unsubscribed`` frame. The backend
        subscription ends with the channel's last subscriber in this process.

        Raises:
            SubscriptionRefused: the connection does not follow ``channel`` (``not_subscribed``; a
                protocol-1 connection's one channel cannot be left either).
        """
        cursor = connection.cursor_for(channel)
        if cursor is None or connection.protocol < 2 or cursor not in connection.cursors or connection.closed:
            raise SubscriptionRefused(SubscriptionErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel!r}")
        self._drop_cursor(cursor, reason)
        connection.push_frame(encode_server_frame(Unsubscribed(request_id, channel, reason)))

    def _drop_cursor(self, cursor: Cursor, reason: str) -> None:
        connection = cursor.connection
        # Only this cursor: the channel may have been left and subscribed again meanwhile.
        if connection.cursor_for(cursor.channel) is not cursor:
            return
        connection.remove_cursor(cursor.channel)
        cursor.set_gap_handler(None)
        emptied = self.registry.remove_cursor(cursor)
        self._observe_end(cursor, reason)
        if emptied and self._state is BroadcasterState.CONNECTED:
            self._spawn(self._release(cursor.channel))

    def add_subscription_observer(self, observer: SubscriptionObserver) -> None:
        """Tell ``observer`` when each subscription of this process starts and ends (presence's seam).

        Every subscription counts: a protocol-1 connection's one channel, each protocol-2 subscription,
        in-process subscriptions. ``observer.subscription_started(cursor)`` is awaited after the cursor is
        registered and the backend subscribed, before the ``welcome``/``subscribed`` frame is queued; what
        it returns is the presence snapshot a protocol-2 ``subscribed`` carries when the subscriber asked
        for one (``None``: the channel has no presence). ``observer.subscription_ended(cursor, reason)`` is
        called once per started subscription, synchronously (spawn a task for I/O), with ``reason`` one of
        ``"client"``, ``"server"`` (an unsubscribe) or ``"disconnect"`` (the connection closed).
        """
        self._observers.append(observer)

    async def _observe_start(self, cursor: Cursor) -> PresenceSnapshot | None:
        cursor.observed = True
        snapshot = await self._presence_started(cursor)
        for observer in self._observers:
            found = await observer.subscription_started(cursor)
            if snapshot is None:
                snapshot = found
        return snapshot

    def _observe_end(self, cursor: Cursor, reason: str) -> None:
        if not cursor.observed:
            return
        cursor.observed = False
        if (cursor.channel, cursor.connection.client_id) in self._members:
            self.presence_leave(cursor.channel, cursor.connection.client_id)
        for observer in self._observers:
            try:
                observer.subscription_ended(cursor, reason)
            except Exception:
                logger.exception("subscription observer failed on the end of %r", cursor)

    async def _presence_started(self, cursor: Cursor) -> PresenceSnapshot | None:
        """Join the subscription's member if its channel has presence; return the snapshot for it.

        A protocol-2 subscription that asked for presence on a channel with members gets a watcher first,
        holding back the changes that arrive while the join is on its way (see ``_subscribed_frames``).
        """
        channel = cursor.channel
        mode = self._presence.mode(channel)
        connection = cursor.connection
        if mode is PresenceMode.NONE or connection.id in self._in_process:
            return None
        client = connection.client_id
        identity = connection.identity
        member = PresenceMember(client, identity.id if identity is not None else None, cursor.info)
        if cursor.presence and mode is PresenceMode.MEMBERS and connection.protocol >= 2:
            self.presence_watch(channel, client, connection.push_frame)
        key = (channel, client)
        joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._members[key] = joined
        try:
            snapshot = await self.presence_join(channel, member, snapshot=cursor.presence)
        except BaseException:
            if self._members.get(key) is joined:
                del self._members[key]
                self._unwatch(channel, client)
            raise
        finally:
            joined.set_result(None)
        if mode is PresenceMode.COUNT:
            snapshot = PresenceSnapshot(snapshot.count, (), False, snapshot.version)
        return snapshot

    def _presence_frames(self, cursor: Cursor, snapshot: PresenceSnapshot | None) -> list[str]:
        """Start the subscription's watcher after its ``subscribed``: the changes its snapshot missed."""
        watchers = self._watchers.get(cursor.channel)
        watcher = watchers.get(cursor.connection.client_id) if watchers else None
        if watcher is None or snapshot is None or watcher.pending is None:
            return []
        return watcher.start(snapshot.version)

    def _unwatch(self, channel: str, client: str) -> None:
        watchers = self._watchers.get(channel)
        if watchers is not None:
            watchers.pop(client, None)
            if not watchers:
                del self._watchers[channel]

    def detach(self, connection: Connection) -> None:
        """Unregister ``connection``; a channel's backend subscription ends with its last connection."""
        for cursor in connection.cursors:
            cursor.set_gap_handler(None)
        emptied = self.registry.remove(connection)
        for cursor in connection.cursors:
            self._observe_end(cursor, "disconnect")
        if self._state is BroadcasterState.CONNECTED:
            for channel in emptied:
                self._spawn(self._release(channel))
            if connection.identity is not None and not self.registry.identified:
                self._control.release_soon()

    def connection_count(self, channel: str | None = None) -> int:
        """Return how many connections this process has, on ``channel`` or in all."""
        return self.registry.count(channel)

    async def _ensure_subscribed(self, channel: str) -> None:
        async with self._lock(channel):
            if channel not in self._subscribed:
                await self.backend.subscribe(channel)
                self._subscribed.add(channel)

    async def _release(self, channel: str) -> None:
        # cursors(), not count(): the broadcaster's own cursor on a reserved channel is not a connection.
        async with self._lock(channel):
            if channel in self._subscribed and not self.registry.cursors(channel):
                self._subscribed.discard(channel)
                await self.backend.unsubscribe(channel)
        if not self.registry.cursors(channel):
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
            await self._bring_up_to_date(cursor, ResumePoint(cursor.epoch, cursor.last_seq), None)
        except BackendUnavailable as exc:
            connection = cursor.connection
            logger.warning("cannot repair connection #%d on %r: %s", connection.id, cursor.channel, exc)
            connection.close(CloseCode.INTERNAL_ERROR, "backend unavailable; reconnect and resume")

    async def _bring_up_to_date(
        self, cursor: Cursor, resume: ResumePoint | None, first: _FirstFrame | None
    ) -> None:
        """Queue what ``cursor`` missed since ``resume`` (buffering live envelopes meanwhile).

        ``first(channel, epoch, seq, resumed)`` builds the frame that opens the stream (protocol 1's
        welcome, protocol 2's subscribed); ``None`` for a gap repair. The I/O half of a resume: the
        decision is :func:`~rtbroadcast.protocol.resync_reason`'s.
        """
        channel = cursor.channel
        connection = cursor.connection
        if resume is None:
            position = await self.backend.position(channel)
            if connection.cursor_for(channel) is not cursor:
                return  # unsubscribed meanwhile
            cursor.set_position(position.epoch, position.seq)
            if first is not None:
                _push_all(connection, first(channel, position.epoch, position.seq, False))
            cursor.end_buffering()
            return
        history = await self._history(channel, resume.seq)
        if connection.cursor_for(channel) is not cursor:
            return
        position = history.position
        missed = history.envelopes
        # Missed events are queued at once, before anything is written: more than the queue holds would
        # close the connection as a slow consumer on every reconnect, so the client resyncs instead.
        fits = connection.has_room(len(missed) + 1, sum(len(envelope.data) for envelope in missed))
        reason = resync_reason(resume, position.epoch, position.seq, complete=history.complete, fits=fits)
        if reason is None:
            if first is not None:
                self._resumes += 1
                _push_all(connection, first(channel, resume.epoch, resume.seq, True))
            cursor.set_position(resume.epoch, resume.seq)
            for envelope in missed:
                cursor.deliver_history(envelope)
        else:
            self._resyncs += 1
            self._resync_reasons[reason] += 1
            if first is not None:
                _push_all(connection, first(channel, position.epoch, position.seq, False))
            named = channel if connection.protocol >= 2 else None
            connection.push_frame(
                encode_server_frame(ResyncRequired(reason, position.epoch, position.seq, named))
            )
            cursor.set_position(position.epoch, position.seq)
        cursor.end_buffering()

    async def _check_positions_forever(self, interval: float) -> None:
        # A connection still behind the stream top at the same seq one interval later did not merely race
        # an in-flight publish: its event was lost on the way (a PUB/SUB message dropped during a
        # reconnect, say). Bring it up to date from history like any other gap.
        behind: dict[tuple[int, str], tuple[str, int]] = {}
        while True:
            await asyncio.sleep(interval)
            try:
                behind = await self.check_positions(behind)
            except Exception:
                logger.exception("position check failed; retrying in %.1f s", interval)

    async def check_positions(
        self, behind: dict[tuple[int, str], tuple[str, int]]
    ) -> dict[tuple[int, str], tuple[str, int]]:
        """Compare each subscribed channel's top with its cursors; repair those behind twice running.

        ``behind`` maps each cursor, as ``(connection id, channel)``, to the position it was behind at in
        the previous check; the result is the same for this check. Runs by itself every
        ``position_check_interval`` seconds.
        """
        still_behind: dict[tuple[int, str], tuple[str, int]] = {}
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
                key = (connection.id, channel)
                if behind.get(key) == here:
                    self._lost_detected += 1
                    self._schedule_repair(cursor)
                else:
                    still_behind[key] = here
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

    def _welcome(self, channel: str, epoch: str, seq: int, resumed: bool) -> list[str]:
        # The first frame of a protocol-1 stream (see _FirstFrame).
        return [encode_server_frame(Welcome(channel, epoch, seq, self.heartbeat_interval, resumed))]

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
        channel: str | Sequence[str],
        *,
        resume: ResumePoint | Mapping[str, ResumePoint] | None = None,
        model: type[E] = Event,  # type: ignore[assignment]
    ) -> Subscription[E]:
        """Subscribe this process to ``channel``: ``async with broadcaster.subscribe(ch) as sub:``.

        ``channel`` is one channel name, or a list of them: one subscription then follows every channel,
        each in its own order (a :class:`Received` names its channel; so does a resync notice). Iterating
        the subscription yields a :class:`Received` per event, in seq order per channel, and a
        :class:`~rtbroadcast.protocol.ResyncRequired` where events could not be replayed. Events decode
        into their registered models; ``model`` is the class every event is expected to be.

        Args:
            channel: a channel name, or a sequence of distinct channel names.
            resume: for one channel, where to resume it (a :class:`~rtbroadcast.ResumePoint`); for a list,
                a mapping from some of its channels to their resume points (``subscription.positions``
                of an earlier subscription).
            model: :class:`Event` or a subclass every event on the channels is an instance of.

        Raises:
            ConfigurationError: a channel is not a valid channel name, a list is empty or names a channel
                twice, ``resume`` does not fit the form of ``channel`` (or names a channel not in the
                list), or ``model`` is not :class:`Event` or a subclass of it.
        """
        if not (isinstance(model, type) and issubclass(model, Event)):
            raise ConfigurationError(f"model must be Event or a subclass of it, not {model!r}")
        if isinstance(channel, str):
            validate_channel(channel)
            if resume is not None and not isinstance(resume, ResumePoint):
                raise ConfigurationError(
                    f"resume must be a ResumePoint(epoch, seq) or None, not {type(resume).__name__}; "
                    "pass subscription.position from an earlier subscription"
                )
            return Subscription(self, channel, resume=resume, model=model)
        if not isinstance(channel, Sequence):
            raise ConfigurationError(f"channel must be a channel name or a list of them, not {channel!r}")
        channels = tuple(channel)
        if not channels:
            raise ConfigurationError("subscribe to at least one channel")
        for name in channels:
            validate_channel(name)
        if len(set(channels)) != len(channels):
            raise ConfigurationError(f"the channels {channels!r} name one twice")
        if resume is None:
            resume = {}
        if not isinstance(resume, Mapping) or not all(isinstance(p, ResumePoint) for p in resume.values()):
            raise ConfigurationError(
                "resume of several channels must map channel names to ResumePoint(epoch, seq); "
                "pass subscription.positions from an earlier subscription"
            )
        unknown = set(resume) - set(channels)
        if unknown:
            raise ConfigurationError(f"resume names channels not subscribed to: {sorted(unknown)!r}")
        return Subscription(self, channels, resume=dict(resume), model=model)

    # -- server-side subscriptions ----------------------------------------------------------------

    async def subscribe_connections(
        self,
        channel: str,
        *,
        identity: str | Identity | None = None,
        tag: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> int:
        """Subscribe every protocol-2 connection of an identity (or with a tag) to ``channel``, everywhere.

        Applied by every process sharing the backend (this one included, in the same order everywhere),
        to the connections open there at that moment: each gets ``subscribed`` with ``"id": null``, then
        the channel's events from its current position. This is the service's own decision: the endpoint's
        ``authorize`` hook is not asked. Protocol-1 connections (one channel, fixed by their URL) and
        connections already subscribed to ``channel`` are left as they are. A connection at its
        ``max_subscriptions`` gets an ``error`` frame (``too_many_subscriptions``, ``"id": null``) instead.

        Connections that open later get their channels from the endpoint's resolver: change what it reads
        first, then call this, so that no connection opening meanwhile is left out.

        Args:
            channel: the channel to subscribe to.
            identity: select the connections whose ``Identity.id`` is this (an :class:`Identity` stands
                for its ``id``).
            tag: select the connections whose ``Identity.tags`` hold this; give ``identity`` or ``tag``.
            info: the presence info of the new subscriptions (``None``: each identity's ``info``).

        Returns:
            How many connections of this process were subscribed (those of other processes are not
            counted: they are changed there, at about the same time).

        Raises:
            StateError: the broadcaster is not connected.
            ConfigurationError: not exactly one of ``identity`` and ``tag`` is given, ``channel`` is not a
                valid channel name, or ``info`` is not a JSON-serialisable mapping.
            BackendUnavailable: the command could not be published (no process applies it), or it was
                published but this process did not apply it within 10 s (the others may have).
        """
        return await self._command(
            ControlCommand(
                ControlAction.SUBSCRIBE, identity=_identity_id(identity), tag=tag, channel=channel, info=info
            )
        )

    async def unsubscribe_connections(
        self, channel: str, *, identity: str | Identity | None = None, tag: str | None = None
    ) -> int:
        """Unsubscribe every protocol-2 connection of an identity (or carrying a tag) from ``channel``.

        Applied by every process, like :meth:`subscribe_connections`: each subscribed connection gets
        ``unsubscribed`` (``"id": null``, ``"reason": "server"``), after which no event of ``channel``
        reaches it. A subscription the client made itself is removed too. Protocol-1 connections are left
        as they are: close them with :meth:`disconnect_connections`.

        Returns:
            How many connections of this process were unsubscribed.

        Raises:
            StateError: the broadcaster is not connected.
            ConfigurationError: not exactly one of ``identity`` and ``tag`` is given, or ``channel`` is not
                a valid channel name.
            BackendUnavailable: as for :meth:`subscribe_connections`.
        """
        return await self._command(
            ControlCommand(
                ControlAction.UNSUBSCRIBE, identity=_identity_id(identity), tag=tag, channel=channel
            )
        )

    async def disconnect_connections(
        self,
        *,
        identity: str | Identity | None = None,
        tag: str | None = None,
        code: int = CloseCode.FORBIDDEN,
        reason: str = "disconnected by the server",
    ) -> int:
        """Close every connection of an identity (or carrying a tag), on either protocol, on every process.

        WebSocket clients get a close frame with ``code`` and ``reason``; SSE streams end with a ``:
        closed <code> <reason>`` comment. The default, ``4003``, tells clients not to reconnect with the
        same credentials: a banned user's new connections must be refused by the endpoint's
        ``authenticate`` hook, since this reaches only the connections open when it is applied.

        Args:
            identity: select the connections whose ``Identity.id`` is this.
            tag: select the connections whose ``Identity.tags`` hold this; give ``identity`` or ``tag``.
            code: the close code: 1000, 1001, 1008 or 3000-4999.
            reason: the close reason, at most 123 UTF-8 bytes.

        Returns:
            How many connections of this process were closed.

        Raises:
            StateError: the broadcaster is not connected.
            ConfigurationError: not exactly one of ``identity`` and ``tag`` is given, or the code or
                reason cannot go in a close frame.
            BackendUnavailable: as for :meth:`subscribe_connections`.
        """
        return await self._command(
            ControlCommand(
                ControlAction.DISCONNECT, identity=_identity_id(identity), tag=tag, code=code, reason=reason
            )
        )

    async def _command(self, command: ControlCommand) -> int:
        """Publish ``command`` for every process; wait until this one applied it (if it has any to change)."""
        self._require_connected("change connections", draining=True)
        control = self._control
        nonce = ""
        waiter: asyncio.Future[int] | None = None
        if control.active:
            nonce = secrets.token_hex(8)
            waiter = control.waiters[nonce] = asyncio.get_running_loop().create_future()
        try:
            await self.backend.publish(CONTROL_CHANNEL, encode_control(replace(command, nonce=nonce)))
            if waiter is None:
                return 0
            try:
                async with asyncio.timeout(CONTROL_APPLY_TIMEOUT):
                    return await waiter
            except TimeoutError:
                raise BackendUnavailable(
                    f"the {command.action} command was published, but this process did not apply it "
                    f"within {CONTROL_APPLY_TIMEOUT:g} s (its backend listener may be reconnecting; it will "
                    "apply it from history when it is back); other processes may have applied it"
                ) from None
        finally:
            if nonce:
                control.waiters.pop(nonce, None)

    async def _apply_control(self, command: ControlCommand) -> int:
        """Apply one command to this process's connections; return how many it changed."""
        connections = self.registry.matching(identity=command.identity, tag=command.tag)
        if command.action is ControlAction.DISCONNECT:
            changed = 0
            for connection in connections:
                if not connection.closed:
                    connection.close(command.code, command.reason)
                    changed += 1
            return changed
        channel = command.channel
        assert channel is not None  # checked by ControlCommand
        targets = [c for c in connections if c.protocol >= 2 and not c.closed]
        if command.action is ControlAction.UNSUBSCRIBE:
            changed = 0
            for connection in targets:
                if connection.cursor_for(channel) is not None:
                    self.remove_subscription(connection, channel, reason=UnsubscribeReason.SERVER)
                    changed += 1
            return changed
        # Subscriptions of many connections at once (a tag) each read the channel's position: concurrently.
        todo = [c for c in targets if c.cursor_for(channel) is None]
        done = await asyncio.gather(*(self._server_subscribe(c, channel, command.info) for c in todo))
        return sum(done)

    async def _server_subscribe(
        self, connection: Connection, channel: str, info: Mapping[str, Any] | None
    ) -> bool:
        """Subscribe one connection for the service; a refusal goes to the client as an ``error``."""
        try:
            await self.add_subscription(connection, channel, None, request_id=None, info=info)
        except SubscriptionRefused as exc:
            code, message = exc.code, exc.message
        except ConnectionLimitReached as exc:
            code, message = SubscriptionErrorCode.TRY_AGAIN_LATER, str(exc)
        except BackendUnavailable as exc:
            logger.warning("cannot subscribe connection #%d to %r: %s", connection.id, channel, exc)
            code, message = SubscriptionErrorCode.TRY_AGAIN_LATER, "backend unavailable"
        except StateError:
            return False  # closed meanwhile, or the broadcaster is draining (which closes it)
        else:
            return connection.cursor_for(channel) is not None
        if code == SubscriptionErrorCode.ALREADY_SUBSCRIBED:
            return False  # subscribed by the client meanwhile: nothing to say
        logger.info("server-side subscription of #%d to %r refused: %s", connection.id, channel, message)
        connection.push_frame(encode_server_frame(ErrorFrameV2(None, code, message, channel)))
        return False

    # -- stats ------------------------------------------------------------------------------------

    def set_metrics_observer(self, observer: MetricsObserver | None) -> None:
        """Tell ``observer`` how long each publish and each fan-out took (``None``: stop telling).

        For metrics integrations, such as :class:`rtbroadcast.metrics.PrometheusMetrics`, which sets
        itself. Without an observer, publishing and fan-out time nothing. One observer at a time: setting
        one replaces the previous.
        """
        self._metrics_observer = observer

    @property
    def metrics_observer(self) -> MetricsObserver | None:
        """The observer :meth:`set_metrics_observer` set, if any."""
        return self._metrics_observer

    def set_tracing_hook(self, hook: TracingHook | None) -> None:
        """Let ``hook`` trace each publish and each delivery of a traced envelope (``None``: stop).

        For tracing integrations, such as :class:`rtbroadcast.tracing.OpenTelemetryTracing`, which sets
        itself. Without a hook, publishing and fan-out trace nothing and send no headers. One hook at a
        time: setting one replaces the previous.
        """
        self._tracing = hook

    @property
    def tracing_hook(self) -> TracingHook | None:
        """The hook :meth:`set_tracing_hook` set, if any."""
        return self._tracing

    def stats(self) -> BroadcasterStats:
        """Return a snapshot of this process's state, backend and counters (see :class:`BroadcasterStats`).

        For a health endpoint: ``JSONResponse(broadcaster.stats().as_dict())``.
        """
        registry = self.registry.stats()
        return BroadcasterStats(
            state=self.state,
            backend_name=self.backend.name,
            backend_available=self.backend.available,
            published=self._published,
            interruptions=self._interruptions,
            repairs=self._repairs,
            lost_detected=self._lost_detected,
            resyncs=self._resyncs,
            control_applied=self._control.applied,
            control_lost=self._control.lost,
            presence_members=len(self._members),
            presence_watchers=sum(len(watchers) for watchers in self._watchers.values()),
            resumes=self._resumes,
            resyncs_by_reason=dict(self._resync_reasons),
            interruptions_by_reason=dict(self._interruption_reasons),
            connections=registry.connections,
            channels=dict(registry.channels),
            messages_sent=registry.messages_sent,
            messages_dropped=registry.messages_dropped,
            queue_high_water=registry.queue_high_water,
            slow_consumers_closed=registry.slow_consumers_closed,
            backend=dict(self.backend.stats()),
        )


def _identity_id(identity: str | Identity | None) -> str | None:
    return identity.id if isinstance(identity, Identity) else identity


@dataclass(frozen=True, slots=True)
class Received(Generic[E]):
    """An event received by an in-process subscription, with its place in the stream."""

    channel: str
    seq: int
    event: E


class Subscription(Generic[E]):
    """An in-process subscription to one channel or several, with the same guarantees as a socket.

    Created by :meth:`Broadcaster.subscribe`; enter it with ``async with``, then iterate.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        channel: str | tuple[str, ...],
        *,
        resume: ResumePoint | dict[str, ResumePoint] | None,
        model: type[E],
    ) -> None:
        self._broadcaster = broadcaster
        self._resume = resume
        self._model = model
        self._channels = (channel,) if isinstance(channel, str) else channel
        if isinstance(channel, str):
            self.connection = Connection(channel, limits=broadcaster.queue_limits)
        else:
            self.connection = Connection(protocol=2, limits=broadcaster.queue_limits)
        # In-process subscriptions are the service's own code: not presence members.
        in_process = broadcaster._in_process
        in_process.add(self.connection.id)
        self.connection.add_close_callback(lambda connection: in_process.discard(connection.id))
        #: The welcome frame of a one-channel subscription, once entered (``None`` for several channels).
        self.welcome: Welcome | None = None

    @property
    def channel(self) -> str:
        """The channel subscribed to (of a one-channel subscription).

        Raises:
            StateError: the subscription follows several channels: see :attr:`channels`.
        """
        if len(self._channels) != 1 or self.connection.protocol != 1:
            raise StateError("this subscription follows several channels; see subscription.channels")
        return self._channels[0]

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels subscribed to."""
        return self._channels

    @property
    def position(self) -> ResumePoint:
        """The stream position reached so far; pass it as ``resume`` to continue later (one channel).

        Raises:
            StateError: the subscription follows several channels: see :attr:`positions`.
        """
        if self.connection.protocol != 1:
            raise StateError("this subscription follows several channels; see subscription.positions")
        cursor = self.connection.cursor
        return ResumePoint(cursor.epoch, cursor.last_seq)

    @property
    def positions(self) -> dict[str, ResumePoint]:
        """Each channel's position reached so far; pass it as ``resume`` to continue later."""
        return {c.channel: ResumePoint(c.epoch, c.last_seq) for c in self.connection.cursors if c.epoch}

    async def __aenter__(self) -> Self:
        broadcaster = self._broadcaster
        connection = self.connection
        if connection.protocol == 1:
            resume = self._resume
            assert resume is None or isinstance(resume, ResumePoint)
            await broadcaster.attach(connection, resume)
            first = connection.get_nowait()
            if first is not None:
                frame = decode_server_frame(item_text(first))
                if isinstance(frame, Welcome):
                    self.welcome = frame
            return self
        points = self._resume if isinstance(self._resume, dict) else {}
        await broadcaster.attach(connection)
        connection.get_nowait()  # protocol 2's welcome
        try:
            for channel in self._channels:
                await broadcaster.add_subscription(connection, channel, points.get(channel))
        except BaseException:
            connection.close(CloseCode.NORMAL, "unsubscribed")
            raise
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


#: Bounds of the control inbox's queue: commands are small, and a burst of them must not be lost to the
#: slow-consumer bound while earlier ones wait on the backend (one subscribe reads a position).
_CONTROL_LIMITS: Final = QueueLimits(max_messages=65_536, max_size=32 * 1024 * 1024)
#: Seconds a ``*_connections()`` call waits for this process to apply its own command.
CONTROL_APPLY_TIMEOUT: Final = 10.0


class _ControlInbox:
    """This process's subscription to the reserved ``CONTROL_CHANNEL``, and the task applying it.

    It exists while the process holds connections with an identity (only those can be selected), like a
    channel's backend subscription while it has connections: started by the first such attach, stopped
    after the last one detached. Its cursor is fanned out to like any other (gap repair, the position
    check and the repair after a backend reconnect included), so a command lost on the way is read from
    history; commands are applied one at a time, in seq order, by one task.
    """

    def __init__(self, broadcaster: Broadcaster) -> None:
        self._broadcaster = broadcaster
        self._connection: Connection | None = None
        self._starting: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Commands sent by this process, by nonce, waiting to be applied here: the future gets the count.
        self.waiters: dict[str, asyncio.Future[int]] = {}
        self.applied = 0
        self.lost = 0
        self._busy = False

    @property
    def active(self) -> bool:
        """Whether commands published from now on will be applied here (the inbox is positioned)."""
        return self._task is not None and self._starting is None

    async def start(self) -> None:
        """Subscribe to the control channel unless already subscribed; return once positioned.

        Raises:
            BackendUnavailable: the backend cannot be reached.
        """
        if self._task is not None and self._starting is None:
            return
        if self._starting is not None:
            await asyncio.shield(self._starting)
            return
        starting = self._starting = asyncio.get_running_loop().create_future()
        try:
            connection, start = await self._open(None)
        except BaseException as exc:
            self._starting = None
            starting.set_exception(exc)
            starting.exception()  # retrieved: no other waiter may be there
            raise
        self._starting = None
        starting.set_result(None)
        broadcaster = self._broadcaster
        task = self._task = asyncio.get_running_loop().create_task(
            self._run(connection, start), name="rtbroadcast-control-inbox"
        )
        broadcaster._tasks.add(task)
        task.add_done_callback(broadcaster._task_done)

    async def _open(self, resume: ResumePoint | None) -> tuple[Connection, ResumePoint]:
        """Subscribe a new inbox from ``resume`` (``None``: from now); return it and where it starts.

        The start is known before anything is queued, so that an inbox closed before it applied anything
        reopens from there, not from the stream's top (which would skip what arrived meanwhile).
        """
        broadcaster = self._broadcaster
        connection = Connection(CONTROL_CHANNEL, limits=_CONTROL_LIMITS)
        cursor = connection.cursor
        cursor.begin_buffering()
        broadcaster.registry.add_internal(cursor)
        cursor.set_gap_handler(broadcaster._on_gap)
        self._connection = connection
        try:
            await broadcaster._ensure_subscribed(CONTROL_CHANNEL)
            if resume is None:
                top = await broadcaster.backend.position(CONTROL_CHANNEL)
                resume = ResumePoint(top.epoch, top.seq)
            await broadcaster._bring_up_to_date(cursor, resume, None)
        except BaseException:
            self._close(connection)
            raise
        return connection, resume

    def _close(self, connection: Connection) -> None:
        connection.cursor.set_gap_handler(None)
        connection.close(CloseCode.NORMAL, "control inbox stopped")
        broadcaster = self._broadcaster
        broadcaster.registry.remove_internal(connection.cursor)
        if self._connection is connection:
            self._connection = None
        if broadcaster._state is BroadcasterState.CONNECTED:
            broadcaster._spawn(broadcaster._release(CONTROL_CHANNEL))

    def release_soon(self) -> None:
        """Stop once the current command (if any) is applied, unless identified connections came back."""
        asyncio.get_running_loop().call_soon(self._release_if_idle)

    def _release_if_idle(self) -> None:
        broadcaster = self._broadcaster
        if (
            self._busy
            or broadcaster.registry.identified
            or broadcaster._state is not BroadcasterState.CONNECTED
        ):
            return
        self.stop()

    def stop(self) -> None:
        """Unsubscribe; commands still on their way are not applied (there is nothing here to change)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        connection = self._connection
        if connection is not None:
            self._close(connection)
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_result(0)

    async def _run(self, connection: Connection, position: ResumePoint) -> None:
        """Apply commands in order from ``position``; reopen the inbox (resuming) if it closes under us."""
        while True:
            item = await connection.get()
            if item is None:
                if self._task is not asyncio.current_task():
                    return  # stopped
                code = connection.close_code
                self._close(connection)
                logger.warning(
                    "the server-side subscription inbox closed (%s %s); reopening it",
                    code,
                    connection.close_reason,
                )
                connection, position = await self._reopen(position)
                continue
            if isinstance(item, str):
                try:
                    frame = decode_server_frame(item)
                except Exception:  # only the broadcaster's own frames are queued here: never stop on one
                    logger.exception("unexpected frame in the server-side subscription inbox")
                    continue
                if isinstance(frame, ResyncRequired):
                    self.lost += 1
                    logger.warning(
                        "server-side subscription commands may have been lost (%s): connections "
                        "changed by subscribe_connections(), unsubscribe_connections() or "
                        "disconnect_connections() meanwhile may not have been changed on this process",
                        frame.reason,
                    )
                    position = ResumePoint(frame.epoch, frame.seq)
                continue
            position = ResumePoint(item.epoch, item.seq)
            try:
                command = decode_control(item.data)
            except ValueError as exc:
                logger.error("ignoring control message %d: %s", item.seq, exc)
                continue
            self._busy = True
            try:
                changed = await self._broadcaster._apply_control(command)
            except Exception:
                logger.exception("applying control command %d (%s) failed", item.seq, command.action)
                changed = 0
            finally:
                self._busy = False
            self.applied += 1
            waiter = self.waiters.get(command.nonce) if command.nonce else None
            if waiter is not None and not waiter.done():
                waiter.set_result(changed)
            if not self._broadcaster.registry.identified:
                self.release_soon()

    async def _reopen(self, position: ResumePoint) -> tuple[Connection, ResumePoint]:
        """Open the inbox again from ``position``, retrying with capped exponential backoff and jitter."""
        delay = 0.1
        while True:
            try:
                return await self._open(position)
            except Exception as exc:  # the task must not die: it is the process's only way to hear commands
                logger.warning("cannot reopen the server-side subscription inbox: %s", exc)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 5.0)
