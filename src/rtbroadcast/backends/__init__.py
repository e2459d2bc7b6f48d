"""Backends, loaded lazily by URL scheme so that ``import rtbroadcast`` never imports ``redis``."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .base import Backend, BackendListener, Envelope, History, StreamPosition

__all__ = ["Backend", "BackendListener", "Envelope", "History", "StreamPosition", "load_backend"]

#: URL scheme -> (module, class, extra to install). A new backend is one module plus one line here.
_BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "memory": ("rtbroadcast.backends.memory", "MemoryBackend", None),
    "redis": ("rtbroadcast.backends.redis", "RedisBackend", "redis"),
    "rediss": ("rtbroadcast.backends.redis", "RedisBackend", "redis"),
    "unix": ("rtbroadcast.backends.redis", "RedisBackend", "redis"),
}


def load_backend(url: str) -> Backend:
    """Create the backend a URL names: ``memory://`` or ``redis://host:port/db`` (``rediss://`` for TLS).

    Raises:
        ConfigurationError: the scheme is unknown, or the backend's extra is not installed.
    """
    scheme = urlsplit(url).scheme
    try:
        module_name, class_name, extra = _BACKENDS[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in sorted(_BACKENDS))
        raise ConfigurationError(f"unknown backend URL {url!r}; expected one of {known}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: pip install 'rtbroadcast[{extra}]'" if extra else ""
        raise ConfigurationError(f"the {scheme}:// backend is not available ({exc}){hint}") from exc
    backend_class: type[Backend] = getattr(module, class_name)
    from_url = getattr(backend_class, "from_url", None)
    if from_url is None:
        raise ConfigurationError(f"{class_name} cannot be built from a URL; pass backend= instead")
    backend: Backend = from_url(url)
    return backend
