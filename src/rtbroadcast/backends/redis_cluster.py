"""The Redis Cluster backend: channels spread over the shards of a Redis Cluster (Redis 7+).

A channel's keys share one hash tag (``rtb:{<channel>}:...``, the key layout in ``redis/_keys.py``), so its
epoch, seq, stream and idempotency keys live on one slot, and its live fan-out goes through *sharded* PUB/SUB
(``SPUBLISH``/``SSUBSCRIBE``) on the shard that owns that slot: the same Lua script assigns the seq, appends
to the stream and ``SPUBLISH``es, so live events and history never disagree, exactly as on one Redis.

Connections, per process: one pipelined command connection per primary that commands went to (see
``_redis_pipe``), and one subscriber connection per primary that owns a subscribed channel. Failures stay
per shard: a subscriber connection that drops, a failover, or a slot migration (the shard's ``sunsubscribe``
of a channel it no longer owns) re-reads the slot map, resubscribes the affected channels where they live
now, and reports an interruption for those channels only, so only their clients are repaired or resynced.

A failover may lose the last writes of the old primary (replication is asynchronous), and its subscribers
may have seen them live. So that the new primary never hands out a seq some client already holds for another
event, the channel's meta hash records the ID of the primary that last wrote it, and the first script that
runs for the channel on another primary (after a failover, or a slot migration) starts a new epoch: the
channel's clients resync once (``epoch_changed``) instead of silently missing an event. Waiting for a replica
(``WAIT``) would not help: what the subscribers saw before the WAIT returned could still be lost.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import hiredis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._config import optional_count, redact_url, seconds
from ..errors import BackendError, BackendUnavailable, ConfigurationError, StateError
from ._reconnect import check_reconnect_delay, reconnect_pause
from ._redis_pipe import CommandPipe, bulks, check_login, connect, login_commands, open_pipe, pack
from .base import Backend, BackendListener, Envelope, History, StreamPosition
from .redis._keys import KeyLayout, check_key_prefix
from .redis._options import URL_OPTIONS, check_redis_py_url, read_option
from .redis._scripts import CLUSTER_SCRIPTS, Script
from .redis._shared import (
    DEFAULT_HISTORY_SIZE,
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_META_TTL,
    DEFAULT_PING_INTERVAL,
    DEFAULT_RECONNECT_DELAY,
    DEFAULT_TIMEOUT,
    DEFAULT_UNPUBLISHED_TTL,
    RECONNECTED,
    TRANSIENT_REPLIES,
    UNREACHABLE,
    ChannelScripts,
    ChannelSettings,
    consume,
    envelope_of,
    text,
)

__all__ = ["RedisClusterBackend"]

logger = logging.getLogger("rtbroadcast.redis")

SLOTS: Final = 16384
#: Tries of one command that Redis answered with a redirection or "try again" (within its timeout).
_MAX_REDIRECTS: Final = 8
#: Replies that mean the script did not run here: send it again, the careful way.
_REDIRECTED: Final = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "NOSCRIPT")


@dataclass(frozen=True, slots=True)
class _Node:
    key: tuple[str, int]  # (host, port): what connections are found by
    id: bytes
    replicas: int


class _Topology:
    """Which primary serves each slot, from ``CLUSTER SLOTS``."""

    def __init__(self) -> None:
        self.slots: list[_Node | None] = [None] * SLOTS
        self.version = 0

    def load(self, reply: Any) -> None:
        slots: list[_Node | None] = [None] * SLOTS
        for entry in reply:
            start, end, primary, *replicas = entry
            host = text(primary[0]) or "127.0.0.1"
            node = _Node((host, int(primary[1])), bytes(primary[2]), len(replicas))
            for slot in range(int(start), int(end) + 1):
                slots[slot] = node
        self.slots = slots
        self.version += 1

    def nodes(self) -> list[_Node]:
        seen: dict[tuple[str, int], _Node] = {}
        for node in self.slots:
            if node is not None:
                seen.setdefault(node.key, node)
        return list(seen.values())


def _moved_target(message: str) -> tuple[int, str, int] | None:
    # "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381"
    parts = message.split()
    if len(parts) != 3:
        return None
    host, _, port = parts[2].rpartition(":")
    try:
        return int(parts[1]), host or "127.0.0.1", int(port)
    except ValueError:
        return None


class RedisClusterBackend(Backend):
    """Share channels between processes through a Redis Cluster: sharded PUB/SUB, Streams on each shard.

    Pass the addresses of some of the cluster's nodes (seeds); the rest are found with ``CLUSTER SLOTS``.
    Usually built from a URL by :meth:`from_url`: ``redis+cluster://host1:6379,host2:6379``.

    Args:
        nodes: seed addresses ``(host, port)``; at least one must answer.
        username: ACL user name, if the cluster requires one.
        password: password, if the cluster requires one.
        tls: connect with TLS; ``ssl`` holds redis-py's ``ssl_*`` options (``ssl_ca_certs`` and so on).
        ssl: redis-py ``ssl_*`` keyword arguments for TLS connections.
        key_prefix: first part of every key and PUB/SUB channel, as for
            :class:`~rtbroadcast.backends.redis.RedisBackend`; so are the options below.
        history_size: events kept per channel for resume, at least; 0 disables history.
        history_ttl: seconds an event stays in history (``None``: until pushed out by size).
        meta_ttl: seconds a channel's epoch and seq outlive its last publish or read (``None``: forever).
        unpublished_ttl: seconds the epoch of a channel nobody published to outlives its last read.
        idempotency_ttl: seconds an idempotency key is remembered.
        timeout: seconds a publish, read, subscribe or connect may take before
            :class:`~rtbroadcast.BackendUnavailable` is raised (redirections and a failover included).
        ping_interval: seconds of silence on a shard's subscriber connection before it is pinged.
        reconnect_delay: ``(first, most)`` seconds between reconnect attempts of a shard's subscriber.
        max_reconnect_attempts: consecutive failed attempts of one shard's subscriber after which the
            backend reports ``failed`` (``None``: never).

    Raises:
        ConfigurationError: an argument has the wrong type or an impossible value.
    """

    name = "redis+cluster"
    supports_headers = True

    def __init__(
        self,
        nodes: Iterable[tuple[str, int]],
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ssl: Mapping[str, Any] | None = None,
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
    ) -> None:
        seeds = list(nodes) if not isinstance(nodes, str) else []
        if not seeds or not all(
            isinstance(n, tuple) and len(n) == 2 and isinstance(n[0], str) and isinstance(n[1], int)
            for n in seeds
        ):
            raise ConfigurationError(f"nodes must be a non-empty list of (host, port) pairs, not {nodes!r}")
        self._keys = KeyLayout(check_key_prefix(key_prefix))
        self._reconnect_delay = check_reconnect_delay(reconnect_delay)
        self._seeds = seeds
        self._username = username
        self._password = password
        self._tls = bool(tls)
        self._ssl = dict(ssl or {})
        settings = ChannelSettings(
            history_size=history_size,
            history_ttl=history_ttl,
            meta_ttl=meta_ttl,
            unpublished_ttl=unpublished_ttl,
            idempotency_ttl=idempotency_ttl,
        )
        self._timeout = seconds("timeout", timeout)
        self._ping_interval = seconds("ping_interval", ping_interval)
        self._max_attempts = optional_count("max_reconnect_attempts", max_reconnect_attempts, minimum=1)
        self._scripts = ChannelScripts(self._run, CLUSTER_SCRIPTS, self._keys, settings)
        self._topology = _Topology()
        # For the shards' reconnect jitter: seeded again by connect(), in the process that connects.
        self._random = random.Random()
        self._refreshing: asyncio.Task[None] | None = None
        self._pipes: dict[tuple[str, int], CommandPipe] = {}
        #: The node ID of each command connection's node (``CLUSTER MYID``), for scripts sent after ``ASK``.
        self._node_ids: dict[tuple[str, int], bytes] = {}
        #: The slot of each channel's first key, as ``_run`` is given it (bounded like the key cache).
        self._slots: dict[bytes, int] = {}
        self._opening: dict[tuple[str, int], asyncio.Task[CommandPipe]] = {}
        self._shards: dict[tuple[str, int], _Shard] = {}
        self._channels: dict[str, str] = {}  # channel -> PUB/SUB name
        self._names: dict[str, str] = {}  # and back
        self._listener: BackendListener | None = None
        self._state = "new"
        # Counters, for stats().
        self._publish_errors = 0
        self._received = 0
        self._listener_errors = 0
        self._reconnects = 0
        self._failovers = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None

    def __repr__(self) -> str:
        return f"<RedisClusterBackend {self._where()} {self._state}>"

    @classmethod
    def from_url(cls, url: str) -> RedisClusterBackend:
        """Build from ``redis+cluster://[user:password@]host:port[,host:port...][?options]``.

        ``rediss+cluster://`` connects with TLS. rtbroadcast's options (``key_prefix``, ``history_size``...)
        and redis-py's ``ssl_*`` options may follow in the query. There is no database number: a cluster has
        database 0 only.

        Raises:
            ConfigurationError: the URL has no node, a node without a valid port, a database number, or an
                unknown or invalid option.
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"url must be a Redis Cluster URL string, not {type(url).__name__}")
        parts = urlsplit(url)
        if parts.scheme not in ("redis+cluster", "rediss+cluster"):
            raise ConfigurationError(
                "a Redis Cluster URL starts with redis+cluster:// or rediss+cluster://, "
                f"not {redact_url(url)!r}"
            )
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username = password = None
        if userinfo:
            user, _, secret = userinfo.partition(":")
            username, password = unquote(user) or None, unquote(secret) or None
        nodes: list[tuple[str, int]] = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigurationError(
                    f"invalid node {item!r} in Redis Cluster URL {redact_url(url)!r}: expected host:port"
                )
            nodes.append((host, int(port)))
        if parts.path not in ("", "/", "/0"):
            raise ConfigurationError(
                f"a Redis Cluster has database 0 only: remove {parts.path!r} from {redact_url(url)!r}"
            )
        options: dict[str, Any] = {}
        ssl: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        seen: set[str] = set()
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in seen:
                raise ConfigurationError(f"Redis URL option {key!r} is given twice")
            seen.add(key)
            if key in URL_OPTIONS:
                options[key] = read_option(key, value)
            elif key.startswith("ssl_"):
                ssl[key] = value
                theirs.append((key, value))
            else:
                raise ConfigurationError(
                    f"unknown Redis Cluster URL option {key!r}; rtbroadcast's options: "
                    f"{', '.join(sorted(URL_OPTIONS))}, and redis-py's ssl_* options"
                )
        tls = parts.scheme == "rediss+cluster"
        if ssl and not tls:
            raise ConfigurationError("ssl_* options need a rediss+cluster:// URL")
        if theirs:
            # The same checks as for one Redis, on an equivalent single-node URL.
            check_redis_py_url(f"rediss://{nodes[0][0]}:{nodes[0][1]}/0?{urlencode(theirs)}")
        return cls(nodes, username=username, password=password, tls=tls, ssl=ssl, **options)

    # -- naming -------------------------------------------------------------------------------------

    def keys(self, channel: str) -> dict[str, str]:
        """Return the Redis keys and the sharded PUB/SUB channel used for ``channel``."""
        return self._keys.describe(channel, presence=False)

    def slot(self, channel: str) -> int:
        """Return the cluster slot that holds ``channel``'s keys and PUB/SUB channel."""
        return int(key_slot(self._keys.base(channel).encode()))

    def _where(self) -> str:
        scheme = "rediss+cluster" if self._tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in self._seeds)

    def _template(self, host: str, port: int) -> AbstractConnection:
        options: dict[str, Any] = {"host": host, "port": port, "username": self._username}
        options["password"] = self._password
        if self._tls:
            return SSLConnection(**options, **self._ssl)
        return Connection(**options)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def connect(self, listener: BackendListener) -> None:
        """Read the slot map from a seed node and open a command connection to every primary.

        Raises:
            StateError: already connected.
            BackendUnavailable: no seed node answers within the timeout.
        """
        if self._state not in ("new", "closed"):
            raise StateError(
                f"cannot connect a Redis Cluster backend that is {self._state}; disconnect() first"
            )
        self._state = "connecting"
        self._random.seed()  # from os.urandom: a process forked after the backend was made has its own
        try:
            async with asyncio.timeout(self._timeout):
                await self._refresh_now()
                await asyncio.gather(*(self._pipe(node.key) for node in self._topology.nodes()))
        except BaseException as exc:
            await self._close_all()
            self._state = "closed"
            if isinstance(exc, (*UNREACHABLE, RedisError)):
                self._note_error(exc)
                raise BackendUnavailable(
                    f"cannot connect to Redis Cluster at {self._where()}: {exc}"
                ) from exc
            raise
        self._listener = listener
        self._state = "connected"
        logger.debug("connected to Redis Cluster at %s (%d primaries)", self._where(), len(self._pipes))

    async def disconnect(self) -> None:
        """Stop every shard's subscriber, fail pending subscribes and close connections. Never raises."""
        if self._state in ("new", "closed"):
            return
        self._state = "closed"
        await self._close_all()
        self._channels.clear()
        self._names.clear()
        self._listener = None

    async def _close_all(self) -> None:
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None:
            refreshing.cancel()
            await asyncio.wait([refreshing])
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.close(StateError("the Redis Cluster backend was disconnected"))
        opening, self._opening = list(self._opening.values()), {}
        for task in opening:
            task.cancel()
        if opening:
            await asyncio.wait(opening)
        pipes, self._pipes = list(self._pipes.values()), {}
        for pipe in pipes:
            await pipe.close()

    @property
    def available(self) -> bool:
        """Whether no shard's subscriber connection is down (lost and not restored yet)."""
        return self._state == "connected" and not any(s.failing for s in self._shards.values())

    @property
    def failed(self) -> bool:
        """Whether a shard's subscriber gave up reconnecting (only with ``max_reconnect_attempts``)."""
        return self._state == "failed"

    def stats(self) -> Mapping[str, object]:
        """Return the state, the shards' subscriber connections and the counters (JSON-serialisable)."""
        return {
            "backend": self.name,
            "server": self._where(),
            "state": self._state,
            "primaries": len(self._topology.nodes()),
            "shards": {f"{h}:{p}": shard.describe() for (h, p), shard in self._shards.items()},
            "subscribed": len(self._channels),
            "received": self._received,
            "reconnects": self._reconnects,
            "failovers": self._failovers,
            "publish_errors": self._publish_errors,
            "listener_errors": self._listener_errors,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
        }

    def _require(self, action: str) -> None:
        if self._state in ("new", "closed", "connecting"):
            raise StateError(
                f"cannot {action}: the Redis Cluster backend is not connected; call connect() first"
            )

    def _note_error(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._last_error_at = time.time()

    # -- the slot map ---------------------------------------------------------------------------------

    async def _refresh_now(self) -> None:
        """Read ``CLUSTER SLOTS`` from a known node (primaries first, then the seeds).

        Raises:
            redis.exceptions.ConnectionError: no node answered.
        """
        errors: list[str] = []
        candidates = [n.key for n in self._topology.nodes()] + [s for s in self._seeds]
        for key in dict.fromkeys(candidates):
            try:
                pipe = await self._pipe(key)
                reply = await pipe.request(pack(b"CLUSTER", b"SLOTS"))
            except (*UNREACHABLE, RedisError) as exc:
                errors.append(f"{key[0]}:{key[1]}: {exc}")
                continue
            if isinstance(reply, ResponseError) or not reply:
                errors.append(f"{key[0]}:{key[1]}: {reply or 'no slots'}")
                continue
            before = {n.key for n in self._topology.nodes()}
            self._topology.load(reply)
            after = {n.key for n in self._topology.nodes()}
            for gone in before - after:  # no longer a primary: its command connection is not needed
                stale = self._pipes.pop(gone, None)
                self._node_ids.pop(gone, None)
                if stale is not None:
                    asyncio.get_running_loop().create_task(stale.close()).add_done_callback(consume)
            if before and before != after:
                self._failovers += 1
            return
        raise RedisConnectionError("no Redis Cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    async def _refresh(self) -> None:
        """Refresh the slot map; concurrent callers share one refresh. Errors are only noted."""
        task = self._refreshing
        if task is None:
            task = self._refreshing = asyncio.get_running_loop().create_task(self._refresh_now())
            task.add_done_callback(self._refreshed)
        try:
            await asyncio.shield(task)
        except (*UNREACHABLE, RedisError) as exc:
            self._note_error(exc)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None
        consume(task)

    def _node_for(self, slot: int) -> _Node:
        node = self._topology.slots[slot]
        if node is None:
            raise ResponseError(f"CLUSTERDOWN slot {slot} is not served by any known primary")
        return node

    # -- command connections --------------------------------------------------------------------------

    async def _pipe(self, key: tuple[str, int]) -> CommandPipe:
        pipe = self._pipes.get(key)
        if pipe is not None and not pipe.closed:
            return pipe
        task = self._opening.get(key)
        if task is None:
            task = self._opening[key] = asyncio.get_running_loop().create_task(self._new_pipe(key))
            task.add_done_callback(consume)
        return await asyncio.shield(task)

    async def _new_pipe(self, key: tuple[str, int]) -> CommandPipe:
        try:
            async with asyncio.timeout(self._timeout):
                pipe = await open_pipe(
                    self._template(*key), request_timeout=self._timeout, where=f"{key[0]}:{key[1]}"
                )
                for script in CLUSTER_SCRIPTS.values():
                    pipe.request(script.load).add_done_callback(consume)
                # Which node this is: a script sent here after an ASK (its slot is being migrated here) says
                # so, so that the channel's epoch changes once, when it first runs here, and not again when
                # the migration ends. A node that cannot say is left out: such scripts then name nobody.
                try:
                    node_id = await pipe.request(pack(b"CLUSTER", b"MYID"))
                except BaseException:
                    await pipe.close()
                    raise
            if isinstance(node_id, bytes) and node_id:
                self._node_ids[key] = node_id
            self._pipes[key] = pipe
            return pipe
        finally:
            self._opening.pop(key, None)

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
        """Run a script on the primary of its keys' slot, following redirections, within the timeout.

        A redirection (``MOVED``, ``ASK``) or ``TRYAGAIN``/``CLUSTERDOWN`` means the script did not run, so
        it is sent again (after re-reading the slot map), as is a command that never left because its node
        could not be reached. A connection lost with the command on it is retried only with ``retry``.
        ``packed``: ``keys`` and ``args`` already packed (see :meth:`Script.evalsha`).

        Raises:
            BackendUnavailable: the shard cannot be reached, or answered "not now", within the timeout.
            BackendError: Redis refused the command for another reason.
        """
        self._require(action)
        slot = self._slots.get(keys[0])
        if slot is None:
            slot = self._slot_of(keys[0])
        # The usual case first, with nothing but the request's own deadline: the slot's primary is known
        # and its connection is up. Anything else (a redirection, a failover, no connection yet) goes the
        # careful way below, from the start: the script did not run, or may run again (reads).
        node = self._topology.slots[slot]
        pipe = self._pipes.get(node.key) if node is not None else None
        if node is not None and pipe is not None and not pipe.closed:
            # The pipe's clock, not asyncio.get_running_loop(): that costs a getpid() call.
            deadline = pipe.deadline()
            with_id = None if packed is None else packed + bulks(node.id)
            command = script.evalsha(keys, [*args, node.id], packed=with_id)
            try:
                reply = await pipe.request(command, deadline)
            except RedisConnectionError as exc:
                self._schedule_refresh()
                if not retry:
                    raise self._failure(exc, action) from exc
                retry = False
            except (*UNREACHABLE, RedisError) as exc:
                raise self._failure(exc, action) from exc
            else:
                if not isinstance(reply, ResponseError):
                    return reply
                if not str(reply).startswith(_REDIRECTED):
                    raise self._failure(reply, action) from reply
        else:
            deadline = asyncio.get_running_loop().time() + self._timeout
        return await self._run_carefully(script, keys, args, action, slot, deadline, retry)

    def _slot_of(self, key: bytes) -> int:
        if len(self._slots) >= 10_000:
            self._slots.clear()  # bounded: a service with more channels computes some slots again
        slot = self._slots[key] = int(key_slot(key))
        return slot

    async def _run_carefully(
        self,
        script: Script,
        keys: list[bytes],
        args: list[bytes],
        action: str,
        slot: int,
        deadline: float,
        retry: bool,
    ) -> Any:
        asking: tuple[str, int] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                for attempt in range(_MAX_REDIRECTS):
                    node = self._node_for(slot)
                    target = asking or node.key
                    try:
                        pipe = await self._pipe(target)
                    except (*UNREACHABLE, RedisConnectionError) as exc:
                        # Nothing was sent: the node is down (a failover under way). Look again.
                        self._note_error(exc)
                        await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
                        await self._refresh()
                        asking = None
                        continue
                    node_id = node.id if asking is None else self._node_ids.get(asking, b"")
                    command = script.evalsha(keys, [*args, node_id])
                    if asking is not None:
                        pipe.request(pack(b"ASKING")).add_done_callback(consume)
                    try:
                        reply = await pipe.request(command, deadline)
                        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                            reply = await pipe.request(script.eval(keys, [*args, node_id]), deadline)
                    except RedisConnectionError:
                        self._schedule_refresh()
                        if not retry:
                            raise
                        retry = False
                        continue
                    if isinstance(reply, ResponseError):
                        message = str(reply)
                        if message.startswith(("MOVED", "ASK")):
                            moved = _moved_target(message)
                            if message.startswith("ASK") and moved is not None:
                                asking = (moved[1], moved[2])
                            else:
                                asking = None
                                await self._refresh()
                            continue
                        if message.startswith(("TRYAGAIN", "CLUSTERDOWN")):
                            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
                            await self._refresh()
                            asking = None
                            continue
                        raise reply
                    return reply
                raise ResponseError(f"TRYAGAIN still redirected after {_MAX_REDIRECTS} tries")
        except (*UNREACHABLE, RedisError) as exc:
            raise self._failure(exc, action) from exc

    def _failure(self, exc: BaseException, action: str) -> BackendError:
        self._note_error(exc)
        if isinstance(exc, ResponseError) and not str(exc).startswith(TRANSIENT_REPLIES):
            return BackendError(f"Redis Cluster refused to {action}: {exc}")
        if isinstance(exc, TimeoutError) and not isinstance(exc, RedisTimeoutError):
            detail = f"no answer within {self._timeout} s"
        else:
            detail = str(exc) or type(exc).__name__
        return BackendUnavailable(f"cannot {action} on Redis Cluster at {self._where()}: {detail}")

    def _schedule_refresh(self) -> None:
        if self._refreshing is None and self._state == "connected":
            task = self._refreshing = asyncio.get_running_loop().create_task(self._refresh_now())
            task.add_done_callback(self._refreshed)

    # -- publishing and reading ---------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        payload: str,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Assign the next seq, append to the stream and SPUBLISH, in one script on the channel's shard.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: the shard cannot be reached within the timeout (a publish that reached it
                just before may still have been applied: retry with the same ``idempotency_key``).
            BackendError: Redis refused the script.
        """
        try:
            return await self._scripts.publish(channel, payload, idempotency_key, headers)
        except BackendError:
            self._publish_errors += 1
            raise

    async def position(self, channel: str) -> StreamPosition:
        """Return the channel's epoch and seq, read together on its shard.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: the shard cannot be reached within the timeout.
        """
        return await self._scripts.position(channel)

    async def history(self, channel: str, since: int, *, limit: int) -> History:
        """Read the envelopes after ``since`` and the position, in one script on the channel's shard.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: the shard cannot be reached within the timeout.
        """
        return await self._scripts.history(channel, since, limit)

    # -- subscriptions ------------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """SSUBSCRIBE on the channel's shard and return once it confirmed.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: no confirmation within the timeout, or the shard's subscriber gave up.
        """
        self._require("subscribe")
        if self._state == "failed":
            raise BackendUnavailable(f"a Redis Cluster shard's subscriber gave up: {self._last_error}")
        name = self._keys.pubsub(channel)
        self._channels[channel] = name
        self._names[name] = channel
        try:
            async with asyncio.timeout(self._timeout):
                node = self._topology.slots[key_slot(name.encode())]
                if node is None:
                    await self._refresh()
                    node = self._node_for(key_slot(name.encode()))
                await self._shard(node.key).add(name)
        except (TimeoutError, *UNREACHABLE, RedisError) as exc:
            if self._channels.get(channel) == name:
                del self._channels[channel]
                self._names.pop(name, None)
                for shard in self._shards.values():
                    shard.discard(name)
            raise BackendUnavailable(
                f"cannot subscribe to {channel!r} on Redis Cluster at {self._where()}: "
                f"not confirmed within {self._timeout} s ({self._last_error or exc or 'no error recorded'})"
            ) from None

    async def unsubscribe(self, channel: str) -> None:
        """SUNSUBSCRIBE on the channel's shard (not waiting for the confirmation). Never raises."""
        name = self._channels.pop(channel, None)
        if name is None:
            return
        self._names.pop(name, None)
        for shard in list(self._shards.values()):
            shard.discard(name)

    def _shard(self, key: tuple[str, int]) -> _Shard:
        shard = self._shards.get(key)
        if shard is None or shard.closed:
            shard = self._shards[key] = _Shard(self, key)
        return shard

    # -- what the shards report -------------------------------------------------------------------------

    def _deliver(self, name: bytes, message: bytes) -> None:
        channel = self._names.get(name.decode())
        listener = self._listener
        if channel is None or listener is None:
            return  # unsubscribed while the message was on its way
        self._received += 1
        try:
            envelope = envelope_of(channel, message.decode())
        except ValueError:
            self._listener_errors += 1
            logger.error("ignoring a malformed message on Redis channel %r: %.80r", name, message)
            return
        try:
            listener.on_envelope(envelope)
        except Exception:
            self._listener_errors += 1
            logger.exception("the backend listener failed in on_envelope() for %r", channel)

    def _interrupted(self, names: Iterable[str], reason: str) -> None:
        listener = self._listener
        channels = [self._names[n] for n in names if n in self._names]
        if listener is None or not channels or self._state == "closed":
            return
        try:
            listener.on_interruption(channels, reason)
        except Exception:
            self._listener_errors += 1
            logger.exception("the backend listener failed in on_interruption()")

    async def _regroup(self, names: Iterable[str], origin: _Shard) -> list[str]:
        """Move ``names`` to the shards that own their slots now; return those that stay with ``origin``.

        A moved channel takes its waiting subscribers along, and its new shard reports an interruption for
        it once subscribed there (it may have missed messages on the way).
        """
        await self._refresh()
        staying: list[str] = []
        for name in names:
            if name not in self._names or name not in origin.wanted:
                continue
            node = self._topology.slots[key_slot(name.encode())]
            if node is None or node.key == origin.key or self._state != "connected":
                staying.append(name)
            else:
                self._shard(node.key).adopt(name, origin.release(name))
        return staying

    def _gave_up(self, shard: _Shard, exc: BaseException) -> None:
        self._state = "failed"
        self._note_error(exc)
        logger.error(
            "the Redis Cluster subscriber of %s:%d gave up after %d attempts; its channels get no events "
            "until the broadcaster is restarted. Last error: %s",
            *shard.key,
            shard.attempts,
            exc,
        )
        self._interrupted(shard.names(), "backend_failed")


class _ShardProtocol(asyncio.Protocol):
    """The subscriber connection to one primary: sharded PUB/SUB messages, parsed in ``data_received``."""

    def __init__(self, shard: _Shard) -> None:
        self._shard = shard
        self._reader = hiredis.Reader(protocolError=RedisConnectionError, replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.replies: deque[asyncio.Future[Any]] = deque()  # login replies, before subscribing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's is not an asyncio.Transport subclass, but acts alike)."""
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Hand every complete reply to the shard."""
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if self.replies:
                    future = self.replies.popleft()
                    if not future.done():
                        future.set_result(reply)
                else:
                    self._shard.on_reply(reply)
        except RedisConnectionError as exc:
            self.abort(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell the shard's task."""
        for future in self.replies:
            if not future.done():
                future.set_exception(RedisConnectionError(f"connection lost: {exc or 'closed'}"))
        if not self.lost.done():
            self.lost.set_result(exc or RedisConnectionError("closed by the server"))

    def send(self, *commands: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(commands)

    def abort(self, exc: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        if self.transport is not None:
            self.transport.abort()


class _Shard:
    """The channels this process subscribed to on one primary, and the subscriber connection they share.

    A task keeps the connection up: connect, log in, ``SSUBSCRIBE`` every wanted channel, then let the
    protocol deliver messages until the connection fails; then re-read the slot map, hand channels whose
    slots moved to their new shard, and reconnect with capped exponential backoff. After a reconnect, and
    for channels it adopted from another shard, it reports an interruption once they are confirmed.
    """

    def __init__(self, backend: RedisClusterBackend, key: tuple[str, int]) -> None:
        self.backend = backend
        self.key = key
        self.attempts = 0
        self.closed = False
        self.up = False
        #: Lost its connection and not back yet (a first connection that is still opening is not failing).
        self.failing = False
        self.wanted: dict[str, list[asyncio.Future[None]]] = {}  # name -> waiters for its confirmation
        self._confirmed: set[str] = set()
        self._interrupted: set[str] = set()  # to report once confirmed
        self._expected_unsubscribes: dict[str, int] = {}
        self._protocol: _ShardProtocol | None = None
        self._pinged = False
        self._heard = True
        self._idle = False
        self._timer: asyncio.TimerHandle | None = None
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"rtbroadcast-redis-shard-{key[0]}:{key[1]}"
        )
        self._task.add_done_callback(self._done)

    def names(self) -> list[str]:
        return list(self.wanted)

    def describe(self) -> dict[str, object]:
        return {
            "up": self.up and not self.failing,
            "channels": len(self.wanted),
            "reconnect_attempts": self.attempts,
        }

    async def add(self, name: str) -> None:
        """Subscribe ``name`` here and wait for the confirmation.

        Raises:
            redis.exceptions.ConnectionError: the shard was closed meanwhile.
        """
        if name in self._confirmed and self.up:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        new = name not in self.wanted
        self.wanted.setdefault(name, []).append(waiter)
        if new and self._protocol is not None and self.up:
            self._protocol.send(pack(b"SSUBSCRIBE", name.encode()))
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.done():
                waiter.cancel()
            raise

    def adopt(self, name: str, waiters: list[asyncio.Future[None]]) -> None:
        """Take over ``name`` from another shard (its slot moved here); report it once subscribed."""
        self._interrupted.add(name)
        new = name not in self.wanted
        self.wanted.setdefault(name, []).extend(waiters)
        if new and self._protocol is not None and self.up:
            self._protocol.send(pack(b"SSUBSCRIBE", name.encode()))

    def release(self, name: str) -> list[asyncio.Future[None]]:
        """Give ``name`` up to another shard, with the subscribers still waiting for it."""
        waiters = self.wanted.pop(name, [])
        self._interrupted.discard(name)
        if name in self._confirmed:  # still subscribed here (a migration): stop hearing it here
            self._confirmed.discard(name)
            self._unsubscribe(name)
        self._close_if_idle()
        return waiters

    def discard(self, name: str) -> None:
        """Stop wanting ``name`` (unsubscribed, or moved to another shard)."""
        waiters = self.wanted.pop(name, None)
        if waiters is None:
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._interrupted.discard(name)
        if name in self._confirmed:
            self._confirmed.discard(name)
            self._unsubscribe(name)
        self._close_if_idle()

    def _unsubscribe(self, name: str) -> None:
        if self._protocol is not None and self.up:
            self._expected_unsubscribes[name] = self._expected_unsubscribes.get(name, 0) + 1
            self._protocol.send(pack(b"SUNSUBSCRIBE", name.encode()))

    def _close_if_idle(self) -> None:
        # A shard with no channel left needs no connection: the task ends once it is closed.
        if not self.wanted and self._protocol is not None:
            self._idle = True
            self._protocol.abort(RedisConnectionError("no channel left on this shard"))

    async def close(self, exc: BaseException) -> None:
        self.closed = True
        self._fail_waiters(exc)
        self._task.cancel()
        await asyncio.wait([self._task])

    def _fail_waiters(self, exc: BaseException) -> None:
        for waiters in self.wanted.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            waiters.clear()

    # -- replies --------------------------------------------------------------------------------------

    def on_reply(self, reply: Any) -> None:
        self._heard = True
        if isinstance(reply, ResponseError):
            self._on_error(reply)
            return
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind = reply[0]
        if kind == b"smessage":
            self.backend._deliver(reply[1], reply[2])
        elif kind == b"ssubscribe":
            self._on_subscribed(text(reply[1]))
        elif kind == b"sunsubscribe":
            name = text(reply[1])
            expected = self._expected_unsubscribes.get(name, 0)
            if expected:
                if expected == 1:
                    del self._expected_unsubscribes[name]
                else:
                    self._expected_unsubscribes[name] = expected - 1
            elif name in self.wanted:
                # The shard dropped it: its slot moved to another node. Find it there.
                self._confirmed.discard(name)
                self._move_soon([name])
        # b"pong": _heard is enough

    def _on_subscribed(self, name: str) -> None:
        if name not in self.wanted:
            return  # unsubscribed meanwhile; its SUNSUBSCRIBE follows
        self._confirmed.add(name)
        for waiter in self.wanted[name]:
            if not waiter.done():
                waiter.set_result(None)
        self.wanted[name].clear()
        self._report()

    def _on_error(self, reply: ResponseError) -> None:
        # SSUBSCRIBE answered MOVED: this node does not own the slot (any more). Which channel it was is not
        # in the reply: re-check every unconfirmed one against a fresh slot map.
        message = str(reply)
        if message.startswith(("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")):
            self._move_soon([n for n in self.wanted if n not in self._confirmed])
        else:
            self.backend._note_error(reply)
            logger.warning("Redis Cluster node %s:%d refused a subscription: %s", *self.key, reply)

    def _move_soon(self, names: list[str]) -> None:
        async def move() -> None:
            staying = await self.backend._regroup(names, self)
            for name in staying:
                if name not in self._confirmed and self._protocol is not None and self.up:
                    self._interrupted.add(name)
                    self._protocol.send(pack(b"SSUBSCRIBE", name.encode()))

        asyncio.get_running_loop().create_task(move()).add_done_callback(consume)

    def _report(self) -> None:
        # Once every interrupted channel is back, in one report (one repair round, one log line).
        ready = [n for n in self._interrupted if n in self._confirmed]
        if ready and len(ready) == len(self._interrupted):
            self._interrupted.difference_update(ready)
            self.backend._interrupted(ready, RECONNECTED)

    # -- the connection's life ----------------------------------------------------------------------------

    async def _run(self) -> None:
        first = True
        while self.wanted or first:
            first = False
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failing = bool(self.wanted)
                if not (self._idle and not self.wanted):
                    self.backend._note_error(exc)
                    logger.warning("lost the Redis Cluster subscriber of %s:%d (%s)", *self.key, exc)
            self._idle = False
            self.up = False
            self._confirmed.clear()
            self._interrupted.update(self.wanted)
            self._stop_pings()
            if self.closed:
                return
            # A failover or migration may have moved these channels: look where they live now.
            await self.backend._regroup(list(self.wanted), self)
            if not self.wanted:
                break
            await self._backoff()
        self.closed = True
        if self.backend._shards.get(self.key) is self:
            del self.backend._shards[self.key]

    async def _backoff(self) -> None:
        backend = self.backend
        await asyncio.sleep(reconnect_pause(backend._random, self.attempts, backend._reconnect_delay))
        self.attempts += 1
        limit = self.backend._max_attempts
        if limit is not None and self.attempts >= limit:
            raise _GaveUp(self.attempts)

    async def _serve(self) -> None:
        backend = self.backend
        template = backend._template(*self.key)
        async with asyncio.timeout(backend._timeout):
            protocol = await connect(template, lambda: _ShardProtocol(self))
            try:
                steps = await login_commands(template)
                futures = []
                for _ in steps:
                    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                    protocol.replies.append(future)
                    futures.append(future)
                protocol.send(*(command for _, command in steps))
                check_login(steps, list(await asyncio.gather(*futures)), f"{self.key[0]}:{self.key[1]}")
            except BaseException:
                protocol.abort(RedisConnectionError("login failed"))
                raise
        self._protocol = protocol
        self.up = True
        self.failing = False
        self._expected_unsubscribes.clear()
        if self.attempts:
            backend._reconnects += 1
        self.attempts = 0
        names = list(self.wanted)
        if names:
            protocol.send(*(pack(b"SSUBSCRIBE", name.encode()) for name in names))
        self._start_pings()
        try:
            exc = await protocol.lost
        finally:
            self._protocol = None
            protocol.abort(RedisConnectionError("closed"))
        raise RedisConnectionError(str(exc) if exc else "connection closed")

    def _start_pings(self) -> None:
        self._heard = True
        self._pinged = False
        self._timer = asyncio.get_running_loop().call_later(self.backend._ping_interval, self._tick)

    def _stop_pings(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        if self._heard:
            self._heard = False
            self._pinged = False
        elif not self._pinged:
            protocol.send(pack(b"PING"))
            self._pinged = True
        else:
            protocol.abort(RedisTimeoutError(f"no answer to PING within {self.backend._ping_interval} s"))
            return
        self._timer = asyncio.get_running_loop().call_later(self.backend._ping_interval, self._tick)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.closed = True
        if self.backend._shards.get(self.key) is self:
            del self.backend._shards[self.key]
        self._fail_waiters(BackendUnavailable(f"the Redis Cluster subscriber of {self.key} gave up: {exc}"))
        if isinstance(exc, _GaveUp):
            self.backend._gave_up(self, RedisConnectionError(self.backend._last_error or "unreachable"))
        else:
            logger.error("the Redis Cluster subscriber of %s:%d failed", *self.key, exc_info=exc)
            self.backend._gave_up(self, exc)


class _GaveUp(Exception):
    """A shard's subscriber stopped reconnecting after ``max_reconnect_attempts``."""
