"""The single-Redis backend: :class:`RedisBackend`, built from the parts of this package.

Live fan-out travels over Redis PUB/SUB (one connection per process, ``_listener``); history lives in a Redis
Stream per channel. One Lua script per publish (``_scripts``) assigns the seq, appends to the stream and
PUBLISHes, so the live stream and the history can never disagree. Publishes and reads share one pipelined
command connection per process: those made in one loop turn go out together, in writes of up to 16
(``_redis_pipe``), each with its own reply, error and deadline. Key names: ``_keys``; URL options:
``_options``; presence: ``_presence``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._config import optional_count, redact_url, seconds
from ...errors import BackendError, BackendUnavailable, ConfigurationError, StateError
from ...presence import DEFAULT_PRESENCE_HEARTBEAT
from .._reconnect import check_reconnect_delay
from .._redis_pipe import CommandPipe, PushConnection, open_pipe, open_push
from ..base import BackendListener, Envelope, History, StreamPosition
from ._keys import KeyLayout, check_key_prefix, pubsub_suffix
from ._listener import PubSubListener, State
from ._options import SCHEMES, check_redis_py_url, read_option, split_url
from ._presence import RedisPresence, RedisPresenceMixin
from ._scripts import SCRIPTS, Script
from ._shared import (
    DEFAULT_HISTORY_SIZE,
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_META_TTL,
    DEFAULT_PING_INTERVAL,
    DEFAULT_RECONNECT_DELAY,
    DEFAULT_TIMEOUT,
    DEFAULT_UNPUBLISHED_TTL,
    UNREACHABLE,
    ChannelScripts,
    ChannelSettings,
    consume,
    is_transient,
    published,
)

__all__ = ["DEFAULT_MAX_CONNECTIONS", "RedisBackend"]

logger = logging.getLogger("rtbroadcast.redis")

#: Connections of the redis-py client's pool (for hooks that use the client); publishes and reads go on the
#: pipelined command connection instead (see _redis_pipe).
DEFAULT_MAX_CONNECTIONS: Final = 50


class RedisBackend(RedisPresenceMixin):
    """Share channels between processes through Redis: PUB/SUB for live events, Streams for history.

    Pass a URL (``redis://[:password@]host:port/db``, ``rediss://`` for TLS, ``unix:///path.sock``) or a
    ``redis.asyncio.Redis`` client you own (it is not closed on :meth:`disconnect`).

    Args:
        url: the Redis URL; redis-py options may follow in the query (``?socket_keepalive=true``).
        client: an existing ``redis.asyncio.Redis`` client, instead of ``url``.
        key_prefix: first part of every key and PUB/SUB channel; give each application sharing a Redis its
            own (PUB/SUB ignores database numbers, so this is also what keeps two databases apart).
        history_size: events kept per channel for resume, at least (Redis trims streams approximately,
            so a few more may be kept); 0 disables history.
        history_ttl: seconds an event stays in history; ``None`` keeps it until pushed out by size (and
            until the channel's ``meta_ttl`` runs out).
        meta_ttl: seconds a channel's epoch and seq outlive its last publish or read; ``None`` keeps them
            forever. When they expire the channel starts a new epoch, and its clients resync.
        unpublished_ttl: seconds the epoch of a channel nobody published to outlives its last read. Reads
            create it, so that a client connecting before the first publish keeps its epoch; this bounds
            what reading random channel names costs (a small hash each, for this long).
        idempotency_ttl: seconds an idempotency key is remembered.
        timeout: seconds a publish, read, subscribe or connect may take before
            :class:`~rtbroadcast.BackendUnavailable` is raised.
        ping_interval: seconds of silence on the PUB/SUB connection before it is pinged; with no answer
            within another interval the connection is taken for dead and re-established.
        reconnect_delay: ``(first, most)`` seconds to wait between reconnect attempts; the delay doubles
            after each failure, with random jitter.
        max_reconnect_attempts: consecutive failed attempts after which the listener gives up (``None``:
            never). Once it gave up, the backend reports ``failed`` and subscribing raises.
        presence_heartbeat: seconds; this process refreshes its presence members every half of it, and
            the members of a process that died without leaving are gone within twice it. Give every
            process the same value.

    Raises:
        ConfigurationError: an argument has the wrong type or an impossible value (zero, negative, ``NaN``
            or infinite durations), or the URL has an unknown or invalid redis-py option (see
            :meth:`from_url`), or rtbroadcast's own options in its query (those are for :meth:`from_url`).
    """

    name = "redis"
    supports_headers = True

    #: The channel scripts, by name (the Sentinel backend's also check which master wrote a channel).
    _script_set: ClassVar[dict[str, Script]] = SCRIPTS
    #: Whether the backend finds its server itself (Sentinel) rather than from ``url`` or ``client``.
    _finds_server: ClassVar[bool] = False

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        key_prefix: str = "rtb",
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_ttl: float | None = None,
        meta_ttl: float | None = DEFAULT_META_TTL,
        unpublished_ttl: float = DEFAULT_UNPUBLISHED_TTL,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        reconnect_delay: tuple[float, float] = DEFAULT_RECONNECT_DELAY,
        max_reconnect_attempts: int | None = None,
        presence_heartbeat: float = DEFAULT_PRESENCE_HEARTBEAT,
    ) -> None:
        if (url is None) == (client is None) and not self._finds_server:
            raise ConfigurationError("pass either a Redis URL or a redis.asyncio.Redis client")
        if client is not None and not isinstance(client, Redis):
            raise ConfigurationError(
                f"client must be a redis.asyncio.Redis, not {type(client).__module__}."
                f"{type(client).__qualname__}"
            )
        if url is not None:
            if not isinstance(url, str):
                raise ConfigurationError(f"url must be a Redis URL string, not {type(url).__name__}")
            if urlsplit(url).scheme not in SCHEMES:
                raise ConfigurationError(
                    f"a Redis URL starts with redis://, rediss:// or unix://, not {redact_url(url)!r}"
                )
            check_redis_py_url(url)
        self._keys = KeyLayout(check_key_prefix(key_prefix))
        settings = ChannelSettings(
            history_size=history_size,
            history_ttl=history_ttl,
            meta_ttl=meta_ttl,
            unpublished_ttl=unpublished_ttl,
            idempotency_ttl=idempotency_ttl,
        )
        self._timeout = seconds("timeout", timeout)
        self._ping_interval = seconds("ping_interval", ping_interval)
        self._reconnect_delay = check_reconnect_delay(reconnect_delay)
        self._max_attempts = optional_count("max_reconnect_attempts", max_reconnect_attempts, minimum=1)
        self._url = url
        self._own_client = client is None
        self._client: Redis | None = client
        self._scripts = ChannelScripts(self._run, self._script_set, self._keys, settings)
        self._presence = RedisPresence(self, seconds("presence_heartbeat", presence_heartbeat))
        # The command connection every publish and read shares (see _redis_pipe), and its opening.
        self._pipe: CommandPipe | None = None
        self._pipe_opening: asyncio.Task[CommandPipe] | None = None
        self._listener: BackendListener | None = None
        # The PUB/SUB connection, its channels and the backend's state.
        self._pubsub = PubSubListener(self)
        # The last failure and the publish errors, for stats().
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._publish_errors = 0

    def __repr__(self) -> str:
        return f"<RedisBackend {self._where()} {self._pubsub.state.value}>"

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        """Build from a URL; rtbroadcast options may be given in its query.

        ``redis://host:6379/0?key_prefix=app&history_size=500&history_ttl=3600&meta_ttl=86400&timeout=2``;
        redis-py's own options (``socket_keepalive``, ``max_connections``, ``ssl_ca_certs``...) are checked
        here too and passed to redis-py.

        Raises:
            ConfigurationError: an option is unknown (the message suggests the closest known one), given
                twice, meant for another scheme (``ssl_*`` on ``redis://``), or has an invalid value.
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"url must be a Redis URL string, not {type(url).__name__}")
        redis_url, ours = split_url(url)
        options: dict[str, Any] = {key: read_option(key, value) for key, value in ours.items()}
        return cls(redis_url, **options)

    # -- naming -------------------------------------------------------------------------------------

    def keys(self, channel: str) -> dict[str, str]:
        """Return the Redis keys and the PUB/SUB channel name used for ``channel`` (for operators, tests).

        By role: ``meta``, ``stream``, ``idempotency`` (the start of every idempotency key's name),
        ``pubsub``, and the presence keys ``presence``, ``presence_order``, ``presence_procs`` and
        ``presence_version``. The Redis how-to's "Keys" table says what each holds and when it expires.
        """
        return self._keys.describe(channel, presence=True)

    def _where(self) -> str:
        if self._url is not None:
            return redact_url(self._url)
        kwargs = self._client.connection_pool.connection_kwargs if self._client is not None else {}
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    # -- lifecycle ----------------------------------------------------------------------------------

    async def connect(self, listener: BackendListener) -> None:
        """Connect to Redis and start the listener task.

        Raises:
            StateError: already connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
        """
        pubsub = self._pubsub
        if pubsub.state not in (State.NEW, State.CLOSED):
            raise StateError(
                f"cannot connect a Redis backend that is {pubsub.state.value}; disconnect() first"
            )
        pubsub.state = State.CONNECTING
        if self._client is None:
            self._client = self._new_client()
        client = self._client
        kwargs = client.connection_pool.connection_kwargs
        self._keys.configure(
            pubsub_suffix=pubsub_suffix(int(kwargs.get("db", 0) or 0)),
            encoding=(kwargs.get("encoding", "utf-8"), kwargs.get("encoding_errors", "strict")),
        )
        try:
            conn = await self._open()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._open_pipe()
            except BaseException:
                conn.close(RedisConnectionError("the command connection could not be opened"))
                raise
        except BaseException as exc:
            await self._close_pipe()
            await self._close_client()
            pubsub.state = State.CLOSED
            if isinstance(exc, (*UNREACHABLE, RedisError)):
                self._note_error(exc)
                raise BackendUnavailable(f"cannot connect to Redis at {self._where()}: {exc}") from exc
            raise
        self._listener = listener
        pubsub.start(conn)
        self._presence.start(client)
        logger.debug("connected to Redis at %s", self._where())

    def _new_client(self) -> Redis:
        """Create the redis-py client for ``url`` (at connect, when none was given)."""
        assert self._url is not None
        # No retries inside redis-py: a retried publish could be applied twice, and a retry loop would
        # outlast the timeout. The listener reconnects on its own schedule. RESP2 unless the URL says
        # otherwise: redis-py 8.1.0 over RESP3 hands out pooled connections the server has closed, so
        # the first commands after a Redis restart fail (redis/redis-py#4252).
        # A blocking pool: a burst of commands (thousands of clients attaching at once) waits for one of
        # its connections instead of failing with "Too many connections" past redis-py's default of 100.
        # `?max_connections=N` in the URL sets the size.
        pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=DEFAULT_MAX_CONNECTIONS,
            timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            protocol=2,
        )
        return Redis(connection_pool=pool)

    async def disconnect(self) -> None:
        """Stop the listener, fail pending subscribes and close connections. Never raises."""
        pubsub = self._pubsub
        if pubsub.state in (State.NEW, State.CLOSED):
            return
        pubsub.state = State.CLOSED
        await pubsub.cancel()
        await self._presence.stop()
        await pubsub.close(StateError("the Redis backend was disconnected"))
        await self._close_pipe()
        self._listener = None
        await self._close_client()

    async def _close_client(self) -> None:
        if self._own_client and self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
                await client.connection_pool.disconnect()
            except Exception as exc:
                logger.debug("closing the Redis client failed: %r", exc)

    @property
    def available(self) -> bool:
        """Whether the PUB/SUB connection is up."""
        return self._pubsub.state is State.CONNECTED

    @property
    def failed(self) -> bool:
        """Whether the listener gave up reconnecting (only with ``max_reconnect_attempts``)."""
        return self._pubsub.state is State.FAILED

    def stats(self) -> Mapping[str, object]:
        """Return the connection state, reconnect counters and the last error (JSON-serialisable)."""
        pubsub = self._pubsub
        down = pubsub.down_since
        return {
            "backend": self.name,
            "server": self._where(),
            "state": pubsub.state.value,
            "listener": pubsub.status(),
            "subscribed": len(pubsub.channels),
            "received": pubsub.received,
            "reconnects": pubsub.reconnects,
            "reconnect_attempts": pubsub.attempts,
            "outage_seconds": None if down is None else round(time.monotonic() - down, 3),
            "publish_errors": self._publish_errors,
            "listener_errors": pubsub.listener_errors,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            **self._presence.stats(),
        }

    def _require(self, action: str) -> Redis:
        if self._pubsub.state in (State.NEW, State.CLOSED, State.CONNECTING) or self._client is None:
            raise StateError(f"cannot {action}: the Redis backend is not connected; call connect() first")
        return self._client

    def _note_error(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._last_error_at = time.time()

    def _translate(self, exc: BaseException, action: str) -> BackendError:
        self._note_error(exc)
        if isinstance(exc, ResponseError) and not is_transient(str(exc)):
            return BackendError(f"Redis refused to {action}: {exc}")
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            detail = f"no answer within {self._timeout} s"
        else:
            detail = str(exc) or type(exc).__name__
        return BackendUnavailable(f"cannot {action} on Redis at {self._where()}: {detail}")

    async def _run(
        self,
        script: Script,
        keys: list[bytes],
        args: list[bytes],
        action: str,
        *,
        retry: bool = False,
        packed: bytes | None = None,
    ) -> Any:
        """Run one of the scripts on the shared command connection within the timeout.

        With ``retry``, a connection error is retried once (within the same timeout): the connection may
        have died with a Redis restart that nobody used it through yet. Only scripts that may run twice
        (reads) retry; a publish must not, since its first attempt may have been applied. ``packed``: see
        :meth:`Script.evalsha`.

        Raises:
            BackendUnavailable: Redis cannot be reached, or answered "not now" (memory full, loading).
            BackendError: Redis refused the command for another reason.
        """
        self._require(action)
        deadline: float | None = None
        try:
            while True:
                try:
                    pipe = self._pipe
                    if pipe is None or pipe.closed:
                        if deadline is None:
                            deadline = asyncio.get_running_loop().time() + self._timeout
                        async with asyncio.timeout_at(deadline):
                            pipe = await self._open_pipe()
                    if deadline is None:
                        # The pipe's clock, not asyncio.get_running_loop(): that costs a getpid() call.
                        deadline = pipe.deadline()
                    reply = await self._send(pipe, script, keys, args, deadline, packed=packed)
                    if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                        # Not run, so safe to send again; EVAL also puts it back in Redis's cache.
                        reply = await self._send(pipe, script, keys, args, deadline, cached=False)
                    if isinstance(reply, ResponseError):
                        raise reply
                    return reply
                except RedisConnectionError:
                    if not retry:
                        raise
                    retry = False
        except (*UNREACHABLE, RedisError) as exc:
            raise self._translate(exc, action) from exc

    async def _open_pipe(self) -> CommandPipe:
        """Return the command connection, opening it if needed; concurrent callers share one opening.

        Raises:
            redis.exceptions.ConnectionError, TimeoutError: Redis cannot be reached.
        """
        if self._pipe is not None and not self._pipe.closed:
            return self._pipe
        task = self._pipe_opening
        if task is None:
            task = self._pipe_opening = asyncio.get_running_loop().create_task(self._new_pipe())
            task.add_done_callback(consume)
        # A caller that gives up (its timeout) must not cancel the opening others wait for.
        return await asyncio.shield(task)

    async def _new_pipe(self) -> CommandPipe:
        try:
            async with asyncio.timeout(self._timeout):
                template = await self._pipe_template()
                pipe = await open_pipe(template, request_timeout=self._timeout, where=self._where())
                try:
                    await self._pipe_opened(pipe)
                except BaseException:
                    await pipe.close()
                    raise
            # Scripts first, so that EVALSHA finds them even on a Redis that just restarted.
            for script in self._script_set.values():
                pipe.request(script.load).add_done_callback(consume)
            old, self._pipe = self._pipe, pipe
            if old is not None:
                await old.close()
            return pipe
        finally:
            self._pipe_opening = None

    async def _pipe_template(self) -> AbstractConnection:
        """Return a connection object that is never connected: it says where and how (TLS, login) the
        command connection, and the PUB/SUB connection of one Redis, connect."""
        assert self._client is not None
        pool = self._client.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    async def _pipe_opened(self, pipe: CommandPipe) -> None:
        """Check a new command connection before any script goes on it (nothing to check on one Redis)."""

    def _send(
        self,
        pipe: CommandPipe,
        script: Script,
        keys: list[bytes],
        args: list[bytes],
        deadline: float,
        *,
        cached: bool = True,
        packed: bytes | None = None,
    ) -> asyncio.Future[Any]:
        """Queue ``script`` on ``pipe`` (``EVALSHA``, or ``EVAL`` if not ``cached``); return its reply.

        Raises:
            redis.exceptions.ConnectionError: the pipe is closed.
        """
        command = script.evalsha(keys, args, packed=packed) if cached else script.eval(keys, args)
        return pipe.request(command, deadline)

    async def _close_pipe(self) -> None:
        task, self._pipe_opening = self._pipe_opening, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.close()

    # -- publishing and reading ---------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        payload: str,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Assign the next seq, append to the channel's stream and PUBLISH, in one Lua script.

        A publish that times out after Redis received it may still have been applied; retry with the same
        ``idempotency_key`` to be sure it is applied once.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
            BackendError: Redis refused the script.
        """
        keys, args, packed, head = self._scripts.publish_request(channel, payload, idempotency_key, headers)
        try:
            reply = await self._run(self._script_set["publish"], keys, args, "publish", packed=packed)
        except BackendError:
            self._publish_errors += 1
            raise
        return published(channel, head, reply, headers)

    async def position(self, channel: str) -> StreamPosition:
        """Return the channel's epoch and seq, read together; creates the epoch of a new channel.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
        """
        return await self._scripts.position(channel)

    async def history(self, channel: str, since: int, *, limit: int) -> History:
        """Read the envelopes after ``since`` and the position, in one script.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
        """
        return await self._scripts.history(channel, since, limit)

    # -- subscriptions ------------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """SUBSCRIBE to the channel and return once Redis confirmed it.

        While the listener is reconnecting, waits (up to the timeout) for the reconnect to subscribe it.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: no confirmation within the timeout, or the listener gave up.
        """
        self._require("subscribe")
        await self._pubsub.subscribe(channel, self._keys.pubsub(channel))

    async def unsubscribe(self, channel: str) -> None:
        """UNSUBSCRIBE from the channel (not waiting for the confirmation). Never raises."""
        await self._pubsub.unsubscribe(channel)

    # -- connections of our own ---------------------------------------------------------------------

    async def _open(self) -> PushConnection:
        """Open the PUB/SUB connection, of our own, outside the client's pool (see ``_redis_pipe``).

        Raises:
            redis.exceptions.ConnectionError, TimeoutError: Redis cannot be reached.
            OSError: the socket could not be opened.
        """
        async with asyncio.timeout(self._timeout):
            return await open_push(await self._pipe_template(), where=self._where())

    async def _drop_idle_connections(self) -> None:
        """Close the client pool's idle connections: after an outage they may lead to a dead server."""
        # Without this, the first commands after a Redis restart (the broadcaster's history reads that
        # repair its connections) could be sent on sockets of the previous server process and fail.
        if self._client is None:
            return
        try:
            await self._client.connection_pool.disconnect(inuse_connections=False)
        except Exception as exc:
            logger.debug("closing idle Redis connections failed: %r", exc)
