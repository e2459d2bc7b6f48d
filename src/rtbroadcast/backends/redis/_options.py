"""The Redis URL's query options: rtbroadcast's own, and redis-py's, each checked when the backend is made.

Every query option is checked when the backend is created, so that a typo fails there, naming the option,
rather than as a TypeError from redis-py at the first connect. rtbroadcast's own options are read here
(:func:`read_option`, for ``RedisBackend.from_url`` and ``RedisClusterBackend.from_url``); redis-py's are
checked here (:func:`check_redis_py_url`) and left in the URL for redis-py to read.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)

from ..._config import did_you_mean, redact_url
from ...errors import ConfigurationError

__all__ = ["SCHEMES", "URL_OPTIONS", "check_redis_py_url", "read_option", "split_url"]


def _seconds_or_none(value: str) -> float | None:
    return None if value.strip().lower() in ("", "none", "0") else float(value)


#: rtbroadcast's own options, with their conversion from text; RedisBackend() checks the values.
URL_OPTIONS: dict[str, Callable[[str], Any]] = {
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
#: The URL schemes of a single Redis.
SCHEMES: Final = _ANY

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


def split_url(url: str) -> tuple[str, dict[str, str]]:
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
        if key in URL_OPTIONS:
            ours[key] = value
        else:
            theirs.append((key, value))
    if not ours:
        return url, ours
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def check_redis_py_url(url: str) -> None:
    """Check everything redis-py will read from ``url`` (what ``split_url`` left of it).

    Raises:
        ConfigurationError: naming the option or the part of the URL that is wrong.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "unix" and not parts.path:
        raise ConfigurationError("a unix:// Redis URL needs the socket's path: unix:///run/redis.sock")
    accepted = _accepted_by_redis_py(scheme)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in URL_OPTIONS:
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
            known = set(URL_OPTIONS) | {
                k for k, (_, schemes) in _REDIS_PY_OPTIONS.items() if scheme in schemes
            }
            raise ConfigurationError(
                f"unknown Redis URL option {key!r}{did_you_mean(key, known)}; rtbroadcast's options: "
                f"{', '.join(sorted(URL_OPTIONS))}; redis-py's: see 'Backend URLs' in the configuration "
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


def read_option(key: str, value: str) -> Any:
    """Convert the text of rtbroadcast's URL option ``key`` (one of :data:`URL_OPTIONS`).

    Raises:
        ConfigurationError: the text is not a value of the option's type.
    """
    try:
        return URL_OPTIONS[key](value)
    except ValueError:
        raise ConfigurationError(f"invalid value {value!r} for Redis URL option {key!r}") from None
