"""Backends, loaded lazily by URL scheme: ``import rtbroadcast`` never imports ``redis`` or ``asyncpg``."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from .._config import did_you_mean, redact_url
from ..errors import ConfigurationError
from .base import PUBLISHED_AT, Backend, BackendListener, Envelope, History, StreamPosition

__all__ = [
    "PUBLISHED_AT",
    "Backend",
    "BackendListener",
    "Envelope",
    "History",
    "StreamPosition",
    "load_backend",
]

#: URL scheme -> (module, class, extra to install). A new backend is one module plus one line here.
_BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "memory": ("rtbroadcast.backends.memory", "MemoryBackend", None),
    "redis": ("rtbroadcast.backends.redis", "RedisBackend", "redis"),
    "rediss": ("rtbroadcast.backends.redis", "RedisBackend", "redis"),
    "unix": ("rtbroadcast.backends.redis", "RedisBackend", "redis"),
    "postgresql": ("rtbroadcast.backends.postgres", "PostgresBackend", "postgres"),
    "postgres": ("rtbroadcast.backends.postgres", "PostgresBackend", "postgres"),
    "redis+cluster": ("rtbroadcast.backends.redis_cluster", "RedisClusterBackend", "redis"),
    "rediss+cluster": ("rtbroadcast.backends.redis_cluster", "RedisClusterBackend", "redis"),
}


def load_backend(url: str) -> Backend:
    """Create the backend a URL names: ``memory://``, ``redis://host:port/db`` (``rediss://`` for TLS),
    ``redis+cluster://host:port,host:port`` for a Redis Cluster, or ``postgresql://user@host:port/db``.

    Each backend reads its options from the URL's query and refuses one it does not know, naming it.

    Raises:
        ConfigurationError: ``url`` is not a string, its scheme is unknown (the message lists the known
            ones), the backend's extra is not installed (the message says what to ``pip install``), or an
            option in it is unknown or has an invalid value.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a backend URL must be a string, not {type(url).__name__}")
    scheme = urlsplit(url).scheme if "://" in url else ""
    known = ", ".join(f"{s}://" for s in sorted(_BACKENDS))
    if scheme not in _BACKENDS:
        what = f"scheme {scheme!r}{did_you_mean(scheme, _BACKENDS)}" if scheme else "no scheme"
        raise ConfigurationError(f"unknown backend URL {redact_url(url)!r} ({what}); expected one of {known}")
    module_name, class_name, extra = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: pip install 'rtbroadcast[{extra}]'" if extra else ""
        raise ConfigurationError(
            f"the {scheme}:// backend needs a package that cannot be imported ({exc}){hint}"
        ) from exc
    backend_class: type[Backend] = getattr(module, class_name)
    from_url = getattr(backend_class, "from_url", None)
    if from_url is None:
        raise ConfigurationError(f"{class_name} cannot be built from a URL; pass backend= instead")
    backend: Backend = from_url(url)
    return backend
