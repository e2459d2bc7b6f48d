"""One subscriber's bounded outbound queue, shared by the cursors of the channels it follows.

A :class:`Connection` is what the broadcaster fans out to: a WebSocket, an SSE response or an in-process
subscription. Fan-out only appends to its queue (no await, no encoding); the connection's own writer
drains the queue at whatever pace its transport allows. A connection that falls behind past its bound is
closed, so one slow reader never holds up the others.

Where the connection stands in a channel's stream (epoch, last seq, the envelopes held back during a resume,
gap detection) is its ``Cursor`` (``rtbroadcast.cursor``) for that channel: one queue, one cursor per
subscription. A protocol-1 connection follows exactly one channel, :attr:`Connection.cursor`; its
``channel``, ``epoch``, ``last_seq`` and the position methods are shorthands for that cursor's. A
protocol-2 connection (``Connection(protocol=2)``) starts with no cursor and gains and loses them at runtime
(:meth:`Connection.add_cursor`, :meth:`Connection.remove_cursor`, which the broadcaster's
``add_subscription`` / ``remove_subscription`` call).

The queue holds envelopes, not text: the writer picks each envelope's text for its protocol
(:func:`item_text` for protocol 1, :func:`item_text_v2` for protocol 2), and both are built once per
envelope for every connection alike.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ._config import count
from .cursor import Cursor
from .errors import ConfigurationError, StateError, SubscriptionRefused
from .protocol import PROTOCOL_VERSIONS, CloseCode, SubscriptionErrorCode

if TYPE_CHECKING:
    from .backends.base import Envelope
    from .identity import Identity

__all__ = ["DEFAULT_LIMITS", "Connection", "QueueLimits", "item_text", "item_text_v2"]

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """Bounds of one connection's outbound queue; past either, the connection is closed.

    Args:
        max_messages: frames waiting to be written.
        max_size: characters of JSON text waiting to be written (about bytes for ASCII payloads).

    Raises:
        ConfigurationError: a limit is not an integer >= 1.
    """

    max_messages: int = 4096
    max_size: int = 1024 * 1024

    def __post_init__(self) -> None:
        count("QueueLimits.max_messages", self.max_messages, minimum=1)
        count("QueueLimits.max_size", self.max_size, minimum=1)


DEFAULT_LIMITS: Final = QueueLimits()


class Connection:
    """A subscriber: its bounded outbound queue, its close state, its counters, and its cursor per channel.

    The broadcaster pushes (through the connection's cursors); the owner of the connection (a transport
    writer or an in-process iterator) awaits :meth:`get`. Both run on one event loop; nothing here is
    thread-safe.

    Args:
        channel: the channel a protocol-1 connection follows (its :attr:`cursor`); ``None`` for a
            protocol-2 connection, which subscribes to channels later.
        limits: the bounds of its outbound queue.
        protocol: the wire protocol its frames are written in (1 or 2).
        identity: who the connection is (from the endpoint's ``authenticate`` hook), if known.
        max_subscriptions: most cursors a protocol-2 connection may have (``None``: unlimited).

    Raises:
        ConfigurationError: ``protocol`` is not 1 or 2, a protocol-1 connection has no channel, or a
            protocol-2 connection has one.
    """

    __slots__ = (
        "_closed",
        "_cursors",
        "_limits",
        "_on_close",
        "_primary",
        "_queue",
        "_send_now",
        "_size",
        "_waiter",
        "client_id",
        "close_code",
        "close_reason",
        "direct",
        "dropped",
        "high_water",
        "id",
        "identity",
        "max_subscriptions",
        "protocol",
        "sent",
        "transport",
    )

    def __init__(
        self,
        channel: str | None = None,
        *,
        limits: QueueLimits = DEFAULT_LIMITS,
        protocol: int = 1,
        identity: Identity | None = None,
        max_subscriptions: int | None = None,
    ) -> None:
        if protocol not in PROTOCOL_VERSIONS:
            raise ConfigurationError(f"protocol must be one of {PROTOCOL_VERSIONS}, not {protocol!r}")
        if protocol == 1 and channel is None:
            raise ConfigurationError("a protocol-1 connection follows one channel: pass Connection(channel)")
        if protocol != 1 and channel is not None:
            raise ConfigurationError(
                "a protocol-2 connection starts without a channel: Connection(protocol=2), then subscribe it"
            )
        self.id = next(_ids)
        #: The wire protocol the connection's frames are written in.
        self.protocol = protocol
        #: Who the connection is, from the endpoint's ``authenticate`` hook (``None``: anonymous).
        self.identity = identity
        #: The connection's opaque id on the wire (protocol 2's welcome; the ``client`` of its presence
        #: members): random, so unique across processes.
        self.client_id = secrets.token_hex(8)
        #: Most cursors this connection may have (:meth:`add_cursor`); ``None``: unlimited.
        self.max_subscriptions = max_subscriptions
        self.sent = 0
        self.dropped = 0
        self.high_water = 0
        self.close_code: int | None = None
        self.close_reason = ""
        #: Whether the transport writes frames straight to the server's socket (see BroadcastEndpoint).
        self.direct = False
        #: What carries it, for stats and metrics: ``"websocket"``, ``"sse"`` or ``"in_process"``.
        self.transport = "in_process"
        self._limits = limits
        self._queue: deque[Envelope | str] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._on_close: list[Callable[[Connection], None]] = []
        self._send_now: Callable[[Envelope | str], bool] | None = None
        self._primary: Cursor | None = None
        self._cursors: dict[str, Cursor] = {}
        if channel is not None:
            self._primary = Cursor(channel, self)
            self._cursors[channel] = self._primary

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        if self._primary is None:
            return f"<Connection #{self.id} protocol 2, {len(self._cursors)} channel(s) {state}>"
        return f"<Connection #{self.id} {self.channel!r} seq={self.last_seq} {state}>"

    @property
    def cursor(self) -> Cursor:
        """The position of a protocol-1 connection in its channel's stream.

        Raises:
            StateError: the connection was made without a channel (protocol 2): use :meth:`cursor_for`.
        """
        primary = self._primary
        if primary is None:
            raise StateError(
                f"connection #{self.id} follows several channels; use cursor_for(channel) or cursors"
            )
        return primary

    @property
    def cursors(self) -> tuple[Cursor, ...]:
        """The connection's cursors, one per channel it follows."""
        return tuple(self._cursors.values())

    def cursor_for(self, channel: str) -> Cursor | None:
        """Return the connection's cursor on ``channel``, or ``None`` if it does not follow it."""
        return self._cursors.get(channel)

    def add_cursor(self, channel: str) -> Cursor:
        """Give the connection a new cursor on ``channel`` (holding live envelopes back until positioned).

        The broadcaster's ``add_subscription`` calls it and then registers the cursor.

        Raises:
            StateError: the connection is closed, or is a protocol-1 connection.
            SubscriptionRefused: it already follows ``channel`` (``already_subscribed``), or has
                ``max_subscriptions`` cursors already (``too_many_subscriptions``).
        """
        if self._closed:
            raise StateError(f"connection #{self.id} is closed")
        if self._primary is not None:
            raise StateError(f"connection #{self.id} is a protocol-1 connection: its one channel is fixed")
        if channel in self._cursors:
            raise SubscriptionRefused(
                SubscriptionErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}"
            )
        limit = self.max_subscriptions
        if limit is not None and len(self._cursors) >= limit:
            raise SubscriptionRefused(
                SubscriptionErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {limit} subscriptions per connection"
            )
        cursor = self._cursors[channel] = Cursor(channel, self)
        return cursor

    def remove_cursor(self, channel: str) -> Cursor | None:
        """Drop the connection's cursor on ``channel`` (stopped); return it, or ``None`` if there was none.

        The primary cursor of a protocol-1 connection is never removed (``None``).
        """
        cursor = self._cursors.get(channel)
        if cursor is None or cursor is self._primary:
            return None
        del self._cursors[channel]
        cursor.stop()
        return cursor

    @property
    def channel(self) -> str:
        """The channel a protocol-1 connection follows (its :attr:`cursor`'s); ``""`` on protocol 2."""
        primary = self._primary
        return "" if primary is None else primary.channel

    @property
    def epoch(self) -> str:
        """The stream (epoch) the connection follows; ``""`` until attached."""
        return self.cursor.epoch

    @property
    def last_seq(self) -> int:
        """The seq of the last event queued (or the position set by a resume or a resync)."""
        return self.cursor.last_seq

    @property
    def closed(self) -> bool:
        """Whether the connection was closed; nothing more is queued or delivered."""
        return self._closed

    @property
    def queued(self) -> int:
        """Frames waiting to be written."""
        return len(self._queue)

    def has_room(self, messages: int, size: int) -> bool:
        """Whether ``messages`` more frames, ``size`` characters in all, fit within the queue's bounds now."""
        limits = self._limits
        return len(self._queue) + messages <= limits.max_messages and self._size + size <= limits.max_size

    @property
    def buffering(self) -> bool:
        """Whether live events are held back while the connection is being brought up to date."""
        return self.cursor.buffering

    # -- broadcaster side -----------------------------------------------------------------------

    def push(self, envelope: Envelope) -> None:
        """Queue ``envelope`` if it is the next one in this connection's stream (see ``Cursor.push``).

        A duplicate (already delivered) is ignored; a gap or an epoch change is handed to the gap handler,
        which brings the connection up to date from history or tells the client to resync.
        """
        self.cursor.push(envelope)

    def push_frame(self, text: str) -> None:
        """Queue a protocol frame (welcome, pong, error, resync_required) ahead of nothing, in order."""
        self._enqueue(text, len(text))

    def _enqueue(self, item: Envelope | str, size: int) -> None:
        queue = self._queue
        # Nothing is queued: the transport may take the frame right here, with no task switch (what
        # websockets' broadcast() does). It declines while an earlier frame is still in flight. A closed
        # connection has no send_now, so this comes before the check for closed, off the common path.
        if not queue:
            send_now = self._send_now
            if send_now is not None and send_now(item):
                return
        if self._closed:
            return
        queue.append(item)
        self._size += size
        depth = len(queue)
        if depth > self.high_water:
            self.high_water = depth
        limits = self._limits
        if depth > limits.max_messages or self._size > limits.max_size:
            self.dropped += depth
            self.close(CloseCode.SLOW_CONSUMER, "fell behind its outbound queue bound")
            return
        if self._waiter is not None:  # checked here: a call per delivery costs more than the test
            self.wake()

    def begin_buffering(self) -> None:
        """Hold live envelopes back until :meth:`end_buffering`."""
        self.cursor.begin_buffering()

    def end_buffering(self) -> None:
        """Release held-back envelopes in seq order, skipping those already delivered."""
        self.cursor.end_buffering()

    def set_position(self, epoch: str, seq: int) -> None:
        """Set the stream position the connection has reached."""
        self.cursor.set_position(epoch, seq)

    def deliver_history(self, envelope: Envelope) -> None:
        """Queue an envelope read from history (the connection is buffering live ones meanwhile)."""
        self.cursor.deliver_history(envelope)

    def set_send_now(self, send_now: Callable[[Envelope | str], bool] | None) -> None:
        """Let the transport write a frame synchronously when nothing is queued.

        ``send_now(item)`` returns true when it took the frame (written, or handed to a writer to
        finish); false leaves the frame to be queued, e.g. while an earlier frame is still in flight.
        Whoever writes the frames in flight then drains the queue (:meth:`get_nowait`). It must not await.
        Ignored once the connection is closed: nothing more is written.
        """
        if not self._closed:
            self._send_now = send_now

    def set_gap_handler(self, handler: Callable[[Connection, Envelope], None] | None) -> None:
        """Call ``handler(connection, envelope)`` when a live envelope does not follow the last one.

        A shorthand for ``cursor.set_gap_handler``, with the connection passed.
        """
        if handler is None:
            self.cursor.set_gap_handler(None)
        else:
            self.cursor.set_gap_handler(lambda _cursor, envelope: handler(self, envelope))

    def add_close_callback(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback(connection)`` once, when the connection closes (right away if it has)."""
        if self._closed:
            callback(self)
        else:
            self._on_close.append(callback)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection: drop what is queued, wake the writer, run the close callbacks.

        Closing twice keeps the first code and reason.
        """
        if self._closed:
            return
        self._closed = True
        self.close_code = int(code)
        self.close_reason = reason
        self._queue.clear()
        self._size = 0
        for cursor in self._cursors.values():
            cursor.stop()
        self._send_now = None
        self.wake()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback(self)

    # -- writer side ----------------------------------------------------------------------------

    async def get(self) -> Envelope | str | None:
        """Wait for the next frame to write; ``None`` once the connection is closed."""
        while not self._queue:
            if self._closed:
                return None
            await self.wait()
        return self.get_nowait()

    async def wait(self) -> None:
        """Wait until a frame is queued, the connection closes, or :meth:`wake` is called."""
        if self._queue or self._closed:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def wake(self) -> None:
        """Wake the writer waiting in :meth:`wait`, if any."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> Envelope | str | None:
        """Return the next frame if one is queued, else ``None``."""
        if not self._queue:
            return None
        item = self._queue.popleft()
        self._size -= len(item) if isinstance(item, str) else len(item.data)
        return item


def item_text(item: Envelope | str) -> str:
    """Return the protocol-1 wire text of a queued item."""
    return item if isinstance(item, str) else item.data


def item_text_v2(item: Envelope | str) -> str:
    """Return the protocol-2 wire text of a queued item (an envelope's is wrapped once, then cached)."""
    return item if isinstance(item, str) else item.protocol2_text()
