"""The typed snapshot :meth:`Broadcaster.stats() <rtbroadcast.Broadcaster.stats>` returns."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .backends.base import Envelope
    from .broadcaster import BroadcasterState

__all__ = ["BroadcasterStats", "MetricsObserver", "PublishSpan", "TracingHook"]


@dataclass(frozen=True, slots=True)
class BroadcasterStats:
    """A snapshot of one process's broadcaster: its state, its backend, its connections and counters.

    Counters (``published``, ``messages_sent``, ...) count over the broadcaster's lifetime in this process,
    including connections that have since closed; ``connections`` and ``channels`` are what is open now.
    The snapshot is the caller's: its mappings are copies made for it, typed read-only.
    Read the attributes in code; :meth:`as_dict` gives the JSON-serialisable form for a health endpoint::

        stats = broadcaster.stats()
        if not stats.backend_available:
            ...
        return JSONResponse(stats.as_dict())

    Until 0.2, ``stats["connections"]``, ``stats.get(...)`` and ``dict(stats)`` still work as they did
    when :meth:`~rtbroadcast.Broadcaster.stats` returned a dict, with a :class:`DeprecationWarning` (see
    the compatibility policy's deprecations).
    """

    #: The lifecycle state (``FAILED`` while connected to a backend that gave up).
    state: BroadcasterState
    #: The backend's name (``"memory"``, ``"redis"``).
    backend_name: str
    #: Whether the backend is reachable, as far as this process knows.
    backend_available: bool
    #: Events this process published (each publish once, even when retried with an idempotency key).
    published: int = 0
    #: Times the backend reported that envelopes may have been lost (a reconnect, a listener restart).
    interruptions: int = 0
    #: Connections brought up to date from history after a gap, an interruption or a lost last message.
    repairs: int = 0
    #: Connections found behind their channel's top twice running by the periodic position check.
    lost_detected: int = 0
    #: ``resync_required`` frames sent (a resume or repair that history could not serve).
    resyncs: int = 0
    #: Client resumes served from history (``resumed: true``): the client missed nothing.
    resumes: int = 0
    #: ``resyncs`` by :class:`~rtbroadcast.ResyncReason`.
    resyncs_by_reason: Mapping[str, int] = field(default_factory=dict)
    #: ``interruptions`` by the backend's reason (Redis: ``"reconnected"``, ``"backend_failed"``).
    interruptions_by_reason: Mapping[str, int] = field(default_factory=dict)
    #: Server-side subscription commands (``subscribe_connections`` and the like) this process applied.
    control_applied: int = 0
    #: Times commands may have been lost (their history was gone when this process looked for them).
    control_lost: int = 0
    #: Presence members this process holds (one per subscription of a channel with presence).
    presence_members: int = 0
    #: Subscriptions here that asked for presence join/leave frames.
    presence_watchers: int = 0
    #: Connections open in this process.
    connections: int = 0
    #: Open connections per channel (only channels that have one).
    channels: Mapping[str, int] = field(default_factory=dict)
    #: Frames written to clients.
    messages_sent: int = 0
    #: Frames dropped with the queue of a connection closed as a slow consumer.
    messages_dropped: int = 0
    #: The deepest any connection's outbound queue has been, in frames.
    queue_high_water: int = 0
    #: Connections closed because they fell behind their queue bound (close code 4001).
    slow_consumers_closed: int = 0
    #: Backend-specific figures (JSON-serialisable): see each backend's ``stats()``.
    backend: Mapping[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """Return the snapshot as a JSON-serialisable dict: the dict ``stats()`` returned before 0.1.

        It adds ``backend_name``. ``state`` is the state's value (``"connected"``), ``backend`` the
        backend's own figures (with its name under ``"backend"``).
        """
        return {
            "state": self.state.value,
            "backend": dict(self.backend),
            "backend_name": self.backend_name,
            "backend_available": self.backend_available,
            "published": self.published,
            "interruptions": self.interruptions,
            "repairs": self.repairs,
            "lost_detected": self.lost_detected,
            "resyncs": self.resyncs,
            "resumes": self.resumes,
            "resyncs_by_reason": dict(self.resyncs_by_reason),
            "interruptions_by_reason": dict(self.interruptions_by_reason),
            "control_applied": self.control_applied,
            "control_lost": self.control_lost,
            "presence_members": self.presence_members,
            "presence_watchers": self.presence_watchers,
            "connections": self.connections,
            "channels": dict(self.channels),
            "messages_sent": self.messages_sent,
            "messages_dropped": self.messages_dropped,
            "queue_high_water": self.queue_high_water,
            "slow_consumers_closed": self.slow_consumers_closed,
        }

    # -- the dict interface of 0.x, deprecated ----------------------------------------------------------

    def __getitem__(self, key: str) -> object:
        """Deprecated: read the attribute instead (``stats.connections``), or ``stats.as_dict()[key]``.

        Raises:
            KeyError: ``key`` is not one of :meth:`as_dict`'s keys.
        """
        _deprecated(f"stats()[{key!r}]", f"stats().{key}" if key in _FIELDS else "stats().as_dict()")
        return self.as_dict()[key]

    def get(self, key: str, default: object = None) -> object:
        """Deprecated: read the attribute instead, or ``stats.as_dict().get(key)``."""
        _deprecated(f"stats().get({key!r})", f"stats().{key}" if key in _FIELDS else "stats().as_dict()")
        return self.as_dict().get(key, default)

    def keys(self) -> list[str]:
        """Deprecated: ``stats.as_dict().keys()`` (``dict(stats)`` and ``{**stats}`` call this)."""
        _deprecated("dict(stats()) or {**stats()}", "stats().as_dict()")
        return list(self.as_dict())


class MetricsObserver(Protocol):
    """What :meth:`~rtbroadcast.Broadcaster.set_metrics_observer` takes: timings of publishes, fan-outs.

    Called on the event loop, inline: each method must be quick and must not raise or block. Counters that
    the broadcaster keeps anyway (connections, deliveries, drops, resyncs) are not pushed here: read them
    from :meth:`~rtbroadcast.Broadcaster.stats` and the registry when metrics are collected.
    """

    def published(self, channel: str, seconds: float) -> None:
        """Hear that the backend accepted a publish on ``channel`` after ``seconds``."""

    def publish_failed(self, channel: str, seconds: float, error: Exception) -> None:
        """Hear that a publish on ``channel`` failed with ``error`` after ``seconds`` (it is re-raised)."""

    def fanned_out(self, envelope: Envelope, subscribers: int, seconds: float) -> None:
        """Hear that ``envelope`` was handed to this process's ``subscribers`` in ``seconds``.

        Timed from the backend's delivery to the last subscriber: each frame is then written (a
        direct write) or queued for its connection's writer.
        """


class PublishSpan(Protocol):
    """One publish's span, as :meth:`TracingHook.start_publish` started it."""

    def end(self, envelope: Envelope | None, error: BaseException | None) -> None:
        """End the span: the backend returned ``envelope``, or the publish raised ``error``.

        Both are ``None`` when the publish was cancelled. Called exactly once, in the task that
        started the span.
        """


class TracingHook(Protocol):
    """What :meth:`~rtbroadcast.Broadcaster.set_tracing_hook` takes: spans of publishes and deliveries.

    :class:`rtbroadcast.tracing.OpenTelemetryTracing` is the one rtbroadcast ships. Called on the event
    loop, inline: each method must be quick and must not raise or block.
    """

    def start_publish(self, channel: str, headers: dict[str, str]) -> PublishSpan:
        """Start the span of a publish on ``channel``, and write its context into ``headers``.

        ``headers`` travel with the envelope through the backend (:attr:`Envelope.headers
        <rtbroadcast.Envelope.headers>`), so that every delivering process can link to this span.
        """

    def delivered(self, envelope: Envelope, subscribers: int, start_ns: int, end_ns: int) -> None:
        """Hear that ``envelope``, received from the backend, was handed to ``subscribers`` here.

        Called once per envelope per process (not once per connection), for envelopes that carry
        headers only, with the fan-out's wall-clock start and end (:func:`time.time_ns`).
        """


_FIELDS = frozenset(BroadcasterStats.__dataclass_fields__) - {"state", "backend"}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated: Broadcaster.stats() returns a BroadcasterStats; use {new} "
        "(the dict interface goes in 0.2)",
        DeprecationWarning,
        stacklevel=3,
    )
