"""The Redis Sentinel backend: one Redis master, found through Sentinel, and followed across failovers.

Everything the single-Redis backend does (:mod:`.backend`: one pipelined command connection, one PUB/SUB
connection, the Lua scripts, Streams history, presence) happens on the master the Sentinels name. Both
connections ask the Sentinels where the master is whenever they (re)connect, and check that the server they
reached says it is the master (``ROLE``, ``INFO replication``) before using it. The Sentinels are asked on
connections of their own, each closed once it answered (:class:`_Sentinels`).

A failover may lose the last writes of the old master (replication is asynchronous), and subscribers may have
seen them live. As on Redis Cluster, the channel's meta hash records the ID of the master that last wrote it,
and the first script that runs for the channel on another master starts a new epoch: the channel's clients
resync once (``epoch_changed``) instead of taking a new event for one they already had. The ID is the
master's replication ID (``master_replid``), which Redis changes whenever a server becomes a master (a
promoted replica, a restart), so a server that was demoted and promoted again does not pass for the master
that wrote the channel before.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final, NamedTuple
from urllib.parse import unquote, urlencode, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from ..._config import count, parse_query, redact_url
from ...errors import ConfigurationError
from .._redis_pipe import CommandPipe, PushConnection, bulks, open_pipe, open_push, pack
from ._options import URL_OPTIONS, check_redis_py_url
from ._scripts import NODE_SCRIPTS, Script
from ._shared import UNREACHABLE, error_code, text
from .backend import DEFAULT_MAX_CONNECTIONS, RedisBackend

__all__ = ["RedisSentinelBackend"]

logger = logging.getLogger("rtbroadcast.redis")

DEFAULT_SENTINEL_PORT: Final = 26379

#: Error replies that mean "this server is not the master (any more)", or may not be (cut off from its
#: replicas under ``min-replicas-to-write``): ask the Sentinels again.
_NOT_MASTER: Final = ("READONLY", "MASTERDOWN", "NOREPLICAS")

#: Options of a ``redis+sentinel://`` URL besides rtbroadcast's own (``ssl_*`` only on ``rediss+sentinel://``).
_SENTINEL_OPTIONS: Final = ("sentinel_username", "sentinel_password")
_SSL_OPTIONS: Final = (
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_password",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_ciphers",
    "ssl_check_hostname",
    "ssl_min_version",
)


class SentinelURL:
    """What a ``redis+sentinel://`` URL says, read and checked by :func:`parse_sentinel_url`."""

    __slots__ = ("db", "options", "password", "sentinels", "service", "ssl", "tls", "username")

    def __init__(self) -> None:
        self.sentinels: list[tuple[str, int]] = []
        self.service = ""
        self.db = 0
        self.username: str | None = None
        self.password: str | None = None
        self.tls = False
        self.ssl: dict[str, str] = {}
        self.options: dict[str, Any] = {}


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?options]``.

    Raises:
        ConfigurationError: naming what is wrong: the scheme, a Sentinel address, the service name, the
            database number, or an option (unknown, given twice, or with an invalid value).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise ConfigurationError(
            "a Redis Sentinel URL starts with redis+sentinel:// or rediss+sentinel://, "
            f"not {redact_url(url)!r}"
        )
    found = SentinelURL()
    found.tls = parts.scheme == "rediss+sentinel"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if userinfo:
        user, _, secret = userinfo.partition(":")
        found.username, found.password = unquote(user) or None, unquote(secret) or None
    for item in hosts.split(","):
        found.sentinels.append(_sentinel_address(item.strip(), url))
    path = [unquote(p) for p in parts.path.split("/")[1:]]
    if not path or not path[0]:
        raise ConfigurationError(
            f"a Redis Sentinel URL names the service (the master's name in the Sentinels' configuration) "
            f"after the Sentinels: redis+sentinel://host:26379/mymaster, not {redact_url(url)!r}"
        )
    found.service = path[0]
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(
            f"after the service name, a Redis Sentinel URL takes only a database number "
            f"(/{path[0]}/0), not {'/'.join(path[1:])!r}"
        )
    found.db = int(path[1]) if len(path) == 2 else 0
    known: dict[str, Any] = {**URL_OPTIONS, **dict.fromkeys(_SENTINEL_OPTIONS, str)}
    known.update(dict.fromkeys(_SSL_OPTIONS, str))
    values = parse_query(
        parts.scheme + "://",
        parts.query,
        known,
        help="; the database number goes in the path (/service/db)",
    )
    ssl = {k: v for k, v in values.items() if k in _SSL_OPTIONS}
    if ssl and not found.tls:
        raise ConfigurationError(f"ssl_* options need a rediss+sentinel:// URL, not {parts.scheme}://")
    if ssl:
        # The same checks as for one Redis, on an equivalent single-node URL.
        check_redis_py_url(f"rediss://127.0.0.1:6379/0?{urlencode(ssl)}")
    found.ssl = ssl
    found.options = {k: v for k, v in values.items() if k not in ssl}
    return found


def _sentinel_address(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:26379
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
    elif item.count(":") == 1:
        host, _, port = item.partition(":")
    else:
        host, port = item, ""
    if not port:
        port = str(DEFAULT_SENTINEL_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"invalid Sentinel address {item!r} in {redact_url(url)!r}: expected host or host:port"
        )
    return host, int(port)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (connections go to the master the Sentinels name), waiting for a free
    connection when all are taken, like the single-Redis backend's pool, rather than failing."""


def _replication(reply: Any) -> dict[str, str]:
    """Read ``INFO replication``'s ``key:value`` lines."""
    fields: dict[str, str] = {}
    for line in text(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


class RedisSentinelBackend(RedisBackend):
    """Share channels between processes through the Redis master that Redis Sentinel names.

    Works as :class:`~rtbroadcast.backends.redis.RedisBackend` (the same keys, scripts, history and
    presence), on whichever server the Sentinels name as ``service_name``'s master; it follows failovers,
    and a channel first written on a new master starts a new epoch (its clients resync once). Usually built
    from a URL by :meth:`from_url`: ``redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster``.

    Args:
        sentinels: the Sentinels' addresses ``(host, port)``; they are asked in turn.
        service_name: the master's name in the Sentinels' configuration (``sentinel monitor <name> ...``).
        db: the database number on the master.
        username: ACL user name on the master and its replicas, if they require one.
        password: password on the master and its replicas, if they require one.
        sentinel_username: ACL user name on the Sentinels, if they require one.
        sentinel_password: password on the Sentinels, if they require one.
        tls: connect with TLS, to the Sentinels and to the master; ``ssl`` holds redis-py's ``ssl_*``
            options (``ssl_ca_certs`` and so on).
        ssl: redis-py ``ssl_*`` keyword arguments for TLS connections.
        options: the options of :class:`~rtbroadcast.backends.redis.RedisBackend` (``key_prefix``,
            ``history_size``, ``timeout``...). ``timeout`` bounds finding the master too; each Sentinel
            is given a quarter of it to answer.

    Raises:
        ConfigurationError: an argument has the wrong type or an impossible value.
    """

    name = "redis+sentinel"

    _script_set: ClassVar[dict[str, Script]] = NODE_SCRIPTS
    _finds_server: ClassVar[bool] = True

    def __init__(
        self,
        sentinels: Iterable[tuple[str, int]],
        service_name: str,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
        tls: bool = False,
        ssl: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        addresses = list(sentinels) if not isinstance(sentinels, str | bytes) else []
        if not addresses or not all(_is_address(a) for a in addresses):
            raise ConfigurationError(
                f"sentinels must be a non-empty list of (host, port) pairs, not {sentinels!r}"
            )
        if not isinstance(service_name, str) or not service_name:
            raise ConfigurationError(
                "service_name must be the master's name in the Sentinels' configuration (a non-empty "
                f"string), not {service_name!r}"
            )
        for option, value in (
            ("username", username),
            ("password", password),
            ("sentinel_username", sentinel_username),
            ("sentinel_password", sentinel_password),
        ):
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{option} must be a string or None, not {type(value).__name__}")
        for option in ("url", "client"):
            if option in options:
                raise ConfigurationError(
                    f"RedisSentinelBackend takes no {option}=: it finds the master through the Sentinels"
                )
        self._db = count("db", db, minimum=0)
        super().__init__(**options)
        self._sentinel_addresses = addresses
        self._service = service_name
        self._username = username
        self._password = password
        self._sentinel_username = sentinel_username
        self._sentinel_password = sentinel_password
        self._tls = bool(tls)
        self._ssl = dict(ssl or {})
        self._sentinel: _Sentinels | None = None
        # The master each command connection was opened to (checked before any script went on it), the
        # one the latest went to, and the address the Sentinels named for it.
        self._masters: weakref.WeakKeyDictionary[CommandPipe, _Master] = weakref.WeakKeyDictionary()
        self._master: _Master | None = None
        self._discovered: tuple[str, int] | None = None
        self._master_changes = 0

    def __repr__(self) -> str:
        return f"<RedisSentinelBackend {self._where()} {self._pubsub.state.value}>"

    @classmethod
    def from_url(cls, url: str) -> RedisSentinelBackend:
        """Build from ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?options]``.

        ``rediss+sentinel://`` connects with TLS (to the Sentinels and to the master). A Sentinel's port
        defaults to 26379; the user and password are the master's. The query takes rtbroadcast's options
        (``key_prefix``, ``timeout``...), ``sentinel_username`` and ``sentinel_password``, and on
        ``rediss+sentinel://`` redis-py's ``ssl_*`` options.

        Raises:
            ConfigurationError: the URL names no Sentinel or service, has an invalid address or database
                number, or an unknown, repeated or invalid option (the message names it).
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"url must be a Redis Sentinel URL string, not {type(url).__name__}")
        found = parse_sentinel_url(url)
        options = dict(found.options)
        ssl: dict[str, Any] = {}
        if found.ssl:
            # redis-py's own reading of the options (flags, numbers), as for a rediss:// URL.
            ssl = {
                k: v for k, v in parse_url(f"rediss://h/0?{urlencode(found.ssl)}").items() if k in found.ssl
            }
        return cls(
            found.sentinels,
            found.service,
            db=found.db,
            username=found.username,
            password=found.password,
            tls=found.tls,
            ssl=ssl,
            **options,
        )

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """The Sentinels' addresses, as given."""
        return list(self._sentinel_addresses)

    @property
    def service(self) -> str:
        """The master's name in the Sentinels' configuration."""
        return self._service

    def _where(self) -> str:
        scheme = "rediss+sentinel" if self._tls else "redis+sentinel"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self._sentinel_addresses)
        return f"{scheme}://{hosts}/{self._service}" + (f"/{self._db}" if self._db else "")

    def stats(self) -> Mapping[str, object]:
        """Return the single-Redis backend's figures, plus the master the command connection is on
        (``master``: the last one it found) and how many times it found a new one (``master_changes``)."""
        master = self._master
        return {
            **super().stats(),
            "service": self._service,
            "sentinels": [f"{h}:{p}" for h, p in self._sentinel_addresses],
            "master": None if master is None else f"{master.host}:{master.port}",
            "master_changes": self._master_changes,
        }

    # -- connections: wherever the Sentinels say the master is ----------------------------------------

    def _new_client(self) -> Redis:
        """Create a redis-py client whose connections go to the master the Sentinels name."""
        # As for one Redis: no retries inside redis-py (a retried publish could be applied twice), RESP2,
        # and a pool that waits for a free connection. Each Sentinel gets a quarter of the timeout, so
        # that one that does not answer leaves time to ask the others. The pool asks _Sentinels where the
        # master is, whenever a connection connects.
        common: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "protocol": 2}
        self._sentinel = _Sentinels(self, self._timeout / 4)
        pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
            self._service,
            self._sentinel,
            max_connections=DEFAULT_MAX_CONNECTIONS,
            timeout=self._timeout,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            db=self._db,
            username=self._username,
            password=self._password,
            ssl=self._tls,
            **self._ssl,
            **common,
        )
        return Redis(connection_pool=pool)

    async def _discover(self) -> tuple[str, int]:
        """Ask the Sentinels where the master is.

        Raises:
            redis.exceptions.ConnectionError: no Sentinel answers, or none names a master it sees up.
        """
        assert self._client is not None
        pool = self._client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]  # untyped in redis-py
        return str(host), int(port)

    async def _pipe_template(self) -> AbstractConnection:
        """Return where the command connection goes: the master the Sentinels name now."""
        host, port = self._discovered = await self._discover()
        return self._template(host, port)

    def _template(self, host: str, port: int) -> AbstractConnection:
        """A connection object that is never connected: how (TLS, login) to connect to ``host:port``."""
        assert self._client is not None
        kwargs = dict(self._client.connection_pool.connection_kwargs)
        kwargs.pop("connection_pool", None)
        connection_class = SSLConnection if self._tls else Connection
        return connection_class(host=host, port=port, **kwargs)

    async def _pipe_opened(self, pipe: CommandPipe) -> None:
        """Check that the new command connection reached the master; record its replication ID.

        Raises:
            redis.exceptions.ConnectionError: the server is not a master (the Sentinels' view is behind).
        """
        assert self._discovered is not None
        host, port = self._discovered
        reply = await pipe.request(pack(b"INFO", b"replication"))
        fields = {} if isinstance(reply, ResponseError) else _replication(reply)
        role, replid = fields.get("role"), fields.get("master_replid")
        if role != "master" or not replid:
            detail = str(reply) if isinstance(reply, ResponseError) else f"role:{role}"
            raise RedisConnectionError(
                f"{host}:{port}, which the Sentinels name as the master of {self._service!r}, is not one "
                f"({detail}); the Sentinels may not have finished a failover"
            )
        master = _Master(host, port, replid.encode())
        self._masters[pipe] = master
        previous, self._master = self._master, master
        if previous is not None and previous.replid != master.replid:
            self._master_changes += 1
            logger.warning(
                "the master of %r is now %s:%d (it was %s:%d): each channel starts a new epoch at its next "
                "publish or read there, and its clients resync",
                self._service,
                host,
                port,
                previous.host,
                previous.port,
            )

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
        """Queue ``script`` with the replication ID of ``pipe``'s master as its last ARGV."""
        master = self._masters.get(pipe)
        if master is None:  # not a connection _pipe_opened() checked: never send a script on it
            raise RedisConnectionError(f"the command connection to {pipe.where} has no master recorded")
        if packed is not None:
            packed += bulks(master.replid)
        args = [*args, master.replid]
        future = super()._send(pipe, script, keys, args, deadline, cached=cached, packed=packed)
        future.add_done_callback(functools.partial(self._check_reply, pipe, master))
        return future

    def _check_reply(self, pipe: CommandPipe, master: _Master, future: asyncio.Future[Any]) -> None:
        """Close ``pipe`` when its server says it is no longer the master: the next command asks the
        Sentinels again (a demotion while this connection stayed open)."""
        if future.cancelled() or future.exception() is not None or pipe.closed:
            return
        reply = future.result()
        if isinstance(reply, ResponseError) and error_code(str(reply)) in _NOT_MASTER:
            logger.warning(
                "%s:%d is no longer the master of %r (%s); asking the Sentinels again",
                master.host,
                master.port,
                self._service,
                reply,
            )
            pipe.abort("closed: its server is no longer the master")

    async def _open(self) -> PushConnection:
        """Open the PUB/SUB connection to the master the Sentinels name, and check that it is the master.

        Raises:
            redis.exceptions.ConnectionError, TimeoutError: no master can be found or reached.
        """
        async with asyncio.timeout(self._timeout):
            host, port = await self._discover()
            push = await open_push(self._template(host, port), where=self._where())
            try:
                role = await push.request(pack(b"ROLE"))
            except BaseException as exc:
                push.close(exc)
                raise
        if isinstance(role, list) and role and text(role[0]) == "master":
            return push
        refused = RedisConnectionError(
            f"{host}:{port}, which the Sentinels name as the master of {self._service!r}, is not one "
            f"(ROLE: {role!r:.60}); the Sentinels may not have finished a failover"
        )
        push.close(refused)
        raise refused


class _Master(NamedTuple):
    """A master a command connection reached: its address and replication ID."""

    host: str
    port: int
    replid: bytes


def _is_address(address: object) -> bool:
    return (
        isinstance(address, tuple)
        and len(address) == 2
        and isinstance(address[0], str)
        and bool(address[0])
        and isinstance(address[1], int)
        and not isinstance(address[1], bool)
        and 0 < address[1] < 65536
    )


class _Sentinels:
    """Ask the Sentinels in turn where the master of the service is (for redis-py's Sentinel pool).

    Each question goes on a connection of its own, closed once answered: discovery happens only when a
    connection (re)connects, and nothing is left open between failovers. The Sentinel that answered is asked
    first next time.
    """

    def __init__(self, backend: RedisSentinelBackend, timeout: float) -> None:
        self._backend = backend
        self._timeout = timeout
        self._order = list(backend._sentinel_addresses)

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        """Return the address of the master the first Sentinel that sees it up names.

        Raises:
            redis.asyncio.sentinel.MasterNotFoundError: no Sentinel answers, or none names a master it
                sees up (the message says what each one said).
        """
        said: list[str] = []
        for index, (host, port) in enumerate(self._order):
            try:
                async with asyncio.timeout(self._timeout):
                    found = await self._ask(host, port, service_name)
            except (*UNREACHABLE, RedisError) as exc:
                said.append(f"{host}:{port}: {exc or type(exc).__name__}")
                continue
            if isinstance(found, str):
                said.append(f"{host}:{port}: {found}")
                continue
            if index:
                self._order.insert(0, self._order.pop(index))
            return found
        raise MasterNotFoundError(f"No master found for {service_name!r}: {'; '.join(said)}")

    async def discover_slaves(self, service_name: str) -> list[tuple[str, int]]:
        """Replicas are never used: every connection goes to the master."""
        return []

    async def _ask(self, host: str, port: int, service_name: str) -> tuple[str, int] | str:
        """Return the master's address, or why this Sentinel names none it sees up."""
        backend = self._backend
        options: dict[str, Any] = {
            "host": host,
            "port": port,
            "username": backend._sentinel_username,
            "password": backend._sentinel_password,
        }
        template = SSLConnection(**options, **backend._ssl) if backend._tls else Connection(**options)
        pipe = await open_pipe(template, request_timeout=self._timeout, where=f"Sentinel {host}:{port}")
        try:
            reply = await pipe.request(pack(b"SENTINEL", b"MASTER", service_name.encode()))
        finally:
            await pipe.close()
        if isinstance(reply, ResponseError):
            return str(reply)  # ERR No such master with that name
        fields = {text(reply[i]): text(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}
        flags = set(fields.get("flags", "").split(","))
        if "master" not in flags or flags & {"s_down", "o_down", "disconnected"}:
            return f"the master is {fields.get('flags', 'unknown')}"
        return fields["ip"], int(fields["port"])
