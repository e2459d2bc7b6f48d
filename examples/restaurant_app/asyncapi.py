"""The service's AsyncAPI 3.0 document: every realtime message a device may receive or send."""

from __future__ import annotations

from typing import Any

from rtbroadcast import Event
from rtbroadcast.schema import ChannelSpec, asyncapi_document

from .events import (
    AtomicTransactionComplete,
    DeviceMessage,
    GuestCreated,
    GuestDeleted,
    GuestUpdated,
    TableCreated,
    TableUpdated,
)

__all__ = ["DEVICE_EVENTS", "EVENTS", "document"]

EVENTS: list[type[Event]] = [
    GuestCreated,
    GuestUpdated,
    GuestDeleted,
    TableCreated,
    TableUpdated,
    AtomicTransactionComplete,
]
#: The events of a device's own channel (protocol 2 only).
DEVICE_EVENTS: list[type[Event]] = [DeviceMessage]


def document(server: str = "ws://127.0.0.1:8000") -> dict[str, Any]:
    """Build the document, naming ``server`` as where devices connect."""
    security = {
        "deviceToken": {
            "type": "httpApiKey",
            "name": "token",
            "in": "query",
            "description": "A signed device token bound to the restaurant (a JWT, HS256). Browsers "
            "pass it here, as they cannot set headers on a WebSocket; when it expires, the "
            "connection is closed with 4003.",
        },
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "The same token in an `Authorization: Bearer` header (native apps).",
        },
    }
    return asyncapi_document(
        [
            ChannelSpec(
                "/realtime?restaurant_id={restaurant_id}",
                name="restaurant",
                title="A restaurant's devices",
                parameters={"restaurant_id": "The restaurant: 1 to 64 characters from `A-Z a-z 0-9 _ -`."},
                sse_address="/realtime/sse",
                security=security,
                events=EVENTS,
            ),
            ChannelSpec(
                "/realtime",
                protocol=2,
                name="device",
                title="One device's own channel (protocol 2)",
                description="`device:<restaurant_id>:<device_id>`: a protocol-2 connection with a valid "
                "token is subscribed to it by the server at connect (a `subscribed` frame with `id` null); "
                "events arrive wrapped in `event` frames naming the channel. Direct messages are sent with "
                "`POST /restaurants/{restaurant_id}/devices/{device_id}/messages`.",
                security=security,
                events=DEVICE_EVENTS,
            ),
        ],
        events=[*EVENTS, *DEVICE_EVENTS],
        title="Restaurant service events",
        version="1.0.0",
        servers={"local": server},
    )
