"""Which connections listen to which channel, with the counters health endpoints report.

The registry maps each channel to the cursors that follow it (one per subscription, each knowing its
connection), so fan-out goes channel -> cursors -> each cursor's connection queue. Connections are counted
apart from cursors: one connection may follow several channels, through one cursor each.

Connections that carry an identity are also indexed by its ``id`` and by each of its ``tags``, so that a
server-side subscription change (``Broadcaster.subscribe_connections()`` and the like) finds them without a
scan. The broadcaster's own cursors on its reserved channels (``CONTROL_CHANNEL`` (``rtbroadcast._control``))
are fanned out to like any other but are not connections: they are neither counted nor iterated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ._config import optional_count
from .connection import Connection
from .cursor import Cursor
from .errors import ConnectionLimitReached
from .protocol import CloseCode

__all__ = ["ConnectionRegistry", "RegistryStats"]


@dataclass(frozen=True, slots=True)
class RegistryStats:
    """A snapshot of the registry's counters.

    ``messages_sent`` and ``messages_dropped`` count frames over the process's lifetime, including those of
    connections that have since closed; ``queue_high_water`` is the deepest any queue has been.
    """

    connections: int
    channels: dict[str, int] = field(default_factory=dict)
    messages_sent: int = 0
    messages_dropped: int = 0
    queue_high_water: int = 0
    slow_consumers_closed: int = 0

    def as_dict(self) -> dict[str, object]:
        """Return the counters as a JSON-serialisable dict."""
        return {
            "connections": self.connections,
            "channels": dict(self.channels),
            "messages_sent": self.messages_sent,
            "messages_dropped": self.messages_dropped,
            "queue_high_water": self.queue_high_water,
            "slow_consumers_closed": self.slow_consumers_closed,
        }


class ConnectionRegistry:
    """Per-channel sets of cursors, kept with a ready tuple for fan-out, and the connections they belong to.

    Args:
        max_connections: connections allowed in this process (``None``: unlimited).
        max_connections_per_channel: connections allowed on one channel (``None``: unlimited).

    Raises:
        ConfigurationError: a limit is not ``None`` or an integer >= 1.
    """

    def __init__(
        self, *, max_connections: int | None = None, max_connections_per_channel: int | None = None
    ) -> None:
        self.max_connections = optional_count("max_connections", max_connections, minimum=1)
        self.max_connections_per_channel = optional_count(
            "max_connections_per_channel", max_connections_per_channel, minimum=1
        )
        self._channels: dict[str, set[Cursor]] = {}
        # Fan-out iterates a tuple, so that a connection closing mid-loop cannot disturb the iteration.
        self._fanout: dict[str, tuple[Cursor, ...]] = {}
        # Registered connections, in registration order, with how many of their cursors are registered.
        self._connections: dict[Connection, int] = {}
        # Registered connections by Identity.id and by each of Identity.tags (insertion-ordered sets).
        self._by_identity: dict[str, dict[Connection, None]] = {}
        self._by_tag: dict[str, dict[Connection, None]] = {}
        self._identified = 0
        # The broadcaster's own cursors, per reserved channel (see internal()).
        self._internal: dict[str, tuple[Cursor, ...]] = {}
        self._sent_closed = 0
        self._dropped_closed = 0
        self._high_water = 0
        self._slow_closed = 0
        # Connections registered and unregistered over the process's lifetime, by kind (and close code).
        self._opened: Counter[tuple[str, int]] = Counter()
        self._closed: Counter[tuple[str, int, int | None]] = Counter()

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[Connection]:
        yield from list(self._connections)

    def add(self, connection: Connection) -> None:
        """Register ``connection`` under each channel it follows (one cursor each).

        Nothing is registered when a limit would be passed.

        Raises:
            ConnectionLimitReached: a per-process or per-channel limit would be passed.
        """
        cursors = [c for c in connection.cursors if c not in self._channels.get(c.channel, ())]
        limit = self.max_connections
        if limit is not None and connection not in self._connections and len(self._connections) >= limit:
            raise ConnectionLimitReached("per-process", limit)
        limit = self.max_connections_per_channel
        if limit is not None:
            for cursor in cursors:
                if len(self._channels.get(cursor.channel, ())) >= limit:
                    raise ConnectionLimitReached("per-channel", limit)
        registered = self._connections.get(connection)
        if registered is None:
            registered = 0
            self._index(connection)
            self._opened[connection.transport, connection.protocol] += 1
        for cursor in cursors:
            channel = cursor.channel
            members = self._channels.get(channel)
            if members is None:
                members = self._channels[channel] = set()
            members.add(cursor)
            self._fanout[channel] = (*members, *self._internal.get(channel, ()))
            registered += 1
        self._connections[connection] = registered

    def add_cursor(self, cursor: Cursor) -> None:
        """Register one more cursor of an already registered connection (a protocol-2 subscription).

        Raises:
            ConnectionLimitReached: the per-channel limit would be passed (nothing is registered).
            KeyError: the cursor's connection is not registered.
        """
        connection = cursor.connection
        registered = self._connections[connection]
        members = self._channels.get(cursor.channel)
        if members is not None and cursor in members:
            return
        limit = self.max_connections_per_channel
        if limit is not None and members is not None and len(members) >= limit:
            raise ConnectionLimitReached("per-channel", limit)
        if members is None:
            members = self._channels[cursor.channel] = set()
        members.add(cursor)
        self._refan(cursor.channel)
        self._connections[connection] = registered + 1

    def remove_cursor(self, cursor: Cursor) -> bool:
        """Unregister one cursor; return whether its channel is left without any (then release it)."""
        members = self._channels.get(cursor.channel)
        if members is None or cursor not in members:
            return False
        members.remove(cursor)
        connection = cursor.connection
        if connection in self._connections:
            self._connections[connection] -= 1
        if members:
            self._refan(cursor.channel)
            return False
        del self._channels[cursor.channel]
        self._refan(cursor.channel)
        return True

    def remove(self, connection: Connection) -> list[str]:
        """Unregister ``connection``; return the channels it leaves without any connection."""
        if connection not in self._connections:
            return []
        del self._connections[connection]
        self._unindex(connection)
        self._sent_closed += connection.sent
        self._dropped_closed += connection.dropped
        self._high_water = max(self._high_water, connection.high_water)
        if connection.close_code == CloseCode.SLOW_CONSUMER:
            self._slow_closed += 1
        self._closed[connection.transport, connection.protocol, connection.close_code] += 1
        emptied = []
        for cursor in connection.cursors:
            channel = cursor.channel
            members = self._channels.get(channel)
            if members is None or cursor not in members:
                continue
            members.remove(cursor)
            if members:
                self._fanout[channel] = (*members, *self._internal.get(channel, ()))
            else:
                del self._channels[channel]
                self._refan(channel)
                emptied.append(channel)
        return emptied

    def _index(self, connection: Connection) -> None:
        identity = connection.identity
        if identity is None:
            return
        self._identified += 1
        self._by_identity.setdefault(identity.id, {})[connection] = None
        for tag in identity.tags:
            self._by_tag.setdefault(tag, {})[connection] = None

    def _unindex(self, connection: Connection) -> None:
        identity = connection.identity
        if identity is None:
            return
        self._identified -= 1
        _discard(self._by_identity, identity.id, connection)
        for tag in identity.tags:
            _discard(self._by_tag, tag, connection)

    def matching(self, *, identity: str | None = None, tag: str | None = None) -> tuple[Connection, ...]:
        """Return the registered connections whose ``Identity.id`` is ``identity``, or that carry ``tag``.

        In registration order; connections without an identity never match.
        """
        if identity is not None:
            return tuple(self._by_identity.get(identity, ()))
        if tag is not None:
            return tuple(self._by_tag.get(tag, ()))
        return ()

    @property
    def identified(self) -> int:
        """How many registered connections carry an identity."""
        return self._identified

    def add_internal(self, cursor: Cursor) -> None:
        """Fan ``cursor.channel``'s envelopes out to ``cursor`` too, without counting it as a connection.

        For the broadcaster's own subscriptions to its reserved channels, which no client can name.
        """
        channel = cursor.channel
        self._internal[channel] = (*self._internal.get(channel, ()), cursor)
        self._refan(channel)

    def remove_internal(self, cursor: Cursor) -> None:
        """Stop fanning out to a cursor given to :meth:`add_internal` (nothing if it was not)."""
        channel = cursor.channel
        kept = tuple(c for c in self._internal.get(channel, ()) if c is not cursor)
        if kept:
            self._internal[channel] = kept
        else:
            self._internal.pop(channel, None)
        self._refan(channel)

    def _refan(self, channel: str) -> None:
        members = (*self._channels.get(channel, ()), *self._internal.get(channel, ()))
        if members:
            self._fanout[channel] = members
        else:
            self._fanout.pop(channel, None)

    def cursors(self, channel: str) -> tuple[Cursor, ...]:
        """Return the cursors that follow ``channel`` (an empty tuple if none): what fan-out iterates."""
        return self._fanout.get(channel, ())

    def fanout(self, channel: str) -> tuple[Connection, ...]:
        """Return the connections of ``channel`` (an empty tuple if none)."""
        return tuple(cursor.connection for cursor in self._fanout.get(channel, ()))

    def channels(self) -> list[str]:
        """Return the channels that have at least one connection."""
        return list(self._channels)

    def count(self, channel: str | None = None) -> int:
        """Return the number of connections, on ``channel`` or in all."""
        if channel is None:
            return len(self._connections)
        return len(self._channels.get(channel, ()))

    def opened(self) -> Mapping[tuple[str, int], int]:
        """Return how many connections were registered, by ``(transport, protocol)``, since the start."""
        return dict(self._opened)

    def closed(self) -> Mapping[tuple[str, int, int | None], int]:
        """Return how many connections were unregistered, by ``(transport, protocol, close_code)``."""
        return dict(self._closed)

    def stats(self) -> RegistryStats:
        """Return a snapshot of the counters."""
        sent, dropped, high = self._sent_closed, self._dropped_closed, self._high_water
        for connection in self._connections:
            sent += connection.sent
            dropped += connection.dropped
            high = max(high, connection.high_water)
        return RegistryStats(
            connections=len(self._connections),
            channels={channel: len(members) for channel, members in self._channels.items()},
            messages_sent=sent,
            messages_dropped=dropped,
            queue_high_water=high,
            slow_consumers_closed=self._slow_closed,
        )


def _discard(index: dict[str, dict[Connection, None]], key: str, connection: Connection) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(connection, None)
        if not members:
            del index[key]
