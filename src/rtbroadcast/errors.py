"""Exceptions raised by rtbroadcast.

Every exception derives from :class:`RTBroadcastError`, so ``except RTBroadcastError`` catches all of them.
Where the meaning fits, a standard exception is mixed in, so ``except ValueError`` keeps working too::

    RTBroadcastError
    ├── ConfigurationError (ValueError)      a bad URL, option or argument, found before anything runs
    ├── StateError (RuntimeError)            the broadcaster is used in the wrong lifecycle state
    ├── InvalidEvent (ValueError)            an event model or payload that cannot be published or decoded
    ├── ProtocolError                        a client frame that breaks the wire protocol (has ``.code``)
    │   ├── MalformedFrame (ValueError)      not UTF-8, not JSON, not an object, no ``type``
    │   ├── FrameTooLarge (ValueError)       longer than the configured limit
    │   ├── UnknownMessageType (ValueError)  a ``type`` the protocol does not define
    │   └── InvalidFrame (ValueError)        a known ``type`` with fields of the wrong shape
    ├── ConnectionLimitReached               a per-process or per-channel connection limit is reached
    ├── BackendError                         the backend failed
    │   └── BackendUnavailable (ConnectionError)  it cannot be reached (publish fails fast)
    ├── SubscriptionClosed                   an in-process subscription ended (slow consumer, shutdown)
    └── rtbroadcast.client.ClientError       the asyncio client stopped or reports a problem (has ``.code``)
        ├── Refused                          the server refused the connection (4003, 4004)
        └── Unreachable (ConnectionError)    ``max_retries`` attempts in a row failed
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ConfigurationError",
    "ConnectionLimitReached",
    "FrameTooLarge",
    "InvalidEvent",
    "InvalidFrame",
    "MalformedFrame",
    "ProtocolError",
    "RTBroadcastError",
    "StateError",
    "SubscriptionClosed",
    "UnknownMessageType",
]


class RTBroadcastError(Exception):
    """Base class of every exception raised by rtbroadcast."""


class ConfigurationError(RTBroadcastError, ValueError):
    """A URL, option or argument is invalid."""


class StateError(RTBroadcastError, RuntimeError):
    """An operation was attempted in a lifecycle state that does not allow it."""


class InvalidEvent(RTBroadcastError, ValueError):
    """An event model or payload cannot be published or decoded."""


class ProtocolError(RTBroadcastError):
    """A client frame breaks the wire protocol.

    ``code`` is the machine-readable error code sent to the client in an ``error`` frame.
    """

    code: str = "protocol_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedFrame(ProtocolError, ValueError):
    """The frame is not a UTF-8 JSON object with a string ``type``."""

    code = "malformed_frame"


class FrameTooLarge(ProtocolError, ValueError):
    """The frame is longer than the configured maximum."""

    code = "frame_too_large"


class UnknownMessageType(ProtocolError, ValueError):
    """The frame's ``type`` is not one the protocol defines."""

    code = "unknown_type"


class InvalidFrame(ProtocolError, ValueError):
    """The frame's ``type`` is known but its fields do not have the documented shape."""

    code = "invalid_frame"


class ConnectionLimitReached(RTBroadcastError):
    """Accepting another connection would pass a configured limit; ``scope`` says which."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} connection limit of {limit} reached")
        self.scope = scope
        self.limit = limit


class BackendError(RTBroadcastError):
    """The backend failed to carry out an operation."""


class BackendUnavailable(BackendError, ConnectionError):
    """The backend cannot be reached; the operation was not carried out."""


class SubscriptionClosed(RTBroadcastError):
    """An in-process subscription was closed.

    ``reason`` says why: ``"slow_consumer"`` when it fell behind its queue bound, ``"shutdown"`` when the
    broadcaster disconnected.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"subscription closed: {reason}")
        self.reason = reason
