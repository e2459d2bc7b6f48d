"""JSON Schema and AsyncAPI export: valid against the official AsyncAPI 3.0.0 schema, true to the wire."""

from __future__ import annotations

import json
from typing import Any, Literal, NotRequired

import jsonschema
import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

from rtbroadcast import Broadcaster, ConfigurationError, Event
from rtbroadcast.events import with_seq
from rtbroadcast.protocol import (
    ErrorFrame,
    Pong,
    ResyncRequired,
    Welcome,
    decode_client_frame,
    decode_server_frame,
    encode_server_frame,
)
from rtbroadcast.schema import (
    ASYNCAPI_VERSION,
    ChannelSpec,
    asyncapi_document,
    event_schema,
    event_schemas,
    protocol_schemas,
)

from .asyncapi_support import ASYNCAPI_SCHEMA, asyncapi_errors


class Line(BaseModel):
    sku: str
    quantity: int = 1


class ParcelShipped(Event):
    """A parcel left the warehouse."""

    type: Literal["schema_test.parcel_shipped"] = "schema_test.parcel_shipped"
    parcel_id: str
    lines: list[Line]
    note: str | None = None


class LossDetails(TypedDict):
    where: str
    insured: NotRequired[bool]


class ParcelLost(Event):
    type: Literal["schema_test.parcel_lost"] = "schema_test.parcel_lost"
    parcel_id: str
    details: LossDetails


EVENTS = [ParcelShipped, ParcelLost]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _documents() -> list[dict[str, Any]]:
    return [
        asyncapi_document(
            ChannelSpec(
                "/realtime?shop_id={shop_id}",
                name="shop",
                parameters={"shop_id": "The shop whose parcels to follow."},
                query={"token": "A signed device token."},
                title="Shop events",
                sse_address="/realtime/sse",
                security={
                    "token": {"type": "httpApiKey", "name": "token", "in": "query"},
                    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                },
            ),
            events=EVENTS,
            title="Parcels",
            version="2.1.0",
            servers={"local": "ws://127.0.0.1:8000", "production": "wss://example.com/api"},
        ),
        asyncapi_document(Broadcaster("memory://", heartbeat_interval=10), events=EVENTS),
        asyncapi_document(
            [ChannelSpec("/a/{x}", name="a", events=[ParcelShipped]), ChannelSpec(None, name="b")],
            events=EVENTS,
        ),
    ]


def test_the_vendored_schema_is_asyncapi_3_0_0() -> None:
    assert json.loads(ASYNCAPI_SCHEMA.read_text())["properties"]["asyncapi"]["const"] == ASYNCAPI_VERSION


@pytest.mark.parametrize("document", _documents(), ids=["spec", "broadcaster", "two-channels"])
def test_asyncapi_document_is_valid_asyncapi_3(document: dict[str, Any]) -> None:
    assert asyncapi_errors(document) == []
    # The official schema does not follow $refs inside the document; check that every one resolves.
    for ref in _refs(document):
        assert _resolve(document, ref) is not None
    for operation in document["operations"].values():
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/")
    json.dumps(document)  # serialisable as is


def test_the_validator_rejects_a_broken_document() -> None:
    document = _documents()[0]
    document["operations"]["shop.send"]["action"] = "publish"  # AsyncAPI 2 spelling
    document["channels"]["shop"]["bindings"]["ws"]["method"] = "PUT"
    assert len(asyncapi_errors(document)) == 2


def test_asyncapi_document_describes_channels_messages_and_operations() -> None:
    document = _documents()[0]
    channel = document["channels"]["shop"]
    # AsyncAPI 3.0: "Query parameters and fragments SHALL NOT be used, instead use bindings to define them."
    assert channel["address"] == "/realtime"
    assert "parameters" not in channel  # shop_id is a query parameter, not part of the address
    query = channel["bindings"]["ws"]["query"]["properties"]
    assert set(query) == {"shop_id", "token", "epoch", "last_seq"}
    assert query["shop_id"]["description"] == "The shop whose parcels to follow."
    assert set(channel["messages"]) == {
        "schema_test.parcel_shipped",
        "schema_test.parcel_lost",
        "welcome",
        "pong",
        "error",
        "resync_required",
        "ping",
    }
    assert document["operations"]["shop.send"]["action"] == "send"
    assert document["operations"]["shop.receivePing"]["action"] == "receive"
    assert document["servers"]["production"] == {"host": "example.com", "protocol": "wss", "pathname": "/api"}
    assert document["x-rtbroadcast"]["close_codes"]["4001"] == "SLOW_CONSUMER"
    observed = document["x-rtbroadcast"]["observed_close_codes"]
    assert observed == {"1006": "ABNORMAL_CLOSURE", "1012": "SERVICE_RESTART"}
    shipped = document["components"]["messages"]["schema_test.parcel_shipped"]
    assert shipped["summary"] == "A parcel left the warehouse."
    assert "summary" not in document["components"]["messages"]["schema_test.parcel_lost"]


@pytest.mark.parametrize("document", _documents(), ids=["spec", "broadcaster", "two-channels"])
def test_no_address_holds_a_query(document: dict[str, Any]) -> None:
    for channel in document["channels"].values():
        assert channel["address"] is None or not set("?#") & set(channel["address"]), channel["address"]


def test_the_security_schemes_are_described() -> None:
    document = _documents()[0]
    schemes = document["components"]["securitySchemes"]
    assert schemes["token"] == {"type": "httpApiKey", "name": "token", "in": "query"}
    assert schemes["bearer"]["scheme"] == "bearer"
    for name in ("shop.send", "shop.receivePing", "shop_sse.send"):
        refs = [ref["$ref"] for ref in document["operations"][name]["security"]]
        assert refs == ["#/components/securitySchemes/token", "#/components/securitySchemes/bearer"]
    # A query API key is a query parameter too, even where the spec's ``query`` does not list it.
    spec = ChannelSpec("/x", security={"key": {"type": "httpApiKey", "name": "api_key", "in": "query"}})
    bare = asyncapi_document(spec, events=EVENTS)
    assert asyncapi_errors(bare) == []
    assert "api_key" in bare["channels"]["broadcast"]["bindings"]["ws"]["query"]["properties"]
    assert "securitySchemes" not in _documents()[1]["components"]


def test_the_sse_endpoint_is_described() -> None:
    document = _documents()[0]
    sse = document["channels"]["shop_sse"]
    assert sse["address"] == "/realtime/sse"
    assert set(sse["messages"]) == {
        "schema_test.parcel_shipped",
        "schema_test.parcel_lost",
        "welcome",
        "resync_required",
    }
    assert "Last-Event-ID" in sse["description"]
    operation = document["operations"]["shop_sse.send"]
    assert operation["action"] == "send"
    http = operation["bindings"]["http"]
    assert http["method"] == "GET"
    assert set(http["query"]["properties"]) == {"shop_id", "token", "epoch", "last_seq"}
    # SSE is served over HTTP, on the WebSocket servers' hosts; each channel names its own servers.
    servers = document["servers"]
    assert servers["local-http"] == {"host": "127.0.0.1:8000", "protocol": "http"}
    assert servers["production-http"] == {"host": "example.com", "protocol": "https", "pathname": "/api"}
    assert [ref["$ref"] for ref in sse["servers"]] == ["#/servers/local-http", "#/servers/production-http"]
    websocket = document["channels"]["shop"]["servers"]
    assert [ref["$ref"] for ref in websocket] == ["#/servers/local", "#/servers/production"]
    with pytest.raises(ConfigurationError, match="sse_address is a path"):
        asyncapi_document(ChannelSpec("/x", sse_address="/x/sse?a=b"), events=EVENTS)
    with pytest.raises(ConfigurationError, match="taken by the HTTP servers"):
        servers = {"a": "ws://a", "a-http": "ws://b"}
        asyncapi_document(ChannelSpec("/x", sse_address="/x/sse"), events=EVENTS, servers=servers)


def test_frame_schemas_are_named_so_generated_code_shadows_nothing() -> None:
    """Generators name classes after titles: ``Error`` would shadow a built-in, ``Ping`` an app's type."""
    document = _documents()[0]
    titles = {name: document["components"]["messages"][name]["title"] for name in protocol_schemas()}
    assert titles == {
        "welcome": "WelcomeFrame",
        "pong": "PongFrame",
        "error": "ErrorFrame",
        "resync_required": "ResyncRequiredFrame",
        "ping": "PingFrame",
    }
    for name, title in titles.items():
        ref = document["components"]["messages"][name]["payload"]["$ref"]
        assert ref == f"#/components/schemas/rtbroadcast.{title}"
        assert _resolve(document, ref)["title"] == title
        assert protocol_schemas()[name]["title"] == title


def test_broadcaster_document_leaves_the_address_unknown() -> None:
    document = _documents()[1]
    assert document["channels"]["broadcast"]["address"] is None
    assert document["components"]["messages"]["welcome"]["examples"][0]["payload"]["heartbeat_interval"] == 10


def test_a_channel_may_restrict_its_events() -> None:
    document = _documents()[2]
    assert "schema_test.parcel_lost" not in document["channels"]["a"]["messages"]
    assert "schema_test.parcel_lost" in document["channels"]["b"]["messages"]
    assert document["channels"]["a"]["parameters"] == {"x": {}}


def test_event_schema_matches_what_clients_receive() -> None:
    schema = event_schema(ParcelShipped)
    jsonschema.Draft202012Validator.check_schema(schema)
    event = ParcelShipped(parcel_id="p-1", lines=[Line(sku="A-7")])
    frame = json.loads(with_seq(event.to_json(), 3))
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    assert list(validator.iter_errors(frame)) == []
    assert set(schema["required"]) == {"type", "timestamp", "parcel_id", "lines", "note", "seq"}
    assert schema["properties"]["timestamp"]["format"] == "date-time"
    # Missing seq, a wrong type and a badly formatted timestamp are all caught.
    for broken in (
        {k: v for k, v in frame.items() if k != "seq"},
        {**frame, "type": "schema_test.parcel_lost"},
        {**frame, "timestamp": "2025-08-16 07:21:27"},
    ):
        assert list(validator.iter_errors(broken)), broken
    # Unknown fields are allowed: a service may add fields without breaking clients.
    assert list(validator.iter_errors({**frame, "added_later": 1})) == []


def test_typed_dict_keys_that_are_not_required_stay_optional() -> None:
    schema = event_schema(ParcelLost)
    assert schema["$defs"]["LossDetails"]["required"] == ["where"]
    validator = jsonschema.Draft202012Validator(schema)
    frame = json.loads(with_seq(ParcelLost(parcel_id="p", details={"where": "depot"}).to_json(), 1))
    assert list(validator.iter_errors(frame)) == []


def test_event_schemas_are_keyed_by_type() -> None:
    schemas = event_schemas(EVENTS)
    assert list(schemas) == ["schema_test.parcel_shipped", "schema_test.parcel_lost"]
    assert schemas["schema_test.parcel_shipped"]["$defs"]["Line"]["required"] == ["sku", "quantity"]
    assert "schema_test.parcel_lost" in event_schemas()  # the default registry holds every model defined


def test_protocol_schemas_accept_what_the_protocol_module_encodes() -> None:
    schemas = protocol_schemas()
    assert set(schemas) == {"welcome", "pong", "error", "resync_required", "ping"}
    frames = {
        "welcome": Welcome("room:1", "e1", 0, 25.0),
        "pong": Pong("2025-08-16T07:21:27.177385Z"),
        "error": ErrorFrame("malformed_frame", "frame is not valid JSON"),
        "resync_required": ResyncRequired("history_trimmed", "e1", 12),
    }
    for name, frame in frames.items():
        validator = jsonschema.Draft202012Validator(schemas[name], format_checker=jsonschema.FormatChecker())
        assert list(validator.iter_errors(json.loads(encode_server_frame(frame)))) == [], name
    ping = {"type": "ping"}
    decode_client_frame(json.dumps(ping))
    assert list(jsonschema.Draft202012Validator(schemas["ping"]).iter_errors(ping)) == []


def test_protocol_message_examples_decode_and_validate() -> None:
    document = _documents()[0]
    for name in ("welcome", "pong", "error", "resync_required", "ping"):
        message = document["components"]["messages"][name]
        schema = _resolve(document, message["payload"]["$ref"])
        for example in message["examples"]:
            assert list(jsonschema.Draft202012Validator(schema).iter_errors(example["payload"])) == []
            text = json.dumps(example["payload"])
            if name == "ping":
                decode_client_frame(text)
            else:
                decode_server_frame(text)


def test_bad_input_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="server URL"):
        asyncapi_document(ChannelSpec("/x"), events=EVENTS, servers={"bad": "http://example.com"})
    with pytest.raises(ConfigurationError, match="do not appear"):
        asyncapi_document(ChannelSpec("/x", parameters={"y": "?"}), events=EVENTS)
    with pytest.raises(ConfigurationError, match="unique"):
        asyncapi_document([ChannelSpec("/x"), ChannelSpec("/y")], events=EVENTS)
    with pytest.raises(ConfigurationError, match="Event subclasses"):
        asyncapi_document(ChannelSpec("/x"), events=[dict])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="no default for 'type'"):
        event_schema(Event)


def test_protocol2_schemas_accept_what_the_protocol_module_encodes_and_refuse_what_it_refuses() -> None:
    from rtbroadcast import ProtocolError
    from rtbroadcast.protocol import (
        ChannelEvent,
        ErrorFrameV2,
        EventFrame,
        PresenceJoin,
        PresenceMember,
        PresenceSnapshot,
        ResumePoint,
        Subscribe,
        Subscribed,
        Unsubscribe,
        Unsubscribed,
        WelcomeV2,
        encode_client_frame,
    )
    from rtbroadcast.schema import protocol2_schemas

    schemas = protocol2_schemas()
    member = PresenceMember("c1", None, {"name": "x"})
    server = {
        "welcome": WelcomeV2(25.0, "c7f3"),
        "subscribed": Subscribed("r1", "room:1", "e", 3, True, PresenceSnapshot(1, (member,))),
        "unsubscribed": Unsubscribed(None, "room:1", "server"),
        "error": ErrorFrameV2(None, "forbidden", "no", "room:1"),
        "event": ChannelEvent("room:1", EventFrame("x", 4, {"a": 1})),
        "resync_required": ResyncRequired("epoch_changed", "e", 0, "room:1"),
        "presence_join": PresenceJoin("room:1", member),
    }
    for name, frame in server.items():
        validator = jsonschema.Draft202012Validator(schemas[name])
        assert list(validator.iter_errors(json.loads(encode_server_frame(frame)))) == [], name
    client = {
        "subscribe": Subscribe("r1", "room:1", ResumePoint("e", 2**63 - 1), True),
        "unsubscribe": Unsubscribe("r2", "room:1"),
    }
    for name, request in client.items():
        validator = jsonschema.Draft202012Validator(schemas[name])
        assert list(validator.iter_errors(json.loads(encode_client_frame(request)))) == [], name
    refused = [
        {"type": "subscribe", "id": "", "channel": "a"},
        {"type": "subscribe", "id": "r1", "channel": "a\u0000"},
        {"type": "subscribe", "id": "r1", "channel": "a", "epoch": "e"},
        {"type": "subscribe", "id": "r1", "channel": "a", "epoch": "e", "last_seq": -1},
        {"type": "subscribe", "id": "r1", "channel": "a", "presence": "yes"},
        {"type": "subscribe", "id": "x" * 65, "channel": "a"},
    ]
    validator = jsonschema.Draft202012Validator(schemas["subscribe"])
    for frame in refused:
        assert list(validator.iter_errors(frame)) != [], frame
        with pytest.raises(ProtocolError):
            decode_client_frame(json.dumps(frame), protocol=2)
