"""The contract every backend fulfils.

A backend owns the channels' streams: it assigns each published event its ``seq`` (atomically, so that no
two publishes on a channel share one), keeps recent history for resume, and delivers every published
envelope to the listener of each process that subscribed to the channel.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from ..errors import ConfigurationError
from ..protocol import event_frame

if TYPE_CHECKING:
    from ..presence import PresenceChange, PresenceMember, PresenceSnapshot

__all__ = [
    "PUBLISHED_AT",
    "Backend",
    "BackendListener",
    "Envelope",
    "History",
    "StreamPosition",
    "decode_headers",
    "encode_headers",
]

#: The header that carries a publish's wall-clock time (seconds since the Unix epoch, as text), when the
#: publishing broadcaster stamps its publishes (``Broadcaster(stamp_publish_time=True)``).
PUBLISHED_AT: Final = "rtb-published-at"

logger = logging.getLogger("rtbroadcast.backends")


def encode_headers(headers: Mapping[str, str]) -> str:
    """Return ``headers`` as the text a backend stores: a compact JSON object, ASCII only.

    The text never holds a line break (JSON escapes them inside strings), so that a wire format may end
    it with one.
    """
    return json.dumps(dict(headers), ensure_ascii=True, separators=(",", ":"))


def decode_headers(text: str | bytes) -> Mapping[str, str] | None:
    """Read what :func:`encode_headers` wrote; ``None`` for anything else (logged, never raised).

    Headers only ever help the servers (a trace, a latency figure): a process that cannot read them
    still delivers the envelope, without them.
    """
    try:
        headers = json.loads(text)
    except ValueError:
        headers = None
    if isinstance(headers, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        return headers
    logger.warning("ignoring an envelope's malformed headers: %.80r", text)
    return None


@dataclass(frozen=True, slots=True)
class Envelope:
    """One published event as it travels: its channel, its place in the stream, and its wire text.

    ``data`` is the JSON text clients receive, ``seq`` included. It is encoded once per publish and the same
    ``str`` is handed to every connection; :meth:`protocol2_text` is its protocol-2 frame, built once too.

    ``headers`` is what the publisher sent along for the servers, never for clients: a W3C trace context
    (``traceparent``, ``tracestate``: see :mod:`rtbroadcast.tracing`) and the publish time
    (:data:`PUBLISHED_AT`). ``None`` when there was nothing to send, which is the case unless tracing or
    ``stamp_publish_time`` is on in the publishing process. Every built-in backend carries headers to
    every delivering process and keeps them in history; they take no part in equality.
    """

    channel: str
    seq: int
    epoch: str
    data: str
    headers: Mapping[str, str] | None = field(default=None, compare=False)
    # The protocol-2 frame, built by the first protocol-2 connection that writes it and kept for the rest.
    _text2: str | None = field(default=None, init=False, repr=False, compare=False)

    def protocol2_text(self) -> str:
        """Return the protocol-2 wire text: ``{"type":"event","channel":...,"event":<data>}``, built once."""
        text = self._text2
        if text is None:
            text = event_frame(self.channel, self.data)
            object.__setattr__(self, "_text2", text)  # a cache, invisible to equality and hashing
        return text

    @property
    def published_at(self) -> float | None:
        """The publish's wall-clock time (:func:`time.time`, in the publishing process), if it was stamped.

        ``None`` without the :data:`PUBLISHED_AT` header, or when its value is not a finite number.
        """
        headers = self.headers
        if headers is None:
            return None
        text = headers.get(PUBLISHED_AT)
        if text is None:
            return None
        try:
            stamp = float(text)
        except ValueError:
            return None
        return stamp if math.isfinite(stamp) else None


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """The top of a channel's stream: its ``epoch`` and the ``seq`` of the last event published (0: none)."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class History:
    """Events after a given seq, read from a channel's history.

    ``complete`` is true when ``envelopes`` holds every event from ``since + 1`` up to ``position.seq``;
    false when history no longer reaches back that far (then a client must resync).
    """

    position: StreamPosition
    envelopes: tuple[Envelope, ...]
    complete: bool


class BackendListener(Protocol):
    """What a backend calls back into; the :class:`~rtbroadcast.Broadcaster` implements it.

    Both methods are called on the event loop and must not block.
    """

    def on_envelope(self, envelope: Envelope) -> None:
        """Take one envelope published on a channel this process subscribed to."""

    def on_interruption(self, channels: Collection[str], reason: str) -> None:
        """Hear that envelopes on ``channels`` may have been missed (say, after a reconnect)."""

    def on_presence(self, change: PresenceChange) -> None:
        """Hear that a member joined or left a channel this process subscribed to.

        Only backends that :attr:`~Backend.supports_presence` call it, and only for channels subscribed
        in this process (joins and leaves made by this process included), in each channel's version order.
        """


class Backend(ABC):
    """Abstract base class of backends.

    The broadcaster calls :meth:`connect` once before anything else and :meth:`disconnect` once at the end.
    It reference-counts local subscribers itself: :meth:`subscribe` is called for the first local subscriber
    of a channel and :meth:`unsubscribe` after the last one left.

    Presence is a capability: a backend that keeps it sets :attr:`supports_presence` and overrides the
    ``presence_*`` methods; one that does not stays a complete backend, and a broadcaster configured with
    presence refuses it with :class:`~rtbroadcast.ConfigurationError`.

    **Reserved channels.** The broadcaster also uses channels of its own, whose names hold a control
    character (``"\\x1frtbroadcast:control"``, never NUL) so that no client can name them: server-side
    subscription commands (``Broadcaster.subscribe_connections()`` and the like) are published on one and
    followed by every process that holds connections with an identity. A backend carries them exactly
    like any other channel (publish, deliver, history, position): that is what makes those commands reach
    every process sharing it, in one order, and repaired from history when a message is lost. A backend
    must therefore not validate channel names itself, and must map every name (any string without NUL)
    to its own keys. Nothing else is asked of it: there is no method to implement, and a backend that
    shares nothing between processes (memory) reaches exactly the processes there are, that is one.
    """

    #: The URL scheme(s) this backend serves, for messages and stats.
    name: str = "backend"

    #: Whether this backend keeps presence (the ``presence_*`` methods and
    #: :meth:`BackendListener.on_presence`).
    supports_presence: bool = False

    #: Whether :meth:`publish` and :meth:`publish_in_transaction` take ``headers=`` and deliver them with
    #: the envelope (:attr:`Envelope.headers`). A backend without it is still complete: the broadcaster
    #: then never passes headers (traces stop at the publishing process).
    supports_headers: bool = False

    @abstractmethod
    async def connect(self, listener: BackendListener) -> None:
        """Open connections and start delivering envelopes to ``listener``.

        Raises:
            BackendUnavailable: the backend cannot be reached.
        """

    @abstractmethod
    async def disconnect(self) -> None:
        """Stop delivering, cancel background tasks and close connections. Never raises."""

    @abstractmethod
    async def publish(
        self,
        channel: str,
        payload: str,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Append ``payload`` (a JSON object's text, without ``seq``) to ``channel``'s stream.

        Assigns the next ``seq`` atomically, stores the envelope in history and delivers it to every
        subscribed process. With an ``idempotency_key`` seen recently on this channel, nothing is published
        again and the envelope of the first publish is returned (its headers may be left out).

        ``headers`` (only passed to backends that :attr:`supports_headers`; never empty) travel with the
        envelope to every subscribed process and into history, as :attr:`Envelope.headers`. Without them,
        a backend writes exactly what it wrote before headers existed, so that processes of an older
        version keep reading its messages.

        Returns:
            The envelope as delivered, with its ``seq`` and ``epoch``.

        Raises:
            BackendUnavailable: the backend could not be reached, or did not answer, within the configured
                timeout. The event was almost certainly not published, but a request that reached the
                server just before the timeout may still have been applied: retry with the same
                ``idempotency_key`` to publish exactly once.
        """

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start delivering ``channel``'s envelopes to the listener; returns once delivery is active.

        Raises:
            BackendUnavailable: the backend cannot be reached.
        """

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering ``channel``'s envelopes. Never raises."""

    @abstractmethod
    async def position(self, channel: str) -> StreamPosition:
        """Return the top of ``channel``'s stream. A channel never published to has seq 0.

        Raises:
            BackendUnavailable: the backend cannot be reached.
        """

    @abstractmethod
    async def history(self, channel: str, since: int, *, limit: int) -> History:
        """Return the envelopes of ``channel`` with seq greater than ``since``, oldest first.

        At most ``limit`` envelopes are returned; when more were missed, the result is not ``complete``.

        Raises:
            BackendUnavailable: the backend cannot be reached.
        """

    async def publish_in_transaction(
        self,
        transaction: object,
        channel: str,
        payload: str,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Publish like :meth:`publish`, inside the caller's open database ``transaction``.

        The event must exist if and only if the transaction commits, and the channel's seq order must be
        the commit order. Backends that keep their streams outside the caller's database cannot promise
        that and keep this default, which refuses.

        Raises:
            ConfigurationError: this backend cannot publish inside a transaction (the default), or
                ``transaction`` is not one it can use.
        """
        raise ConfigurationError(
            f"the {self.name} backend cannot publish inside a database transaction: transaction= needs "
            "the postgresql:// backend on the same database. Publish after the commit instead (a "
            "transactional outbox keeps commit order), or switch the broadcaster to PostgreSQL"
        )

    def stats(self) -> Mapping[str, object]:
        """Return backend-specific figures for health endpoints (JSON-serialisable)."""
        return {"backend": self.name}

    @property
    def available(self) -> bool:
        """Whether the backend is reachable, as far as this process knows."""
        return True

    @property
    def failed(self) -> bool:
        """Whether the backend gave up for good (say, a listener out of reconnect attempts).

        A failed backend does not recover by itself; the broadcaster reports
        :attr:`~rtbroadcast.BroadcasterState.FAILED` until it is disconnected.
        """
        return False

    # -- presence (optional: see supports_presence) ---------------------------------------------------

    async def presence_join(
        self, channel: str, member: PresenceMember, *, limit: int, notify: bool = True
    ) -> PresenceSnapshot:
        """Add ``member`` to ``channel``'s presence and return the snapshot that includes it, atomically.

        A member is keyed by ``member.client`` (one per subscription): joining again replaces it. With
        ``notify``, every process subscribed to ``channel`` hears a ``join`` through
        :meth:`BackendListener.on_presence` (this one too, with a version the snapshot already covers).

        Args:
            channel: the channel.
            member: who joins.
            limit: most members the returned snapshot lists (0: only the count).
            notify: whether to tell subscribed processes (false on count-only channels).

        Raises:
            ConfigurationError: this backend does not keep presence.
            BackendUnavailable: the backend cannot be reached; the member did not join.
        """
        raise self._no_presence()

    async def presence_leave(self, channel: str, client: str, *, notify: bool = True) -> None:
        """Remove the member ``client`` from ``channel``'s presence; a member that is not there is ignored.

        Never raises for a backend that keeps presence: a leave that cannot reach the backend is retried
        (or the member expires, see the backend's bound).

        Raises:
            ConfigurationError: this backend does not keep presence.
        """
        raise self._no_presence()

    async def presence_snapshot(self, channel: str, *, limit: int) -> PresenceSnapshot:
        """Return ``channel``'s presence: the full count and the first ``limit`` members in join order.

        Raises:
            ConfigurationError: this backend does not keep presence.
            BackendUnavailable: the backend cannot be reached.
        """
        raise self._no_presence()

    async def presence_count(self, channel: str) -> int:
        """Return how many members ``channel`` has, across every process.

        Raises:
            ConfigurationError: this backend does not keep presence.
            BackendUnavailable: the backend cannot be reached.
        """
        raise self._no_presence()

    def _no_presence(self) -> ConfigurationError:
        return ConfigurationError(
            f"the {self.name} backend does not keep presence; use the memory or Redis backend for "
            "channels with presence"
        )
