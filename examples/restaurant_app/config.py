"""Configuration from environment variables (documented in this package's README)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_OUTBOX_RETENTION",
    "MIN_SECRET_BYTES",
    "Settings",
]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./restaurant.db"
#: Seconds a published outbox row is kept before the relay deletes it (one hour).
DEFAULT_OUTBOX_RETENTION = 3600.0
#: Largest HTTP request body accepted, in bytes (1 MiB); a larger one gets 413 before it is read.
DEFAULT_MAX_BODY_SIZE = 1024 * 1024
#: Shortest token secret accepted: HS256 keys shorter than the hash (RFC 7518 section 3.2) are refused.
MIN_SECRET_BYTES = 32

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the service needs to start.

    Args:
        database_url: SQLAlchemy URL; ``sqlite://`` and ``postgresql://`` get their async drivers.
        broadcast_url: rtbroadcast backend URL, ``memory://``, ``redis://host:port/db``, or
            ``postgresql://...`` on the service's own PostgreSQL database (writes then publish inside
            their transaction, and ``outbox`` does not apply).
        heartbeat_interval: seconds between WebSocket pings, also announced in the welcome frame.
        heartbeat_timeout: seconds to wait for a pong before the server drops a dead connection.
        demo: seed the demo restaurant at startup.
        outbox: write events to a transactional outbox relayed to the broadcaster (the default); off
            publishes right after each commit, and an event whose publish fails is lost. Not used with
            a ``postgresql://`` broadcast backend.
        outbox_retention: seconds an outbox row is kept after it was published; the relay then deletes
            it (``0``: at its next prune). Pending rows are never deleted.
        log_level: level of the root logger when started with ``python -m examples.restaurant_app``.
        token_secret: HS256 secret of the device tokens (at least 32 bytes). When set, every request for
            a restaurant's data needs a token bound to that restaurant. Never shown in ``repr``.
        allow_legacy_unauthenticated: also accept requests that carry no token at all (the reference's
            bare ``/realtime?restaurant_id=...``). Without a secret it runs the service open.
        allowed_origins: if set, WebSocket requests whose ``Origin`` is not listed are refused (4003).
        max_body_size: largest HTTP request body accepted, in bytes; a larger one gets 413 while it is
            being read (a ``Content-Length`` over it before the request is handled).
        metrics: serve the broadcaster's Prometheus metrics on ``/metrics``.
    """

    database_url: str = DEFAULT_DATABASE_URL
    broadcast_url: str = "memory://"
    heartbeat_interval: float = 25.0
    heartbeat_timeout: float = 10.0
    demo: bool = False
    outbox: bool = True
    outbox_retention: float = DEFAULT_OUTBOX_RETENTION
    log_level: str = "INFO"
    token_secret: str | None = field(default=None, repr=False)
    allow_legacy_unauthenticated: bool = False
    allowed_origins: tuple[str, ...] | None = None
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    metrics: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.outbox_retention) or self.outbox_retention < 0:
            raise ValueError(
                f"OUTBOX_RETENTION must be a finite number of seconds >= 0, not {self.outbox_retention}"
            )
        if self.max_body_size < 1:
            raise ValueError(f"MAX_BODY_SIZE must be a positive number of bytes, not {self.max_body_size}")
        if self.token_secret is not None and len(self.token_secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(
                f"RESTAURANT_TOKEN_SECRET must be at least {MIN_SECRET_BYTES} bytes long "
                '(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))")'
            )

    @property
    def auth_mode(self) -> str:
        """``tokens``, ``tokens+legacy`` (tokens, and requests without one), ``open``, or ``unconfigured``."""
        if self.token_secret is not None:
            return "tokens+legacy" if self.allow_legacy_unauthenticated else "tokens"
        return "open" if self.allow_legacy_unauthenticated else "unconfigured"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (default: the process environment).

        Raises:
            ValueError: a variable has a value of the wrong kind.
        """
        env = os.environ if environ is None else environ
        return cls(
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            broadcast_url=env.get("BROADCAST_URL") or "memory://",
            heartbeat_interval=_seconds(env, "HEARTBEAT_INTERVAL", 25.0),
            heartbeat_timeout=_seconds(env, "HEARTBEAT_TIMEOUT", 10.0),
            demo=_flag(env, "DEMO", False),
            outbox=_flag(env, "OUTBOX", True),
            outbox_retention=_seconds(env, "OUTBOX_RETENTION", DEFAULT_OUTBOX_RETENTION, zero=True),
            log_level=_log_level(env),
            token_secret=env.get("RESTAURANT_TOKEN_SECRET") or None,
            allow_legacy_unauthenticated=_flag(env, "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED", False),
            allowed_origins=_origins(env),
            max_body_size=_byte_count(env, "MAX_BODY_SIZE", DEFAULT_MAX_BODY_SIZE),
            metrics=_flag(env, "METRICS", True),
        )


def _origins(env: Mapping[str, str]) -> tuple[str, ...] | None:
    raw = env.get("RESTAURANT_ALLOWED_ORIGINS")
    if not raw or not raw.strip():
        return None
    origins = tuple(origin.strip().rstrip("/") for origin in raw.split(",") if origin.strip())
    for origin in origins:
        scheme, sep, host = origin.partition("://")
        if not sep or scheme not in ("http", "https") or not host or "/" in host:
            raise ValueError(
                f"RESTAURANT_ALLOWED_ORIGINS takes comma-separated origins like https://app.example.com, "
                f"not {origin!r}"
            )
    return origins


def _seconds(env: Mapping[str, str], name: str, default: float, *, zero: bool = False) -> float:
    """A finite number of seconds: more than zero, or (``zero``) zero or more."""
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be a finite number of seconds {'>=' if zero else '>'} 0, not {raw!r}")
    return value


def _byte_count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of bytes, not {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be positive, not {raw!r}")
    return value


def _log_level(env: Mapping[str, str]) -> str:
    level = (env.get("LOG_LEVEL") or "INFO").upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, not {env.get('LOG_LEVEL')!r}")
    return level


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, not {raw!r}")
