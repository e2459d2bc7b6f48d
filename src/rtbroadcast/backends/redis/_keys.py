"""The Redis key layout of a channel, in one place: one Redis, Redis Cluster and presence all use it.

Every key of a channel carries the channel in one hash tag, so that they all live on one Redis Cluster slot
(and a Lua script may touch them together)::

    <prefix>:{<channel>}:meta              hash: epoch, seq (a Cluster's also node: who last wrote it)
    <prefix>:{<channel>}:stream            stream: one entry per event, ID "<seq>-0", fields d (data), t (ms)
    <prefix>:{<channel>}:idem:<key>        string: "<epoch>:<seq>" of the publish with idempotency key <key>
    <prefix>:{<channel>}[:db<N>]           PUB/SUB channel (sharded on a Cluster): "<seq> <epoch> <data>",
                                           and presence changes "p <version> j|l <member JSON>"
    <prefix>:{<channel>}:presence          hash: client -> "<process> <member JSON>"
    <prefix>:{<channel>}:presence:order    sorted set: client -> version of its join (join order)
    <prefix>:{<channel>}:presence:procs    sorted set: process -> deadline (ms since the epoch)
    <prefix>:{<channel>}:presence:version  string: the version of the channel's last presence change

``{``, ``}`` and ``%`` in a channel name are percent-escaped, so that every channel has a hash tag of its own
and no two channels can share a key: ``room:{1}`` becomes ``rtb:{room:%7B1%7D}:meta``. PUB/SUB ignores
database numbers, so on a database other than 0 the PUB/SUB channel's name ends in ``:db<N>`` (a Cluster has
database 0 only). docs/howto/redis.md shows the same table for operators: change both together.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from ...errors import ConfigurationError
from .._redis_pipe import bulks

__all__ = ["ChannelKeys", "KeyLayout", "check_key_prefix", "escape", "pubsub_suffix"]

#: The suffixes of a channel's presence keys, in the order the presence scripts take them as KEYS.
PRESENCE_SUFFIXES: Final = (":presence", ":presence:order", ":presence:procs", ":presence:version")

#: Channels whose encoded names a layout keeps; a service with more recomputes some.
_CACHE_SIZE: Final = 10_000


def escape(channel: str) -> str:
    """Return ``channel`` as it appears inside the hash tag of its keys."""
    # Percent-escaping keeps the hash tag unambiguous: "{a}b}" could otherwise end at the first "}".
    return channel.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def check_key_prefix(key_prefix: object) -> str:
    """Return ``key_prefix`` if it can start every key name.

    Raises:
        ConfigurationError: it is not a non-empty string, or holds a brace (it would end up in the hash
            tag) or a space.
    """
    if not isinstance(key_prefix, str) or not key_prefix or any(c in key_prefix for c in "{} "):
        raise ConfigurationError(
            f"key_prefix must be a non-empty string without braces or spaces, not {key_prefix!r}"
        )
    return key_prefix


def pubsub_suffix(db: int) -> str:
    """Return the end of PUB/SUB channel names on database ``db`` (PUB/SUB itself ignores databases)."""
    return f":db{db}" if db else ""


class ChannelKeys(NamedTuple):
    """A channel's key base (text) and, encoded for the wire, its meta and stream keys and PUB/SUB name;
    ``packed_keys`` and ``packed_pubsub`` are the same names packed as RESP bulk strings, for the publish."""

    base: str
    meta: bytes
    stream: bytes
    pubsub: bytes
    packed_keys: bytes
    packed_pubsub: bytes


class KeyLayout:
    """The names of every channel's keys under one prefix, and their encoding on the wire.

    Args:
        prefix: the first part of every name (checked by :func:`check_key_prefix`).
        pubsub_suffix: the end of PUB/SUB channel names (:func:`pubsub_suffix` of the database).
        encoding: how the client encodes text, ``(encoding, errors)``.
    """

    __slots__ = ("_cache", "encoding", "prefix", "pubsub_suffix")

    def __init__(
        self, prefix: str, *, pubsub_suffix: str = "", encoding: tuple[str, str] = ("utf-8", "strict")
    ) -> None:
        self.prefix = prefix
        self.pubsub_suffix = pubsub_suffix
        self.encoding = encoding
        self._cache: dict[str, ChannelKeys] = {}

    def configure(self, *, pubsub_suffix: str, encoding: tuple[str, str]) -> None:
        """Name PUB/SUB channels and encode names as the client connected to says (see ``__init__``)."""
        self.pubsub_suffix = pubsub_suffix
        self.encoding = encoding
        self._cache.clear()

    def base(self, channel: str) -> str:
        """Return what every key name of ``channel`` starts with: the prefix and the hash tag."""
        return f"{self.prefix}:{{{escape(channel)}}}"

    def pubsub(self, channel: str) -> str:
        """Return the name of ``channel``'s PUB/SUB channel."""
        return self.base(channel) + self.pubsub_suffix

    def presence(self, channel: str) -> list[str]:
        """Return ``channel``'s presence keys: members, order, processes, version."""
        base = self.base(channel)
        return [base + suffix for suffix in PRESENCE_SUFFIXES]

    def describe(self, channel: str, *, presence: bool) -> dict[str, str]:
        """Return every name of ``channel`` by role (for operators and tests); ``idempotency`` is a prefix."""
        base = self.base(channel)
        names = {
            "meta": f"{base}:meta",
            "stream": f"{base}:stream",
            "idempotency": f"{base}:idem:",
            "pubsub": base + self.pubsub_suffix,
        }
        if presence:
            roles = ("presence", "presence_order", "presence_procs", "presence_version")
            names.update(zip(roles, self.presence(channel), strict=True))
        return names

    def encode(self, text: str) -> bytes:
        """Encode ``text`` the way the client would."""
        return text.encode(*self.encoding)

    def channel(self, channel: str) -> ChannelKeys:
        """Return ``channel``'s key base and encoded names, from a bounded cache."""
        found = self._cache.get(channel)
        if found is None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            base = self.base(channel)
            encoding, errors = self.encoding
            meta = f"{base}:meta".encode(encoding, errors)
            stream = f"{base}:stream".encode(encoding, errors)
            pubsub = (base + self.pubsub_suffix).encode(encoding, errors)
            found = ChannelKeys(base, meta, stream, pubsub, bulks(meta, stream), bulks(pubsub))
            self._cache[channel] = found
        return found

    def idempotency(self, keys: ChannelKeys, idempotency_key: str) -> bytes:
        """Return the encoded key that records a publish's ``idempotency_key``."""
        return f"{keys.base}:idem:{idempotency_key}".encode(*self.encoding)
