"""The public surface: what ``rtbroadcast`` exports, and what importing it pulls in."""

from __future__ import annotations

import subprocess
import sys

import rtbroadcast

PUBLIC = {
    "PROTOCOL_VERSIONS",
    "Allow",
    "Deny",
    "Identity",
    "InvalidChannel",
    "PresenceMember",
    "PresenceSnapshot",
    "SubscriptionObserver",
    "SubscriptionRefused",
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
    "Envelope",
    "Event",
    "EventRegistry",
    "FrameTooLarge",
    "History",
    "InvalidEvent",
    "InvalidFrame",
    "MalformedFrame",
    "PresenceChange",
    "PresenceMode",
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
    "UnknownMessageType",
    "Welcome",
    "__version__",
    "decode_event",
    "format_timestamp",
    "load_backend",
    "registry",
    "utc_now",
}


def test_all_is_exactly_the_documented_surface() -> None:
    assert set(rtbroadcast.__all__) == PUBLIC
    for name in rtbroadcast.__all__:
        assert hasattr(rtbroadcast, name), name


def test_public_objects_are_not_defined_in_private_modules() -> None:
    for name in rtbroadcast.__all__:
        module = getattr(getattr(rtbroadcast, name), "__module__", "rtbroadcast") or ""
        assert not any(part.startswith("_") for part in module.split(".")[1:]), (name, module)


def test_errors_share_one_root() -> None:
    for name in rtbroadcast.__all__:
        obj = getattr(rtbroadcast, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, rtbroadcast.RTBroadcastError), name


def test_import_pulls_in_no_framework_or_redis() -> None:
    code = (
        "import sys, rtbroadcast, rtbroadcast.asgi, rtbroadcast.backends.memory, rtbroadcast.client\n"
        "frameworks = ('starlette', 'redis', 'fastapi', 'uvicorn', 'websockets', 'prometheus_client', 'opentelemetry')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in frameworks)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


CLIENT = {
    "Backoff",
    "ChannelSubscription",
    "Client",
    "ClientError",
    "ClientState",
    "ClientStats",
    "CloseAction",
    "DisconnectInfo",
    "Presence",
    "PresenceChange",
    "Received",
    "Refused",
    "ResumeTracker",
    "ResyncInfo",
    "Subscription",
    "SubscriptionDenied",
    "SubscriptionStats",
    "TokenRequest",
    "Unreachable",
    "Verdict",
    "close_action",
}


def test_the_client_module_exports_what_its_page_documents() -> None:
    """``rtbroadcast.client`` is its own public module (it needs websockets to connect): not re-exported."""
    import rtbroadcast.client as client

    assert set(client.__all__) == CLIENT
    for name in client.__all__:
        assert hasattr(client, name), name
    assert "Client" not in rtbroadcast.__all__
    assert issubclass(client.ClientError, rtbroadcast.RTBroadcastError)
