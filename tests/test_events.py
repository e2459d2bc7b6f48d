"""Event models: timestamps, the type registry, encode once with seq."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import pytest
from pydantic import ValidationError

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
