"""Protocol 2's frames, sans I/O: every client field validated, every server frame encoded and decoded."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtbroadcast import ProtocolError
from rtbroadcast.backends import Envelope
from rtbroadcast.errors import InvalidChannel, InvalidFrame, MalformedFrame, UnknownMessageType
from rtbroadcast.protocol import (
    ChannelEvent,
    ErrorFrameV2,
    EventFrame,
    Ping,
    PresenceJoin,
    PresenceLeave,
    PresenceMember,
    PresenceSnapshot,
    ResumePoint,
    ResyncRequired,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    WelcomeV2,
    decode_client_frame,
    decode_positions,
    decode_server_frame,
    encode_client_frame,
    encode_positions,
    encode_server_frame,
    event_frame,
    is_valid_channel,
    parse_protocol,
)


def decode2(frame: dict[str, Any] | str) -> Any:
    text = frame if isinstance(frame, str) else json.dumps(frame)
    return decode_client_frame(text, protocol=2)


def test_subscribe_and_unsubscribe_decode() -> None:
    assert decode2({"type": "subscribe", "id": "r1", "channel": "room:1"}) == Subscribe("r1", "room:1")
    frame = {"type": "subscribe", "id": "r2", "channel": "c", "epoch": "e", "last_seq": 41, "presence": True}
    assert decode2(frame) == Subscribe("r2", "c", ResumePoint("e", 41), True)
    assert decode2({"type": "unsubscribe", "id": "r3", "channel": "c", "extra": 1}) == Unsubscribe("r3", "c")
    assert decode2({"type": "ping"}) == Ping()


def test_protocol_1_still_knows_only_ping() -> None:
    with pytest.raises(UnknownMessageType) as caught:
        decode_client_frame('{"type":"subscribe","id":"r1","channel":"c"}')
    assert caught.value.message == "unknown message type 'subscribe'; clients may send: ping"
    assert caught.value.request_id is None


BAD_ID: list[object] = [None, 1, 1.5, True, [], {}, "", "x" * 65, "a\x00b", "a\nb", "a\x7fb", "\ud800"]


@pytest.mark.parametrize("request_id", BAD_ID, ids=repr)
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_a_request_without_a_valid_id_is_invalid_frame_with_id_null(kind: str, request_id: object) -> None:
    frame: dict[str, Any] = {"type": kind, "channel": "c"}
    if request_id is not None:
        frame["id"] = request_id
    with pytest.raises(InvalidFrame) as caught:
        decode2(frame)
    assert caught.value.code == "invalid_frame"
    assert caught.value.request_id is None


BAD_CHANNEL: list[object] = [None, 1, [], {}, "", "x" * 257, "a\x00b", "a\x1fb", "a\ud800", "\udfff"]


@pytest.mark.parametrize("channel", BAD_CHANNEL, ids=repr)
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_an_invalid_channel_is_invalid_channel_with_the_id(kind: str, channel: object) -> None:
    frame: dict[str, Any] = {"type": kind, "id": "r1"}
    if channel is not None:
        frame["channel"] = channel
    with pytest.raises(InvalidChannel) as caught:
        decode2(frame)
    assert caught.value.code == "invalid_channel"
    assert (caught.value.request_id, caught.value.channel) == ("r1", None)


@pytest.mark.parametrize(
    "fields",
    [
        {"epoch": "e"},
        {"last_seq": 1},
        {"epoch": "", "last_seq": 1},
        {"epoch": 5, "last_seq": 1},
        {"epoch": "x" * 129, "last_seq": 1},
        {"epoch": "\ud800", "last_seq": 1},
        {"epoch": "e", "last_seq": -1},
        {"epoch": "e", "last_seq": 2**63},
        {"epoch": "e", "last_seq": 1.0},
        {"epoch": "e", "last_seq": True},
        {"epoch": "e", "last_seq": "1"},
        {"presence": 1},
        {"presence": "yes"},
        {"presence": None},
    ],
    ids=repr,
)
def test_bad_subscribe_fields_are_invalid_frame_with_id_and_channel(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidFrame) as caught:
        decode2({"type": "subscribe", "id": "r1", "channel": "c", **fields})
    assert caught.value.code == "invalid_frame"
    assert (caught.value.request_id, caught.value.channel) == ("r1", "c")


def test_a_huge_number_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedFrame):
        decode2('{"type":"subscribe","id":"r1","channel":"c","epoch":"e","last_seq":' + "9" * 5000 + "}")


def test_an_unknown_type_on_protocol_2_echoes_a_valid_id() -> None:
    with pytest.raises(UnknownMessageType) as caught:
        decode2({"type": "publish", "id": "r9"})
    assert caught.value.request_id == "r9"
    assert "ping, subscribe, unsubscribe" in caught.value.message
    with pytest.raises(UnknownMessageType) as caught:
        decode2({"type": "publish", "id": "a\x00"})
    assert caught.value.request_id is None


def test_the_largest_valid_values_are_accepted() -> None:
    frame = {
        "type": "subscribe",
        "id": "i" * 64,
        "channel": "c" * 256,
        "epoch": "e" * 128,
        "last_seq": 2**63 - 1,
    }
    assert decode2(frame) == Subscribe("i" * 64, "c" * 256, ResumePoint("e" * 128, 2**63 - 1))


def test_parse_protocol() -> None:
    assert parse_protocol({}) == 1
    assert parse_protocol({"protocol": "1"}) == 1
    assert parse_protocol({"protocol": "2"}) == 2
    for value in ("3", "", "02", "2 ", "x" * 100):
        with pytest.raises(InvalidFrame):
            parse_protocol({"protocol": value})
    with pytest.raises(InvalidFrame) as caught:
        parse_protocol({"protocol": "3"})
    assert caught.value.message == "unsupported protocol '3'; this server speaks 1 and 2"


# -- fuzz: whatever arrives, a ProtocolError whose error frame can be sent, or a valid frame ------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ping", "pong", "x"]) | st.text(max_size=8)},
    optional={
        "id": st.text(max_size=70) | json_values,
        "channel": st.text(max_size=260) | json_values,
        "epoch": st.text(max_size=130) | json_values,
        "last_seq": st.integers(min_value=-5, max_value=2**64) | json_values,
        "presence": st.booleans() | json_values,
    },
)


def _check_decoded_or_refused(data: str | bytes) -> None:
    try:
        frame = decode_client_frame(data, protocol=2)
    except ProtocolError as exc:
        error = encode_server_frame(ErrorFrameV2(exc.request_id, exc.code, exc.message, exc.channel))
        error.encode("utf-8")  # sendable: no lone surrogate reaches the wire
        assert json.loads(error)["code"] == exc.code
        return
    assert isinstance(frame, Ping | Subscribe | Unsubscribe)
    if not isinstance(frame, Ping):
        assert is_valid_channel(frame.channel)
        (frame.id + frame.channel).encode("utf-8")
        assert decode_client_frame(encode_client_frame(frame), protocol=2) == frame


@settings(max_examples=400)
@given(request_like)
def test_fuzz_request_shaped_objects(obj: dict[str, Any]) -> None:
    _check_decoded_or_refused(json.dumps(obj))


@settings(max_examples=300)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_fuzz_any_text_or_bytes(data: str | bytes) -> None:
    _check_decoded_or_refused(data)


# -- server frames ------------------------------------------------------------------------------------

MEMBER = PresenceMember("c7f3", "device-1", {"name": "Host stand"})

SERVER_FRAMES = [
    WelcomeV2(25.0, "c7f3"),
    Subscribed("r2", "room:2", "9f1c", 41, True),
    Subscribed(None, "user:42", "e", 7, False),
    Subscribed("r4", "restaurant:R", "e", 3, False, PresenceSnapshot(2, (MEMBER,), True)),
    Unsubscribed("r3", "room:1", "client"),
    Unsubscribed(None, "restaurant:R", "server"),
    ErrorFrameV2("r5", "forbidden", "not your room", "room:9"),
    ErrorFrameV2(None, "malformed_frame", "frame is not valid JSON"),
    ChannelEvent("room:2", EventFrame("message_posted", 42, {"text": "hi"})),
    ResyncRequired("epoch_changed", "e", 0, "room:2"),
    PresenceJoin("restaurant:R", MEMBER),
    PresenceLeave("restaurant:R", PresenceMember("c8", None, {})),
]


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: type(f).__name__)
def test_server_frames_round_trip(frame: Any) -> None:
    text = encode_server_frame(frame)
    assert json.loads(text)["type"] in {
        "welcome",
        "subscribed",
        "unsubscribed",
        "error",
        "event",
        "resync_required",
        "presence_join",
        "presence_leave",
    }
    assert decode_server_frame(text) == frame


def test_wire_shapes_are_the_specs() -> None:
    assert encode_server_frame(WelcomeV2(25.0, "c7f3")) == (
        '{"type":"welcome","protocol":2,"heartbeat_interval":25.0,"connection":"c7f3"}'
    )
    assert encode_server_frame(ErrorFrameV2("r5", "forbidden", "no", "room:9")) == (
        '{"type":"error","id":"r5","channel":"room:9","code":"forbidden","message":"no"}'
    )
    assert encode_server_frame(ResyncRequired("epoch_changed", "e", 0, "room:2")) == (
        '{"type":"resync_required","channel":"room:2","reason":"epoch_changed","epoch":"e","seq":0}'
    )
    # Without a channel, protocol 1's bytes exactly.
    assert encode_server_frame(ResyncRequired("epoch_changed", "e", 0)) == (
        '{"type":"resync_required","reason":"epoch_changed","epoch":"e","seq":0}'
    )


@given(st.text(min_size=1, max_size=40).filter(is_valid_channel), st.integers(0, 2**63 - 1))
def test_the_wrapped_event_is_the_protocol_1_frame_unchanged(channel: str, seq: int) -> None:
    data = '{"type":"t","channel":"not the wrapper\'s","event":1,"seq":' + str(seq) + "}"
    wrapped = json.loads(event_frame(channel, data))
    assert wrapped == {"type": "event", "channel": channel, "event": json.loads(data)}
    envelope = Envelope(channel, seq, "e", data)
    assert envelope.protocol2_text() is envelope.protocol2_text()  # built once
    assert envelope.protocol2_text() == event_frame(channel, data)
    assert envelope == Envelope(channel, seq, "e", data)  # the cache is invisible to equality


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=20).filter(is_valid_channel),
        st.builds(ResumePoint, st.text(min_size=1, max_size=128), st.integers(0, 2**63 - 1)),
        max_size=8,
    )
)
def test_positions_token_round_trips(positions: dict[str, ResumePoint]) -> None:
    token = encode_positions(positions)
    assert token.isascii() and "=" not in token
    assert decode_positions(token) == positions


@pytest.mark.parametrize(
    "token",
    [
        "!!!",
        "e30",  # {} is fine, tested below
        "WzFd",  # [1]
        encode_positions({}) + "x",
        "eyJhIjpbImUiXX0",  # {"a":["e"]}
        "eyJhIjpbImUiLC0xXX0",  # {"a":["e",-1]}
        "eyJcdTAwMDAiOlsiZSIsMV19",  # {"\u0000":["e",1]}
        "x" * 70_000,
    ],
)
def test_bad_positions_tokens_are_invalid_frame(token: str) -> None:
    if token == "e30":
        assert decode_positions(token) == {}
        return
    with pytest.raises(InvalidFrame):
        decode_positions(token)
