"""Who a connection is, and what an ``authorize`` hook decides about one of its subscriptions.

These are plain values shared by every layer: the ASGI endpoint fills them from its hooks
(``authenticate`` returns an :class:`Identity` or a :class:`Deny`; ``authorize`` returns ``True``,
``False``, a :class:`Deny` or an :class:`Allow`), the broadcaster keeps them on each
:class:`~rtbroadcast.Connection` and subscription, and presence and server-side subscriptions read them.
Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from .errors import ConfigurationError

__all__ = ["Allow", "Deny", "Identity"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """What a connection proved when it connected (returned by the endpoint's ``authenticate`` hook).

    Args:
        id: the user's or device's id; connections are indexed by it (several connections may share it:
            a user with two tabs).
        tags: further names the service groups connections by (``"restaurant:R"``, ``"role:manager"``).
        info: JSON-serialisable details shown to other subscribers as this connection's presence info,
            unless ``authorize`` gives a subscription its own (:class:`Allow`).
        expires_at: when the credentials the identity came from expire (timezone-aware), if they do.

    Raises:
        ConfigurationError: ``id`` is not a non-empty string, ``tags`` holds something other than
            strings, ``info`` is not a mapping, or ``expires_at`` is not a timezone-aware datetime.
    """

    id: str
    tags: frozenset[str] = frozenset()
    info: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigurationError(f"Identity.id must be a non-empty string, not {self.id!r}")
        if isinstance(self.tags, str) or not isinstance(self.tags, frozenset | set | tuple | list):
            raise ConfigurationError(
                f"Identity.tags must be a collection of strings such as frozenset({{'a'}}), not {self.tags!r}"
            )
        tags = frozenset(self.tags)
        wrong = [tag for tag in tags if not isinstance(tag, str) or not tag]
        if wrong:
            raise ConfigurationError(f"Identity.tags must hold non-empty strings, not {wrong[0]!r}")
        object.__setattr__(self, "tags", tags)
        if not isinstance(self.info, Mapping):
            raise ConfigurationError(f"Identity.info must be a mapping, not {type(self.info).__name__}")
        _check_json("Identity.info", self.info)
        if self.expires_at is not None and (
            not isinstance(self.expires_at, datetime) or self.expires_at.utcoffset() is None
        ):
            raise ConfigurationError(
                f"Identity.expires_at must be a timezone-aware datetime or None, not {self.expires_at!r}"
            )


@dataclass(frozen=True, slots=True)
class Deny:
    """Returned by an ``authenticate`` or ``authorize`` hook to refuse; ``reason`` goes to the client."""

    reason: str = "forbidden"


@dataclass(frozen=True, slots=True)
class Allow:
    """Returned by an ``authorize`` hook to allow a subscription, with its presence info.

    Args:
        info: what other subscribers see of this subscription in presence (JSON-serialisable); ``None``
            uses the connection's ``Identity.info``, or ``{}`` for an anonymous connection.

    Raises:
        ConfigurationError: ``info`` is neither ``None`` nor a JSON-serialisable mapping.
    """

    info: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.info is not None and not isinstance(self.info, Mapping):
            raise ConfigurationError(f"Allow.info must be a mapping or None, not {type(self.info).__name__}")
        if self.info is not None:
            _check_json("Allow.info", self.info)


def _check_json(name: str, info: Mapping[str, Any]) -> None:
    """Refuse presence info that members could not be sent with, where the service creates it.

    Raises:
        ConfigurationError: ``info`` holds something JSON cannot carry (a ``datetime``, a set, ``NaN``).
    """
    try:
        json.dumps(dict(info), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{name} must be JSON-serialisable: {exc}") from None


def presence_info(allow: Allow | None, identity: Identity | None) -> Mapping[str, Any]:
    """Return the presence info of a subscription: the hook's, else the identity's, else ``{}``."""
    if allow is not None and allow.info is not None:
        return allow.info
    if identity is not None:
        return identity.info
    return _EMPTY
