"""Server-side subscription changes that every process applies, and the reserved channel they travel on.

``Broadcaster.subscribe_connections()``, ``unsubscribe_connections()`` and ``disconnect_connections()`` do
not change connections directly: they publish a :class:`ControlCommand` on :data:`CONTROL_CHANNEL`, and
every process that holds connections with an identity applies it, this one included, in the order of the
channel's ``seq``. So every process applies the same commands in the same order (two calls made at once on
two processes never end in different states on different processes), and a command is carried by the
machinery that carries events: history, gap repair after a backend reconnect, the periodic position check.
Nothing here does I/O.

The reserved channel's name holds a control character, which :func:`~rtbroadcast.protocol.is_valid_channel`
refuses: no client can subscribe to it or publish on it, and since backends derive their keys from channel
names injectively (Redis: ``rtb:{<name>}...``), it can never share a key with a channel of the service.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import ConfigurationError
from .protocol import CloseCode, is_valid_channel

__all__ = [
    "CONTROL_CHANNEL",
    "ControlAction",
    "ControlCommand",
    "decode_control",
    "encode_control",
]

#: The channel control commands travel on. ``\x1f`` (unit separator) is not a valid character in a
#: channel name, and unlike NUL every backend can store it (PostgreSQL text cannot hold NUL).
CONTROL_CHANNEL: Final = "\x1frtbroadcast:control"

#: The ``type`` of a control command's JSON text (never seen by clients).
_TYPE: Final = "rtb_control"
#: Longest close reason, in UTF-8 bytes, a WebSocket close frame can carry.
MAX_CLOSE_REASON: Final = 123
#: Longest identity id or tag a command may name.
MAX_SELECTOR = 256


class ControlAction(enum.StrEnum):
    """What a :class:`ControlCommand` does to the connections it selects."""

    #: Subscribe each protocol-2 connection to the command's channel (``subscribed`` with ``"id": null``).
    SUBSCRIBE = "subscribe"
    #: Unsubscribe each protocol-2 connection from the channel (``unsubscribed``, ``reason: "server"``).
    UNSUBSCRIBE = "unsubscribe"
    #: Close each connection, on either protocol, with the command's code and reason.
    DISCONNECT = "disconnect"


def is_valid_close_code(code: object) -> bool:
    """Return whether a server may close a connection with ``code`` on behalf of the service.

    1000 (normal), 1001 (going away), 1008 (policy violation), and the registered and private ranges
    3000-4999; not the codes that describe a protocol failure or that never travel on the wire.
    """
    return (
        isinstance(code, int)
        and not isinstance(code, bool)
        and (code in (1000, 1001, 1008) or 3000 <= code <= 4999)
    )


@dataclass(frozen=True, slots=True)
class ControlCommand:
    """One change to the connections that carry an identity id or a tag, applied on every process.

    Args:
        action: what to do (:class:`ControlAction`).
        identity: the ``Identity.id`` of the connections to change; exactly one of ``identity`` and
            ``tag`` is given.
        tag: a tag of ``Identity.tags`` of the connections to change.
        channel: the channel to subscribe or unsubscribe (not for ``disconnect``).
        info: the presence info of the new subscriptions (``subscribe`` only; ``None``: the identity's).
        code: the close code of a ``disconnect``.
        reason: the close reason of a ``disconnect`` (at most 123 UTF-8 bytes).
        nonce: who waits for the command in the process that sent it (opaque; ``""``: nobody).

    Raises:
        ConfigurationError: not exactly one of ``identity`` and ``tag`` is a non-empty string (at most 256
            characters), the channel is missing or invalid (or given to ``disconnect``), ``info`` is not a
            JSON-serialisable mapping, or the close code or reason cannot go in a close frame.
    """

    action: ControlAction
    identity: str | None = None
    tag: str | None = None
    channel: str | None = None
    info: Mapping[str, Any] | None = None
    code: int = int(CloseCode.FORBIDDEN)
    reason: str = ""
    nonce: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        try:
            action = ControlAction(self.action)
        except ValueError:
            raise ConfigurationError(f"unknown control action {self.action!r}") from None
        object.__setattr__(self, "action", action)
        given = [name for name in ("identity", "tag") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigurationError(
                "select connections by exactly one of identity=... or tag=..., "
                + ("not both" if given else "not neither")
            )
        selector = getattr(self, given[0])
        if not isinstance(selector, str) or not selector or len(selector) > MAX_SELECTOR:
            raise ConfigurationError(
                f"{given[0]} must be a non-empty string of at most {MAX_SELECTOR} characters, "
                f"not {selector!r}"
            )
        if action is ControlAction.DISCONNECT:
            if self.channel is not None:
                raise ConfigurationError("disconnect closes whole connections; it takes no channel")
            if not is_valid_close_code(self.code):
                raise ConfigurationError(
                    f"close code must be 1000, 1001, 1008 or in 3000-4999, not {self.code!r}"
                )
            if not isinstance(self.reason, str) or len(self.reason.encode()) > MAX_CLOSE_REASON:
                raise ConfigurationError(
                    f"reason must be a string of at most {MAX_CLOSE_REASON} UTF-8 bytes (the most a close "
                    f"frame carries), not {self.reason!r}"
                )
        elif not is_valid_channel(self.channel):
            raise ConfigurationError(
                f"invalid channel name {self.channel!r}: use 1 to 256 characters, no control characters"
            )
        if self.info is not None:
            if action is not ControlAction.SUBSCRIBE:
                raise ConfigurationError("info (presence info) is given to subscribe only")
            if not isinstance(self.info, Mapping):
                raise ConfigurationError(f"info must be a mapping or None, not {type(self.info).__name__}")
            try:
                _dumps(dict(self.info))
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"info must be JSON-serialisable: {exc}") from None
        if not isinstance(self.nonce, str):
            raise ConfigurationError(f"nonce must be a string, not {self.nonce!r}")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_control(command: ControlCommand) -> str:
    """Return the JSON text of ``command``, as published on :data:`CONTROL_CHANNEL`."""
    body: dict[str, Any] = {"type": _TYPE, "action": command.action.value}
    if command.identity is not None:
        body["identity"] = command.identity
    else:
        body["tag"] = command.tag
    if command.action is ControlAction.DISCONNECT:
        body["code"] = command.code
        body["reason"] = command.reason
    else:
        body["channel"] = command.channel
    if command.info is not None:
        body["info"] = dict(command.info)
    if command.nonce:
        body["nonce"] = command.nonce
    return _dumps(body)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_control(text: str) -> ControlCommand:
    """Parse the JSON text of a control command (its ``seq`` is ignored).

    Raises:
        ValueError: the text is not a control command this version understands (say, one with an action
            added by a newer version of rtbroadcast, during a rolling upgrade); the message says why.
    """
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("type") != _TYPE:
        raise ValueError("not a control command")
    action = body.get("action")
    if not isinstance(action, str) or action not in set(ControlAction):
        raise ValueError(f"unknown control action {action!r}")
    code = body.get("code", int(CloseCode.FORBIDDEN))
    if isinstance(code, float) and math.isfinite(code) and code.is_integer():
        code = int(code)
    try:
        return ControlCommand(
            action=ControlAction(action),
            identity=body.get("identity"),
            tag=body.get("tag"),
            channel=body.get("channel"),
            info=body.get("info"),
            code=code,
            reason=body.get("reason", ""),
            nonce=body.get("nonce", ""),
        )
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from None
