"""Typed event models and the registry that maps a wire ``type`` back to its model.

Declare an event by subclassing :class:`Event` with a ``type`` literal::

    class GuestCreated(Event):
        type: Literal["guest_created"] = "guest_created"
        restaurant_id: str
        data: dict[str, Any]

The model's JSON is exactly what clients receive, plus one added field, ``seq``.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator

from .errors import InvalidEvent

__all__ = [
    "PROTOCOL_TYPES",
    "Event",
    "EventRegistry",
    "decode_event",
    "format_timestamp",
    "registry",
    "utc_now",
    "with_seq",
]

#: ``type`` values the wire protocol uses for its own frames; an application event may not use them.
PROTOCOL_TYPES: frozenset[str] = frozenset({"welcome", "ping", "pong", "error", "resync_required"})


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


#: The registry every :class:`Event` subclass registers in.
registry = EventRegistry()


class Event(BaseModel):
    """Base class of application events.

    Subclasses declare ``type`` as a ``Literal`` with a default, plus their own fields. ``timestamp`` is set
    in UTC when the event is created and serialised as ``2025-08-16T07:21:27.177385Z``. Unknown fields are
    rejected, so a typo fails at the publisher instead of surprising every client.
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    timestamp: datetime = Field(default_factory=utc_now)

    _registry: ClassVar[EventRegistry] = registry

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
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


def with_seq(payload: str, seq: int) -> str:
    """Append ``"seq": seq`` to a JSON object's text without parsing it again.

    ``payload`` must be the text of a JSON object, as :meth:`Event.to_json` produces.
    """
    body = payload.rstrip()
    if body == "{}":
        return f'{{"seq":{seq}}}'
    return f'{body[:-1]},"seq":{seq}}}'


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
