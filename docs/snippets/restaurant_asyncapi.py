"""The AsyncAPI document of the example restaurant service (served by it, or printed with the CLI)."""

from typing import Any

from examples.restaurant_app.events import (
    AtomicTransactionComplete,
    GuestCreated,
    GuestDeleted,
    GuestUpdated,
    TableCreated,
    TableUpdated,
)

from rtbroadcast.schema import ChannelSpec, asyncapi_document

EVENTS = [GuestCreated, GuestUpdated, GuestDeleted, TableCreated, TableUpdated, AtomicTransactionComplete]


def document() -> dict[str, Any]:
    return asyncapi_document(
        ChannelSpec(
            "/realtime?restaurant_id={restaurant_id}",
            name="restaurant",
            title="A restaurant's devices",
            parameters={"restaurant_id": "The restaurant: 1 to 64 characters from `A-Z a-z 0-9 _ -`."},
        ),
        events=EVENTS,
        title="Restaurant service events",
        version="1.0.0",
        servers={"local": "ws://127.0.0.1:8000"},
    )
