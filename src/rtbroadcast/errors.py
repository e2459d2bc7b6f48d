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
    │       └── InvalidChannel               a protocol-2 frame names an invalid channel
    ├── ConnectionLimitReached               a per-process or per-channel connection limit is reached
    ├── SubscriptionRefused                  a protocol-2 subscribe/unsubscribe cannot be done (has ``.code``)
    ├── BackendError                         the backend failed
    │   └── BackendUnavailable (ConnectionError)  it cannot be reached (publish fails fast)
    ├── SubscriptionClosed                   an in-process subscription ended (has ``.reason``)
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
    "InvalidChannel",
    "InvalidEvent",
    "InvalidFrame",
    "MalformedFrame",
    "ProtocolError",
    "RTBroadcastError",
    "StateError",
    "SubscriptionClosed",
    "SubscriptionRefused",
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

    ``code`` is the machine-readable error code sent to the client in an ``error`` frame. On protocol 2,
    ``request_id`` and ``channel`` are the frame's own, where it had a valid one (echoed in the error).
    """

    code: str = "protocol_error"

    def __init__(self, message: str, *, request_id: str | None = None, channel: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.channel = channel


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


class InvalidChannel(InvalidFrame):
    """The frame names a channel that is not a valid channel name (protocol 2)."""

    code = "invalid_channel"


class ConnectionLimitReached(RTBroadcastError):
    """Accepting another connection would pass a configured limit; ``scope`` says which."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} connection limit of {limit} reached")
        self.scope = scope
        self.limit = limit


class SubscriptionRefused(RTBroadcastError):
    """A subscription cannot be started or ended on a connection.

    ``code`` is the ``error`` frame code a protocol-2 client gets (``already_subscribed``,
    ``not_subscribed``, ``too_many_subscriptions``: see ``protocol.SubscriptionErrorCode``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BackendError(RTBroadcastError):
    """The backend failed to carry out an operation."""


class BackendUnavailable(BackendError, ConnectionError):
    """The backend cannot be reached; the operation was not carried out."""


class SubscriptionClosed(RTBroadcastError):
    """An in-process subscription was closed.

    ``reason`` says why:

    - ``"slow_consumer"``: it fell behind its queue bound.
    - ``"shutdown"``: the broadcaster drained or disconnected.
    - ``"backend_unavailable"``: events were missed (a gap in the seqs, or a backend interruption) and
      the backend could not be reached to read them from history. Nothing shut down: subscribe again
      with ``resume=subscription.position`` once the backend is back, and the missed events follow (or
      a resync notice, if the history no longer has them).
    - ``"closed"``: any other close (not sent by rtbroadcast itself today).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"subscription closed: {reason}")
        self.reason = reason
