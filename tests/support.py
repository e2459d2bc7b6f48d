"""Helpers for tests: a real uvicorn server on an ephemeral loopback port, and a WebSocket client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection


@contextlib.asynccontextmanager
async def serve(app: Any, **config: Any) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 and a free port, in this event loop; yield ``host:port``."""
    options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "lifespan": "on"}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("uvicorn did not start within 5 s")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """Receive one text frame and parse it, failing the test after ``timeout`` seconds."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    data: dict[str, Any] = json.loads(raw)
    return data


#: What :func:`connect` offers the server unless told otherwise: ``"deflate"`` (permessage-deflate, so
#: uvicorn sends every frame through ASGI) or ``None`` (no extension: frames go straight to the transport).
client_compression: str | None = "deflate"


async def connect(url: str, **kwargs: Any) -> ClientConnection:
    """Open a WebSocket client connection (a thin wrapper so tests read alike)."""
    kwargs.setdefault("compression", client_compression)
    return await websockets.connect(url, open_timeout=5, **kwargs)


class StalledClient:
    """A WebSocket client that completes the handshake and then never reads: the slowest reader possible.

    Its socket's receive buffer is kept small, so the server feels the backpressure soon.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, host: str, path: str) -> StalledClient:
        address, port = host.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (address, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
            if not chunk:
                raise ConnectionError("server closed during the handshake")
            response += chunk
        if not response.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {response!r}")
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    async def read_text_frames(self, count: int, timeout: float = 10.0) -> list[str]:
        """Read ``count`` unfragmented text frames (the server never masks nor fragments its frames)."""
        loop = asyncio.get_running_loop()
        buffer = b""

        async def need(size: int) -> bytes:
            nonlocal buffer
            while len(buffer) < size:
                chunk = await loop.sock_recv(self.sock, 65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buffer += chunk
            head, buffer = buffer[:size], buffer[size:]
            return head

        frames: list[str] = []
        async with asyncio.timeout(timeout):
            while len(frames) < count:
                first, second = await need(2)
                length = second & 0x7F
                if length == 126:
                    length = int.from_bytes(await need(2), "big")
                elif length == 127:
                    length = int.from_bytes(await need(8), "big")
                payload = await need(length)
                if first & 0x0F == 0x1:
                    frames.append(payload.decode())
        return frames

    async def read_until_close(self, timeout: float = 10.0) -> tuple[int, str, int] | None:
        """Read frames until a close frame: return its ``(code, reason, text frames before it)``.

        ``None`` means the server ended the TCP connection without a close frame (a client library
        reports that as 1006).
        """
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        texts = 0
        async with asyncio.timeout(timeout):
            while True:
                while True:  # parse every whole frame in the buffer
                    if len(buffer) < 2:
                        break
                    length, offset = buffer[1] & 0x7F, 2
                    if length == 126:
                        length, offset = int.from_bytes(buffer[2:4], "big"), 4
                    elif length == 127:
                        length, offset = int.from_bytes(buffer[2:10], "big"), 10
                    if len(buffer) < offset + length:
                        break
                    opcode, payload = buffer[0] & 0x0F, bytes(buffer[offset : offset + length])
                    del buffer[: offset + length]
                    if opcode == 0x8:
                        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                        return code, payload[2:].decode(), texts
                    texts += opcode == 0x1
                try:
                    chunk = await loop.sock_recv(self.sock, 1 << 20)
                except ConnectionResetError:
                    return None
                if not chunk:
                    return None
                buffer += chunk
