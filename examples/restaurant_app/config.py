"""Configuration from environment variables (documented in this package's README)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_DATABASE_URL", "Settings"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./restaurant.db"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the service needs to start.

    Args:
        database_url: SQLAlchemy URL; ``sqlite://`` and ``postgresql://`` get their async drivers.
        broadcast_url: rtbroadcast backend URL, ``memory://`` or ``redis://host:port/db``.
        heartbeat_interval: seconds between WebSocket pings, also announced in the welcome frame.
        heartbeat_timeout: seconds to wait for a pong before the server drops a dead connection.
        demo: seed the demo restaurant at startup.
        log_level: level of the root logger when started with ``python -m examples.restaurant_app``.
    """

    database_url: str = DEFAULT_DATABASE_URL
    broadcast_url: str = "memory://"
    heartbeat_interval: float = 25.0
    heartbeat_timeout: float = 10.0
    demo: bool = False
    log_level: str = "INFO"

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
            heartbeat_interval=_positive(env, "HEARTBEAT_INTERVAL", 25.0),
            heartbeat_timeout=_positive(env, "HEARTBEAT_TIMEOUT", 10.0),
            demo=_flag(env, "DEMO", False),
            log_level=_log_level(env),
        )


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {raw!r}") from None
    if value <= 0:
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
