"""Reference (1): the ``websockets`` library's own server and ``websockets.broadcast()``.

This is the practical limit for a Python process: no ASGI, no framework, the frame is encoded once
and written to every transport synchronously. ``websockets`` only parses GET requests, so the
publish POST is served on a second port by a tiny keep-alive HTTP/1.1 handler built on
``httptools`` (the parser uvicorn uses), in the same process and event loop. It answers ``{}``
after calling ``broadcast()``.
"""

from __future__ import annotations

import asyncio
import signal
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

channels: dict[str, set[ServerConnection]] = {}

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def subscriber(websocket: ServerConnection) -> None:
    query = parse_qs(urlsplit(websocket.request.path if websocket.request else "").query)
    channel = query.get("channel", [""])[0]
    connections = channels.setdefault(channel, set())
    connections.add(websocket)
    try:
        async for _ in websocket:  # subscribers send nothing we need; keep reading until close
            pass
    finally:
        connections.discard(websocket)


class PublishProtocol(asyncio.Protocol):
    """``POST /publish/<channel>``: broadcast the body as a text frame, answer ``{}``."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(_BAD)
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if not self.url.startswith(b"/publish/"):
            self.transport.write(_NOT_FOUND)
            return
        connections = channels.get(self.url[9:].decode())
        if connections:
            broadcast(connections, b"".join(self.body).decode())
        self.transport.write(_OK)


async def main(port: int, http_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    http_server = await loop.create_server(PublishProtocol, "127.0.0.1", http_port, backlog=16384)
    # No keepalive pings, as for the uvicorn stacks (see bench/servers/common.py).
    async with serve(subscriber, "127.0.0.1", port, compression=None, ping_interval=None, backlog=16384):
        await stop
    http_server.close()


def run(port: int, http_port: int) -> None:
    uvloop.run(main(port, http_port))
