"""The Redis backend: many processes share channels through one Redis server.

Live fan-out travels over Redis PUB/SUB (one connection per process); history lives in a Redis Stream per
channel. One Lua script per publish assigns the seq, appends to the stream and PUBLISHes, so the live
stream and the history can never disagree. Redis Cluster (:mod:`rtbroadcast.backends.redis_cluster`) uses
the same key layout and scripts.

The package, part by part:

- ``backend``: :class:`RedisBackend`.
- ``_keys``: the key layout of a channel, every key described in one place (presence keys included).
- ``_scripts``: the Lua scripts, and ``Script``, which sends one with ``EVALSHA``/``EVAL``.
- ``_listener``: the PUB/SUB listener and the backend's state machine.
- ``_presence``: presence members and their heartbeat.
- ``_options``: the URL's query options, checked.
- ``_shared``: defaults, checks and script calls shared with the Cluster backend.
"""

from __future__ import annotations

from ._shared import (
    DEFAULT_HISTORY_SIZE,
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_META_TTL,
    DEFAULT_PING_INTERVAL,
    DEFAULT_RECONNECT_DELAY,
    DEFAULT_TIMEOUT,
    DEFAULT_UNPUBLISHED_TTL,
    RECONNECTED,
)
from .backend import DEFAULT_MAX_CONNECTIONS, RedisBackend

__all__ = [
    "DEFAULT_HISTORY_SIZE",
    "DEFAULT_IDEMPOTENCY_TTL",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_META_TTL",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_RECONNECT_DELAY",
    "DEFAULT_TIMEOUT",
    "DEFAULT_UNPUBLISHED_TTL",
    "RECONNECTED",
    "RedisBackend",
]
