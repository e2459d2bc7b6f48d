"""The Redis Sentinel backend: one Redis master, found through Sentinel, and followed across failovers.

Everything the single-Redis backend does (:mod:`.redis`: one pipelined command connection, one PUB/SUB
connection, the Lua scripts, Streams history, presence) happens on the master the Sentinels name. Both
connections ask the Sentinels where the master is whenever they (re)connect, and check that the server they
reached says it is the master (``ROLE``, ``INFO replication``) before using it.

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
import logging
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import unquote, urlencode, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from .._config import did_you_mean, parse_query, redact_url
from ..errors import ConfigurationError
from ._redis_pipe import CommandPipe, pack
from .redis import _URL_OPTIONS, _check_redis_py_url, _close, _Script, _text
from .redis import RedisBackend

__all__ = ["RedisSentinelBackend"]

logger = logging.getLogger("rtbroadcast.redis")

DEFAULT_SENTINEL_PORT: Final = 26379

#: Error replies that mean "this server is not the master (any more)": find the master again.
_NOT_MASTER: Final = ("READONLY", "MASTERDOWN")

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
            f"a Redis Sentinel URL starts with redis+sentinel:// or rediss+sentinel://, not {redact_url(url)!r}"
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
    known: dict[str, Any] = {**_URL_OPTIONS, **dict.fromkeys(_SENTINEL_OPTIONS, str)}
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
        _check_redis_py_url(f"rediss://127.0.0.1:6379/0?{urlencode(ssl)}")
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
    for line in _text(reply).splitlines():
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
