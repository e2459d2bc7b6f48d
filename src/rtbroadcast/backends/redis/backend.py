"""The Redis backend: many processes share channels through one Redis server.

Live fan-out travels over Redis PUB/SUB (one connection per process); history lives in a Redis Stream per
channel. One Lua script per publish assigns the seq, appends to the stream and PUBLISHes, so the live
stream and the history can never disagree. Publishes and reads share one pipelined command connection per
process: those made in one loop turn go out in one write (``_redis_pipe``), each with its own reply,
error and deadline.

Keys of a channel share one hash tag, so that Redis Cluster (``redis_cluster``) uses the same layout::

    rtb:{<channel>}:meta          hash: epoch, seq
    rtb:{<channel>}:stream        stream: one entry per event, ID "<seq>-0", fields d (data) and t (ms)
    rtb:{<channel>}:idem:<key>    string "<epoch>:<seq>" for an idempotency key
    rtb:{<channel>}               PUB/SUB channel: messages "<seq> <epoch> <data>" (and presence changes)
    rtb:{<channel>}:presence...   presence, see rtbroadcast.backends.redis_presence

``{``, ``}`` and ``%`` in a channel name are percent-escaped in key names, so every channel has a hash tag
of its own and no two channels can share a key.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import inspect
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._config import (
    count,
    did_you_mean,
    is_seconds,
    optional_count,
    optional_seconds,
    redact_url,
    seconds,
)
from ..errors import BackendError, BackendUnavailable, ConfigurationError, StateError
from ..presence import DEFAULT_PRESENCE_HEARTBEAT
from ..protocol import seq_prefix
from ._redis_pipe import CommandPipe, open_pipe, pack
from .base import BackendListener, Envelope, History, StreamPosition
from .redis_presence import RedisPresence, RedisPresenceMixin, is_presence_message

__all__ = ["RedisBackend"]

logger = logging.getLogger("rtbroadcast.redis")

DEFAULT_HISTORY_SIZE: Final = 1000
DEFAULT_META_TTL: Final = 30 * 24 * 3600.0
DEFAULT_UNPUBLISHED_TTL: Final = 24 * 3600.0
DEFAULT_IDEMPOTENCY_TTL: Final = 3600.0
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_PING_INTERVAL: Final = 10.0
DEFAULT_RECONNECT_DELAY: Final = (0.1, 3.0)
#: Connections of the redis-py client's pool (for hooks that use the client); publishes and reads go on the
#: pipelined command connection instead (see _redis_pipe).
DEFAULT_MAX_CONNECTIONS: Final = 50

#: The reason given to the listener after the PUB/SUB connection was re-established.
RECONNECTED: Final = "backend_reconnected"

# Errors that mean "Redis cannot be reached right now" (BusyLoadingError is a ConnectionError).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)
# Error replies that mean "not now" rather than "never": memory full, failover, loading, busy script.
_TRANSIENT_REPLIES = (
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOSCRIPT",
)

# -- Lua ------------------------------------------------------------------------------------------------
#
# Every script starts by making sure the channel has an epoch. A channel that lost its meta hash (expired,
# evicted, Redis restarted without persistence) starts a new epoch at seq 0, and its old history goes with
# it: a stream must never hold entries of two epochs. Creating the epoch on reads too means a client that
# connects before the first publish keeps its epoch when that publish happens.

_ENSURE_EPOCH = """
local function ensure_epoch(meta, stream, candidate)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then
    return epoch
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', candidate, 'seq', 0)
  return candidate
end
-- Keep a channel that is read alive, and return its seq. A channel nobody published to lives only
-- unpublished_ms after its last read, so that reading random channel names costs little for long.
local function touch(meta, meta_ms, unpublished_ms)
  local seq = tonumber(redis.call('HGET', meta, 'seq'))
  if seq == 0 then
    redis.call('PEXPIRE', meta, unpublished_ms)
  elseif meta_ms > 0 then
    redis.call('PEXPIRE', meta, meta_ms)
  end
  return seq
end
local function now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
"""

# KEYS: meta, stream[, idempotency key]
# ARGV: candidate epoch, payload head (the envelope text up to the seq), PUB/SUB channel,
#       history size, history ttl ms (0: none), meta ttl ms (0: none), idempotency ttl ms
# Returns {seq, epoch, duplicate (0/1), stored data of a duplicate or false}.
_PUBLISH = (
    _ENSURE_EPOCH
    + """
local meta, stream = KEYS[1], KEYS[2]
local size, history_ms, meta_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local epoch = ensure_epoch(meta, stream, ARGV[1])
if #KEYS == 3 then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, ':', 1, true)
    -- A key recorded in another epoch refers to a stream that no longer exists: publish again.
    if sep and string.sub(seen, 1, sep - 1) == epoch then
      local seq = string.sub(seen, sep + 1)
      local found = redis.call('XRANGE', stream, seq .. '-0', seq .. '-0')
      local data = false
      if found[1] then
        data = found[1][2][2]
      end
      return {tonumber(seq), epoch, 1, data}
    end
  end
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local data = ARGV[2] .. seq .. '}'
if size > 0 then
  local id = seq .. '-0'
  local ms = now_ms()
  local added = redis.pcall('XADD', stream, 'MAXLEN', '~', size, id, 'd', data, 't', ms)
  if type(added) == 'table' and added.err then
    -- The stream is ahead of the counter (a key was restored or edited by hand): drop the stale history
    -- rather than fail the publish; readers see incomplete history and resync.
    redis.call('DEL', stream)
    redis.call('XADD', stream, 'MAXLEN', '~', size, id, 'd', data, 't', ms)
  end
  local stream_ms = history_ms
  if stream_ms == 0 then
    stream_ms = meta_ms
  end
  if stream_ms > 0 then
    redis.call('PEXPIRE', stream, stream_ms)
  end
end
if meta_ms > 0 then
  redis.call('PEXPIRE', meta, meta_ms)
else
  redis.call('PERSIST', meta)  -- a read may have created it with the shorter ttl of unpublished channels
end
if #KEYS == 3 then
  redis.call('SET', KEYS[3], epoch .. ':' .. seq, 'PX', ARGV[7])
end
redis.call('PUBLISH', ARGV[3], seq .. ' ' .. epoch .. ' ' .. data)
return {seq, epoch, 0, false}
"""
)

# KEYS: meta, stream
# ARGV: candidate epoch, meta ttl ms (0: none), unpublished ttl ms
# Returns {epoch, seq}.
_POSITION = (
    _ENSURE_EPOCH
    + """
local epoch = ensure_epoch(KEYS[1], KEYS[2], ARGV[1])
local seq = touch(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
return {epoch, seq}
"""
)

# KEYS: meta, stream
# ARGV: candidate epoch, meta ttl ms (0: none), unpublished ttl ms, since, limit, history ttl ms (0: none)
# Returns {epoch, seq, {id, data, id, data, ...}}: the entries after since, at most limit, none expired.
_HISTORY = (
    _ENSURE_EPOCH
    + """
local meta, stream = KEYS[1], KEYS[2]
local epoch = ensure_epoch(meta, stream, ARGV[1])
local top = touch(meta, tonumber(ARGV[2]), tonumber(ARGV[3]))
local since, limit, history_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
if top > since and limit > 0 then
  if since < 0 then
    since = 0
  end
  local entries = redis.call('XRANGE', stream, (since + 1) .. '-0', '+', 'COUNT', limit)
  local horizon = -1
  if history_ms > 0 then
    horizon = now_ms() - history_ms
  end
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    local data, stamp = nil, 0
    for i = 1, #fields, 2 do
      if fields[i] == 'd' then
        data = fields[i + 1]
      elseif fields[i] == 't' then
        stamp = tonumber(fields[i + 1])
      end
    end
    if data and stamp >= horizon then
      out[#out + 1] = entry[1]
      out[#out + 1] = data
    end
  end
end
return {epoch, top, out}
"""
)


class _Script:
    """A Lua script, ready to be sent: ``EVALSHA`` while Redis has it cached, ``EVAL`` when it has not."""

    __slots__ = ("body", "eval_head", "evalsha_head", "load")

    def __init__(self, body: str) -> None:
        self.body = body.encode()
        sha = hashlib.sha1(self.body).hexdigest().encode()  # Redis names scripts by SHA-1
        self.evalsha_head = (b"EVALSHA", sha)
        self.eval_head = (b"EVAL", self.body)
        self.load = pack(b"SCRIPT", b"LOAD", self.body)

    def evalsha(self, keys: list[bytes], args: list[bytes]) -> bytes:
        return pack(*self.evalsha_head, b"%d" % len(keys), *keys, *args)

    def eval(self, keys: list[bytes], args: list[bytes]) -> bytes:
        return pack(*self.eval_head, b"%d" % len(keys), *keys, *args)


_SCRIPTS: Final = {"publish": _Script(_PUBLISH), "position": _Script(_POSITION), "history": _Script(_HISTORY)}


def _history_of(channel: str, since: int, limit: int, epoch_raw: Any, top: Any, flat: Any) -> History:
    """Build the :class:`History` of the ``history`` script's reply: epoch, stream top, flat id/data pairs."""
    epoch = _text(epoch_raw)
    seq = int(top)
    envelopes = tuple(
        Envelope(channel, int(_text(flat[i]).partition("-")[0]), epoch, _text(flat[i + 1]))
        for i in range(0, len(flat), 2)
    )
    missed = seq - since
    complete = missed <= 0 or (missed <= limit and len(envelopes) == missed)
    return History(StreamPosition(epoch, seq), envelopes, complete)


def _candidate_epoch() -> bytes:
    # Not a secret: epochs go to every client. The module's generator is reseeded after a fork.
    return b"%016x" % random.getrandbits(64)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _State(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    CLOSED = "closed"


class _ListenerGaveUp(Exception):
    """The listener stopped reconnecting after ``max_reconnect_attempts``."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _escape(channel: str) -> str:
    # Percent-escaping keeps the hash tag unambiguous: "{a}b}" could otherwise end at the first "}".
    return channel.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _ms(seconds: float | None) -> int:
    return 0 if seconds is None else max(1, math.ceil(seconds * 1000))


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
        if (url is None) == (client is None):
            raise ConfigurationError("pass either a Redis URL or a redis.asyncio.Redis client")
        if client is not None and not isinstance(client, Redis):
            raise ConfigurationError(
                f"client must be a redis.asyncio.Redis, not {type(client).__module__}."
                f"{type(client).__qualname__}"
            )
        if url is not None:
            if not isinstance(url, str):
                raise ConfigurationError(f"url must be a Redis URL string, not {type(url).__name__}")
            if urlsplit(url).scheme not in _ANY:
                raise ConfigurationError(
                    f"a Redis URL starts with redis://, rediss:// or unix://, not {redact_url(url)!r}"
                )
            _check_redis_py_url(url)
        if not isinstance(key_prefix, str) or not key_prefix or any(c in key_prefix for c in "{} "):
            raise ConfigurationError(
                f"key_prefix must be a non-empty string without braces or spaces, not {key_prefix!r}"
            )
        history_size = count("history_size", history_size, minimum=0)
        history_ttl = optional_seconds("history_ttl", history_ttl)
        meta_ttl = optional_seconds("meta_ttl", meta_ttl)
        unpublished_ttl = seconds("unpublished_ttl", unpublished_ttl)
        idempotency_ttl = seconds("idempotency_ttl", idempotency_ttl)
        timeout = seconds("timeout", timeout)
        ping_interval = seconds("ping_interval", ping_interval)
        delays = tuple(reconnect_delay) if isinstance(reconnect_delay, tuple | list) else ()
        if len(delays) != 2 or not all(map(is_seconds, delays)) or delays[0] > delays[1]:
            raise ConfigurationError(
                "reconnect_delay must be (first, most) seconds with 0 < first <= most, "
                f"not {reconnect_delay!r}"
            )
        first_delay, max_delay = delays
        max_reconnect_attempts = optional_count("max_reconnect_attempts", max_reconnect_attempts, minimum=1)
        self._url = url
        self._own_client = client is None
        self._client: Redis | None = client
        self._prefix = key_prefix
        self._history_size = history_size
        self._history_ms = _ms(history_ttl)
        self._meta_ms = _ms(meta_ttl)
        self._unpublished_ms = _ms(unpublished_ttl)
        self._idempotency_ms = _ms(idempotency_ttl)
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._reconnect_delay = (first_delay, max_delay)
        self._max_attempts = max_reconnect_attempts
        self._presence = RedisPresence(self, seconds("presence_heartbeat", presence_heartbeat))
        # The command connection every publish and read shares (see _redis_pipe), and its opening.
        self._pipe: CommandPipe | None = None
        self._pipe_opening: asyncio.Task[CommandPipe] | None = None
        self._encoding = ("utf-8", "strict")
        self._publish_tail: list[bytes] = []
        self._key_cache: dict[str, tuple[str, bytes, bytes, bytes]] = {}
        self._listener: BackendListener | None = None
        self._state = _State.NEW
        self._task: asyncio.Task[None] | None = None
        self._pubsub_suffix = ""
        # The PUB/SUB connection while it is up and subscribed; None while reconnecting.
        self._conn: AbstractConnection | None = None
        self._handover: AbstractConnection | None = None
        # Channels this process wants (channel -> PUB/SUB name), and the way back.
        self._channels: dict[str, str] = {}
        self._names: dict[str, str] = {}
        # Per PUB/SUB name, one entry per SUBSCRIBE in flight on the current connection; Redis confirms
        # them in order, and each confirmation releases the subscribe() calls waiting on its entry.
        self._waiters: dict[str, deque[list[asyncio.Future[None]]]] = {}
        # subscribe() calls made while reconnecting: the reconnect subscribes them.
        self._orphans: dict[str, list[asyncio.Future[None]]] = {}
        # Counters and the last failure, for stats().
        self._reconnects = 0
        self._attempts = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._down_since: float | None = None
        self._publish_errors = 0
        self._received = 0
        self._listener_errors = 0

    def __repr__(self) -> str:
        return f"<RedisBackend {self._where()} {self._state.value}>"

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
        redis_url, ours = _split_url(url)
        options: dict[str, Any] = {}
        for key, value in ours.items():
            try:
                options[key] = _URL_OPTIONS[key](value)
            except ValueError:
                raise ConfigurationError(f"invalid value {value!r} for Redis URL option {key!r}") from None
        return cls(redis_url, **options)

    # -- naming -------------------------------------------------------------------------------------

    def _base(self, channel: str) -> str:
        return f"{self._prefix}:{{{_escape(channel)}}}"

    def keys(self, channel: str) -> dict[str, str]:
        """Return the Redis keys and the PUB/SUB channel name used for ``channel`` (for operators, tests)."""
        base = self._base(channel)
        return {
            "meta": f"{base}:meta",
            "stream": f"{base}:stream",
            "idempotency": f"{base}:idem:",
            "pubsub": base + self._pubsub_suffix,
        }

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
        if self._state not in (_State.NEW, _State.CLOSED):
            raise StateError(
                f"cannot connect a Redis backend that is {self._state.value}; disconnect() first"
            )
        self._state = _State.CONNECTING
        if self._client is None:
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
            self._client = Redis(connection_pool=pool)
        client = self._client
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        self._pubsub_suffix = f":db{db}" if db else ""
        kwargs = client.connection_pool.connection_kwargs
        self._encoding = (kwargs.get("encoding", "utf-8"), kwargs.get("encoding_errors", "strict"))
        self._key_cache = {}
        self._publish_tail = [
            b"%d" % n for n in (self._history_size, self._history_ms, self._meta_ms, self._idempotency_ms)
        ]
        try:
            conn = await self._open()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._open_pipe()
            except BaseException:
                await _close(conn)
                raise
        except BaseException as exc:
            await self._close_pipe()
            await self._close_client()
            self._state = _State.CLOSED
            if isinstance(exc, (*_UNREACHABLE, RedisError)):
                self._note_error(exc)
                raise BackendUnavailable(f"cannot connect to Redis at {self._where()}: {exc}") from exc
            raise
        self._listener = listener
        self._state = _State.CONNECTED
        # Held here until the task takes it, so that a disconnect() before the task ever ran closes it.
        self._handover = conn
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="rtbroadcast-redis-listener")
        self._task.add_done_callback(self._listener_done)
        self._presence.start(client)
        logger.debug("connected to Redis at %s", self._where())

    async def disconnect(self) -> None:
        """Stop the listener, fail pending subscribes and close connections. Never raises."""
        if self._state in (_State.NEW, _State.CLOSED):
            return
        self._state = _State.CLOSED
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() neither raises the task's exception nor swallows a cancellation of disconnect() itself.
            await asyncio.wait([task])
        await self._presence.stop()
        self._fail_waiters(StateError("the Redis backend was disconnected"))
        await self._close_pipe()
        for conn in (self._conn, self._handover):
            if conn is not None:
                await _close(conn)
        self._conn = self._handover = None
        self._channels.clear()
        self._names.clear()
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
            "state": self._state.value,
            "listener": _listener_status(self._task),
            "subscribed": len(self._channels),
            "received": self._received,
            "reconnects": self._reconnects,
            "reconnect_attempts": self._attempts,
            "outage_seconds": None if down is None else round(time.monotonic() - down, 3),
            "publish_errors": self._publish_errors,
            "listener_errors": self._listener_errors,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            **self._presence.stats(),
        }

    def _require(self, action: str) -> Redis:
        if self._state in (_State.NEW, _State.CLOSED, _State.CONNECTING) or self._client is None:
            raise StateError(f"cannot {action}: the Redis backend is not connected; call connect() first")
        return self._client

    def _note_error(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._last_error_at = time.time()

    def _translate(self, exc: BaseException, action: str) -> BackendError:
        self._note_error(exc)
        if isinstance(exc, ResponseError) and not str(exc).startswith(_TRANSIENT_REPLIES):
            return BackendError(f"Redis refused to {action}: {exc}")
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            detail = f"no answer within {self._timeout} s"
        else:
            detail = str(exc) or type(exc).__name__
        return BackendUnavailable(f"cannot {action} on Redis at {self._where()}: {detail}")

    async def _run(
        self, script: _Script, keys: list[bytes], args: list[bytes], action: str, *, retry: bool = False
    ) -> Any:
        """Run one of the scripts on the shared command connection within the timeout.

        With ``retry``, a connection error is retried once (within the same timeout): the connection may
        have died with a Redis restart that nobody used it through yet. Only scripts that may run twice
        (reads) retry; a publish must not, since its first attempt may have been applied.

        Raises:
            BackendUnavailable: Redis cannot be reached, or answered "not now" (memory full, loading).
            BackendError: Redis refused the command for another reason.
        """
        self._require(action)
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            while True:
                try:
                    pipe = self._pipe
                    if pipe is None or pipe.closed:
                        async with asyncio.timeout_at(deadline):
                            pipe = await self._open_pipe()
                    reply = await pipe.request(script.evalsha(keys, args), deadline)
                    if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                        # Not run, so safe to send again; EVAL also puts it back in Redis's cache.
                        reply = await pipe.request(script.eval(keys, args), deadline)
                    if isinstance(reply, ResponseError):
                        raise reply
                    return reply
                except RedisConnectionError:
                    if not retry:
                        raise
                    retry = False
        except (*_UNREACHABLE, RedisError) as exc:
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
            task.add_done_callback(_consume)
        # A caller that gives up (its timeout) must not cancel the opening others wait for.
        return await asyncio.shield(task)

    async def _new_pipe(self) -> CommandPipe:
        try:
            assert self._client is not None
            pool = self._client.connection_pool
            # A connection object that is never connected: it says where and how (TLS, login) to connect.
            template = pool.connection_class(**pool.connection_kwargs)
            async with asyncio.timeout(self._timeout):
                pipe = await open_pipe(template, request_timeout=self._timeout, where=self._where())
            # Scripts first, so that EVALSHA finds them even on a Redis that just restarted.
            for script in _SCRIPTS.values():
                pipe.request(script.load).add_done_callback(_consume)
            old, self._pipe = self._pipe, pipe
            if old is not None:
                await old.close()
            return pipe
        finally:
            self._pipe_opening = None

    async def _close_pipe(self) -> None:
        task, self._pipe_opening = self._pipe_opening, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.close()

    def _channel_keys(self, channel: str) -> tuple[str, bytes, bytes, bytes]:
        """Return ``channel``'s key base and, encoded, its meta and stream keys and PUB/SUB name."""
        found = self._key_cache.get(channel)
        if found is None:
            if len(self._key_cache) >= 10_000:
                self._key_cache.clear()  # bounded: a service with more channels recomputes some names
            base = self._base(channel)
            encoding, errors = self._encoding
            found = (
                base,
                f"{base}:meta".encode(encoding, errors),
                f"{base}:stream".encode(encoding, errors),
                (base + self._pubsub_suffix).encode(encoding, errors),
            )
            self._key_cache[channel] = found
        return found

    # -- publishing and reading ---------------------------------------------------------------------

    async def publish(self, channel: str, payload: str, *, idempotency_key: str | None = None) -> Envelope:
        """Assign the next seq, append to the channel's stream and PUBLISH, in one Lua script.

        A publish that times out after Redis received it may still have been applied; retry with the same
        ``idempotency_key`` to be sure it is applied once.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
            BackendError: Redis refused the script.
        """
        base, meta, stream, name = self._channel_keys(channel)
        encoding, errors = self._encoding
        keys = [meta, stream]
        if idempotency_key is not None:
            keys.append(f"{base}:idem:{idempotency_key}".encode(encoding, errors))
        head = seq_prefix(payload)
        args = [_candidate_epoch(), head.encode(encoding, errors), name, *self._publish_tail]
        try:
            seq, epoch, duplicate, stored = await self._run(_SCRIPTS["publish"], keys, args, "publish")
        except BackendError:
            self._publish_errors += 1
            raise
        data = _text(stored) if duplicate and stored is not None else f"{head}{seq}}}"
        return Envelope(channel, int(seq), _text(epoch), data)

    async def position(self, channel: str) -> StreamPosition:
        """Return the channel's epoch and seq, read together; creates the epoch of a new channel.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
        """
        _, meta, stream, _ = self._channel_keys(channel)
        epoch, seq = await self._run(
            _SCRIPTS["position"],
            [meta, stream],
            [_candidate_epoch(), b"%d" % self._meta_ms, b"%d" % self._unpublished_ms],
            "read position",
            retry=True,
        )
        return StreamPosition(_text(epoch), int(seq))

    async def history(self, channel: str, since: int, *, limit: int) -> History:
        """Read the envelopes after ``since`` and the position, in one script.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
        """
        _, meta, stream, _ = self._channel_keys(channel)
        numbers = (self._meta_ms, self._unpublished_ms, since, limit, self._history_ms)
        epoch_raw, top, flat = await self._run(
            _SCRIPTS["history"],
            [meta, stream],
            [_candidate_epoch(), *(b"%d" % n for n in numbers)],
            "read history",
            retry=True,
        )
        return _history_of(channel, since, limit, epoch_raw, top, flat)

    # -- subscriptions ------------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """SUBSCRIBE to the channel and return once Redis confirmed it.

        While the listener is reconnecting, waits (up to the timeout) for the reconnect to subscribe it.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: no confirmation within the timeout, or the listener gave up.
        """
        self._require("subscribe")
        if self._state is _State.FAILED:
            raise BackendUnavailable(f"the Redis listener gave up reconnecting: {self._last_error}")
        name = self._base(channel) + self._pubsub_suffix
        self._channels[channel] = name
        self._names[name] = channel
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn = self._conn
        if conn is None:
            self._orphans.setdefault(name, []).append(waiter)
        else:
            self._waiters.setdefault(name, deque()).append([waiter])
            try:
                await conn.send_command("SUBSCRIBE", name, check_health=False)
            except (*_UNREACHABLE, RedisError) as exc:
                # The listener sees the broken connection too; its reconnect subscribes this channel.
                logger.debug("SUBSCRIBE %s failed, leaving it to the reconnect: %r", name, exc)
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        except TimeoutError:
            if self._channels.get(channel) == name:
                del self._channels[channel]
                self._names.pop(name, None)
            if conn is not None and self._conn is conn:
                # A connection that does not confirm within the timeout is not to be trusted with the
                # order of later confirmations either: the listener starts over on a fresh one.
                logger.warning(
                    "no SUBSCRIBE confirmation from Redis within %s s; reconnecting", self._timeout
                )
                await _close(conn)
            raise BackendUnavailable(
                f"cannot subscribe to {channel!r} on Redis at {self._where()}: "
                f"not confirmed within {self._timeout} s ({self._last_error or 'no error recorded'})"
            ) from None
        except asyncio.CancelledError:
            if not waiter.done():
                waiter.cancel()
            raise

    async def unsubscribe(self, channel: str) -> None:
        """UNSUBSCRIBE from the channel (not waiting for the confirmation). Never raises."""
        name = self._channels.pop(channel, None)
        if name is None:
            return
        self._names.pop(name, None)
        conn = self._conn
        if conn is None:
            return  # the reconnect subscribes only what is still wanted
        try:
            await conn.send_command("UNSUBSCRIBE", name, check_health=False)
        except (*_UNREACHABLE, RedisError) as exc:
            logger.debug("UNSUBSCRIBE %s failed (the reconnect will not resubscribe it): %r", name, exc)

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

    # -- the listener -------------------------------------------------------------------------------

    async def _open(self, **overrides: Any) -> AbstractConnection:
        """Open a connection of our own (PUB/SUB, or the command pipe), outside the client's pool.

        Raises:
            redis.exceptions.ConnectionError, TimeoutError: Redis cannot be reached.
        """
        assert self._client is not None
        pool = self._client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        # This connection is the listener's alone: no retries of its own (we reconnect, and we must know
        # when we did), no health checks that would read replies our loop expects.
        kwargs.update(retry=Retry(NoBackoff(), 0), health_check_interval=0, **overrides)
        conn: AbstractConnection = pool.connection_class(**kwargs)
        try:
            async with asyncio.timeout(self._timeout):
                await conn.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py
        except BaseException:
            await _close(conn)
            raise
        return conn

    async def _listen(self) -> None:
        """Keep a PUB/SUB connection up, subscribed to every wanted channel, and deliver its messages."""
        conn, self._handover = self._handover, None
        reconnected = False
        while True:
            if conn is None:
                conn = await self._reconnect()
                await self._drop_idle_connections()
            try:
                await self._serve(conn, announce=reconnected)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._note_error(exc)
                if not isinstance(exc, (*_UNREACHABLE, RedisError)):
                    self._listener_errors += 1
                    logger.error("Redis listener failed unexpectedly; reconnecting", exc_info=exc)
                else:
                    logger.warning(
                        "lost the Redis PUB/SUB connection to %s (%s); reconnecting", self._where(), exc
                    )
            finally:
                self._conn = None
                await _close(conn)
            conn = None
            reconnected = True
            if self._down_since is None:
                self._down_since = time.monotonic()
            if self._state is _State.CONNECTED:
                self._state = _State.RECONNECTING

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

    async def _reconnect(self) -> AbstractConnection:
        """Open a new connection, waiting with capped exponential backoff and jitter between attempts.

        Raises:
            _ListenerGaveUp: ``max_reconnect_attempts`` failed in a row.
        """
        first, most = self._reconnect_delay
        # The count goes back to 0 only once a connection is fully restored (_restored), so a connection
        # that opens but fails at once (say, an ACL refusing SUBSCRIBE) still backs off, and can give up.
        while True:
            delay = min(most, first * 2 ** min(self._attempts, 32))  # the exponent is capped: no overflow
            # Jitter spreads the reconnects of many processes after a Redis restart.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            self._attempts += 1
            try:
                return await self._open()
            except Exception as exc:
                self._note_error(exc)
                logger.debug("Redis reconnect attempt %d failed: %r", self._attempts, exc)
                if self._attempts in (1, 10) or self._attempts % 100 == 0:
                    logger.warning(
                        "cannot reach Redis at %s (attempt %d): %s", self._where(), self._attempts, exc
                    )
                if self._max_attempts is not None and self._attempts >= self._max_attempts:
                    raise _ListenerGaveUp(self._attempts) from exc

    async def _serve(self, conn: AbstractConnection, *, announce: bool) -> None:
        """Subscribe every wanted channel on ``conn``, then read messages until it fails."""
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
        channels = dict(self._channels)
        names = list(channels.values())
        outstanding = set(names)
        for name in names:
            self._waiters[name] = deque([pending.pop(name, [])])
        for waiters in pending.values():  # unsubscribed meanwhile: nothing to wait for
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if names:
            await conn.send_command("SUBSCRIBE", *names, check_health=False)
        else:
            self._restored(channels, announce)
        pinged = False
        while True:
            response = await conn.read_response(
                timeout=self._ping_interval, disconnect_on_error=False, push_request=True
            )
            if response is None:
                if pinged:
                    raise RedisTimeoutError(f"no answer to PING within {self._ping_interval} s")
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            if not isinstance(response, list) or len(response) < 2:
                continue  # PONG outside subscribed mode (RESP3)
            kind = _text(response[0])
            if kind == "message":
                self._deliver(_text(response[1]), response[2])
            elif kind == "subscribe":
                name = _text(response[1])
                in_flight = self._waiters.get(name)
                if in_flight:
                    for waiter in in_flight.popleft():
                        if not waiter.done():
                            waiter.set_result(None)
                    if not in_flight:
                        del self._waiters[name]
                if outstanding:
                    outstanding.discard(name)
                    if not outstanding:
                        self._restored(channels, announce)

    def _restored(self, channels: Mapping[str, str], announce: bool) -> None:
        """Mark the connection as up; after a reconnect, tell the listener what it may have missed."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CONNECTED
        if not announce:
            return
        self._reconnects += 1
        down = self._down_since
        self._down_since = None
        self._attempts = 0
        logger.info(
            "reconnected to Redis at %s after %.1f s; resubscribed %d channel(s)",
            self._where(),
            0.0 if down is None else time.monotonic() - down,
            len(channels),
        )
        listener = self._listener
        wanted = [channel for channel in channels if channel in self._channels]
        if listener is not None and wanted:
            try:
                listener.on_interruption(wanted, RECONNECTED)
            except Exception:
                self._listener_errors += 1
                logger.exception("the backend listener failed in on_interruption()")

    def _deliver(self, name: str, message: bytes | str) -> None:
        channel = self._names.get(name)
        listener = self._listener
        if channel is None or listener is None:
            return  # unsubscribed while the message was on its way
        text = _text(message)
        if is_presence_message(text):
            self._presence.deliver(channel, text)
            return
        self._received += 1
        try:
            seq, epoch, data = text.split(" ", 2)
            envelope = Envelope(channel, int(seq), epoch, data)
        except ValueError:
            self._listener_errors += 1
            logger.error("ignoring a malformed message on Redis channel %r: %.80r", name, message)
            return
        try:
            listener.on_envelope(envelope)
        except Exception:
            # One failing callback must not take the listener, and every other channel, down with it.
            self._listener_errors += 1
            logger.exception("the backend listener failed in on_envelope() for %r", channel)

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._state is _State.CLOSED:
            return
        exc = task.exception()
        self._state = _State.FAILED
        self._conn = None
        if exc is not None:
            self._note_error(exc.__cause__ or exc)
        unavailable = BackendUnavailable(f"the Redis listener gave up: {self._last_error}")
        self._fail_waiters(unavailable)
        logger.error(
            "the Redis listener stopped after %d failed reconnect attempt(s); channels get no events until "
            "the broadcaster is restarted. Last error: %s",
            self._attempts,
            self._last_error,
            exc_info=exc if not isinstance(exc, _ListenerGaveUp) else None,
        )
        listener = self._listener
        if listener is not None and self._channels:
            try:
                listener.on_interruption(list(self._channels), "backend_failed")
            except Exception:
                logger.exception("the backend listener failed in on_interruption()")


def _listener_status(task: asyncio.Task[None] | None) -> str:
    if task is None:
        return "stopped"
    if not task.done():
        return "running"
    return "failed" if not task.cancelled() and task.exception() is not None else "stopped"


async def _close(conn: AbstractConnection) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception as exc:
        logger.debug("closing a Redis connection failed: %r", exc)


# -- URL options ----------------------------------------------------------------------------------------
#
# Every query option is checked when the backend is created, so that a typo fails there, naming the option,
# rather than as a TypeError from redis-py at the first connect. rtbroadcast's own options are read here
# (RedisBackend.from_url); redis-py's are checked here and left in the URL for redis-py to read.


def _seconds_or_none(value: str) -> float | None:
    return None if value.strip().lower() in ("", "none", "0") else float(value)


#: rtbroadcast's own options, with their conversion from text; RedisBackend() checks the values.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "key_prefix": str,
    "history_size": int,
    "history_ttl": _seconds_or_none,
    "meta_ttl": _seconds_or_none,
    "unpublished_ttl": float,
    "idempotency_ttl": float,
    "timeout": float,
    "ping_interval": float,
    "max_reconnect_attempts": int,
    "presence_heartbeat": float,
}


def _flag(value: str) -> bool:
    # Only the spellings redis-py reads the same way: it takes any text but 0/F/FALSE/N/NO for true.
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y"):
        return True
    if lowered in ("0", "false", "no", "n"):
        return False
    raise ValueError("expected true or false")


def _number(convert: Callable[[str], float], minimum: float) -> Callable[[str], float]:
    def check(value: str) -> float:
        number = convert(value)
        if not math.isfinite(number) or number < minimum:
            raise ValueError(f"expected a number >= {minimum:g}")
        return number

    return check


def _one_of(*allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.lower() not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return check


_TCP: Final = frozenset({"redis", "rediss"})
_TLS: Final = frozenset({"rediss"})
_ANY: Final = frozenset({"redis", "rediss", "unix"})

#: redis-py's query options: how to check the text (redis-py converts it again itself) and the URL schemes
#: whose connection class takes the option. Others (``decode_responses``, a retry policy) cannot be text:
#: pass a ``redis.asyncio.Redis`` of your own as ``client=`` for them.
_REDIS_PY_OPTIONS: dict[str, tuple[Callable[[str], Any], frozenset[str]]] = {
    "db": (_number(int, 0), _ANY),
    "username": (str, _ANY),
    "password": (str, _ANY),
    "client_name": (str, _ANY),
    "lib_name": (str, _ANY),
    "lib_version": (str, _ANY),
    "encoding": (str, _ANY),
    "encoding_errors": (str, _ANY),
    "socket_timeout": (_number(float, 1e-9), _ANY),
    "socket_connect_timeout": (_number(float, 1e-9), _ANY),
    "socket_read_size": (_number(int, 1), _ANY),
    "retry_on_timeout": (_flag, _ANY),
    "health_check_interval": (_number(int, 0), _ANY),
    "max_connections": (_number(int, 1), _ANY),
    "protocol": (_one_of("2", "3"), _ANY),
    "legacy_responses": (_flag, _ANY),
    "socket_keepalive": (_flag, _TCP),
    "ssl_keyfile": (str, _TLS),
    "ssl_certfile": (str, _TLS),
    "ssl_password": (str, _TLS),
    "ssl_cert_reqs": (_one_of("none", "optional", "required"), _TLS),
    "ssl_ca_certs": (str, _TLS),
    "ssl_ca_data": (str, _TLS),
    "ssl_ca_path": (str, _TLS),
    "ssl_ciphers": (str, _TLS),
    "ssl_check_hostname": (_flag, _TLS),
    "ssl_min_version": (_number(int, 0), _TLS),
    "ssl_include_verify_flags": (str, _TLS),
    "ssl_exclude_verify_flags": (str, _TLS),
}

#: Options of the connection pool rather than of each connection (``timeout`` is rtbroadcast's).
_POOL_OPTIONS: Final = frozenset({"max_connections"})


@functools.cache
def _accepted_by_redis_py(scheme: str) -> frozenset[str]:
    """Return the keyword arguments the installed redis-py's connection class for ``scheme`` takes."""
    connection_class = {"unix": UnixDomainSocketConnection, "rediss": SSLConnection}.get(scheme, Connection)
    names: set[str] = set(_POOL_OPTIONS)
    for klass in connection_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break  # the rest of the chain never sees these arguments
    names.discard("self")
    return frozenset(names)


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """Split ``url`` into the URL for redis-py and the rtbroadcast options in its query.

    Raises:
        ConfigurationError: an option is given twice.
    """
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in seen:
            raise ConfigurationError(f"Redis URL option {key!r} is given twice")
        seen.add(key)
        if key in _URL_OPTIONS:
            ours[key] = value
        else:
            theirs.append((key, value))
    if not ours:
        return url, ours
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def _check_redis_py_url(url: str) -> None:
    """Check everything redis-py will read from ``url`` (what ``_split_url`` left of it).

    Raises:
        ConfigurationError: naming the option or the part of the URL that is wrong.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "unix" and not parts.path:
        raise ConfigurationError("a unix:// Redis URL needs the socket's path: unix:///run/redis.sock")
    accepted = _accepted_by_redis_py(scheme)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _URL_OPTIONS:
            raise ConfigurationError(
                f"URL option {key!r} is read by RedisBackend.from_url() (or Broadcaster(url)); "
                "pass it as an argument to RedisBackend() instead"
            )
        entry = _REDIS_PY_OPTIONS.get(key)
        if entry is None:
            if key in accepted:
                raise ConfigurationError(
                    f"redis-py option {key!r} cannot be given in a Redis URL; pass "
                    "client=redis.asyncio.Redis(...) with it to RedisBackend() instead"
                )
            known = set(_URL_OPTIONS) | {
                k for k, (_, schemes) in _REDIS_PY_OPTIONS.items() if scheme in schemes
            }
            raise ConfigurationError(
                f"unknown Redis URL option {key!r}{did_you_mean(key, known)}; rtbroadcast's options: "
                f"{', '.join(sorted(_URL_OPTIONS))}; redis-py's: see 'Backend URLs' in the configuration "
                "reference"
            )
        check, schemes = entry
        if scheme not in schemes:
            where = " and ".join(f"{s}://" for s in sorted(schemes))
            raise ConfigurationError(
                f"Redis URL option {key!r} applies to {where} URLs only, not {scheme}://"
            )
        if key not in accepted:
            raise ConfigurationError(
                f"Redis URL option {key!r} is not supported by the installed redis-py {redis.__version__}"
            )
        try:
            check(value)
        except ValueError as exc:
            raise ConfigurationError(f"invalid value {value!r} for Redis URL option {key!r}: {exc}") from None
    try:
        parse_url(url)
    except ValueError as exc:  # a port that is not a number, say
        raise ConfigurationError(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None
