"""The sans-I/O wire protocol: round trips, and any input gives a frame or the documented error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtbroadcast import (
    ConfigurationError,
    FrameTooLarge,
    InvalidEvent,
    InvalidFrame,
    MalformedFrame,
    ProtocolError,
    UnknownMessageType,
)
from rtbroadcast.protocol import (
    CloseCode,
    ErrorFrame,
    EventFrame,
    Ping,
    Pong,
    ResumePoint,
    ResyncRequired,
    Welcome,
    check_event_fields,
    check_event_payload,
    decode_client_frame,
    decode_server_frame,
    encode_client_frame,
    encode_server_frame,
    parse_resume_point,
    with_seq,
)

text = st.text(max_size=40)
seqs = st.integers(min_value=0, max_value=2**63 - 1)
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
reserved = {"welcome", "pong", "error", "resync_required", "ping"}
event_types = text.filter(lambda t: t not in reserved)

server_frames = st.one_of(
    st.builds(
        Welcome,
        channel=text,
        epoch=text,
        seq=seqs,
        heartbeat_interval=st.floats(min_value=0.001, max_value=1e6),
        resumed=st.booleans(),
        protocol=st.integers(min_value=1, max_value=100),
    ),
    st.builds(Pong, timestamp=text),
    st.builds(ErrorFrame, code=text, message=text),
    st.builds(ResyncRequired, reason=text, epoch=text, seq=seqs),
    st.builds(
        EventFrame,
        type=event_types,
        seq=seqs,
        data=st.dictionaries(text.filter(lambda k: k not in ("type", "seq")), json_values, max_size=5),
    ),
)


@given(server_frames)
def test_server_frames_round_trip(frame: object) -> None:
    assert decode_server_frame(encode_server_frame(frame)) == frame  # type: ignore[arg-type]


def test_client_frames_round_trip() -> None:
    assert decode_client_frame(encode_client_frame(Ping())) == Ping()


@given(st.binary(max_size=200) | st.text(max_size=200))
def test_arbitrary_input_gives_a_frame_or_a_protocol_error(data: bytes | str) -> None:
    try:
        frame = decode_client_frame(data)
    except ProtocolError as exc:
        assert exc.code in {"malformed_frame", "frame_too_large", "unknown_type", "invalid_frame"}
    else:
        assert frame == Ping()


@given(json_values)
def test_arbitrary_json_gives_a_frame_or_a_protocol_error(value: object) -> None:
    try:
        decode_client_frame(json.dumps(value))
    except (MalformedFrame, UnknownMessageType):
        pass


def test_errors_are_typed_and_coded() -> None:
    with pytest.raises(MalformedFrame, match="not valid JSON"):
        decode_client_frame("{")
    with pytest.raises(MalformedFrame, match="JSON object"):
        decode_client_frame("[]")
    with pytest.raises(MalformedFrame, match="string 'type'"):
        decode_client_frame('{"type": 3}')
    with pytest.raises(MalformedFrame, match="UTF-8"):
        decode_client_frame(b'{"type": "\xff"}')
    with pytest.raises(UnknownMessageType, match="subscribe") as info:
        decode_client_frame('{"type": "subscribe"}')
    assert info.value.code == "unknown_type"
    with pytest.raises(FrameTooLarge) as too_large:
        decode_client_frame('{"type":"ping","pad":"' + "x" * 20000 + '"}')
    assert too_large.value.code == "frame_too_large"
    # Multi-byte characters count as bytes, not characters.
    with pytest.raises(FrameTooLarge):
        decode_client_frame('{"type":"ping","pad":"' + "é" * 5000 + '"}', max_size=8000)


def test_deep_nesting_is_rejected_not_crashing() -> None:
    with pytest.raises(MalformedFrame, match="nested too deeply"):
        decode_client_frame("[" * 8000 + "]" * 8000)


def test_decode_server_frame_checks_fields() -> None:
    with pytest.raises(InvalidFrame, match="'seq'"):
        decode_server_frame('{"type": "welcome", "channel": "c", "epoch": "e", "seq": "1"}')
    with pytest.raises(InvalidFrame, match="'seq'"):
        decode_server_frame('{"type": "guest_created"}')
    with pytest.raises(InvalidFrame):
        decode_server_frame('{"type": "resync_required", "reason": "x", "epoch": "e", "seq": true}')


def test_resume_point_parsing() -> None:
    assert parse_resume_point({}) is None
    assert parse_resume_point({"epoch": "abc", "last_seq": "12"}) == ResumePoint("abc", 12)
    for bad in (
        {"epoch": "abc"},
        {"last_seq": "1"},
        {"epoch": "a", "last_seq": "-1"},
        {"epoch": "a", "last_seq": "1e3"},
        {"epoch": "a", "last_seq": "9" * 30},
        {"epoch": "a" * 200, "last_seq": "1"},
        {"epoch": "a", "last_seq": "١"},
    ):
        with pytest.raises(InvalidFrame):
            parse_resume_point(bad)


def test_close_codes_are_stable() -> None:
    # Clients hard-code these numbers: changing one is a breaking change of the wire protocol.
    assert {c.name: c.value for c in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "TRY_AGAIN_LATER": 1013,
        "SLOW_CONSUMER": 4001,
        "HEARTBEAT_TIMEOUT": 4002,
        "FORBIDDEN": 4003,
        "BAD_REQUEST": 4004,
        "RATE_LIMITED": 4008,
    }


# -- application events: what a publisher may send --------------------------------------------------------

event_objects = st.builds(
    lambda body, event_type, seq: {
        **body,
        **({} if event_type is _ABSENT else {"type": event_type}),
        **({} if seq is _ABSENT else {"seq": seq}),
    },
    st.dictionaries(text.filter(lambda k: k not in ("type", "seq")), json_values, max_size=4),
    st.just(_ABSENT := object()) | event_types | st.sampled_from(sorted(reserved)) | json_values,
    st.just(_ABSENT) | st.just(_ABSENT) | json_values,
)


@given(event_objects, st.integers(min_value=1, max_value=2**53), st.sampled_from(["", " ", "\n\t "]))
def test_a_payload_is_accepted_exactly_when_clients_can_read_it_as_an_event(
    obj: dict[str, object], seq: int, padding: str
) -> None:
    text = json.dumps(obj, ensure_ascii=False)
    event_type = obj.get("type")
    readable = isinstance(event_type, str) and event_type not in reserved | {""} and "seq" not in obj
    try:
        checked = check_event_payload(padding + text + padding)
    except InvalidEvent:
        assert not readable
        return
    assert readable
    assert checked == text
    assert json.loads(with_seq(checked, seq)) == {**obj, "seq": seq}
    assert decode_server_frame(with_seq(checked, seq)) == EventFrame(
        event_type, seq, {k: v for k, v in obj.items() if k != "type"}
    )


def _read_as_json_loads_would(text: str) -> object:
    """What ``json.loads`` makes of an event payload, with the rules of check_event_payload as hooks."""

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        if len({key for key, _ in pairs}) != len(pairs):
            raise ValueError("a key twice")
        return dict(pairs)

    def no_constant(name: str) -> object:
        raise ValueError(name)

    return json.loads(text, object_pairs_hook=unique, parse_constant=no_constant)


json_ish = st.text(alphabet='{}[]":,. \n\t0123456789eE+-truefalsnNIiyaT\\u\ufeff', max_size=40)


@given(json_ish | st.builds(lambda obj, tail: json.dumps(obj) + tail, event_objects, json_ish))
def test_the_payload_check_reads_json_as_the_json_module_does(text: str) -> None:
    # check_event_payload calls the json module's C scanner directly (no decoder per call): it must accept
    # and refuse exactly what json.loads does, and name JSON errors as json.loads would.
    try:
        expected: object = _read_as_json_loads_would(text.strip())
    except (ValueError, RecursionError) as exc:
        expected = exc
    readable = isinstance(expected, dict)
    if isinstance(expected, dict):
        try:
            check_event_fields(expected)
        except InvalidEvent:
            readable = False
    try:
        checked = check_event_payload(text)
    except InvalidEvent as exc:
        assert not readable
        if isinstance(expected, json.JSONDecodeError):
            assert str(exc) == f"event payload is not valid JSON: {expected}"
        return
    assert readable
    assert checked == text.strip()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("", "not valid JSON: Expecting value: line 1 column 1 \\(char 0\\)"),
        (" \n ", "not valid JSON: Expecting value"),
        ('{"type":"a"} {"type":"b"}', "not valid JSON: Extra data: line 1 column 14 \\(char 13\\)"),
        ('{"type":"a","seq":1}', "may not carry 'seq'"),
        ('{"kind":"a"}', "needs a non-empty string 'type' \\(got none\\)"),
        ('{"type":7}', "needs a non-empty string 'type' \\(got 7\\)"),
        ('{"type":""}', "needs a non-empty string 'type'"),
        ('{"type":"welcome"}', "'welcome' is reserved"),
        ("[1]", "must be a JSON object, not an array"),
        ('"text"', "must be a JSON object, not a string"),
        ('{"type":"a"', "not valid JSON"),
        ('{"type":"a","n":NaN}', "contains NaN"),
        ('{"type":"a","n":-Infinity}', "contains -Infinity"),
        ('{"type":"a","type":"b"}', "has the key 'type' twice"),
        ('{"type":"a","d":{"x":1,"x":2}}', "has the key 'x' twice"),
        ('{"type":"a","s":"\ud800"}', "not valid Unicode"),
        (b'{"type":"a"}', "must be str"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_a_payload_that_is_not_an_event_is_refused_naming_the_mistake(payload: object, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        check_event_payload(payload)


@pytest.mark.parametrize(
    ("epoch", "seq", "message"),
    [
        ("9f1c", "41", r"ResumePoint\.seq must be an integer >= 0, not '41'"),
        ("9f1c", -1, r"ResumePoint\.seq must be an integer >= 0"),
        ("9f1c", 4.0, r"ResumePoint\.seq must be an integer >= 0"),
        ("9f1c", True, r"ResumePoint\.seq must be an integer >= 0"),
        (None, 3, r"ResumePoint\.epoch must be a string"),
    ],
)
def test_a_resume_point_of_the_wrong_kind_is_refused_when_built(
    epoch: object, seq: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ResumePoint(epoch, seq)  # type: ignore[arg-type]
