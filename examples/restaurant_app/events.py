"""The events the service broadcasts on ``restaurant:<restaurant_id>``, in the reference's exact format.

(:class:`DeviceMessage` alone goes to one device's own channel, ``device:<restaurant_id>:<device_id>``,
which only protocol-2 connections receive; see ``devices.py``.)

Clients receive each event's JSON plus ``seq``. ``timestamp`` is UTC with microseconds and a ``Z``
(``2025-08-16T07:21:27.177385Z``). ``guest_updated.action`` says what kind of change it was:

=====================  ===============================================================================
``status_change``      ``status`` changed (whatever else changed with it)
``table_assigned``     ``table_id`` was set or changed to another table, ``status`` unchanged
``table_unassigned``   ``table_id`` was cleared, ``status`` unchanged
``details_change``     only ``guestName``, ``partySize``, ``phone`` or ``notes`` changed
=====================  ===============================================================================

``data`` of ``guest_updated`` always has ``id``, ``status`` and ``table_id``, plus the new value of every
other field that changed; ``table_updated`` likewise always has ``id``, ``status`` and ``guest_id``.
"""

from __future__ import annotations

from typing import Literal, NotRequired

from typing_extensions import TypedDict

from rtbroadcast import Event

__all__ = [
    "AtomicTransactionComplete",
    "DeviceMessage",
    "GuestAction",
    "GuestCreated",
    "GuestCreatedData",
    "GuestDeleted",
    "GuestDeletedData",
    "GuestUpdated",
    "GuestUpdatedData",
    "RestaurantEvent",
    "TableCreated",
    "TableCreatedData",
    "TableUpdated",
    "TableUpdatedData",
]

GuestAction = Literal["status_change", "table_assigned", "table_unassigned", "details_change"]

# The field names below are the wire names of the reference (camelCase for guestName and partySize).


class GuestCreatedData(TypedDict):
    """``data`` of ``guest_created``."""

    id: str
    guestName: str
    partySize: int
    status: str


class GuestUpdatedData(TypedDict):
    """``data`` of ``guest_updated``: the guest's id, status and table, and what else changed."""

    id: str
    status: str
    table_id: str | None
    guestName: NotRequired[str]
    partySize: NotRequired[int]
    phone: NotRequired[str | None]
    notes: NotRequired[str | None]


class GuestDeletedData(TypedDict):
    """``data`` of ``guest_deleted``."""

    id: str


class TableCreatedData(TypedDict):
    """``data`` of ``table_created``."""

    id: str
    name: str
    capacity: int
    status: str
    guest_id: str | None


class TableUpdatedData(TypedDict):
    """``data`` of ``table_updated``: the table's id, status and guest, and what else changed."""

    id: str
    status: str
    guest_id: str | None
    name: NotRequired[str]
    capacity: NotRequired[int]


class RestaurantEvent(Event):
    """Base of every event of the service: each belongs to one restaurant."""

    restaurant_id: str


class GuestCreated(RestaurantEvent):
    """A guest joined the waitlist (``POST /restaurants/{rid}/guests``)."""

    type: Literal["guest_created"] = "guest_created"
    guest_id: str
    data: GuestCreatedData


class GuestUpdated(RestaurantEvent):
    """A guest changed (``PUT /restaurants/{rid}/guests/{gid}``)."""

    type: Literal["guest_updated"] = "guest_updated"
    guest_id: str
    action: GuestAction
    data: GuestUpdatedData


class GuestDeleted(RestaurantEvent):
    """A guest was removed (``DELETE /restaurants/{rid}/guests/{gid}``)."""

    type: Literal["guest_deleted"] = "guest_deleted"
    guest_id: str
    data: GuestDeletedData


class TableCreated(RestaurantEvent):
    """A table was added (``POST /restaurants/{rid}/tables``)."""

    type: Literal["table_created"] = "table_created"
    table_id: str
    data: TableCreatedData


class TableUpdated(RestaurantEvent):
    """A table changed (``PUT /restaurants/{rid}/tables/{tid}``, or its guest was deleted)."""

    type: Literal["table_updated"] = "table_updated"
    table_id: str
    data: TableUpdatedData


class AtomicTransactionComplete(RestaurantEvent):
    """An atomic transaction committed; ``affected_entities`` lists the ids it changed, in operation order."""

    type: Literal["atomic_transaction_complete"] = "atomic_transaction_complete"
    affected_entities: list[str]


class DeviceMessage(RestaurantEvent):
    """A direct message to one device (``POST /restaurants/{rid}/devices/{device_id}/messages``).

    Sent on the device's own channel ``device:<restaurant_id>:<device_id>``, never on the restaurant's:
    ``sender`` is the device id of the token that sent it (``None`` in the service's open modes).
    """

    type: Literal["device_message"] = "device_message"
    device_id: str
    text: str
    sender: str | None
