"""Helpers shared by the example service's tests."""

from __future__ import annotations

import re
from typing import Any

from websockets.asyncio.client import ClientConnection

from tests.support import recv_json

#: The reference's timestamp format: UTC, microseconds, ``Z``.
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


async def welcome(ws: ClientConnection) -> dict[str, Any]:
    """Receive the welcome frame every connection starts with."""
    frame = await recv_json(ws)
    assert frame["type"] == "welcome", frame
    return frame


async def assert_nothing_queued(ws: ClientConnection) -> None:
    """Ping and check that the pong is the next frame: nothing was sent to ``ws`` before it."""
    await ws.send('{"type":"ping"}')
    frame = await recv_json(ws)
    assert frame["type"] == "pong", f"expected only a pong, got {frame}"
    assert TIMESTAMP.fullmatch(frame["timestamp"]), frame


def strip_envelope(event: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Check ``timestamp`` and ``seq`` of a received event; return the rest and its seq."""
    body = dict(event)
    timestamp = body.pop("timestamp")
    assert isinstance(timestamp, str), event
    assert TIMESTAMP.fullmatch(timestamp), event
    seq = body.pop("seq")
    assert isinstance(seq, int), event
    return body, seq
