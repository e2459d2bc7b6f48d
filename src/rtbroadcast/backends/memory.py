"""The in-process backend: one process, no dependencies, history in a ring buffer per channel."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .._config import count, optional_seconds, parse_query
from ..errors import ConfigurationError, StateError
from ..protocol import with_seq
from .base import Backend, BackendListener, Envelope, History, StreamPosition

__all__ = ["MemoryBackend"]

_DEFAULT_HISTORY_SIZE = 1000
_DEFAULT_IDEMPOTENCY_KEYS = 1000


def _seconds_or_none(value: str) -> float | None:
    return None if value.strip().lower() in ("", "none") else float(value)


#: Options ``memory://`` reads from its query, each with its conversion from text.
_URL_OPTIONS: dict[str, Any] = {"history_size": int, "history_ttl": _seconds_or_none}


class _Stream:
    __slots__ = ("history", "keys", "seq", "stamps")

    def __init__(self, history_size: int) -> None:
        self.seq = 0
        self.history: deque[Envelope] = deque(maxlen=history_size)
        self.stamps: deque[float] = deque(maxlen=history_size)
        self.keys: OrderedDict[str, Envelope] = OrderedDict()


class MemoryBackend(Backend):
    """Keep every channel's stream in this process.

    All channels share one ``epoch``, chosen at random when the backend is created: history lives and dies
    with the process, so a client that resumes against a restarted process is told to resync rather than
    given a wrong stream. A channel's stream is created by its first publish; asking about a channel that
    was never published to costs nothing, so clients cannot grow memory by naming random channels.

    Args:
        history_size: events kept per channel for resume (0 disables history).
        history_ttl: seconds an event stays in history; ``None`` keeps it until pushed out by size.
        idempotency_keys: idempotency keys remembered per channel.

    Raises:
        ConfigurationError: an option has the wrong type or an impossible value (negative, ``NaN``).
    """

    name = "memory"

    def __init__(
        self,
        *,
        history_size: int = _DEFAULT_HISTORY_SIZE,
        history_ttl: float | None = None,
        idempotency_keys: int = _DEFAULT_IDEMPOTENCY_KEYS,
    ) -> None:
        self._history_size = count("history_size", history_size, minimum=0)
        self._history_ttl = optional_seconds("history_ttl", history_ttl)
        self._idempotency_keys = count("idempotency_keys", idempotency_keys, minimum=1)
        self._epoch = secrets.token_hex(8)
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._listener: BackendListener | None = None

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        """Build from ``memory://`` with optional ``?history_size=N&history_ttl=SECONDS``.

        Raises:
            ConfigurationError: the URL has a host or path, or an option is unknown (the message suggests
                the closest known one), given twice, or invalid.
        """
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise ConfigurationError(
                f"memory:// takes no host, path or fragment, only query options, not {url!r} "
                "(example: memory://?history_size=5000)"
            )
        options = parse_query("memory://", parts.query, _URL_OPTIONS)
        return cls(**options)

    @property
    def epoch(self) -> str:
        """The epoch of every stream of this backend."""
        return self._epoch

    async def connect(self, listener: BackendListener) -> None:
        self._listener = listener

    async def disconnect(self) -> None:
        self._listener = None
        self._subscribed.clear()

    async def publish(self, channel: str, payload: str, *, idempotency_key: str | None = None) -> Envelope:
        listener = self._listener
        if listener is None:
            raise StateError("the memory backend is not connected; call connect() first")
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(self._history_size)
        epoch = self._epoch
        if idempotency_key is not None:
            seen = stream.keys.get(idempotency_key)
            if seen is not None:
                return seen
        stream.seq += 1
        envelope = Envelope(channel, stream.seq, epoch, with_seq(payload, stream.seq))
        if self._history_size:
            stream.history.append(envelope)
            stream.stamps.append(time.monotonic())
        if idempotency_key is not None:
            stream.keys[idempotency_key] = envelope
            if len(stream.keys) > self._idempotency_keys:
                stream.keys.popitem(last=False)
        if channel in self._subscribed:
            listener.on_envelope(envelope)
        return envelope

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def position(self, channel: str) -> StreamPosition:
        stream = self._streams.get(channel)
        return StreamPosition(self._epoch, stream.seq if stream is not None else 0)

    async def history(self, channel: str, since: int, *, limit: int) -> History:
        stream = self._streams.get(channel)
        position = StreamPosition(self._epoch, stream.seq if stream is not None else 0)
        missed = position.seq - since
        if stream is None or missed <= 0:
            return History(position, (), complete=True)
        kept = list(stream.history)
        if self._history_ttl is not None:
            horizon = time.monotonic() - self._history_ttl
            first_fresh = next((i for i, t in enumerate(stream.stamps) if t >= horizon), len(kept))
            kept = kept[first_fresh:]
        envelopes = tuple(e for e in kept if e.seq > since)
        complete = missed <= limit and len(envelopes) == missed
        return History(position, envelopes[:limit], complete)

    def stats(self) -> Mapping[str, object]:
        return {"backend": self.name, "channels": len(self._streams), "subscribed": len(self._subscribed)}
