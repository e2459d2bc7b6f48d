"""Event models: timestamps, the type registry, encode once with seq."""

from __future__ import annotations

import itertools
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import pytest
from pydantic import ConfigDict, Field, ValidationError, computed_field

from rtbroadcast import Event, InvalidEvent, decode_event, format_timestamp
from rtbroadcast.events import with_seq


class TableUpdated(Event):
    type: Literal["table_updated_test"] = "table_updated_test"
    restaurant_id: str
    table_id: str
    data: dict[str, Any]


def test_timestamp_is_utc_with_microseconds_and_z() -> None:
    event = TableUpdated(restaurant_id="r", table_id="t", data={"id": "t"})
    body = json.loads(event.to_json())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", body["timestamp"])
    assert body == {
        "type": "table_updated_test",
        "timestamp": body["timestamp"],
        "restaurant_id": "r",
        "table_id": "t",
        "data": {"id": "t"},
    }


def test_timestamp_formatting() -> None:
    assert (
        format_timestamp(datetime(2025, 8, 16, 7, 21, 27, 177385, tzinfo=UTC))
        == "2025-08-16T07:21:27.177385Z"
    )
    plus_two = datetime(2025, 8, 16, 9, 21, 27, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(plus_two) == "2025-08-16T07:21:27.000005Z"


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        TableUpdated(restaurant_id="r", table_id="t", data={}, tabel="typo")  # type: ignore[call-arg]


def test_decode_returns_the_registered_model_and_seq() -> None:
    event = TableUpdated(restaurant_id="r", table_id="t", data={"status": "occupied"})
    decoded, seq = decode_event(with_seq(event.to_json(), 7))
    assert seq == 7
    assert decoded == event
    assert isinstance(decoded, TableUpdated)


def test_decode_unknown_type_gives_a_dict() -> None:
    decoded, seq = decode_event('{"type": "nobody_declared_this", "x": 1, "seq": 2}')
    assert decoded == {"type": "nobody_declared_this", "x": 1}
    assert seq == 2


def test_decode_errors_are_typed() -> None:
    with pytest.raises(InvalidEvent):
        decode_event("not json")
    with pytest.raises(InvalidEvent):
        decode_event('{"no_type": 1}')
    with pytest.raises(InvalidEvent):
        decode_event('{"type": "table_updated_test", "seq": "x"}')
    with pytest.raises(InvalidEvent, match="does not match"):
        decode_event('{"type": "table_updated_test", "restaurant_id": 5}')


def test_reserved_and_duplicate_types_are_refused() -> None:
    with pytest.raises(InvalidEvent, match="reserves"):

        class Welcome(Event):
            type: Literal["welcome"] = "welcome"

    with pytest.raises(InvalidEvent, match="declared by both"):

        class Again(Event):
            type: Literal["table_updated_test"] = "table_updated_test"


def test_with_seq_appends_without_parsing() -> None:
    assert with_seq('{"type":"a"}', 3) == '{"type":"a","seq":3}'
    assert with_seq("{}", 1) == '{"seq":1}'
    assert json.loads(with_seq('{"type":"a","data":{"x":[1,2]}}', 9))["seq"] == 9


# -- the rules an Event subclass must follow, checked when it is defined -----------------------------------


_names = itertools.count()


def _define(name: str, namespace: dict[str, Any], annotations: dict[str, Any], base: type = Event) -> type:
    """Define an Event subclass from parts, as a class statement would."""
    return type(name, (base,), {"__annotations__": annotations, "__module__": __name__, **namespace})


@pytest.mark.parametrize(
    ("annotation", "namespace"),
    [
        pytest.param(str, {"type": "rule_str"}, id="str-with-default"),
        pytest.param(Literal["rule_two_a", "rule_two_b"], {"type": "rule_two_a"}, id="two-strings"),
        pytest.param(Literal["rule_no_default"], {}, id="no-default"),
        pytest.param(Literal["rule_x"], {"type": "rule_y"}, id="other-default"),
        pytest.param(Literal[1], {"type": 1}, id="not-a-string"),
        pytest.param(Literal[""], {"type": ""}, id="empty"),
        pytest.param(
            Literal["rule_factory"], {"type": Field(default_factory=lambda: "rule_factory")}, id="factory"
        ),
        pytest.param(str, {}, id="redeclared-str"),
    ],
)
def test_type_must_be_a_literal_of_one_string_with_that_default(
    annotation: Any, namespace: dict[str, Any]
) -> None:
    with pytest.raises(InvalidEvent, match=r"Bad\.type must be a Literal of one non-empty string") as caught:
        _define("Bad", namespace, {"type": annotation})
    assert 'type: Literal["order_placed"] = "order_placed"' in str(caught.value)


@pytest.mark.parametrize(
    ("annotations", "namespace", "message"),
    [
        pytest.param({"seq": int}, {"seq": 3}, r"Bad\.seq is named 'seq' on the wire", id="field-seq"),
        pytest.param(
            {"n": int},
            {"n": Field(3, alias="seq")},
            r"Bad\.n has the alias 'seq', so it is named 'seq'",
            id="alias-seq",
        ),
        pytest.param(
            {"n": int},
            {"n": Field(3, serialization_alias="seq")},
            r"Bad\.n has the alias 'seq'",
            id="serialization-alias-seq",
        ),
        pytest.param(
            {"n": int},
            {"n": Field(3, validation_alias="seq")},
            r"Bad\.n has the alias 'seq'",
            id="validation-alias-seq",
        ),
        pytest.param(
            {"kind": str},
            {"kind": Field("k", serialization_alias="type")},
            r"Bad\.kind has the alias 'type'.*it is the event's type",
            id="alias-type",
        ),
        pytest.param(
            {},
            {"seq": computed_field(property(lambda self: 1), return_type=int)},
            r"Bad\.seq is named 'seq' on the wire",
            id="computed-seq",
        ),
        pytest.param(
            {},
            {"n": computed_field(property(lambda self: 1), return_type=int, alias="seq")},
            r"Bad\.n has the alias 'seq'",
            id="computed-alias-seq",
        ),
        pytest.param(
            {"type": Literal["rule_alias"]},
            {"type": Field("rule_alias", serialization_alias="kind")},
            r"Bad\.type has serialization_alias 'kind'",
            id="type-aliased",
        ),
        pytest.param(
            {"type": Literal["rule_excluded"]},
            {"type": Field("rule_excluded", exclude=True)},
            r"Bad\.type is excluded",
            id="type-excluded",
        ),
        pytest.param(
            {},
            {"model_config": ConfigDict(extra="allow")},
            r"Bad sets extra='allow'",
            id="extra-allow",
        ),
        pytest.param(
            {},
            {"model_config": ConfigDict(ser_json_inf_nan="constants")},
            r"Bad sets ser_json_inf_nan='constants'",
            id="nan-constants",
        ),
    ],
)
def test_models_whose_json_would_clash_with_the_envelope_are_refused(
    annotations: dict[str, Any], namespace: dict[str, Any], message: str
) -> None:
    # Each class gets a type of its own, so that the old code, which accepted them, registered no clash.
    event_type = f"rule_clash_{next(_names)}"
    full_annotations = {"type": Literal[event_type], **annotations}
    full_namespace = {"type": event_type, **namespace}
    with pytest.raises(InvalidEvent, match=message):
        _define("Bad", full_namespace, full_annotations)
