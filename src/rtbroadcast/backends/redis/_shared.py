"""What the single-Redis and Redis Cluster backends share: defaults, checks, the channel scripts' calls.

The two differ in how a script reaches Redis (one pipelined connection; or the primary of the slot, following
redirections), which each passes to :class:`ChannelScripts` as its ``run``; what goes into a script and what
comes out of it is the same, and lives here once.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from collections.abc import Mapping
from typing import Any, Final, Protocol, TypeAlias

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._config import count, optional_seconds, seconds
from ...protocol import seq_prefix
from .._redis_pipe import bulks
from ..base import Envelope, History, StreamPosition, decode_headers, encode_headers
from ._keys import KeyLayout
from ._scripts import Script

__all__ = [
    "DEFAULT_HISTORY_SIZE",
    "DEFAULT_IDEMPOTENCY_TTL",
    "DEFAULT_META_TTL",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_RECONNECT_DELAY",
    "DEFAULT_TIMEOUT",
    "DEFAULT_UNPUBLISHED_TTL",
    "HEADED_MESSAGE_PREFIX",
    "RECONNECTED",
    "TRANSIENT_REPLIES",
    "UNREACHABLE",
    "ChannelScripts",
    "ChannelSettings",
    "PublishRequest",
    "consume",
    "envelope_of",
    "published",
    "text",
]

DEFAULT_HISTORY_SIZE: Final = 1000
DEFAULT_META_TTL: Final = 30 * 24 * 3600.0
DEFAULT_UNPUBLISHED_TTL: Final = 24 * 3600.0
DEFAULT_IDEMPOTENCY_TTL: Final = 3600.0
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_PING_INTERVAL: Final = 10.0
DEFAULT_RECONNECT_DELAY: Final = (0.1, 3.0)

#: How a PUB/SUB message of an envelope with headers starts: ``h <seq> <epoch> <headers>\n<data>``. An
#: envelope without headers is ``<seq> <epoch> <data>`` (it starts with a digit), a presence change
#: ``p ...``. Versions before headers read a headed message as malformed: they log it, skip it, and
#: repair the channel from history when the gap shows.
HEADED_MESSAGE_PREFIX: Final = "h "

#: The reason given to the listener after the PUB/SUB connection was re-established.
RECONNECTED: Final = "backend_reconnected"

#: Errors that mean "Redis cannot be reached right now" (BusyLoadingError is a ConnectionError).
UNREACHABLE: Final = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)
#: Error replies that mean "not now" rather than "never": memory full, failover (a replica, a master cut off
#: from its replicas under ``min-replicas-to-write``), loading, busy script.
TRANSIENT_REPLIES: Final = (
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "NOREPLICAS",
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOSCRIPT",
)


def error_code(message: str) -> str:
    """Return the code of an error reply (``READONLY``), also from inside a script's error.

    Redis 7 starts a script's error with the code of the command that failed in it; Redis 6 wraps it:
    ``ERR Error running script (call to f_...): @user_script:49: @user_script: 49: -NOREPLICAS ...``.
    """
    if message.startswith("ERR Error running script"):
        _, found, inner = message.rpartition(": -")
        if found:
            message = inner
    return message.partition(" ")[0]


def is_transient(message: str) -> bool:
    """Return whether an error reply means "not now" (one of :data:`TRANSIENT_REPLIES`)."""
    return error_code(message) in TRANSIENT_REPLIES


def text(value: bytes | str) -> str:
    """Return a reply as text."""
    return value.decode() if isinstance(value, bytes) else value


def consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a finished future's exception, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _headed_envelope(channel: str, message: str) -> Envelope | None:
    """Read a PUB/SUB message of an envelope with headers; ``None`` if ``message`` is not one.

    Headers that do not read (see :func:`~rtbroadcast.backends.base.decode_headers`) are dropped, and the
    envelope is delivered without them.
    """
    if not message.startswith(HEADED_MESSAGE_PREFIX):
        return None
    try:
        _, seq, epoch, rest = message.split(" ", 3)
        headers, newline, data = rest.partition("\n")
        if not newline:
            return None
        return Envelope(channel, int(seq), epoch, data, decode_headers(headers))
    except ValueError:
        return None


def _ms(seconds: float | None) -> int:
    return 0 if seconds is None else max(1, math.ceil(seconds * 1000))


# Epochs are not secrets (every client sees them), but they must never repeat: a channel whose data Redis
# lost gets a new epoch, and an old one coming back would make its clients take new events for ones they
# had. So they come from a generator of our own, seeded by the OS (and again in a forked child), never from
# the ``random`` module, which an application may seed.
_epochs = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _epochs.seed(os.urandom(32)))


def _candidate_epoch() -> bytes:
    return b"%016x" % _epochs.getrandbits(64)


def envelope_of(channel: str, message: str) -> Envelope:
    """Parse a channel's PUB/SUB message, ``"<seq> <epoch> <data>"`` (what the publish script sends).

    A message of an envelope with headers, ``"h <seq> <epoch> <headers>\\n<data>"``, is read too, off the
    path of those without (where ``int()`` of its first word fails), so that they cost nothing more.

    Raises:
        ValueError: the message is of neither form.
    """
    try:
        seq, epoch, data = message.split(" ", 2)
        return Envelope(channel, int(seq), epoch, data)
    except ValueError:
        headed = _headed_envelope(channel, message)
        if headed is None:
            raise
        return headed


class ChannelSettings:
    """How much history a channel keeps and how long its keys live, checked, in the scripts' units (ms).

    Raises:
        ConfigurationError: naming the option with the wrong type or an impossible value.
    """

    __slots__ = (
        "history_ms",
        "history_size",
        "idempotency_ms",
        "meta_ms",
        "packed_publish_tail",
        "position_tail",
        "publish_tail",
        "unpublished_ms",
    )

    def __init__(
        self,
        *,
        history_size: int,
        history_ttl: float | None,
        meta_ttl: float | None,
        unpublished_ttl: float,
        idempotency_ttl: float,
    ) -> None:
        self.history_size = count("history_size", history_size, minimum=0)
        self.history_ms = _ms(optional_seconds("history_ttl", history_ttl))
        self.meta_ms = _ms(optional_seconds("meta_ttl", meta_ttl))
        self.unpublished_ms = _ms(seconds("unpublished_ttl", unpublished_ttl))
        self.idempotency_ms = _ms(seconds("idempotency_ttl", idempotency_ttl))
        #: The last ARGV of the publish and position scripts (see _scripts); the publish's also packed.
        self.publish_tail = [
            b"%d" % n for n in (self.history_size, self.history_ms, self.meta_ms, self.idempotency_ms)
        ]
        self.packed_publish_tail = bulks(*self.publish_tail)
        self.position_tail = [b"%d" % self.meta_ms, b"%d" % self.unpublished_ms]


class RunScript(Protocol):
    """How a backend sends a script: within its timeout, translating errors to ``BackendError``.

    ``packed`` is ``keys`` and ``args`` already packed (see :meth:`Script.evalsha`), when the caller has it.
    """

    async def __call__(
        self,
        script: Script,
        keys: list[bytes],
        args: list[bytes],
        action: str,
        *,
        retry: bool = False,
        packed: bytes | None = None,
    ) -> Any: ...


#: The publish script's keys, its arguments, both packed (see :meth:`Script.evalsha`), and the envelope's
#: text up to its seq. A plain tuple: a named one cost as much to build as the packing.
PublishRequest: TypeAlias = tuple[list[bytes], list[bytes], bytes, str]


class ChannelScripts:
    """A channel's publish, position and history: the scripts' arguments in, envelopes and positions out.

    Args:
        run: how the backend sends a script.
        scripts: the backend's scripts by name (``publish``, ``position``, ``history``).
        keys: the backend's key layout.
        settings: the backend's history size and ttls.
    """

    __slots__ = ("_keys", "_run", "_scripts", "_settings")

    def __init__(
        self, run: RunScript, scripts: dict[str, Script], keys: KeyLayout, settings: ChannelSettings
    ) -> None:
        self._run = run
        self._scripts = scripts
        self._keys = keys
        self._settings = settings

    async def publish(
        self, channel: str, payload: str, idempotency_key: str | None, headers: Mapping[str, str] | None
    ) -> Envelope:
        """Run the publish script: assign the next seq, append to the stream, PUBLISH (see ``_scripts``)."""
        keys, args, packed, head = self.publish_request(channel, payload, idempotency_key, headers)
        reply = await self._run(self._scripts["publish"], keys, args, "publish", packed=packed)
        return published(channel, head, reply, headers)

    def publish_request(
        self, channel: str, payload: str, idempotency_key: str | None, headers: Mapping[str, str] | None
    ) -> PublishRequest:
        """Return the publish script's keys and arguments, and the envelope's text up to its seq.

        :meth:`publish` is this, the script run, then :func:`published`; a backend that runs the script
        itself (one coroutine fewer per publish) calls the two.
        """
        layout = self._keys
        names = layout.channel(channel)
        keys = [names.meta, names.stream]
        # What never changes comes packed (the names from the layout's cache, the settings once): packing
        # every argument anew was most of what building a publish cost.
        packed_keys = names.packed_keys
        if idempotency_key is not None:
            keys.append(layout.idempotency(names, idempotency_key))
            packed_keys += bulks(keys[2])
        head = seq_prefix(payload)
        epoch = _candidate_epoch()
        text = layout.encode(head)
        wire = encode_headers(headers).encode() if headers else b""
        settings = self._settings
        args = [epoch, text, names.pubsub, *settings.publish_tail, wire]
        # The fixed parts around the three that change, in one formatting (the cheapest way, measured).
        packed = b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b%b$%d\r\n%b\r\n" % (
            packed_keys,
            len(epoch),
            epoch,
            len(text),
            text,
            names.packed_pubsub,
            settings.packed_publish_tail,
            len(wire),
            wire,
        )
        return keys, args, packed, head

    async def position(self, channel: str) -> StreamPosition:
        """Run the position script: the channel's epoch and seq; creates the epoch of a new channel."""
        names = self._keys.channel(channel)
        epoch, seq = await self._run(
            self._scripts["position"],
            [names.meta, names.stream],
            [_candidate_epoch(), *self._settings.position_tail],
            "read position",
            retry=True,
        )
        return StreamPosition(text(epoch), int(seq))

    async def history(self, channel: str, since: int, limit: int) -> History:
        """Run the history script: the envelopes after ``since`` (at most ``limit``) and the position."""
        names = self._keys.channel(channel)
        settings = self._settings
        numbers = (settings.meta_ms, settings.unpublished_ms, since, limit, settings.history_ms)
        epoch_raw, top, flat = await self._run(
            self._scripts["history"],
            [names.meta, names.stream],
            [_candidate_epoch(), *(b"%d" % n for n in numbers)],
            "read history",
            retry=True,
        )
        return _history_of(channel, since, limit, epoch_raw, top, flat)


def published(channel: str, head: str, reply: Any, headers: Mapping[str, str] | None) -> Envelope:
    """Build the envelope of the publish script's reply (``head``: see ``ChannelScripts.publish_request``).

    A duplicate (an idempotency key seen before) is the first publish's envelope, without ``headers``.
    """
    seq, epoch, duplicate, stored = reply
    if duplicate:
        data = text(stored) if stored is not None else f"{head}{seq}}}"
        return Envelope(channel, int(seq), text(epoch), data)
    return Envelope(channel, int(seq), text(epoch), f"{head}{seq}}}", headers)


def _history_of(channel: str, since: int, limit: int, epoch_raw: Any, top: Any, flat: Any) -> History:
    """Build the :class:`History` of the ``history`` script's reply: epoch, stream top, flat
    id/data/headers triples."""
    epoch = text(epoch_raw)
    seq = int(top)
    envelopes = tuple(
        Envelope(
            channel,
            int(text(flat[i]).partition("-")[0]),
            epoch,
            text(flat[i + 1]),
            decode_headers(flat[i + 2]) if flat[i + 2] else None,
        )
        for i in range(0, len(flat), 3)
    )
    missed = seq - since
    complete = missed <= 0 or (missed <= limit and len(envelopes) == missed)
    return History(StreamPosition(epoch, seq), envelopes, complete)
