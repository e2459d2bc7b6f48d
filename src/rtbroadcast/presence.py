"""Presence: who is subscribed to a channel, described by the service, never by the client.

Sans-I/O: the member and snapshot types, the wire form of a member, and the rule that says which channels
have presence (:class:`PresencePolicy`). Backends keep the members (see
:meth:`~rtbroadcast.Backend.presence_join`); the broadcaster joins and leaves them as subscriptions start
and end.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_PRESENCE_HEARTBEAT",
    "DEFAULT_PRESENCE_SNAPSHOT_LIMIT",
    "PresenceChange",
    "PresenceMember",
    "PresenceMode",
    "PresencePolicy",
    "PresenceRule",
    "PresenceSnapshot",
]

#: Members a snapshot holds at most by default (``count`` is always the full count).
DEFAULT_PRESENCE_SNAPSHOT_LIMIT: Final = 100
#: Seconds between a process's presence refreshes on Redis; a dead process's members are gone within
#: twice this.
DEFAULT_PRESENCE_HEARTBEAT: Final = 10.0

#: Which channels have presence: a predicate on the channel name, or channel-name prefixes.
PresenceRule: TypeAlias = Callable[[str], bool] | Collection[str]


@dataclass(frozen=True, slots=True, eq=True)
class PresenceMember:
    """One subscription present on a channel.

    Attributes:
        client: the connection's id (the ``connection`` of its protocol-2 ``welcome``).
        identity: the connection's :attr:`Identity.id <rtbroadcast.Identity.id>`, or ``None`` (anonymous).
        info: what the service said about this subscription (``Allow(info=...)``, else the identity's
            ``info``, else ``{}``); JSON-serialisable.
    """

    client: str
    identity: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Return the member's wire form, ``{"client": ..., "identity": ..., "info": {...}}``.

        Raises:
            ConfigurationError: ``info`` is not JSON-serialisable (a ``datetime``, a set, ``NaN``...).
        """
        try:
            return json.dumps(
                {"client": self.client, "identity": self.identity, "info": dict(self.info)},
                separators=(",", ":"),
                ensure_ascii=False,
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"presence info must be JSON-serialisable: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> PresenceMember:
        """Read a member from its wire form (as :meth:`to_json` wrote it).

        Raises:
            ValueError: ``text`` is not a member's wire form.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("client"), str):
            raise ValueError(f"not a presence member: {text[:80]!r}")
        identity = data.get("identity")
        info = data.get("info")
        return cls(
            data["client"],
            identity if isinstance(identity, str) else None,
            info if isinstance(info, dict) else {},
        )


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    """The members of a channel at one moment, capped.

    Attributes:
        count: how many members the channel has, always the full count.
        members: the first members in join order, at most the limit asked for (empty on a count-only
            channel).
        truncated: whether ``members`` lists fewer than ``count`` (a count-only channel, which lists
            none on purpose, is not truncated).
        version: the channel's presence version this snapshot reflects: a :class:`PresenceChange` with a
            higher version happened after it, one with a lower or equal version is already in it (not
            on the wire; not compared).
    """

    count: int
    members: tuple[PresenceMember, ...] = ()
    truncated: bool = False
    version: int = field(default=0, compare=False)

    def to_wire(self) -> dict[str, Any]:
        """Return the snapshot as the ``presence`` object of a ``subscribed`` frame."""
        return {
            "count": self.count,
            "members": [json.loads(member.to_json()) for member in self.members],
            "truncated": self.truncated,
        }


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A member joined or left a channel; what a backend tells its listener.

    ``version`` orders the changes of one channel (see :attr:`PresenceSnapshot.version`); ``data`` is the
    member's wire form, encoded once, as :meth:`PresenceMember.to_json` gives it.
    """

    channel: str
    kind: Literal["join", "leave"]
    member: PresenceMember
    version: int
    data: str


class PresenceMode(enum.Enum):
    """How a channel keeps presence."""

    #: No presence: subscriptions are not members.
    NONE = "none"
    #: Members, snapshots (capped) and join/leave frames.
    MEMBERS = "members"
    #: Only the count: snapshots hold no members and no join/leave frames are sent.
    COUNT = "count"


def _matcher(name: str, rule: PresenceRule | None) -> Callable[[str], bool] | None:
    """Turn a presence rule into a predicate.

    Raises:
        ConfigurationError: ``rule`` is neither a callable nor a collection of non-empty strings.
    """
    if rule is None:
        return None
    if callable(rule):
        return rule
    if isinstance(rule, str) or not isinstance(rule, Collection):
        raise ConfigurationError(
            f"{name} must be a predicate on the channel name or a collection of channel-name prefixes "
            f"(e.g. ('restaurant:',)), not {rule!r}"
        )
    prefixes = tuple(rule)
    if not all(isinstance(p, str) and p for p in prefixes):
        raise ConfigurationError(f"{name} prefixes must be non-empty strings, not {prefixes!r}")
    return lambda channel: channel.startswith(prefixes)


class PresencePolicy:
    """Decide which channels have presence, and in which mode.

    Args:
        presence: the channels with presence: a predicate ``Callable[[str], bool]`` or a collection of
            channel-name prefixes. ``None``: no channel has presence.
        count_only: the channels whose presence is only counted (same forms); a channel it matches has
            presence in :attr:`PresenceMode.COUNT`, whether or not ``presence`` matches it too.

    Raises:
        ConfigurationError: a rule has the wrong form.
    """

    def __init__(self, presence: PresenceRule | None = None, count_only: PresenceRule | None = None) -> None:
        self._members = _matcher("presence", presence)
        self._count = _matcher("presence_count_only", count_only)

    @property
    def enabled(self) -> bool:
        """Whether any channel may have presence."""
        return self._members is not None or self._count is not None

    def mode(self, channel: str) -> PresenceMode:
        """Return ``channel``'s presence mode.

        A predicate that raises is a bug in the service: the exception propagates.
        """
        if self._count is not None and self._count(channel):
            return PresenceMode.COUNT
        if self._members is not None and self._members(channel):
            return PresenceMode.MEMBERS
        return PresenceMode.NONE


def presence_frame(kind: str, channel: str, member_data: str) -> str:
    """Return a ``presence_join`` / ``presence_leave`` frame, built once per change by concatenation.

    ``member_data`` is the member's wire form (:attr:`PresenceChange.data`), inserted as it is.
    """
    return (
        '{"type":"presence_' + kind + '","channel":' + json.dumps(channel, ensure_ascii=False)
        + ',"member":' + member_data + "}"
    )  # fmt: skip


class PresenceWatcher:
    """One subscription that asked for join/leave frames: where they go, and from which version on.

    Changes that arrive while its snapshot is being taken are held back, then those the snapshot already
    covers are dropped (the same shape as a cursor's buffering during a resume).
    """

    __slots__ = ("channel", "client", "pending", "push", "version")

    def __init__(self, channel: str, client: str, push: Callable[[str], None]) -> None:
        self.channel = channel
        self.client = client
        self.push = push
        self.version = 0
        self.pending: list[tuple[PresenceChange, str]] | None = []

    def offer(self, change: PresenceChange, frame: str) -> None:
        """Queue ``frame`` (the change's frame) unless the snapshot covers it or it is this member's own."""
        if self.pending is not None:
            self.pending.append((change, frame))
        elif change.version > self.version and change.member.client != self.client:
            self.push(frame)

    def start(self, version: int) -> list[str]:
        """Go live after a snapshot at ``version``; return the held-back frames it does not cover.

        The caller queues them right after the subscription's ``subscribed``; later changes are pushed.
        """
        pending, self.pending = self.pending, None
        self.version = version
        return [
            frame
            for change, frame in pending or ()
            if change.version > version and change.member.client != self.client
        ]
