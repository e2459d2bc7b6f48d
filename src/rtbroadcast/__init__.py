"""rtbroadcast: realtime broadcasting for Python backends.

Publish typed events on channels; every subscriber of a channel receives them in order, each with a
``seq``, and resumes after a reconnect without gaps.
"""

from ._version import __version__
from .backends import Backend, BackendListener, Envelope, History, StreamPosition, load_backend
from .broadcaster import Broadcaster, BroadcasterState, Received, Subscription, SubscriptionObserver
from .connection import Connection, QueueLimits
from .errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    ConnectionLimitReached,
    FrameTooLarge,
    InvalidChannel,
    InvalidEvent,
    InvalidFrame,
    MalformedFrame,
    ProtocolError,
    RTBroadcastError,
    StateError,
    SubscriptionClosed,
    SubscriptionRefused,
    UnknownMessageType,
)
from .events import Event, EventRegistry, decode_event, format_timestamp, registry, utc_now
from .identity import Allow, Deny, Identity
from .presence import PresenceChange, PresenceMember, PresenceMode, PresenceSnapshot
from .protocol import (
    PROTOCOL_VERSIONS,
    CloseCode,
    ResumePoint,
    ResyncReason,
    ResyncRequired,
    Welcome,
)
from .stats import BroadcasterStats

__all__ = [
    "PROTOCOL_VERSIONS",
    "Allow",
    "Backend",
    "BackendError",
    "BackendListener",
    "BackendUnavailable",
    "Broadcaster",
    "BroadcasterState",
    "BroadcasterStats",
    "CloseCode",
    "ConfigurationError",
    "Connection",
    "ConnectionLimitReached",
    "Deny",
    "Envelope",
    "Event",
    "EventRegistry",
    "FrameTooLarge",
    "History",
    "Identity",
    "InvalidChannel",
    "InvalidEvent",
    "InvalidFrame",
    "MalformedFrame",
    "PresenceChange",
    "PresenceMember",
    "PresenceMode",
    "PresenceSnapshot",
    "ProtocolError",
    "QueueLimits",
    "RTBroadcastError",
    "Received",
    "ResumePoint",
    "ResyncReason",
    "ResyncRequired",
    "StateError",
    "StreamPosition",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionObserver",
    "SubscriptionRefused",
    "UnknownMessageType",
    "Welcome",
    "__version__",
    "decode_event",
    "format_timestamp",
    "load_backend",
    "registry",
    "utc_now",
]
