"""Typed event models and the registry that maps a wire ``type`` back to its model.

Declare an event by subclassing :class:`Event` with a ``type`` literal::

    class GuestCreated(Event):
        type: Literal["guest_created"] = "guest_created"
        restaurant_id: str
        data: dict[str, Any]

The model's JSON is exactly what clients receive, plus one added field, ``seq``. A class that could not
keep that promise is refused when it is defined, with :class:`~rtbroadcast.InvalidEvent` (see
:class:`Event` for the rules).
"""

from __future__ import annotations

import inspect
import json
import threading
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator
from pydantic_core import PydanticSerializationError, PydanticUndefined

from .errors import InvalidEvent
from .protocol import ENVELOPE_FIELDS, PROTOCOL_TYPES, check_event_payload, with_seq

__all__ = [
    "PROTOCOL_TYPES",
    "Event",
    "EventRegistry",
    "decode_event",
    "encode_event",
    "format_timestamp",
    "registry",
    "utc_now",
    "with_seq",
]


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def format_timestamp(value: datetime) -> str:
    """Format a datetime as UTC with microseconds and a ``Z``: ``2025-08-16T07:21:27.177385Z``.

    A naive datetime is taken to be UTC already.
    """
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventRegistry:
    """Map each wire ``type`` to the :class:`Event` subclass that declares it.

    Subclasses of :class:`Event` register themselves in the module-level :data:`registry` when they are
    defined. Defining two different classes for one ``type`` raises :class:`InvalidEvent`, since a subscriber
    could not tell which model to decode into; redefining the same class (a module reload) replaces it.
    """

    def __init__(self) -> None:
        self._models: dict[str, type[Event]] = {}
        self._lock = threading.Lock()

    def register(self, model: type[Event]) -> None:
        """Register ``model`` under the default of its ``type`` field.

        Raises:
            InvalidEvent: the type is reserved by the protocol or taken by another model.
        """
        event_type = _declared_type(model)
        if event_type is None:
            return
        if event_type in PROTOCOL_TYPES:
            raise InvalidEvent(
                f"{model.__qualname__} declares type {event_type!r}, which the wire protocol reserves "
                f"for its own frames ({', '.join(sorted(PROTOCOL_TYPES))}); choose another name"
            )
        with self._lock:
            existing = self._models.get(event_type)
            if existing is not None and _qualified(existing) != _qualified(model):
                raise InvalidEvent(
                    f"event type {event_type!r} is declared by both {_qualified(existing)} and "
                    f"{_qualified(model)}; each type needs exactly one model"
                )
            self._models[event_type] = model

    def get(self, event_type: str) -> type[Event] | None:
        """Return the model registered for ``event_type``, or ``None``."""
        return self._models.get(event_type)

    def types(self) -> dict[str, type[Event]]:
        """Return a copy of the type -> model mapping."""
        with self._lock:
            return dict(self._models)


def _qualified(model: type[Any]) -> str:
    return f"{model.__module__}.{model.__qualname__}"


def _declared_type(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("type")
    if field is None or not isinstance(field.default, str):
        return None
    return field.default


def _check_model(model: type[Event]) -> None:
    """Refuse a model whose JSON could not be an event as the wire protocol defines it.

    Raises:
        InvalidEvent: naming the class, the field and the fix.
    """
    name = model.__qualname__
    field = model.model_fields["type"]
    own = "type" in inspect.get_annotations(model)
    if own or field.default is not PydanticUndefined or field.default_factory is not None:
        declared = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
        value = declared[0] if len(declared) == 1 else None
        if not isinstance(value, str) or not value or field.default != value:
            raise InvalidEvent(
                f"{name}.type must be a Literal of one non-empty string with that string as its default, "
                f'like type: Literal["order_placed"] = "order_placed"; got {_annotation(field)}'
            )
    for label in ("alias", "serialization_alias", "validation_alias"):
        alias = getattr(field, label)
        if alias is not None and alias != "type":
            raise InvalidEvent(
                f"{name}.type has {label} {alias!r}: the wire key of an event's type is always 'type'"
            )
    if field.exclude:
        raise InvalidEvent(f"{name}.type is excluded from serialisation: clients need it")
    wire_names: list[tuple[str, str]] = []
    for field_name, info in model.model_fields.items():
        if field_name == "type":
            continue
        wire_names.append((field_name, field_name))
        wire_names.extend(
            (field_name, alias)
            for alias in (info.alias, info.serialization_alias, info.validation_alias)
            if isinstance(alias, str)
        )
    for field_name, computed in model.model_computed_fields.items():
        wire_names.append((field_name, field_name))
        if computed.alias is not None:
            wire_names.append((field_name, computed.alias))
    for field_name, wire in wire_names:
        if wire in ENVELOPE_FIELDS or wire == "type":
            how = "is named" if wire == field_name else f"has the alias {wire!r}, so it is named"
            whose = (
                "the server adds it to every event" if wire in ENVELOPE_FIELDS else "it is the event's type"
            )
            raise InvalidEvent(
                f"{name}.{field_name} {how} {wire!r} on the wire, which an event may not use: {whose}; "
                "rename it"
            )
    if model.model_config.get("extra") == "allow":
        raise InvalidEvent(
            f"{name} sets extra='allow': extra fields would go to clients unchecked (a 'seq' among them "
            "would clash with the server's); declare every field instead"
        )
    if model.model_config.get("ser_json_inf_nan") == "constants":
        raise InvalidEvent(
            f"{name} sets ser_json_inf_nan='constants', which writes NaN and Infinity: they are not JSON, "
            "and clients' parsers reject them; keep the default ('null') or use 'strings'"
        )


def _annotation(field: Any) -> str:
    annotation = field.annotation
    shown = getattr(annotation, "__name__", None) if get_origin(annotation) is None else None
    text = f"type: {shown if shown else repr(annotation)}".replace("typing.", "")
    if field.default is not PydanticUndefined:
        text += f" = {field.default!r}"
    elif field.default_factory is not None:
        text += " with a default_factory"
    return text


def _custom_serialization(model: type[Event]) -> bool:
    """Whether the model's JSON may differ from what its fields say (a custom serializer or to_json)."""
    decorators = model.__pydantic_decorators__
    return (
        bool(decorators.model_serializers)
        or any("type" in d.info.fields for d in decorators.field_serializers.values())
        or model.to_json is not Event.to_json
    )


#: The registry every :class:`Event` subclass registers in.
registry = EventRegistry()


class Event(BaseModel):
    """Base class of application events.

    Subclasses declare ``type`` as a ``Literal`` of one string with that string as its default, plus their
    own fields. ``timestamp`` is set in UTC when the event is created and serialised as
    ``2025-08-16T07:21:27.177385Z``. Unknown fields are rejected, so a typo fails at the publisher instead
    of surprising every client.

    A subclass that does not declare ``type`` is a base for other events (fields they share) and cannot be
    published itself. Defining a subclass raises :class:`~rtbroadcast.InvalidEvent` when:

    - ``type`` is declared as anything but ``Literal["name"] = "name"`` (``type: str = "a"``, two strings,
      no default, a default that differs), has an alias other than ``"type"``, or is excluded;
    - the type is one the protocol reserves, or another class already declares it;
    - a field or computed field is named ``seq`` or ``type``, or has one of them as an alias: ``seq`` is
      the server's, added to every event;
    - the model sets ``extra="allow"`` or ``ser_json_inf_nan="constants"``.
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    timestamp: datetime = Field(default_factory=utc_now)

    _registry: ClassVar[EventRegistry] = registry
    # Set per class when it is defined: the type it declares (None for a base class), and whether its JSON
    # is checked at every publish because a custom serializer shapes it.
    __rtbroadcast_type__: ClassVar[str | None] = None
    __rtbroadcast_check_json__: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _check_model(cls)
        cls.__rtbroadcast_type__ = _declared_type(cls)
        cls.__rtbroadcast_check_json__ = _custom_serialization(cls)
        cls._registry.register(cls)

    @field_validator("timestamp")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @field_serializer("timestamp")
    def _format_timestamp(self, value: datetime) -> str:
        return format_timestamp(value)

    def to_json(self) -> str:
        """Serialise the event to the compact JSON clients receive (without ``seq``)."""
        return self.model_dump_json()


def encode_event(event: Event) -> str:
    """Return the JSON text :meth:`Broadcaster.publish` sends for ``event`` (without ``seq``).

    The model's rules were checked when its class was defined, so the text is not parsed again, unless a
    custom serializer shapes it: then it is checked like :meth:`Broadcaster.publish_json`'s payloads.

    Raises:
        InvalidEvent: ``event`` is not an :class:`Event`; its class declares no ``type`` (a base class, or
            ``Event`` itself); its ``type`` was changed after it was built; it cannot be serialised (a
            string with a lone surrogate, say); or a custom serializer produced JSON that breaks the rules
            of :func:`~rtbroadcast.protocol.check_event_payload`.
    """
    if not isinstance(event, Event):
        what = f"the class {event.__qualname__}" if isinstance(event, type) else type(event).__name__
        raise InvalidEvent(f"an event must be an instance of an Event subclass, not {what}")
    model = type(event)
    declared = model.__rtbroadcast_type__
    if declared is None:
        raise InvalidEvent(
            f"{model.__qualname__} declares no type, so clients could not tell its events apart; publish "
            'an instance of a subclass that declares type: Literal["name"] = "name"'
        )
    if event.type != declared:
        raise InvalidEvent(
            f"{model.__qualname__} event has type {event.type!r}, but its class declares {declared!r}"
        )
    try:
        text = event.to_json()
    except PydanticSerializationError as exc:
        raise InvalidEvent(f"{model.__qualname__} event cannot be serialised: {exc}") from None
    if model.__rtbroadcast_check_json__:
        text = check_event_payload(text)
    return text


def decode_event(
    text: str | bytes, *, events: EventRegistry | None = None
) -> tuple[Event | dict[str, Any], int | None]:
    """Decode an event as delivered to clients into ``(event, seq)``.

    The event comes back as its registered model; an event whose ``type`` no model declares comes back as a
    plain ``dict``. ``seq`` is ``None`` when the text carries none.

    Raises:
        InvalidEvent: the text is not a JSON object with a string ``type``, or it does not validate against
            the model registered for its type.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"event is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise InvalidEvent("event must be a JSON object with a string 'type'")
    seq = data.pop("seq", None)
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
        raise InvalidEvent(f"event seq must be an integer, not {seq!r}")
    model = (events or registry).get(data["type"])
    if model is None:
        return data, seq
    try:
        return model.model_validate(data), seq
    except ValidationError as exc:
        raise InvalidEvent(
            f"event of type {data['type']!r} does not match {model.__qualname__}: {exc}"
        ) from exc
