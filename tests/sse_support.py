"""A Server-Sent Events client for tests: a real HTTP streaming request (httpx), parsed per the SSE spec."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from .support import MS


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its ``data`` (lines joined) and the last event id at that point."""

    data: str
    id: str | None
    #: Whether this event's own block set the id (an ``id:`` line).
    has_id: bool

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


class SSEStream:
    """Reads events from an open streaming response; comments (``: ping``) are kept apart."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.last_event_id: str | None = None
        self.comments: list[str] = []
        self.retry: int | None = None
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 5_000 * MS) -> SSEEvent:
        """Return the next event; fail after ``timeout`` seconds; ``EOFError`` when the stream ended."""
        async with asyncio.timeout(timeout):
            data: list[str] = []
            has_id = False
            while True:
                try:
                    line = await anext(self._lines)
                except StopAsyncIteration:
                    raise EOFError("the stream ended") from None
                if line == "":
                    if data:
                        return SSEEvent("\n".join(data), self.last_event_id, has_id)
                    has_id = False
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "data":
                    data.append(value)
                elif field == "id" and "\x00" not in value:
                    self.last_event_id = value
                    has_id = True
                elif field == "retry" and value.isdigit():
                    self.retry = int(value)

    async def next_json(self, timeout: float = 5_000 * MS) -> dict[str, Any]:
        return (await self.next(timeout)).json()

    async def until_end(self, timeout: float = 5_000 * MS) -> list[SSEEvent]:
        """Read every event until the server ends the stream."""
        events: list[SSEEvent] = []
        with contextlib.suppress(EOFError):
            while True:
                events.append(await self.next(timeout))
        return events


@contextlib.asynccontextmanager
async def open_sse(
    http: httpx.AsyncClient, url: str, *, last_event_id: str | None = None
) -> AsyncIterator[SSEStream]:
    """Open an SSE stream (failing unless it answers 200 ``text/event-stream``)."""
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    async with http.stream("GET", url, headers=headers, timeout=10_000 * MS) as response:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"SSE request answered {response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SSEStream(response)
