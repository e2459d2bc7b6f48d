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


# -- protocol 2 -----------------------------------------------------------------------------------


def _protocol2_document() -> dict[str, Any]:
    security = {"token": {"type": "httpApiKey", "name": "token", "in": "query"}}
    return asyncapi_document(
        [
            ChannelSpec("/realtime?shop_id={shop_id}", name="shop", sse_address="/realtime/sse"),
            ChannelSpec(
                "/realtime?protocol=2",
                name="inbox",
                sse_address="/realtime/sse",
                security=security,
                protocol=2,
                events=[ParcelShipped],
            ),
        ],
        events=EVENTS,
        servers={"local": "ws://127.0.0.1:8000"},
    )


def _validates(document: dict[str, Any], message_key: str, frame: dict[str, Any]) -> bool:
    """Whether ``frame`` is valid against message ``message_key``'s payload, $refs resolved in ``document``."""
    ref = document["components"]["messages"][message_key]["payload"]["$ref"]
    schema = {"$ref": ref, "components": document["components"]}
    return not list(jsonschema.Draft202012Validator(schema).iter_errors(frame))


def test_a_protocol_2_channel_is_valid_asyncapi_and_its_refs_resolve() -> None:
    document = _protocol2_document()
    assert asyncapi_errors(document) == []
    for ref in _refs(document):
        assert _resolve(document, ref) is not None
    for operation in document["operations"].values():
        for message in operation["messages"]:
            assert message["$ref"].startswith(operation["channel"]["$ref"] + "/messages/")
    for channel in document["channels"].values():
        assert not set("?#") & set(channel["address"])


def test_a_protocol_2_channel_lists_protocol_2_frames_and_query() -> None:
    document = _protocol2_document()
    inbox = document["channels"]["inbox"]
    assert inbox["address"] == "/realtime"
    assert set(inbox["messages"]) == {
        "v2.event.schema_test.parcel_shipped",  # this channel's one event, in its event frame
        "v2.welcome",
        "v2.subscribed",
        "v2.unsubscribed",
        "v2.error",
        "v2.resync_required",
        "v2.presence_join",
        "v2.presence_leave",
        "pong",
        "v2.subscribe",
        "v2.unsubscribe",
        "ping",
    }
    query = inbox["bindings"]["ws"]["query"]
    assert set(query["properties"]) == {"protocol", "resume", "token"}
    assert query["properties"]["protocol"]["const"] == "2" and query["required"] == ["protocol"]
    received = document["operations"]["inbox.receive"]["messages"]
    assert [m["$ref"].rsplit("/", 1)[1] for m in received] == ["v2.subscribe", "v2.unsubscribe", "ping"]
    assert "inbox.receivePing" not in document["operations"]
    sent = {m["$ref"].rsplit("/", 1)[1] for m in document["operations"]["inbox.send"]["messages"]}
    assert "v2.subscribe" not in sent and "v2.event.schema_test.parcel_shipped" in sent
    # Its SSE stream: protocol 2's frames and positions, and the channel= parameters.
    sse = document["channels"]["inbox_sse"]
    assert "v2.presence_join" not in sse["messages"] and "v2.subscribed" in sse["messages"]
    assert "Last-Event-ID" in sse["description"] and "channel=" in sse["description"]
    http = document["operations"]["inbox_sse.send"]["bindings"]["http"]["query"]["properties"]
    assert set(http) == {"protocol", "resume", "channel", "token"}
    assert http["channel"]["type"] == "array"
    # The protocol-1 channel of the same document is unchanged.
    shop = document["channels"]["shop"]
    assert "v2.welcome" not in shop["messages"] and "welcome" in shop["messages"]
    assert set(shop["bindings"]["ws"]["query"]["properties"]) == {"shop_id", "epoch", "last_seq"}
    # The wrapped events are protocol frames: a generator makes no second type per event from them.
    wrapped = document["components"]["messages"]["v2.event.schema_test.parcel_shipped"]
    assert {"name": "protocol"} in wrapped["tags"]
    assert wrapped["title"] == "ParcelShippedEventFrame"
    # Every protocol schema is titled ...Frame, so that generated classes shadow no built-in (Error).
    protocol = {k: v for k, v in document["components"]["schemas"].items() if k.startswith("rtbroadcast.")}
    assert {"rtbroadcast.ErrorV2Frame", "rtbroadcast.WelcomeV2Frame", "rtbroadcast.SubscribedFrame"} <= set(
        protocol
    )
    assert all(schema["title"].endswith("Frame") for schema in protocol.values())


def test_a_protocol_1_document_has_no_protocol_2_parts() -> None:
    document = _documents()[0]
    assert not [key for key in document["components"]["messages"] if key.startswith("v2.")]
    assert not [key for key in document["components"]["schemas"] if "V2" in key or "EventFrame" in key]


def test_the_address_and_the_protocol_must_agree() -> None:
    with pytest.raises(ConfigurationError, match=r"protocol=2\)"):
        asyncapi_document(ChannelSpec("/realtime?protocol=2"), events=EVENTS)
    with pytest.raises(ConfigurationError, match=r"protocol=1\)"):
        asyncapi_document(ChannelSpec("/realtime?protocol=1", protocol=2), events=EVENTS)
    with pytest.raises(ConfigurationError, match="1 or 2"):
        asyncapi_document(ChannelSpec("/realtime?protocol=3", protocol=2), events=EVENTS)
    for bad in (3, "2", True):
        with pytest.raises(ConfigurationError, match="protocol must be 1 or 2"):
            ChannelSpec("/realtime", protocol=bad)  # type: ignore[arg-type]


async def test_the_frames_a_protocol_2_client_receives_match_the_channels_messages() -> None:
    """True to the wire: every frame of a real protocol-2 session matches one of the channel's messages,
    and an event frame the one of its own event."""
    import websockets

    from rtbroadcast.asgi import Deny

    from .support import broadcast_app, recv_json, serve

    document = _protocol2_document()
    inbox = document["channels"]["inbox"]
    client_keys = {"v2.subscribe", "v2.unsubscribe", "ping"}
    server_keys = set(inbox["messages"]) - client_keys

    def authorize(request: object, channel: str) -> bool | Deny:
        return Deny("not yours") if channel == "shop:other" else True

    broadcaster = Broadcaster("memory://")
    app = broadcast_app(broadcaster, channel=lambda request: ["shop:s1"], authorize=authorize)
    frames: list[dict[str, Any]] = []
    async with serve(app) as host, websockets.connect(f"ws://{host}/ws?protocol=2") as ws:
        frames.append(await recv_json(ws))  # welcome
        frames.append(await recv_json(ws))  # subscribed, by the server
        sent = [
            {"type": "subscribe", "id": "r1", "channel": "shop:s2", "epoch": "nope", "last_seq": 3},
            {"type": "subscribe", "id": "r2", "channel": "shop:other"},
            {"type": "ping"},
            {"type": "unsubscribe", "id": "r3", "channel": "shop:s2"},
        ]
        await ws.send(json.dumps(sent[0]))
        frames += [await recv_json(ws), await recv_json(ws)]  # subscribed, resync_required
        await broadcaster.publish("shop:s1", ParcelShipped(parcel_id="p1", lines=[Line(sku="a")]))
        frames.append(await recv_json(ws))  # the event
        for request in sent[1:]:
            await ws.send(json.dumps(request))
            frames.append(await recv_json(ws))  # error, pong, unsubscribed
    for request in sent:
        assert [key for key in client_keys if _validates(document, key, request)], request
    kinds = [frame["type"] for frame in frames]
    assert kinds == [
        "welcome",
        "subscribed",
        "subscribed",
        "resync_required",
        "event",
        "error",
        "pong",
        "unsubscribed",
    ]
    for frame in frames:
        matches = [key for key in server_keys if _validates(document, key, frame)]
        assert matches, frame
        if frame["type"] == "event":
            assert matches == ["v2.event.schema_test.parcel_shipped"]
    event = frames[4]
    event["event"]["parcel_id"] = 7  # what the event's own schema refuses, inside the frame
    assert not _validates(document, "v2.event.schema_test.parcel_shipped", event)


def test_protocol_2_message_examples_validate_and_decode() -> None:
    document = _protocol2_document()
    messages = document["components"]["messages"]
    with_examples = [key for key in messages if key.startswith("v2.") and "examples" in messages[key]]
    assert set(with_examples) >= {"v2.welcome", "v2.subscribed", "v2.error", "v2.subscribe"}
    for key in with_examples:
        for example in messages[key]["examples"]:
            assert _validates(document, key, example["payload"]), (key, example)
            text = json.dumps(example["payload"])
            if key in ("v2.subscribe", "v2.unsubscribe"):
                decode_client_frame(text, protocol=2)
            else:
                decode_server_frame(text)
