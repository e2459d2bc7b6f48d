"""One subscription's position in one channel's stream, apart from the queue it delivers into.

A :class:`Cursor` is the per-channel half of a subscriber: which stream (``epoch``) it follows, the last
``seq`` it delivered, the live envelopes it holds back while it is being brought up to date from history
(an attach with a resume point, a gap repair), and the check that every envelope it delivers is the next
one. It does no I/O and never awaits: envelopes go in through :meth:`Cursor.push` (live) and
:meth:`Cursor.deliver_history` (read from history), and those that are next in order go out, once each, into
the outbound queue of the :class:`~rtbroadcast.Connection` that owns the cursor.

Keeping the cursor apart from the queue is what lets one connection's single bounded queue (and its one
writer, and its one slow-consumer bound) serve several subscriptions: each channel a connection follows has
its own cursor, and fan-out goes channel -> cursors -> each cursor's connection queue. A protocol-1
connection has exactly one cursor (``connection.cursor``); a protocol-2 connection one per subscription.

What a cursor does with an envelope, when it is not holding envelopes back:

- the next one (same epoch, ``seq == last_seq + 1``): delivered, and ``last_seq`` advances;
- one already delivered (same epoch, ``seq <= last_seq``): dropped, so nothing is ever delivered twice;
- anything else (a seq beyond the next, another epoch): a gap. The cursor starts holding live envelopes
  back (this one first) and calls its gap handler, which brings it up to date from history
  (:meth:`set_position`, :meth:`deliver_history`) or tells the client to resync, then calls
  :meth:`end_buffering` to release what was held back in seq order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends.base import Envelope
    from .connection import Connection

__all__ = ["Cursor", "GapHandler"]

#: Called as ``handler(cursor, envelope)`` when a live envelope does not follow the cursor's last one.
GapHandler = Callable[["Cursor", "Envelope"], None]


class Cursor:
    """Where one subscription stands in one channel's stream; delivers into its connection's queue.

    Args:
        channel: the channel whose stream the cursor follows.
        connection: the connection whose outbound queue receives what the cursor delivers.

    A new cursor holds live envelopes back until its position is set and :meth:`end_buffering` is called
    (what :meth:`Broadcaster.attach <rtbroadcast.Broadcaster.attach>` does). Synchronous and not
    thread-safe: it runs on the connection's event loop.
    """

    __slots__ = (
        "_buffer",
        "_on_gap",
        "channel",
        "connection",
        "epoch",
        "info",
        "last_seq",
        "observed",
        "presence",
    )

    def __init__(self, channel: str, connection: Connection) -> None:
        self.channel = channel
        self.connection = connection
        #: The stream (epoch) the cursor follows; ``""`` until its position is set.
        self.epoch = ""
        #: The seq of the last envelope delivered (or the position set by a resume or a resync).
        self.last_seq = 0
        # While the cursor is being brought up to date (attach, resume, gap repair), live envelopes wait
        # here and are merged by seq afterwards; None when they are delivered as they come.
        self._buffer: list[Envelope] | None = []
        self._on_gap: GapHandler | None = None
        #: This subscription's presence info (``authorize``'s ``Allow.info``, else the identity's, else {}).
        self.info: Mapping[str, Any] = _EMPTY
        #: Whether the subscriber asked for presence frames on this channel (protocol 2 ``presence: true``).
        self.presence = False
        #: Whether the broadcaster's subscription observers were told this subscription started (so that
        #: they are told it ended exactly once).
        self.observed = False

    def __repr__(self) -> str:
        return f"<Cursor {self.channel!r} {self.epoch or '-'}/{self.last_seq} of #{self.connection.id}>"

    @property
    def buffering(self) -> bool:
        """Whether live envelopes are held back while the cursor is being brought up to date."""
        return self._buffer is not None

    def push(self, envelope: Envelope) -> None:
        """Deliver a live ``envelope`` if it is the next one in this cursor's stream.

        A duplicate (already delivered) is ignored; a gap or an epoch change is handed to the gap handler,
        with live envelopes held back from here on (this one first).
        """
        if self._buffer is not None:
            self._buffer.append(envelope)
            return
        seq = envelope.seq
        if seq != self.last_seq + 1 or envelope.epoch != self.epoch:
            if envelope.epoch == self.epoch and seq <= self.last_seq:
                return
            if self._on_gap is not None and not self.connection.closed:
                self._buffer = [envelope]
                self._on_gap(self, envelope)
            return
        self.last_seq = seq
        # Not a bound method kept in a slot: CPython specialises a method call on the connection, not a
        # call of a callable read from a slot (about 50 more instructions per delivery).
        self.connection._enqueue(envelope, len(envelope.data))

    def begin_buffering(self) -> None:
        """Hold live envelopes back until :meth:`end_buffering`."""
        if self._buffer is None:
            self._buffer = []

    def end_buffering(self) -> None:
        """Release held-back envelopes in seq order, skipping those already delivered.

        A gap among them starts holding back again (and calls the gap handler); the rest wait with it.
        """
        buffered = self._buffer
        self._buffer = None
        if buffered:
            buffered.sort(key=_seq_of)
            for envelope in buffered:
                if self._buffer is not None:  # a new gap started buffering again
                    self._buffer.append(envelope)
                else:
                    self.push(envelope)

    def stop(self) -> None:
        """Drop what is held back and hold nothing more (the connection closed)."""
        self._buffer = None

    def set_position(self, epoch: str, seq: int) -> None:
        """Set the stream position the cursor has reached (from a resume point, or after a resync)."""
        self.epoch = epoch
        self.last_seq = seq

    def deliver_history(self, envelope: Envelope) -> None:
        """Deliver an envelope read from history if it is the next one (live ones are held back meanwhile)."""
        if envelope.epoch == self.epoch and envelope.seq == self.last_seq + 1:
            self.last_seq = envelope.seq
            self.connection._enqueue(envelope, len(envelope.data))

    def set_gap_handler(self, handler: GapHandler | None) -> None:
        """Call ``handler(cursor, envelope)`` when a live envelope does not follow the last one."""
        self._on_gap = handler


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _seq_of(envelope: Envelope) -> int:
    return envelope.seq
