"""Objects for ``rtbroadcast schema MODULE:ATTR`` to point at, in tests/test_cli.py."""

from __future__ import annotations

from typing import Any, Literal

from rtbroadcast import Broadcaster, Event
from rtbroadcast.schema import ChannelSpec, asyncapi_document


class PingPong(Event):
    """A ball crossed the net."""

    type: Literal["cli_target.ping_pong"] = "cli_target.ping_pong"
    side: str


broadcaster = Broadcaster("memory://")
SPEC = ChannelSpec("/beeps?room={room}", name="beeps", parameters={"room": "The room."}, events=[PingPong])
NOT_A_SOURCE = 42


def make_document() -> dict[str, Any]:
    return asyncapi_document(SPEC, events=[PingPong], title="Made")
