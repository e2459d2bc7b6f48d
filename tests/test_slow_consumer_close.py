"""What a client that fell behind its queue bound really receives: a 4001 close frame, not a bare EOF."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette

from rtbroadcast import Broadcaster, QueueLimits
from rtbroadcast.asgi import channel_from_query
from rtbroadcast.starlette import lifespan, websocket_route
from rtbroadcast.uvicorn import WebSocketProtocol

from .support import StalledClient, serve

WS_PROTOCOL = "rtbroadcast.uvicorn:WebSocketProtocol"


def make_app(broadcaster: Broadcaster) -> Starlette:
    return Starlette(
        routes=[websocket_route("/ws", broadcaster, channel=channel_from_query("room"))],
        lifespan=lifespan(broadcaster),
    )


async def _stall_until_closed(broadcaster: Broadcaster, host: str) -> StalledClient:
    """Open a client that does not read, publish until the server drops it as a slow consumer."""
    client = await StalledClient.open(host, "/ws?room=s")
    payload = json.dumps({"type": "blob", "blob": "z" * 8000})
    async with asyncio.timeout(20):
        while broadcaster.connection_count("s") == 0:
            await asyncio.sleep(0.01)
        while broadcaster.stats().slow_consumers_closed == 0:
            await broadcaster.publish_json("s", payload)
            await asyncio.sleep(0)
    return client


async def test_a_stalled_reader_that_resumes_finds_a_4001_close_frame() -> None:
    # Keepalive pings on, as in production: before, the 4001 close waited behind flow control, so a client
    # that stayed stalled got uvicorn's keepalive ping timeout (1011) instead.
    broadcaster = Broadcaster("memory://", queue_limits=QueueLimits(max_messages=20, max_size=2**20))
    async with serve(
        make_app(broadcaster), ws=WS_PROTOCOL, ws_ping_interval=1.0, ws_ping_timeout=1.0
    ) as host:
        client = await _stall_until_closed(broadcaster, host)
        await asyncio.sleep(3)  # the reader stays stalled past the server's ping timeout (2 s)
        closed = await client.read_until_close()
        client.close()
    assert closed is not None, "the server ended the connection without a close frame (1006)"
    code, reason, texts = closed
    assert (code, reason) == (4001, "fell behind its outbound queue bound")
    assert texts > 0  # what the transport had already taken comes first


class ShortGrace(WebSocketProtocol):
    """The opt-in protocol with a short close timeout, so the grace is quick to test."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = 0.5


async def test_a_reader_that_never_resumes_is_cut_off_after_the_grace() -> None:
    broadcaster = Broadcaster("memory://", queue_limits=QueueLimits(max_messages=20, max_size=2**20))
    async with serve(make_app(broadcaster), ws=ShortGrace, ws_ping_interval=None) as host:
        client = await _stall_until_closed(broadcaster, host)
        await asyncio.sleep(3)  # the grace (0.5 s) with slack for a busy host
        # The server dropped its buffer (close frame included) and reset the connection: reading now
        # ends at once, where before it waited for a server that waited for this client.
        closed = await client.read_until_close(timeout=5)
        client.close()
    assert closed is None


async def test_without_the_protocol_class_a_stalled_reader_is_let_go_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The ASGI path (ws="auto", other servers): the close frame waits behind flow control. The endpoint
    # waits for it a bounded time, then returns; the server ends the connection without a close frame
    # (1006), as the docs say. Before, the handler waited for this client forever.
    monkeypatch.setattr("rtbroadcast._websocket.CLOSE_GRACE", 0.5)
    broadcaster = Broadcaster("memory://", queue_limits=QueueLimits(max_messages=20, max_size=2**20))
    async with serve(make_app(broadcaster), ws="auto", ws_ping_interval=None) as host:
        client = await _stall_until_closed(broadcaster, host)
        await asyncio.sleep(3)  # the grace (0.5 s) with slack for a busy host
        closed = await client.read_until_close(timeout=5)
        client.close()
    assert closed is None
