"""The HTTP contract: request bodies (unknown fields rejected with 422) and response bodies.

Field names on the wire follow the reference: ``guestName`` and ``partySize`` in camelCase, the rest in
snake_case. Python attributes are snake_case; the aliases carry the wire names.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_serializer, field_validator
from pydantic_core import PydanticCustomError

from rtbroadcast import format_timestamp

__all__ = [
    "RESTAURANT_ID_PATTERN",
    "AtomicOperation",
    "AtomicRequest",
    "AtomicResult",
    "CreateGuestOp",
    "Guest",
    "GuestCreate",
    "GuestList",
    "GuestStatus",
    "GuestUpdate",
    "OperationResult",
    "Table",
    "TableCreate",
    "TableList",
    "TableStatus",
    "TableUpdate",
    "UpdateGuestOp",
    "UpdateTableOp",
]

#: What a restaurant id may look like (also enforced on the WebSocket's ``restaurant_id``).
RESTAURANT_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_ID_PATTERN = r"^[A-Za-z0-9_-]{1,48}$"

EntityId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
GuestName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
PartySize = Annotated[int, Field(ge=1, le=50)]
Phone = Annotated[str, StringConstraints(strip_whitespace=True, max_length=32)]
Notes = Annotated[str, StringConstraints(max_length=500)]
TableName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Capacity = Annotated[int, Field(ge=1, le=50)]


class GuestStatus(StrEnum):
    """Where a guest is in the visit."""

    WAITING = "waiting"
    NOTIFIED = "notified"
    SEATED = "seated"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    NO_SHOW = "no_show"


class TableStatus(StrEnum):
    """What a table is doing."""

    AVAILABLE = "available"
    OCCUPIED = "occupied"
    RESERVED = "reserved"
    CLEANING = "cleaning"
    OUT_OF_SERVICE = "out_of_service"


class _Request(BaseModel):
    # Unknown fields are a client bug: reject them with their location instead of ignoring them.
    model_config = ConfigDict(extra="forbid")


def _not_null(value: object) -> object:
    # Partial updates default every field to None ("not sent"); an explicit null is only allowed where
    # the field can be cleared.
    if value is None:
        raise PydanticCustomError("null_not_allowed", "Field may not be null")
    return value


class GuestCreate(_Request):
    """Body of ``POST /restaurants/{rid}/guests``; the guest starts ``waiting``."""

    guest_name: GuestName = Field(alias="guestName")
    party_size: PartySize = Field(alias="partySize")
    phone: Phone | None = None
    notes: Notes | None = None


class GuestUpdate(_Request):
    """Body of ``PUT /restaurants/{rid}/guests/{gid}``: only the fields sent are changed.

    ``table_id`` and ``phone``/``notes`` may be ``null`` to clear them; the others may not.
    """

    status: GuestStatus | None = None
    table_id: EntityId | None = None
    guest_name: GuestName | None = Field(default=None, alias="guestName")
    party_size: PartySize | None = Field(default=None, alias="partySize")
    phone: Phone | None = None
    notes: Notes | None = None

    _required = field_validator("status", "guest_name", "party_size", mode="before")(_not_null)

    def changes(self) -> dict[str, Any]:
        """Return the fields the client sent, by attribute name."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class TableCreate(_Request):
    """Body of ``POST /restaurants/{rid}/tables``; the table starts ``available``."""

    name: TableName
    capacity: Capacity


class TableUpdate(_Request):
    """Body of ``PUT /restaurants/{rid}/tables/{tid}``: only the fields sent are changed.

    ``guest_id`` may be ``null`` to clear it; the others may not.
    """

    status: TableStatus | None = None
    guest_id: EntityId | None = None
    name: TableName | None = None
    capacity: Capacity | None = None

    _required = field_validator("status", "name", "capacity", mode="before")(_not_null)

    def changes(self) -> dict[str, Any]:
        """Return the fields the client sent, by attribute name."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class UpdateGuestOp(_Request):
    """Atomic operation: change a guest, as ``PUT /restaurants/{rid}/guests/{gid}`` would."""

    op: Literal["update_guest"]
    guest_id: EntityId
    changes: GuestUpdate


class UpdateTableOp(_Request):
    """Atomic operation: change a table, as ``PUT /restaurants/{rid}/tables/{tid}`` would."""

    op: Literal["update_table"]
    table_id: EntityId
    changes: TableUpdate


class CreateGuestOp(_Request):
    """Atomic operation: add a guest, as ``POST /restaurants/{rid}/guests`` would."""

    op: Literal["create_guest"]
    guest: GuestCreate


AtomicOperation = Annotated[UpdateGuestOp | UpdateTableOp | CreateGuestOp, Field(discriminator="op")]


class AtomicRequest(_Request):
    """Body of ``POST /transactions/atomic``: operations applied in order, all or none."""

    restaurant_id: Annotated[str, StringConstraints(pattern=f"^{RESTAURANT_ID_PATTERN}$")]
    operations: list[AtomicOperation] = Field(min_length=1, max_length=100)


# -- responses ----------------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    @field_serializer("created_at", "updated_at", check_fields=False)
    def _timestamp(self, value: datetime) -> str:
        return format_timestamp(value)


class Guest(_Response):
    """A guest as the API returns it."""

    id: str
    restaurant_id: str
    guest_name: str = Field(alias="guestName")
    party_size: int = Field(alias="partySize")
    phone: str | None
    notes: str | None
    status: GuestStatus
    table_id: str | None
    created_at: datetime
    updated_at: datetime


class Table(_Response):
    """A table as the API returns it."""

    id: str
    restaurant_id: str
    name: str
    capacity: int
    status: TableStatus
    guest_id: str | None
    created_at: datetime
    updated_at: datetime


class _Snapshot(BaseModel):
    """A list response, with the stream position it reflects.

    ``epoch`` and ``seq`` are those of the restaurant's channel when the snapshot was read: connect with
    ``?epoch=...&last_seq=...`` to receive every later event. They are ``null`` while the broadcast
    backend is unreachable.
    """

    restaurant_id: str
    epoch: str | None
    seq: int | None


class GuestList(_Snapshot):
    """Body of ``GET /restaurants/{rid}/guests``."""

    guests: list[Guest]


class TableList(_Snapshot):
    """Body of ``GET /restaurants/{rid}/tables``."""

    tables: list[Table]


class OperationResult(BaseModel):
    """The entity one atomic operation left behind."""

    op: str
    guest: Guest | None = None
    table: Table | None = None


class AtomicResult(BaseModel):
    """Body of a successful ``POST /transactions/atomic``."""

    restaurant_id: str
    affected_entities: list[str]
    results: list[OperationResult]
