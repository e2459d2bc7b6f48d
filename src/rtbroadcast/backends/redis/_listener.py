"""The PUB/SUB listener of the single-Redis backend: one connection per process, kept up and subscribed.

The backend's life is one state machine (:class:`State`), held here because the listener moves it most::

    NEW -> CONNECTING -> CONNECTED <-> RECONNECTING
                |            |               |
                v            v               v
              CLOSED <--- (disconnect)     FAILED (max_reconnect_attempts failed in a row)

A task reads the connection; when it fails (a Redis restart, a dead socket found by the ping), the task
reconnects with capped exponential backoff and jitter, resubscribes every wanted channel, and once Redis
confirmed them all tells the backend's listener which channels may have missed messages
(:data:`~._shared.RECONNECTED`). ``subscribe()`` returns once Redis confirmed the channel, on the current
connection or the next one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...errors import BackendUnavailable
from .._reconnect import reconnect_pause
from .._redis_pipe import PushConnection, pack
from ..base import BackendListener
from ._presence import is_presence_message
from ._shared import RECONNECTED, UNREACHABLE, envelope_of, text

if TYPE_CHECKING:
    from ._keys import KeyLayout
    from ._presence import RedisPresence

__all__ = ["PubSubListener", "State"]

logger = logging.getLogger("rtbroadcast.redis")


class State(enum.Enum):
    """Where the Redis backend is in its life (see the module's docstring)."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    CLOSED = "closed"


class _ListenerGaveUp(Exception):
    """The listener stopped reconnecting after ``max_reconnect_attempts``."""


class _Host(Protocol):
    """What :class:`PubSubListener` needs of the :class:`~rtbroadcast.backends.redis.RedisBackend`."""

    _timeout: float
    _ping_interval: float
    _reconnect_delay: tuple[float, float]
    _max_attempts: int | None
    _last_error: str | None
    _listener: BackendListener | None
    _presence: RedisPresence
    _keys: KeyLayout

    async def _open(self) -> PushConnection: ...

    async def _drop_idle_connections(self) -> None: ...

    def _note_error(self, exc: BaseException) -> None: ...

    def _where(self) -> str: ...


class PubSubListener:
    """The PUB/SUB connection, the channels subscribed on it, and the task that keeps both up.

    Args:
        host: the backend whose connections, listener, options and error record it uses.
    """

    def __init__(self, host: _Host) -> None:
        self._host = host
        self.state = State.NEW
        self._task: asyncio.Task[None] | None = None
        # The PUB/SUB connection while it is up and subscribed; None while reconnecting.
        self._conn: PushConnection | None = None
        self._handover: PushConnection | None = None
        # While a connection is being (re)subscribed: the channels it subscribes, those Redis has not
        # confirmed yet, and whether to announce an interruption once it has (after a reconnect).
        self._restoring: dict[str, str] = {}
        self._outstanding: set[str] = set()
        self._announce = False
        # The keepalive of the current connection: its timer, and when the unanswered PING went out (with
        # how many chunks the connection had received then: loop time has only millisecond steps).
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pinged_at: float | None = None
        self._pinged_chunks = 0
        # Channels this process wants (channel -> PUB/SUB name), and the way back.
        self.channels: dict[str, str] = {}
        self._names: dict[str, str] = {}
        # Per PUB/SUB name, one entry per SUBSCRIBE in flight on the current connection; Redis confirms
        # them in order, and each confirmation releases the subscribe() calls waiting on its entry.
        self._waiters: dict[str, deque[list[asyncio.Future[None]]]] = {}
        # subscribe() calls made while reconnecting: the reconnect subscribes them.
        self._orphans: dict[str, list[asyncio.Future[None]]] = {}
        # Counters, for the backend's stats().
        self.reconnects = 0
        self.attempts = 0
        self.down_since: float | None = None
        self.received = 0
        self.listener_errors = 0
        # For the reconnect jitter: seeded again by start(), in the process that connects.
        self._random = random.Random()

    # -- what the backend calls ---------------------------------------------------------------------

    def start(self, conn: PushConnection) -> None:
        """Mark the backend connected and start the task that reads ``conn`` (already connected)."""
        self.state = State.CONNECTED
        self._random.seed()  # from os.urandom: a process forked after the backend was made has its own
        # Held here until the task takes it, so that a stop() before the task ever ran closes it.
        self._handover = conn
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="rtbroadcast-redis-listener")
        self._task.add_done_callback(self._listener_done)

    async def cancel(self) -> None:
        """Stop the task (the state is already ``CLOSED``). Never raises."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() neither raises the task's exception nor swallows a cancellation of the caller.
            await asyncio.wait([task])

    async def close(self, exc: BaseException) -> None:
        """Fail pending subscribes with ``exc``, close the connection and forget every channel."""
        self._fail_waiters(exc)
        for conn in (self._conn, self._handover):
            if conn is not None:
                conn.close(RedisConnectionError("the Redis backend was disconnected"))
        self._conn = self._handover = None
        self.channels.clear()
        self._names.clear()

    def status(self) -> str:
        """Return whether the task is ``running``, ``stopped`` or ``failed``."""
        task = self._task
        if task is None:
            return "stopped"
        if not task.done():
            return "running"
        return "failed" if not task.cancelled() and task.exception() is not None else "stopped"

    async def subscribe(self, channel: str, name: str) -> None:
        """SUBSCRIBE to ``name`` (``channel``'s PUB/SUB channel) and return once Redis confirmed it.

        Raises:
            BackendUnavailable: no confirmation within the timeout, or the listener gave up.
        """
        host = self._host
        if self.state is State.FAILED:
            raise BackendUnavailable(f"the Redis listener gave up reconnecting: {host._last_error}")
        self.channels[channel] = name
        self._names[name] = channel
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn = self._conn
        if conn is None:
            self._orphans.setdefault(name, []).append(waiter)
        else:
            self._waiters.setdefault(name, deque()).append([waiter])
            # A connection that broke meanwhile takes nothing; the listener's reconnect subscribes it.
            conn.send(pack(b"SUBSCRIBE", host._keys.encode(name)))
        try:
            async with asyncio.timeout(host._timeout):
                await waiter
        except TimeoutError:
            if self.channels.get(channel) == name:
                del self.channels[channel]
                self._names.pop(name, None)
            if conn is not None and self._conn is conn:
                # A connection that does not confirm within the timeout is not to be trusted with the
                # order of later confirmations either: the listener starts over on a fresh one.
                logger.warning(
                    "no SUBSCRIBE confirmation from Redis within %s s; reconnecting", host._timeout
                )
                conn.close(RedisTimeoutError(f"no SUBSCRIBE confirmation within {host._timeout} s"))
            raise BackendUnavailable(
                f"cannot subscribe to {channel!r} on Redis at {host._where()}: "
                f"not confirmed within {host._timeout} s ({host._last_error or 'no error recorded'})"
            ) from None
        except asyncio.CancelledError:
            if not waiter.done():
                waiter.cancel()
            raise

    async def unsubscribe(self, channel: str) -> None:
        """UNSUBSCRIBE from the channel (not waiting for the confirmation). Never raises."""
        name = self.channels.pop(channel, None)
        if name is None:
            return
        self._names.pop(name, None)
        conn = self._conn
        if conn is not None:  # else the reconnect subscribes only what is still wanted
            conn.send(pack(b"UNSUBSCRIBE", self._host._keys.encode(name)))

    def _fail_waiters(self, exc: BaseException) -> None:
        for entries in self._waiters.values():
            for entry in entries:
                for waiter in entry:
                    if not waiter.done():
                        waiter.set_exception(exc)
        for waiters in self._orphans.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        self._waiters.clear()
        self._orphans.clear()

    # -- the task -----------------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Keep a PUB/SUB connection up, subscribed to every wanted channel, and deliver its messages."""
        host = self._host
        conn, self._handover = self._handover, None
        reconnected = False
        while True:
            if conn is None:
                conn = await self._reconnect()
                await host._drop_idle_connections()
            try:
                await self._serve(conn, announce=reconnected)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                host._note_error(exc)
                if not isinstance(exc, (*UNREACHABLE, RedisError)):
                    self.listener_errors += 1
                    logger.error("Redis listener failed unexpectedly; reconnecting", exc_info=exc)
                else:
                    logger.warning(
                        "lost the Redis PUB/SUB connection to %s (%s); reconnecting", host._where(), exc
                    )
            finally:
                self._conn = None
                self._stop_pings()
                conn.close(RedisConnectionError("the PUB/SUB connection was given up"))
            conn = None
            reconnected = True
            if self.down_since is None:
                self.down_since = time.monotonic()
            if self.state is State.CONNECTED:
                self.state = State.RECONNECTING

    async def _reconnect(self) -> PushConnection:
        """Open a new connection, waiting with capped exponential backoff and jitter between attempts.

        Raises:
            _ListenerGaveUp: ``max_reconnect_attempts`` failed in a row.
        """
        host = self._host
        # The count goes back to 0 only once a connection is fully restored (_restored), so a connection
        # that opens but fails at once (say, an ACL refusing SUBSCRIBE) still backs off, and can give up.
        while True:
            await asyncio.sleep(reconnect_pause(self._random, self.attempts, host._reconnect_delay))
            self.attempts += 1
            try:
                return await host._open()
            except Exception as exc:
                host._note_error(exc)
                logger.debug("Redis reconnect attempt %d failed: %r", self.attempts, exc)
                if self.attempts in (1, 10) or self.attempts % 100 == 0:
                    logger.warning(
                        "cannot reach Redis at %s (attempt %d): %s", host._where(), self.attempts, exc
                    )
                if host._max_attempts is not None and self.attempts >= host._max_attempts:
                    raise _ListenerGaveUp(self.attempts) from exc

    async def _serve(self, conn: PushConnection, *, announce: bool) -> None:
        """Subscribe every wanted channel on ``conn``, then deliver its messages until it fails.

        Messages are handled as they are parsed (:meth:`_on_reply`, called from the connection's
        ``data_received``); this coroutine only waits for the connection's end, and raises its error.
        """
        # Gather whoever waits for a subscription: their SUBSCRIBE went to a dead connection, or was made
        # while there was none. Between setting _conn and taking the snapshot nothing awaits, so a
        # subscribe() call either is in the snapshot or sends its own SUBSCRIBE on the new connection.
        pending: dict[str, list[asyncio.Future[None]]] = {}
        for name, entries in self._waiters.items():
            for entry in entries:
                pending.setdefault(name, []).extend(entry)
        for name, waiters in self._orphans.items():
            pending.setdefault(name, []).extend(waiters)
        self._waiters = {}
        self._orphans = {}
        self._conn = conn
        channels = dict(self.channels)
        names = list(channels.values())
        self._restoring = channels
        self._outstanding = set(names)
        self._announce = announce
        for name in names:
            self._waiters[name] = deque([pending.pop(name, [])])
        for waiters in pending.values():  # unsubscribed meanwhile: nothing to wait for
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        conn.on_reply = self._on_reply
        self._start_pings(conn)
        if names:
            encode = self._host._keys.encode
            conn.send(pack(b"SUBSCRIBE", *(encode(name) for name in names)))
        else:
            self._restored(channels, announce)
        raise await conn.lost

    def _on_reply(self, reply: Any) -> None:
        """Handle one reply on the PUB/SUB connection: a message, a confirmation, a PONG or an error."""
        if type(reply) is list and len(reply) > 2:
            kind = reply[0]
            if kind == b"message":
                self._deliver(reply[1], reply[2])
            elif kind == b"subscribe":
                self._confirmed(text(reply[1]))
            return
        if isinstance(reply, ResponseError):
            # A refused SUBSCRIBE (an ACL, say): start over on a new connection, backing off, as before.
            conn = self._conn
            if conn is not None:
                conn.close(reply)

    def _confirmed(self, name: str) -> None:
        in_flight = self._waiters.get(name)
        if in_flight:
            for waiter in in_flight.popleft():
                if not waiter.done():
                    waiter.set_result(None)
            if not in_flight:
                del self._waiters[name]
        outstanding = self._outstanding
        if outstanding:
            outstanding.discard(name)
            if not outstanding:
                self._restored(self._restoring, self._announce)

    # -- the keepalive --------------------------------------------------------------------------------

    def _start_pings(self, conn: PushConnection) -> None:
        self._pinged_at = None
        self._ping_timer = asyncio.get_running_loop().call_at(
            conn.last_heard + self._host._ping_interval, self._tick, conn
        )

    def _stop_pings(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    def _tick(self, conn: PushConnection) -> None:
        """PING after ``ping_interval`` of silence; give the connection up after as long again unanswered."""
        loop = asyncio.get_running_loop()
        now, interval = loop.time(), self._host._ping_interval
        pinged_at = self._pinged_at
        if pinged_at is not None and conn.chunks != self._pinged_chunks:
            pinged_at = self._pinged_at = None  # heard from since: alive
        if pinged_at is not None:
            if now - pinged_at >= interval:
                self._ping_timer = None
                conn.close(RedisTimeoutError(f"no answer to PING within {interval} s"))
                return
            due = pinged_at + interval
        elif now - conn.last_heard >= interval:
            conn.send(pack(b"PING"))
            self._pinged_at, self._pinged_chunks = now, conn.chunks
            due = now + interval
        else:
            due = conn.last_heard + interval
        self._ping_timer = loop.call_at(due, self._tick, conn)

    def _restored(self, channels: Mapping[str, str], announce: bool) -> None:
        """Mark the connection as up; after a reconnect, tell the listener what it may have missed."""
        if self.state is State.CLOSED:
            return
        self.state = State.CONNECTED
        if not announce:
            return
        self.reconnects += 1
        down = self.down_since
        self.down_since = None
        self.attempts = 0
        logger.info(
            "reconnected to Redis at %s after %.1f s; resubscribed %d channel(s)",
            self._host._where(),
            0.0 if down is None else time.monotonic() - down,
            len(channels),
        )
        listener = self._host._listener
        wanted = [channel for channel in channels if channel in self.channels]
        if listener is not None and wanted:
            try:
                listener.on_interruption(wanted, RECONNECTED)
            except Exception:
                self.listener_errors += 1
                logger.exception("the backend listener failed in on_interruption()")

    def _deliver(self, name: bytes, message: bytes) -> None:
        channel = self._names.get(name.decode())
        listener = self._host._listener
        if channel is None or listener is None:
            return  # unsubscribed while the message was on its way
        body = message.decode()
        if is_presence_message(body):
            self._host._presence.deliver(channel, body)
            return
        self.received += 1
        try:
            envelope = envelope_of(channel, body)
        except ValueError:
            self.listener_errors += 1
            logger.error("ignoring a malformed message on Redis channel %r: %.80r", name, message)
            return
        try:
            listener.on_envelope(envelope)
        except Exception:
            # One failing callback must not take the listener, and every other channel, down with it.
            self.listener_errors += 1
            logger.exception("the backend listener failed in on_envelope() for %r", channel)

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.state is State.CLOSED:
            return
        host = self._host
        exc = task.exception()
        self.state = State.FAILED
        self._conn = None
        if exc is not None:
            host._note_error(exc.__cause__ or exc)
        unavailable = BackendUnavailable(f"the Redis listener gave up: {host._last_error}")
        self._fail_waiters(unavailable)
        logger.error(
            "the Redis listener stopped after %d failed reconnect attempt(s); channels get no events until "
            "the broadcaster is restarted. Last error: %s",
            self.attempts,
            host._last_error,
            exc_info=exc if not isinstance(exc, _ListenerGaveUp) else None,
        )
        listener = host._listener
        if listener is not None and self.channels:
            try:
                listener.on_interruption(list(self.channels), "backend_failed")
            except Exception:
                logger.exception("the backend listener failed in on_interruption()")
