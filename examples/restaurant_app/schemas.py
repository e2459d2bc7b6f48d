"""The HTTP contract: request bodies (unknown fields rejected with 422) and response bodies.

Field names on the wire follow the reference: ``guestName`` and ``partySize`` in camelCase, the rest in
snake_case. Python attributes are snake_case; the aliases carry the wire names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
    field_serializer,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from rtbroadcast import format_timestamp

__all__ = [
    "ENTITY_ID_PATTERN",
    "RESTAURANT_ID_PATTERN",
    "AtomicOperation",
    "AtomicRequest",
    "AtomicResult",
    "CreateGuestOp",
    "DeviceMessageCreate",
    "DeviceMessageResult",
    "EntityId",
    "Guest",
    "GuestCreate",
    "GuestList",
    "GuestStatus",
    "GuestUpdate",
    "NotFoundBody",
    "OnlineDevice",
    "OnlineDeviceList",
    "OperationResult",
    "RestaurantId",
    "Table",
    "TableCreate",
    "TableList",
    "TableStatus",
    "TableUpdate",
    "Text",
    "UpdateGuestOp",
    "UpdateTableOp",
]

#: What a restaurant id may look like (also enforced on the WebSocket's ``restaurant_id``).
RESTAURANT_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
#: What a guest or table id may look like, in a path or a body (the service makes ``guest-<32 hex>``).
ENTITY_ID_PATTERN = r"^[A-Za-z0-9_-]{1,48}$"


def _space_class() -> str:
    """What ``str.strip()`` removes, as the inside of a regex class of ``\\uXXXX`` ranges.

    The OpenAPI document says "not blank" with the very characters the server strips (they are all
    below U+3001).
    """
    codes = [code for code in range(0x3001) if chr(code).isspace()]
    ranges: list[list[int]] = []
    for code in codes:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "".join(
        f"\\u{first:04x}" if first == last else f"\\u{first:04x}-\\u{last:04x}" for first, last in ranges
    )


_SPACES = _space_class()


@dataclass(frozen=True, slots=True)
class Text:
    """The last annotation of every string the API accepts: refuses what no database can store.

    A NUL character (PostgreSQL's ``text`` cannot hold one) gets ``string_nul_character`` and an unpaired
    surrogate (not encodable as UTF-8, so neither SQLite nor PostgreSQL nor a JSON response can carry it)
    gets ``string_unpaired_surrogate``, both 422 with the field's location, on every database. The rule is
    also written into the OpenAPI document (a ``pattern``), so clients and schemathesis see it.

    Args:
        strip: remove surrounding whitespace (after the length limits, which count what was sent).
        blank: whether an empty or all-whitespace string is accepted (``False``: ``string_too_short``).
    """

    strip: bool = False
    blank: bool = True

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        # Storability is checked before anything else, so a NUL or a surrogate gets its own error type
        # whatever other constraints the string has; stripping comes after the length limits.
        return core_schema.no_info_before_validator_function(
            _storable, core_schema.no_info_after_validator_function(self._tidy, handler(source))
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        # A constraint's own pattern (the ids') already admits only printable ASCII.
        if "pattern" not in json_schema:
            no_nul = r"[^\x00]*"
            json_schema["pattern"] = f"^{no_nul}$" if self.blank else f"^{no_nul}[^\\x00{_SPACES}]{no_nul}$"
        return json_schema

    def _tidy(self, value: str) -> str:
        if self.strip:
            value = value.strip()
        if not self.blank and not value.strip():
            # The type a plain ``min_length=1`` gave once stripped, which clients may already test for.
            raise PydanticCustomError(
                "string_too_short", "String should have at least 1 character", {"min_length": 1}
            )
        return value


def _storable(value: object) -> object:
    if isinstance(value, str):
        if "\x00" in value:
            raise PydanticCustomError(
                "string_nul_character", "String must not contain the NUL character (U+0000)"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError(
                "string_unpaired_surrogate", "String must not contain an unpaired surrogate (U+D800-U+DFFF)"
            ) from None
    return value


RestaurantId = Annotated[str, StringConstraints(pattern=f"^{RESTAURANT_ID_PATTERN}$"), Text()]
EntityId = Annotated[str, StringConstraints(pattern=ENTITY_ID_PATTERN), Text()]
GuestName = Annotated[str, StringConstraints(min_length=1, max_length=100), Text(strip=True, blank=False)]
PartySize = Annotated[int, Field(ge=1, le=50)]
Phone = Annotated[str, StringConstraints(max_length=32), Text(strip=True)]
Notes = Annotated[str, StringConstraints(max_length=500), Text()]
TableName = Annotated[str, StringConstraints(min_length=1, max_length=64), Text(strip=True, blank=False)]
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
    if value is None:
        raise PydanticCustomError("null_not_allowed", "Field may not be null")
    return value


def _omittable_schema(schema: dict[str, Any]) -> None:
    # The field is ``X | None`` for the code, ``X`` for the client: drop the null branch and the default.
    schema.pop("default", None)
    branches = [branch for branch in schema.pop("anyOf", ()) if branch != {"type": "null"}]
    if len(branches) == 1:
        schema.update(branches[0])
    elif branches:
        schema["anyOf"] = branches


_T = TypeVar("_T")

#: A field of a partial update that may be left out but not sent as ``null`` (``None`` means "not sent").
#: The OpenAPI document shows the field's own type, neither nullable nor with a ``null`` default.
Omittable = Annotated[
    _T | None,
    BeforeValidator(_not_null),
    Field(default=None, json_schema_extra=_omittable_schema),
]


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

    status: Omittable[GuestStatus] = None
    table_id: EntityId | None = None
    guest_name: Omittable[GuestName] = Field(default=None, alias="guestName")
    party_size: Omittable[PartySize] = Field(default=None, alias="partySize")
    phone: Phone | None = None
    notes: Notes | None = None

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

    status: Omittable[TableStatus] = None
    guest_id: EntityId | None = None
    name: Omittable[TableName] = None
    capacity: Omittable[Capacity] = None

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

    restaurant_id: RestaurantId
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


class NotFoundBody(BaseModel):
    """Body of a 404: the guest or table id the restaurant does not have."""

    detail: str
    entity: Literal["guest", "table"]
    id: str
    #: Set when the id came from an operation of an atomic transaction.
    operation_index: int | None = None


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


# -- devices: direct messages and presence -------------------------------------------------------------

MessageText = Annotated[str, StringConstraints(min_length=1, max_length=500), Text(strip=True, blank=False)]


class DeviceMessageCreate(_Request):
    """Body of ``POST /restaurants/{rid}/devices/{device_id}/messages``."""

    text: MessageText


class DeviceMessageResult(BaseModel):
    """A direct message was published on the device's channel (whether the device is online or not)."""

    channel: str
    seq: int


class OnlineDevice(BaseModel):
    """One connection of a device at the restaurant (a device with two pages open is listed twice)."""

    device: str | None
    name: str | None
    connection: str


class OnlineDeviceList(BaseModel):
    """Who is subscribed to the restaurant's channel on protocol 2, in join order (capped)."""

    restaurant_id: str
    count: int
    devices: list[OnlineDevice]
    truncated: bool
