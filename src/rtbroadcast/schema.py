"""JSON Schema and AsyncAPI 3.0 documents for what clients receive: the events and the protocol frames.

Client developers generate models from these, or read them in an AsyncAPI viewer::

    from rtbroadcast.schema import ChannelSpec, asyncapi_document

    document = asyncapi_document(
        ChannelSpec(
            "/realtime?restaurant_id={restaurant_id}",
            parameters={"restaurant_id": "The restaurant whose events to receive."},
            sse_address="/realtime/sse",
            security={"token": {"type": "httpApiKey", "name": "token", "in": "query"}},
        ),
        events=[GuestCreated, GuestUpdated],
        title="Restaurant events",
        servers={"local": "ws://127.0.0.1:8000"},
    )

The channel's address in the document is the path alone: AsyncAPI 3.0 allows no query in an address, so
the query parameters (the channel's, the resume point's, an access token) are in the channel's WebSocket
binding (and in the SSE operation's HTTP binding).

An event's schema is its pydantic model's serialisation schema plus the ``seq`` field the server adds, with
every field required (the server always sends every field). Unknown fields are not forbidden: a later
version of a service may add fields, and clients should ignore those they do not know.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeAlias
from urllib.parse import urlsplit

from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic_core import core_schema

from ._version import __version__
from .broadcaster import Broadcaster
from .errors import ConfigurationError, ProtocolError
from .events import Event, EventRegistry, registry
from .protocol import (
    PROTOCOL_VERSION,
    CloseCode,
    ErrorFrame,
    ErrorFrameV2,
    ObservedCloseCode,
    Ping,
    Pong,
    ResumePoint,
    ResyncReason,
    ResyncRequired,
    Subscribe,
    Subscribed,
    SubscriptionErrorCode,
    Unsubscribe,
    Unsubscribed,
    UnsubscribeReason,
    Welcome,
    WelcomeV2,
    encode_client_frame,
    encode_server_frame,
)

__all__ = [
    "ASYNCAPI_VERSION",
    "JSON_SCHEMA_DIALECT",
    "ChannelSpec",
    "asyncapi_document",
    "event_schema",
    "event_schemas",
    "protocol2_schemas",
    "protocol_schemas",
]

#: The AsyncAPI version of the documents :func:`asyncapi_document` produces.
ASYNCAPI_VERSION: Final = "3.0.0"
#: The JSON Schema dialect of :func:`event_schema` and :func:`protocol_schemas`.
JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

#: The regular expression every event and pong ``timestamp`` matches.
TIMESTAMP_PATTERN: Final = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"

_EXAMPLE_TIMESTAMP: Final = "2025-08-16T07:21:27.177385Z"
_EXAMPLE_EPOCH: Final = "9f1c2b7a4d3e5f60"

#: Events to document: explicit models, a registry, or ``None`` for every model in the default registry.
Events: TypeAlias = Iterable[type[Event]] | EventRegistry | None


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """Describe one broadcast endpoint (one channel family) of an AsyncAPI document.

    Args:
        address: where clients connect, relative to the server: a path that may hold ``{parameters}``, and
            query parameters that name the channel, e.g. ``"/realtime?restaurant_id={restaurant_id}"``.
            The document puts the path in the channel's address and the query parameters in its
            WebSocket binding. ``None`` documents a channel whose address is not known up front.
        name: the channel's key in the document.
        parameters: a description of each ``{parameter}`` in ``address``.
        query: further query parameters clients send (name -> description), e.g. an access token.
        events: the events sent on this channel; ``None`` means the document's ``events``.
        title: a human-friendly title.
        description: a longer description (CommonMark).
        sse_address: the path where the same channel is served as Server-Sent Events, with the same query
            parameters (``broadcast_routes`` serves it at ``<path>/sse``); it is documented as a second
            channel, ``<name>_sse``. ``None`` leaves it out.
        security: how clients authenticate, by scheme name: AsyncAPI Security Scheme Objects such as
            ``{"type": "httpApiKey", "name": "token", "in": "query"}`` or ``{"type": "http", "scheme":
            "bearer", "bearerFormat": "JWT"}``. Any one of them is enough. A query API key is also listed
            among the query parameters.
        protocol: the wire protocol the channel is documented in: ``1`` (one channel per connection) or
            ``2`` (``?protocol=2``: subscriptions, events in ``event`` frames naming their channel). One
            endpoint serves both; document it twice, under two names, to describe both.

    Raises:
        ConfigurationError: ``protocol`` is neither 1 nor 2.
    """

    address: str | None
    name: str = "broadcast"
    parameters: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    events: Sequence[type[Event]] | None = None
    title: str | None = None
    description: str | None = None
    sse_address: str | None = None
    security: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    protocol: int = 1

    def __post_init__(self) -> None:
        if type(self.protocol) is not int or self.protocol not in (1, 2):
            raise ConfigurationError(f"protocol must be 1 or 2, not {self.protocol!r}")


class _WireSchema(GenerateJsonSchema):
    """Mark every serialised model field required: ``Event.to_json`` always writes all of them."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        # A TypedDict's NotRequired keys may be absent from the JSON, so those keep their own rule.
        if self.mode == "serialization" and field["type"] != "typed-dict-field":
            return field.get("serialization_exclude_if") is None
        return super().field_is_required(field, total)


def _models(events: Events) -> list[type[Event]]:
    if events is None:
        events = registry
    if isinstance(events, EventRegistry):
        return list(events.types().values())
    models = list(events)
    for model in models:
        if not (isinstance(model, type) and issubclass(model, Event)):
            raise ConfigurationError(f"events must be Event subclasses, not {model!r}")
    return models


def _event_type(model: type[Event]) -> str:
    default = model.model_fields["type"].default
    if not isinstance(default, str):
        raise ConfigurationError(
            f"{model.__qualname__} declares no default for 'type'; declare "
            "type: Literal['my_event'] = 'my_event' so clients can tell its events apart"
        )
    return default


def _wire_schemas(models: Sequence[type[Event]], ref_template: str) -> tuple[list[str], dict[str, Any]]:
    """Return each model's definition name and every definition, with the wire changes applied."""
    keys, top = models_json_schema(
        [(model, "serialization") for model in models],
        ref_template=ref_template,
        schema_generator=_WireSchema,
    )
    definitions: dict[str, Any] = top.get("$defs", {})
    prefix = ref_template.split("{model}")[0]
    names: list[str] = []
    for model in models:
        ref = keys[(model, "serialization")]["$ref"]
        name = ref[len(prefix) :]
        names.append(name)
        _to_wire(definitions[name], model)
    return names, definitions


def _to_wire(schema: dict[str, Any], model: type[Event]) -> None:
    """Turn a model's serialisation schema into the schema of the JSON a client receives."""
    # Clients must ignore fields they do not know, so that a service can add fields without breaking them.
    schema.pop("additionalProperties", None)
    properties: dict[str, Any] = schema.setdefault("properties", {})
    event_type = _event_type(model)
    properties["type"] = {"const": event_type, "type": "string", "description": "The event type."}
    stamp = model.model_fields.get("timestamp")
    if "timestamp" in properties and stamp is not None and stamp.annotation is datetime:
        # Event's serializer writes every ``timestamp`` datetime in the one documented format.
        properties["timestamp"] = _timestamp_schema("When the event was created (UTC).")
    properties["seq"] = {
        "type": "integer",
        "minimum": 1,
        "description": "The event's position in its channel's stream: 1 for the first event, then +1 each.",
    }
    required: list[str] = schema.setdefault("required", [])
    for name in ("type", "seq"):
        if name not in required:
            required.append(name)
    schema.setdefault("title", model.__name__)


def _timestamp_schema(description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "format": "date-time",
        "pattern": TIMESTAMP_PATTERN,
        "description": f"{description} Always UTC, microseconds, and a 'Z'.",
        "examples": [_EXAMPLE_TIMESTAMP],
    }


def event_schema(model: type[Event]) -> dict[str, Any]:
    """Return the JSON Schema (2020-12) of ``model``'s events as clients receive them, ``seq`` included.

    Raises:
        ConfigurationError: ``model`` is not an :class:`~rtbroadcast.Event` with a ``type`` default.
    """
    _models([model])
    names, definitions = _wire_schemas([model], "#/$defs/{model}")
    schema = definitions.pop(names[0])
    document: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT, **schema}
    if definitions:
        document["$defs"] = definitions
    return document


def event_schemas(events: Events = None) -> dict[str, dict[str, Any]]:
    """Return :func:`event_schema` of every event, keyed by event ``type``.

    Args:
        events: the event models; by default every model registered so far.

    Raises:
        ConfigurationError: an item is not an :class:`~rtbroadcast.Event` with a ``type`` default.
    """
    return {_event_type(model): event_schema(model) for model in _models(events)}


# -- protocol frames -------------------------------------------------------------------------------


def _protocol_error_codes() -> list[str]:
    codes: list[str] = []
    pending: list[type[ProtocolError]] = [ProtocolError]
    while pending:
        cls = pending.pop(0)
        if cls.code not in codes and cls is not ProtocolError:
            codes.append(cls.code)
        pending.extend(cls.__subclasses__())
    return codes


def _resync_reasons() -> list[str]:
    return [value for name, value in vars(ResyncReason).items() if name.isupper() and isinstance(value, str)]


def _frame(frame_type: str, title: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "title": title,
        "description": description,
        "properties": {"type": {"const": frame_type, "type": "string"}, **properties},
        "required": ["type", *properties],
    }


def _epoch(description: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": 128, "description": description}


def _protocol_frame_schemas() -> dict[str, dict[str, Any]]:
    # Titles end in "Frame": code generators name classes after them, and a class called ``Error`` or
    # ``Ping`` would shadow a built-in or an app's own type.
    reasons = ", ".join(f"`{r}`" for r in _resync_reasons())
    codes = ", ".join(f"`{c}`" for c in _protocol_error_codes())
    return {
        "welcome": _frame(
            "welcome",
            "WelcomeFrame",
            "First frame on every connection: where the client stands in the channel's stream. Every "
            "event that follows has a higher seq.",
            {
                "channel": {"type": "string", "description": "The channel this connection receives."},
                "epoch": _epoch("The stream's epoch; it changes when the stream's history is lost."),
                "seq": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "The last seq the client has: the resumed-from seq after a successful "
                    "resume, otherwise the channel's current seq (0: nothing published yet).",
                },
                "heartbeat_interval": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "Seconds between heartbeats; send a ping at about this interval.",
                },
                "resumed": {
                    "type": "boolean",
                    "description": "True when the requested resume succeeded: the missed events follow.",
                },
                "protocol": {
                    "type": "integer",
                    "minimum": 1,
                    "description": f"The wire protocol version (currently {PROTOCOL_VERSION}).",
                },
            },
        ),
        "pong": _frame(
            "pong",
            "PongFrame",
            "The answer to a client's ping.",
            {"timestamp": _timestamp_schema("The server's clock when it answered.")},
        ),
        "error": _frame(
            "error",
            "ErrorFrame",
            "A client frame was rejected. The connection stays open unless a close frame follows.",
            {
                "code": {
                    "type": "string",
                    "description": f"Machine-readable error code: {codes}. Treat unknown codes alike.",
                    "examples": _protocol_error_codes(),
                },
                "message": {"type": "string", "description": "A human-readable explanation."},
            },
        ),
        "resync_required": _frame(
            "resync_required",
            "ResyncRequiredFrame",
            "The missed events cannot be replayed: reload the snapshot over HTTP, then apply the events "
            "that follow (their seqs continue after this frame's seq, in this frame's epoch).",
            {
                "reason": {
                    "type": "string",
                    "description": f"Why: {reasons}. Treat unknown reasons alike.",
                    "examples": _resync_reasons(),
                },
                "epoch": _epoch("The stream's current epoch; remember it for the next resume."),
                "seq": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "The channel's current seq; the next event has a higher one.",
                },
            },
        ),
        "ping": _frame(
            "ping",
            "PingFrame",
            "Sent by the client to check the connection; the server answers with a pong.",
            {},
        ),
    }


def protocol_schemas() -> dict[str, dict[str, Any]]:
    """Return the JSON Schema (2020-12) of each protocol frame, keyed by its ``type``.

    The server sends ``welcome``, ``pong``, ``error`` and ``resync_required``; the client sends ``ping``.
    """
    return {
        name: {"$schema": JSON_SCHEMA_DIALECT, **schema} for name, schema in _protocol_frame_schemas().items()
    }


def _codes(cls: type) -> list[str]:
    return [value for name, value in vars(cls).items() if name.isupper() and isinstance(value, str)]


def _protocol2_frame_schemas() -> dict[str, dict[str, Any]]:
    # Keys are frame names, not types: protocol 2 sends two frames of type "welcome" and "error" that
    # differ from protocol 1's, and titles end in "V2Frame" where they would clash with protocol 1's.
    request_id = {
        "type": "string",
        "minLength": 1,
        "maxLength": 64,
        "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
        "description": "The client's request id: 1 to 64 characters, no control characters.",
    }
    answer_id = {
        "type": ["string", "null"],
        "description": "The request's id; null for what the server did itself, or for no valid id.",
    }
    channel = {
        "type": "string",
        "minLength": 1,
        "maxLength": 256,
        "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
        "description": "A channel name: 1 to 256 characters, no control characters.",
    }
    seq = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    member = {
        "type": "object",
        "properties": {
            "client": {"type": "string", "description": "The member's connection id (its welcome's)."},
            "identity": {"type": ["string", "null"], "description": "The connection's identity id, if any."},
            "info": {"type": "object", "description": "What the service shows of this member."},
        },
        "required": ["client", "identity", "info"],
    }
    codes = [*_protocol_error_codes(), *_codes(SubscriptionErrorCode)]
    subscribe = _frame(
        "subscribe",
        "SubscribeFrame",
        "Protocol 2, client: follow a channel, optionally resuming it (epoch and last_seq: both or neither).",
        {"id": request_id, "channel": channel},
    )
    subscribe["properties"].update(
        epoch=_epoch("Resume: the epoch of the last event applied on this channel."),
        last_seq={**seq, "description": "Resume: the seq of the last event applied on this channel."},
        presence={"type": "boolean", "description": "Ask for the channel's presence snapshot and frames."},
    )
    subscribe["dependentRequired"] = {"epoch": ["last_seq"], "last_seq": ["epoch"]}
    subscribed = _frame(
        "subscribed",
        "SubscribedFrame",
        "Protocol 2: a subscription started at epoch/seq (protocol 1's welcome, per channel); with "
        "resumed, the missed events follow.",
        {
            "id": answer_id,
            "channel": channel,
            "epoch": _epoch("The stream's epoch."),
            "seq": {
                **seq,
                "description": "The last seq the subscriber has; every event that follows is higher.",
            },
            "resumed": {"type": "boolean", "description": "True when the requested resume succeeded."},
        },
    )
    subscribed["properties"]["presence"] = {
        "type": "object",
        "description": "The channel's presence, when asked for and the channel has presence.",
        "properties": {
            "count": {"type": "integer", "minimum": 0},
            "members": {"type": "array", "items": member},
            "truncated": {"type": "boolean"},
        },
        "required": ["count", "members", "truncated"],
    }
    presence = {
        kind: _frame(
            kind,
            title,
            f"Protocol 2: a member {verb} the channel (only to subscriptions that asked for presence).",
            {"channel": channel, "member": member},
        )
        for kind, title, verb in (
            ("presence_join", "PresenceJoinFrame", "joined"),
            ("presence_leave", "PresenceLeaveFrame", "left"),
        )
    }
    return {
        "subscribe": subscribe,
        "unsubscribe": _frame(
            "unsubscribe",
            "UnsubscribeFrame",
            "Protocol 2, client: stop following a channel.",
            {"id": request_id, "channel": channel},
        ),
        "welcome": _frame(
            "welcome",
            "WelcomeV2Frame",
            "Protocol 2's first frame: no channel; the connection's id.",
            {
                "protocol": {"const": 2, "type": "integer"},
                "heartbeat_interval": {"type": "number", "exclusiveMinimum": 0},
                "connection": {"type": "string", "description": "This connection's opaque id."},
            },
        ),
        "subscribed": subscribed,
        "unsubscribed": _frame(
            "unsubscribed",
            "UnsubscribedFrame",
            "Protocol 2: a subscription ended; no event of the channel follows.",
            {
                "id": answer_id,
                "channel": channel,
                "reason": {"type": "string", "examples": _codes(UnsubscribeReason)},
            },
        ),
        "error": _frame(
            "error",
            "ErrorV2Frame",
            "Protocol 2: a request was rejected; the connection and its other subscriptions stay.",
            {
                "id": answer_id,
                "channel": {"type": ["string", "null"], "description": "The request's channel, if valid."},
                "code": {
                    "type": "string",
                    "description": "Machine-readable: " + ", ".join(f"`{c}`" for c in codes) + ".",
                    "examples": codes,
                },
                "message": {"type": "string"},
            },
        ),
        "event": _frame(
            "event",
            "EventV2Frame",
            "Protocol 2: an event of a channel, exactly its protocol-1 frame (with its own type and seq).",
            {
                "channel": channel,
                "event": {
                    "type": "object",
                    "properties": {"type": {"type": "string"}, "seq": {**seq, "minimum": 1}},
                    "required": ["type", "seq"],
                },
            },
        ),
        "resync_required": _frame(
            "resync_required",
            "ResyncRequiredV2Frame",
            "Protocol 2: protocol 1's resync_required, for one channel.",
            {
                "channel": channel,
                "reason": {"type": "string", "examples": _resync_reasons()},
                "epoch": _epoch("The stream's current epoch."),
                "seq": seq,
            },
        ),
        **presence,
    }


def protocol2_schemas() -> dict[str, dict[str, Any]]:
    """Return the JSON Schema (2020-12) of each protocol-2 frame, keyed by frame name.

    The client sends ``subscribe`` and ``unsubscribe`` (and protocol 1's ``ping``); the server sends
    ``welcome`` (protocol 2's), ``subscribed``, ``unsubscribed``, ``error`` (with the request id),
    ``event``, ``resync_required`` (with the channel), ``presence_join`` and ``presence_leave`` (and
    protocol 1's ``pong``). :func:`asyncapi_document` describes them on a ``ChannelSpec(...,
    protocol=2)``.
    """
    return {
        name: {"$schema": JSON_SCHEMA_DIALECT, **schema}
        for name, schema in _protocol2_frame_schemas().items()
    }


def _protocol_examples(heartbeat_interval: float) -> dict[str, list[dict[str, Any]]]:
    """Return examples of each protocol frame, encoded by the protocol module itself."""

    def example(name: str, text: str) -> dict[str, Any]:
        return {"name": name, "payload": json.loads(text)}

    return {
        "welcome": [
            example("fresh", encode_server_frame(Welcome("room:1", _EXAMPLE_EPOCH, 41, heartbeat_interval))),
            example(
                "resumed",
                encode_server_frame(Welcome("room:1", _EXAMPLE_EPOCH, 37, heartbeat_interval, resumed=True)),
            ),
        ],
        "pong": [example("pong", encode_server_frame(Pong(_EXAMPLE_TIMESTAMP)))],
        "error": [
            example(
                "unknown_type",
                encode_server_frame(
                    ErrorFrame("unknown_type", "unknown message type 'hello'; clients may send: ping")
                ),
            )
        ],
        "resync_required": [
            example(reason, encode_server_frame(ResyncRequired(reason, _EXAMPLE_EPOCH, 41)))
            for reason in _resync_reasons()
        ],
        "ping": [example("ping", encode_client_frame(Ping()))],
    }


def _protocol2_examples(heartbeat_interval: float) -> dict[str, list[dict[str, Any]]]:
    """Return examples of protocol 2's frames, encoded by the protocol module itself."""

    def example(name: str, text: str) -> dict[str, Any]:
        return {"name": name, "payload": json.loads(text)}

    channel, epoch = "user:42", _EXAMPLE_EPOCH
    return {
        "welcome": [
            example("welcome", encode_server_frame(WelcomeV2(heartbeat_interval, "c7f3a1e09b2d4f58")))
        ],
        "subscribed": [
            example("server-side", encode_server_frame(Subscribed(None, channel, epoch, 7))),
            example("resumed", encode_server_frame(Subscribed("r1", "room:1", epoch, 3, resumed=True))),
        ],
        "unsubscribed": [
            example("client", encode_server_frame(Unsubscribed("r2", "room:1"))),
        ],
        "error": [
            example(
                "forbidden",
                encode_server_frame(
                    ErrorFrameV2("r3", SubscriptionErrorCode.FORBIDDEN, "not your tenant", "tenant-b:orders")
                ),
            )
        ],
        "resync_required": [
            example(
                "history_trimmed",
                encode_server_frame(ResyncRequired(ResyncReason.HISTORY_TRIMMED, epoch, 41, "room:1")),
            )
        ],
        "subscribe": [
            example("fresh", encode_client_frame(Subscribe("r1", "room:1"))),
            example("resume", encode_client_frame(Subscribe("r1", "room:1", ResumePoint(epoch, 3)))),
        ],
        "unsubscribe": [example("unsubscribe", encode_client_frame(Unsubscribe("r2", "room:1")))],
    }


# -- AsyncAPI --------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"[^\w.\-]")
_PARAM_RE = re.compile(r"\{([^{}]+)\}")
_PROTOCOL_SERVER_FRAMES: Final = ("welcome", "pong", "error", "resync_required")
#: What an SSE stream carries besides events: no pongs and no errors, for the client sends nothing.
_SSE_PROTOCOL_FRAMES: Final = ("welcome", "resync_required")
_PROTOCOL_SCHEMA_PREFIX: Final = "rtbroadcast."
#: Protocol 2's frames the server sends on a WebSocket (with protocol 1's pong, and the events' frames).
_PROTOCOL2_SERVER_FRAMES: Final = (
    "welcome",
    "subscribed",
    "unsubscribed",
    "error",
    "resync_required",
    "presence_join",
    "presence_leave",
)
#: What a protocol-2 SSE stream carries besides the events' frames (presence needs a subscribe frame).
_PROTOCOL2_SSE_FRAMES: Final = ("welcome", "subscribed", "unsubscribed", "error", "resync_required")
_PROTOCOL2_CLIENT_FRAMES: Final = ("subscribe", "unsubscribe")
#: Protocol 2's message keys start with this, so that they keep clear of protocol 1's and the events'.
_PROTOCOL2_KEY_PREFIX: Final = "v2."
_PROTOCOL2_SUMMARIES: Final = {
    "welcome": "First frame on a protocol-2 connection: no channel; the connection's id.",
    "subscribed": "A subscription started (the answer to subscribe, or one the server made).",
    "unsubscribed": "A subscription ended; no event of its channel follows.",
    "error": "A request was refused; the connection and its other subscriptions stay.",
    "resync_required": "A channel's missed events cannot be replayed: reload its snapshot.",
    "presence_join": "A member joined a channel whose presence the client asked for.",
    "presence_leave": "A member left a channel whose presence the client asked for.",
    "subscribe": "The client follows a channel, optionally resuming it.",
    "unsubscribe": "The client stops following a channel.",
}
_FRAME_SUMMARIES: Final = {
    "welcome": "First frame on every connection: the client's place in the stream.",
    "pong": "The answer to a ping.",
    "error": "A client frame was rejected.",
    "resync_required": "Missed events cannot be replayed: reload the snapshot.",
    "ping": "The client checks the connection.",
}


def _component_key(name: str, taken: Iterable[str]) -> str:
    key = _KEY_RE.sub("_", name) or "_"
    taken = set(taken)
    candidate, n = key, 2
    while candidate in taken:
        candidate, n = f"{key}_{n}", n + 1
    return candidate


def _summary(model: type[Event]) -> str | None:
    doc = model.__doc__
    if not doc or doc is Event.__doc__:
        return None
    return doc.strip().splitlines()[0]


def _server(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigurationError(f"server URL must look like ws://host:port or wss://host, not {url!r}")
    server: dict[str, Any] = {"host": parts.netloc, "protocol": parts.scheme}
    if parts.path and parts.path != "/":
        server["pathname"] = parts.path
    return server


def _http_server(server: Mapping[str, Any]) -> dict[str, Any]:
    """Return the HTTP server on the same host as WebSocket ``server``, where SSE streams are served."""
    return {**server, "protocol": "https" if server["protocol"] == "wss" else "http"}


@dataclass(frozen=True, slots=True)
class _Address:
    """A :class:`ChannelSpec` address split as AsyncAPI 3.0 wants it: the path, and the query apart."""

    path: str | None
    #: The path's ``{parameters}``, in order.
    parameters: list[str]
    #: Query parameter name -> description.
    query: dict[str, str]


def _split_address(spec: ChannelSpec) -> _Address:
    if spec.address is None:
        return _Address(None, [], {})
    every = _PARAM_RE.findall(spec.address)
    unknown = set(spec.parameters) - set(every)
    if unknown:
        raise ConfigurationError(
            f"parameters {sorted(unknown)} do not appear in the address {spec.address!r}"
        )
    path, _, query_part = spec.address.partition("?")
    query: dict[str, str] = {}
    for pair in filter(None, query_part.split("&")):
        key, _, value = pair.partition("=")
        if key == "protocol":  # documented by the spec's protocol, not as a parameter of its own
            if value != str(spec.protocol):
                raise ConfigurationError(
                    f"the address {spec.address!r} asks for protocol {value!r}: document it with "
                    f"ChannelSpec(..., protocol={value})" + ("" if value in ("1", "2") else " (1 or 2)")
                )
            continue
        match = _PARAM_RE.fullmatch(value)
        query[key] = spec.parameters.get(match.group(1), "") if match else f"Always `{value}`."
    return _Address(path or "/", _PARAM_RE.findall(path), query)


def _path_parameters(spec: ChannelSpec, names: Sequence[str]) -> dict[str, Any]:
    return {name: {"description": spec.parameters[name]} if name in spec.parameters else {} for name in names}


def _query_schema(spec: ChannelSpec, address: _Address, *, sse: bool = False) -> dict[str, Any]:
    """Return the JSON Schema of the query string: the channel's parameters, credentials, the resume point."""
    described = {**address.query, **spec.query}
    for scheme in spec.security.values():
        if scheme.get("type") == "httpApiKey" and scheme.get("in") == "query":
            described.setdefault(str(scheme["name"]), str(scheme.get("description", "")))
    query: dict[str, Any] = {
        name: {"type": "string", **({"description": text} if text else {})}
        for name, text in described.items()
    }
    if spec.protocol == 2:
        return _protocol2_query_schema(query, sse=sse)
    query["epoch"] = {
        "type": "string",
        "description": "Resume: the epoch of the last event the client applied (from `welcome`, an "
        "event's stream, or `resync_required`). Send together with `last_seq`.",
    }
    query["last_seq"] = {
        "type": "string",
        "pattern": r"^\d{1,19}$",
        "description": "Resume: the seq of the last event the client applied, in decimal. Send together "
        "with `epoch`.",
    }
    return {"type": "object", "properties": query}


def _protocol2_query_schema(query: dict[str, Any], *, sse: bool) -> dict[str, Any]:
    query["protocol"] = {"type": "string", "const": "2", "description": "Protocol 2."}
    query["resume"] = {
        "type": "string",
        "pattern": "^[A-Za-z0-9_-]*$",
        "description": "Resume of the server-side subscriptions: base64url (no padding) of the compact "
        'JSON `{"<channel>": ["<epoch>", <seq>], ...}` with the last position applied on each. Other '
        "channels resume in their `subscribe` frames."
        + (" An `EventSource` sends the same token back as `Last-Event-ID`, which wins." if sse else ""),
    }
    if sse:
        query["channel"] = {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 256},
            "description": "Repeated (`channel=a&channel=b`): further channels for the stream besides "
            "the server-side ones, each asked of the service's authorization.",
        }
    return {"type": "object", "properties": query, "required": ["protocol"]}


def _channel(
    spec: ChannelSpec, address: _Address, message_keys: Sequence[str], heartbeat_interval: float | None
) -> dict[str, Any]:
    channel: dict[str, Any] = {"address": address.path}
    if spec.title:
        channel["title"] = spec.title
    description = spec.description or (
        _PROTOCOL2_DESCRIPTION
        if spec.protocol == 2
        else "A WebSocket connection subscribed to one rtbroadcast channel. The server sends `welcome` "
        "first, then the channel's events in `seq` order, with `pong`, `error` and `resync_required` "
        "frames as needed; the client sends `ping`. Resume after a reconnect with the `epoch` and "
        "`last_seq` query parameters. Refusals are close codes after the handshake: `4003` (not "
        "allowed), `4004` (bad request); see `x-rtbroadcast.close_codes`."
    )
    if heartbeat_interval is not None:
        description += f" Heartbeat interval: {heartbeat_interval:g} s."
    channel["description"] = description
    if address.parameters:
        channel["parameters"] = _path_parameters(spec, address.parameters)
    channel["messages"] = {key: {"$ref": f"#/components/messages/{key}"} for key in message_keys}
    channel["bindings"] = {
        "ws": {"method": "GET", "query": _query_schema(spec, address), "bindingVersion": "0.1.0"}
    }
    return channel


_PROTOCOL2_DESCRIPTION: Final = (
    "A protocol-2 WebSocket connection (`?protocol=2`): several subscriptions on one connection. The "
    "server sends `welcome` (no channel) first, then `subscribed` (`id` null) for each channel it "
    "subscribes the connection to itself, and answers each `subscribe` and `unsubscribe` with "
    "`subscribed`, `unsubscribed` or `error`, echoing the request's `id`. Each event arrives in an "
    "`event` frame that names its channel; per channel, events come in `seq` order and resume and "
    "`resync_required` work as in protocol 1. Resume the server-side channels with the `resume` query "
    "parameter, the others with `epoch` and `last_seq` in their `subscribe` frames. Refusals of the "
    "connection are close codes after the handshake: `4003` (not allowed), `4004` (bad request); see "
    "`x-rtbroadcast.close_codes`."
)
_SSE_DESCRIPTION: Final = (
    "The same channel as a Server-Sent Events stream (`text/event-stream`), for clients that cannot "
    "open a WebSocket: `GET` with the same query parameters. Each event is a `data:` line with "
    "`id: <epoch>:<seq>`, so an `EventSource` resumes by itself with the `Last-Event-ID` header (the "
    "`epoch` and `last_seq` query parameters work too); `welcome` and `resync_required` are `data:` "
    "lines without an id; a `: ping` comment comes after {heartbeat} without a frame. A stream the "
    "server ends finishes with a comment naming the close code and a `retry:` line. There is no "
    "client -> server direction; refusals are HTTP statuses: `403` (for `4003`), `503` (for `1013` and "
    "`1001`), `400` otherwise."
)
_PROTOCOL2_SSE_DESCRIPTION: Final = (
    "The same connection as a Server-Sent Events stream (`text/event-stream`), for clients that cannot "
    "open a WebSocket: `GET` with `protocol=2`, the server-side channels and those of repeated `channel=` "
    "query parameters. Each protocol-2 frame is a `data:` line; each one that moves a channel's position "
    "(`subscribed`, an event, `resync_required`, `unsubscribed`) has an `id:` holding every channel's "
    "position (the `resume` token), so an `EventSource` resumes every channel by itself with the "
    "`Last-Event-ID` header; a `: ping` comment comes after {heartbeat} without a frame. A channel the "
    "service denies gets an `error` frame and the stream goes on. A stream the server ends finishes with "
    "a comment naming the close code and a `retry:` line. There is no client -> server direction; a "
    "request none of whose channels may be subscribed is refused with `403` (`503` when the backend or "
    "a limit was the reason), other refusals with `400`."
)


def _sse_channel(
    spec: ChannelSpec, sse_path: str, message_keys: Sequence[str], heartbeat_interval: float | None
) -> dict[str, Any]:
    if "?" in sse_path:
        raise ConfigurationError(
            f"sse_address is a path, not {sse_path!r}: its query parameters are the address's"
        )
    heartbeat = "`heartbeat_interval` seconds"
    if heartbeat_interval is not None:
        heartbeat = f"{heartbeat_interval:g} s"
    channel: dict[str, Any] = {"address": sse_path}
    channel["title"] = f"{spec.title or spec.name}, as Server-Sent Events"
    template = _PROTOCOL2_SSE_DESCRIPTION if spec.protocol == 2 else _SSE_DESCRIPTION
    channel["description"] = template.format(heartbeat=heartbeat)
    names = _PARAM_RE.findall(sse_path)
    if names:
        channel["parameters"] = _path_parameters(spec, names)
    channel["messages"] = {key: {"$ref": f"#/components/messages/{key}"} for key in message_keys}
    return channel


def _security_refs(spec: ChannelSpec, schemes: dict[str, Any]) -> list[dict[str, str]]:
    """Register ``spec``'s security schemes in ``schemes``; return the references its operations carry."""
    refs = []
    for name, scheme in spec.security.items():
        if not name or _KEY_RE.search(name):
            raise ConfigurationError(f"a security scheme name uses letters, digits, '.', '-', '_': {name!r}")
        if schemes.setdefault(name, dict(scheme)) != dict(scheme):
            raise ConfigurationError(f"two different security schemes are named {name!r}")
        refs.append({"$ref": f"#/components/securitySchemes/{name}"})
    return refs


def _protocol2_messages(
    schemas: dict[str, Any], messages: dict[str, Any], heartbeat_interval: float
) -> dict[str, str]:
    """Add protocol 2's frames to ``schemas`` and ``messages``; return each frame's message key."""
    examples = _protocol2_examples(heartbeat_interval)
    keys: dict[str, str] = {}
    for name, schema in _protocol2_frame_schemas().items():
        if name == "event":  # each event gets a frame of its own (_event_frames)
            continue
        schema_name = _component_key(_PROTOCOL_SCHEMA_PREFIX + schema["title"], schemas)
        schemas[schema_name] = schema
        keys[name] = _component_key(_PROTOCOL2_KEY_PREFIX + name, messages)
        messages[keys[name]] = {
            "name": name,
            "title": schema["title"],
            "summary": _PROTOCOL2_SUMMARIES[name],
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{schema_name}"},
            **({"examples": examples[name]} if name in examples else {}),
            "tags": [{"name": "protocol"}, {"name": "protocol 2"}],
        }
    return keys


def _event_frames(
    models: Sequence[type[Event]],
    schema_names: Mapping[type[Event], str],
    schemas: dict[str, Any],
    messages: dict[str, Any],
) -> dict[type[Event], str]:
    """Add protocol 2's ``event`` frame of each model (the event inside, by reference); return their keys."""
    template = _protocol2_frame_schemas()["event"]
    keys: dict[type[Event], str] = {}
    for model in models:
        event_schema_name = schema_names[model]
        schema = json.loads(json.dumps(template))  # a deep copy
        schema["title"] = f"{event_schema_name}EventFrame"
        schema["description"] = (
            f"Protocol 2: a {model.__name__} event of the channel, as protocol 1 sends it."
        )
        schema["properties"]["event"] = {"$ref": f"#/components/schemas/{event_schema_name}"}
        frame_schema_name = _component_key(_PROTOCOL_SCHEMA_PREFIX + schema["title"], schemas)
        schemas[frame_schema_name] = schema
        event_type = _event_type(model)
        keys[model] = _component_key(f"{_PROTOCOL2_KEY_PREFIX}event.{event_type}", messages)
        messages[keys[model]] = {
            "name": event_type,
            "title": schema["title"],
            "summary": f"A {event_type} event, in protocol 2's event frame.",
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{frame_schema_name}"},
            "tags": [{"name": "protocol"}, {"name": "protocol 2"}],
        }
    return keys


def asyncapi_document(
    channels: Broadcaster | ChannelSpec | Sequence[ChannelSpec],
    events: Events = None,
    *,
    title: str = "rtbroadcast events",
    version: str = "1.0.0",
    description: str | None = None,
    servers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Return an AsyncAPI 3.0 document describing the channels, their events and the wire protocol.

    The document describes the server: on a protocol-1 channel it *sends* the events and the protocol
    frames ``welcome``, ``pong``, ``error`` and ``resync_required``, and *receives* the client's ``ping``;
    on a protocol-2 channel (``ChannelSpec(..., protocol=2)``) it sends protocol 2's frames (message keys
    ``v2.*``; each event in an ``event`` frame of its own, ``v2.event.<type>``) and receives
    ``subscribe``, ``unsubscribe`` and ``ping``. Serialise it with :func:`json.dumps`.

    Args:
        channels: one or more :class:`ChannelSpec`; or a :class:`~rtbroadcast.Broadcaster`, which documents
            one channel whose address is left unknown and uses the broadcaster's heartbeat interval.
        events: the event models; by default every model registered so far.
        title: the document's title.
        version: the version of the API described (not of rtbroadcast).
        description: a longer description (CommonMark).
        servers: server names mapped to WebSocket base URLs, e.g. ``{"local": "ws://127.0.0.1:8000"}``.

    Raises:
        ConfigurationError: a model, channel or server URL cannot be documented.
    """
    heartbeat: float | None = None
    if isinstance(channels, Broadcaster):
        heartbeat = channels.heartbeat_interval
        specs: list[ChannelSpec] = [ChannelSpec(None)]
    elif isinstance(channels, ChannelSpec):
        specs = [channels]
    else:
        specs = list(channels)
    if not specs:
        raise ConfigurationError("document at least one channel")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"channel names must be unique, not {names}")

    document_models = _models(events)
    all_models: list[type[Event]] = []
    for model in [*document_models, *(m for spec in specs for m in _models(spec.events or ()))]:
        if model not in all_models:
            all_models.append(model)
    schema_names, schemas = _wire_schemas(all_models, "#/components/schemas/{model}")

    messages: dict[str, Any] = {}
    model_keys: dict[type[Event], str] = {}
    for model, schema_name in zip(all_models, schema_names, strict=True):
        event_type = _event_type(model)
        key = _component_key(event_type, messages)
        model_keys[model] = key
        message: dict[str, Any] = {
            "name": event_type,
            "title": model.__name__,
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{schema_name}"},
        }
        summary = _summary(model)
        if summary:
            message["summary"] = summary
        messages[key] = message

    examples = _protocol_examples(heartbeat if heartbeat is not None else 25.0)
    for frame_type, schema in _protocol_frame_schemas().items():
        schema_name = _component_key(_PROTOCOL_SCHEMA_PREFIX + schema["title"], schemas)
        schemas[schema_name] = schema
        key = _component_key(frame_type, messages)
        if key != frame_type:  # pragma: no cover - event types may not use protocol names
            raise ConfigurationError(f"message name {frame_type!r} is taken by an event")
        messages[key] = {
            "name": frame_type,
            "title": schema["title"],
            "summary": _FRAME_SUMMARIES[frame_type],
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{schema_name}"},
            "examples": examples[frame_type],
            "tags": [{"name": "protocol"}],
        }

    frames2: dict[str, str] = {}
    event_frames: dict[type[Event], str] = {}
    if any(spec.protocol == 2 for spec in specs):
        frames2 = _protocol2_messages(schemas, messages, heartbeat if heartbeat is not None else 25.0)
        models2 = {
            model: None
            for spec in specs
            if spec.protocol == 2
            for model in (_models(spec.events) if spec.events is not None else document_models)
        }
        named = dict(zip(all_models, schema_names, strict=True))
        event_frames = _event_frames(list(models2), named, schemas, messages)

    document_servers = {name: _server(url) for name, url in (servers or {}).items()}
    http_servers: dict[str, Any] = {}
    if any(spec.sse_address is not None for spec in specs):
        http_servers = {f"{name}-http": _http_server(server) for name, server in document_servers.items()}
        if set(http_servers) & set(document_servers):
            raise ConfigurationError(
                f"server names {sorted(set(http_servers) & set(document_servers))} are "
                "taken by the HTTP servers added for SSE"
            )
    document_channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    security_schemes: dict[str, Any] = {}
    for spec in specs:
        channel_models = _models(spec.events) if spec.events is not None else document_models
        if spec.protocol == 2:
            event_keys = [event_frames[m] for m in channel_models]
            server_keys = [*event_keys, *(frames2[f] for f in _PROTOCOL2_SERVER_FRAMES), "pong"]
            client_keys = [*(frames2[f] for f in _PROTOCOL2_CLIENT_FRAMES), "ping"]
            sse_keys = [*event_keys, *(frames2[f] for f in _PROTOCOL2_SSE_FRAMES)]
            receive = ("receive", "Receive a client's subscribe, unsubscribe and ping frames; answer each.")
        else:
            event_keys = [model_keys[m] for m in channel_models]
            server_keys = [*event_keys, *_PROTOCOL_SERVER_FRAMES]
            client_keys = ["ping"]
            sse_keys = [*event_keys, *_SSE_PROTOCOL_FRAMES]
            receive = ("receivePing", "Receive a client's ping and answer it with a pong.")
        address = _split_address(spec)
        refs = _security_refs(spec, security_schemes)
        security: dict[str, Any] = {"security": refs} if refs else {}
        channel = _channel(spec, address, [*server_keys, *client_keys], heartbeat)
        if http_servers:  # the WebSocket channel is not served by the HTTP servers added for SSE
            channel["servers"] = [{"$ref": f"#/servers/{name}"} for name in document_servers]
        document_channels[spec.name] = channel
        channel_ref = {"$ref": f"#/channels/{spec.name}"}
        operations[f"{spec.name}.send"] = {
            "action": "send",
            "channel": channel_ref,
            "summary": "Send the channel's events in seq order, and the protocol's own frames.",
            "messages": [{"$ref": f"#/channels/{spec.name}/messages/{key}"} for key in server_keys],
            **security,
        }
        operations[f"{spec.name}.{receive[0]}"] = {
            "action": "receive",
            "channel": channel_ref,
            "summary": receive[1],
            "messages": [{"$ref": f"#/channels/{spec.name}/messages/{key}"} for key in client_keys],
            **security,
        }
        if spec.sse_address is not None:
            sse_name = f"{spec.name}_sse"
            if sse_name in names:
                raise ConfigurationError(
                    f"channel name {sse_name!r} is taken by the SSE channel of {spec.name!r}"
                )
            sse = _sse_channel(spec, spec.sse_address, sse_keys, heartbeat)
            if http_servers:
                sse["servers"] = [{"$ref": f"#/servers/{name}"} for name in http_servers]
            document_channels[sse_name] = sse
            operations[f"{sse_name}.send"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{sse_name}"},
                "summary": "Stream the channel's events in seq order, as Server-Sent Events.",
                "messages": [{"$ref": f"#/channels/{sse_name}/messages/{key}"} for key in sse_keys],
                "bindings": {
                    "http": {
                        "method": "GET",
                        "query": _query_schema(spec, address, sse=True),
                        "bindingVersion": "0.3.0",
                    }
                },
                **security,
            }

    info: dict[str, Any] = {
        "title": title,
        "version": version,
        "description": description
        or "Events and protocol frames of an rtbroadcast server. This document describes the server: it "
        "sends the events, and receives the client's pings.",
    }
    document: dict[str, Any] = {"asyncapi": ASYNCAPI_VERSION, "info": info}
    if document_servers:
        document["servers"] = {**document_servers, **http_servers}
    document["defaultContentType"] = "application/json"
    document["channels"] = document_channels
    document["operations"] = operations
    document["components"] = {"schemas": schemas, "messages": messages}
    if security_schemes:
        document["components"]["securitySchemes"] = security_schemes
    document["x-rtbroadcast"] = {
        "version": __version__,
        "protocol": PROTOCOL_VERSION,
        "close_codes": {str(int(code)): code.name for code in CloseCode},
        # What clients observe without rtbroadcast sending it (the network's 1006, uvicorn's 1012).
        "observed_close_codes": {str(int(code)): code.name for code in ObservedCloseCode},
    }
    return document
