"""The in-process backend: one process, no dependencies, history in a ring buffer per channel."""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from .._config import count, optional_seconds, parse_query
from ..errors import ConfigurationError, StateError
from ..presence import PresenceChange, PresenceMember, PresenceSnapshot
from ..protocol import with_seq
from .base import Backend, BackendListener, Envelope, History, StreamPosition

__all__ = ["DEFAULT_IDLE_TTL", "MemoryBackend"]

_DEFAULT_HISTORY_SIZE = 1000
_DEFAULT_IDEMPOTENCY_KEYS = 1000
#: Seconds a channel nobody in this process subscribes to is kept after its last publish or read.
DEFAULT_IDLE_TTL: Final = 3600.0


def _seconds_or_none(value: str) -> float | None:
    return None if value.strip().lower() in ("", "none") else float(value)


#: Options ``memory://`` reads from its query, each with its conversion from text.
_URL_OPTIONS: dict[str, Any] = {
    "history_size": int,
    "history_ttl": _seconds_or_none,
    "idle_ttl": _seconds_or_none,
}


class _Stream:
    __slots__ = ("epoch", "history", "keys", "seq", "stamps")

    def __init__(self, epoch: str, history_size: int) -> None:
        self.epoch = epoch
        self.seq = 0
        self.history: deque[Envelope] = deque(maxlen=history_size)
        self.stamps: deque[float] = deque(maxlen=history_size)
        self.keys: OrderedDict[str, Envelope] = OrderedDict()


class _Presence:
    """One channel's members in join order, each with its wire form, and the version of the last change."""

    __slots__ = ("members", "version")

    def __init__(self) -> None:
        self.members: dict[str, tuple[PresenceMember, str]] = {}
        self.version = 0


class MemoryBackend(Backend):
    """Keep every channel's stream in this process.

    Each stream has an ``epoch``, chosen at random in this process: history lives and dies with the
    process, so a client that resumes against a restarted process is told to resync rather than given a
    wrong stream. A channel's stream is created by its first publish; asking about a channel that was never
    published to costs nothing, so clients cannot grow memory by naming random channels.

    A stream nobody in this process subscribes to is dropped ``idle_ttl`` seconds after its last publish or
    read, with its history and idempotency keys, so that memory does not grow with every channel ever
    published to. A later publish starts a new stream in a new epoch: a client that resumes from the old
    one gets ``resync_required`` (``epoch_changed``), never a stream that silently restarted at seq 1.

    Args:
        history_size: events kept per channel for resume (0 disables history).
        history_ttl: seconds an event stays in history; ``None`` keeps it until pushed out by size.
        idempotency_keys: idempotency keys remembered per channel.
        idle_ttl: seconds an unsubscribed channel's stream outlives its last publish or read; ``None``
            keeps every stream for the life of the process.

    Raises:
        ConfigurationError: an option has the wrong type or an impossible value (negative, ``NaN``).
    """

    name = "memory"
    supports_presence = True
    supports_headers = True

    def __init__(
        self,
        *,
        history_size: int = _DEFAULT_HISTORY_SIZE,
        history_ttl: float | None = None,
        idempotency_keys: int = _DEFAULT_IDEMPOTENCY_KEYS,
        idle_ttl: float | None = DEFAULT_IDLE_TTL,
    ) -> None:
        self._history_size = count("history_size", history_size, minimum=0)
        self._history_ttl = optional_seconds("history_ttl", history_ttl)
        self._idempotency_keys = count("idempotency_keys", idempotency_keys, minimum=1)
        self._idle_ttl = optional_seconds("idle_ttl", idle_ttl)
        self._epoch = secrets.token_hex(8)
        self._streams: dict[str, _Stream] = {}
        # Channels with a stream and no subscriber here, least recently used first, with that time.
        self._idle: OrderedDict[str, float] = OrderedDict()
        # Subscribed channels, each with the epoch its stream will get if it has none yet: the one this
        # process's clients were told when they connected.
        self._subscribed: dict[str, str] = {}
        self._listener: BackendListener | None = None
        self._evicted = 0
        # Presence per channel, only while it has members. Versions come from one counter, so that a
        # channel that emptied and filled again never reuses one.
        self._presence: dict[str, _Presence] = {}
        self._presence_versions = itertools.count(1)

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        """Build from ``memory://`` with optional ``?history_size=N&history_ttl=SECONDS&idle_ttl=SECONDS``.

        ``idle_ttl=none`` keeps every stream for the life of the process.

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
        """The epoch that a channel without a stream reports, and that the next new stream gets.

        It changes when an idle stream that was published to is dropped, so that no two streams of one
        channel ever share an epoch.
        """
        return self._epoch

    async def connect(self, listener: BackendListener) -> None:
        self._listener = listener

    async def disconnect(self) -> None:
        self._listener = None
        self._presence.clear()
        now = time.monotonic()
        for channel in list(self._subscribed):
            self._release(channel, now)

    async def publish(
        self,
        channel: str,
        payload: str,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        listener = self._listener
        if listener is None:
            raise StateError("the memory backend is not connected; call connect() first")
        now = time.monotonic()
        self._evict_idle(now)
        stream = self._stream(channel, now)
        if idempotency_key is not None:
            seen = stream.keys.get(idempotency_key)
            if seen is not None:
                return seen
        stream.seq += 1
        envelope = Envelope(channel, stream.seq, stream.epoch, with_seq(payload, stream.seq), headers)
        if self._history_size:
            stream.history.append(envelope)
            stream.stamps.append(now)
        if idempotency_key is not None:
            stream.keys[idempotency_key] = envelope
            if len(stream.keys) > self._idempotency_keys:
                stream.keys.popitem(last=False)
        if channel in self._subscribed:
            listener.on_envelope(envelope)
        return envelope

    async def subscribe(self, channel: str) -> None:
        self._subscribed.setdefault(channel, self._epoch)
        self._idle.pop(channel, None)

    async def unsubscribe(self, channel: str) -> None:
        if channel in self._subscribed:
            self._release(channel, time.monotonic())

    async def position(self, channel: str) -> StreamPosition:
        now = time.monotonic()
        self._evict_idle(now)
        stream = self._used(channel, now)
        return StreamPosition(stream.epoch, stream.seq) if stream else self._unpublished(channel)

    async def history(self, channel: str, since: int, *, limit: int) -> History:
        now = time.monotonic()
        self._evict_idle(now)
        stream = self._used(channel, now)
        if stream is None:
            return History(self._unpublished(channel), (), complete=True)
        position = StreamPosition(stream.epoch, stream.seq)
        missed = position.seq - since
        if missed <= 0:
            return History(position, (), complete=True)
        kept = list(stream.history)
        if self._history_ttl is not None:
            horizon = now - self._history_ttl
            first_fresh = next((i for i, t in enumerate(stream.stamps) if t >= horizon), len(kept))
            kept = kept[first_fresh:]
        envelopes = tuple(e for e in kept if e.seq > since)
        complete = missed <= limit and len(envelopes) == missed
        return History(position, envelopes[:limit], complete)

    def stats(self) -> Mapping[str, object]:
        return {
            "backend": self.name,
            "channels": len(self._streams),
            "subscribed": len(self._subscribed),
            "evicted": self._evicted,
            "presence_channels": len(self._presence),
        }

    # -- presence ------------------------------------------------------------------------------------

    async def presence_join(
        self, channel: str, member: PresenceMember, *, limit: int, notify: bool = True
    ) -> PresenceSnapshot:
        if self._listener is None:
            raise StateError("the memory backend is not connected; call connect() first")
        data = member.to_json()
        presence = self._presence.get(channel)
        if presence is None:
            presence = self._presence[channel] = _Presence()
        presence.version = next(self._presence_versions)
        presence.members[member.client] = (member, data)
        snapshot = self._snapshot(presence, limit)
        if notify:
            self._notify(PresenceChange(channel, "join", member, presence.version, data))
        return snapshot

    async def presence_leave(self, channel: str, client: str, *, notify: bool = True) -> None:
        presence = self._presence.get(channel)
        if presence is None:
            return
        left = presence.members.pop(client, None)
        if left is None:
            return
        presence.version = version = next(self._presence_versions)
        if not presence.members:
            del self._presence[channel]
        if notify:
            self._notify(PresenceChange(channel, "leave", left[0], version, left[1]))

    async def presence_snapshot(self, channel: str, *, limit: int) -> PresenceSnapshot:
        presence = self._presence.get(channel)
        return PresenceSnapshot(0) if presence is None else self._snapshot(presence, limit)

    async def presence_count(self, channel: str) -> int:
        presence = self._presence.get(channel)
        return 0 if presence is None else len(presence.members)

    @staticmethod
    def _snapshot(presence: _Presence, limit: int) -> PresenceSnapshot:
        members = tuple(m for m, _ in itertools.islice(presence.members.values(), max(0, limit)))
        count = len(presence.members)
        return PresenceSnapshot(count, members, len(members) < count, presence.version)

    def _notify(self, change: PresenceChange) -> None:
        listener = self._listener
        if listener is not None and change.channel in self._subscribed:
            listener.on_presence(change)

    # -- streams' lifetime ---------------------------------------------------------------------------

    def _stream(self, channel: str, now: float) -> _Stream:
        """Return ``channel``'s stream, created in the current epoch if it has none; mark it used."""
        stream = self._used(channel, now)
        if stream is None:
            epoch = self._unpublished(channel).epoch
            stream = self._streams[channel] = _Stream(epoch, self._history_size)
            if channel not in self._subscribed:
                self._idle[channel] = now
        return stream

    def _unpublished(self, channel: str) -> StreamPosition:
        """Return the position of a channel without a stream, whose epoch its first publish will keep."""
        return StreamPosition(self._subscribed.get(channel, self._epoch), 0)

    def _used(self, channel: str, now: float) -> _Stream | None:
        stream = self._streams.get(channel)
        if stream is not None and channel in self._idle:
            self._idle[channel] = now
            self._idle.move_to_end(channel)
        return stream

    def _release(self, channel: str, now: float) -> None:
        """Forget this process's subscription to ``channel``; its stream starts to age."""
        del self._subscribed[channel]
        if channel in self._streams:
            self._idle[channel] = now
            self._idle.move_to_end(channel)

    def _evict_idle(self, now: float) -> None:
        """Drop every stream unused for ``idle_ttl`` seconds (they are the oldest in ``_idle``)."""
        if self._idle_ttl is None:
            return
        horizon = now - self._idle_ttl
        while self._idle:
            channel, used = next(iter(self._idle.items()))
            if used > horizon:
                return
            del self._idle[channel]
            stream = self._streams.pop(channel)
            self._evicted += 1
            if stream.seq and stream.epoch == self._epoch:
                # The channel's next stream restarts at seq 1: it must not share an epoch with this one,
                # or a client resuming from this one would take the new events for the ones it missed.
                self._epoch = secrets.token_hex(8)
