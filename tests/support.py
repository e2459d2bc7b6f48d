"""Helpers for tests: one unit of time, one ``until()``, the suite's broadcast app, a real uvicorn server on an
ephemeral loopback port, and WebSocket clients.

Timeouts are written in :data:`MS` (``5_000 * MS``), never in bare seconds: on a slow machine
``RTB_TEST_TIMEOUT_FACTOR=4`` makes every wait of the suite four times longer at once. Bounds that a test
asserts (a publish fails within 1.5 s) are the behaviour under test and stay in seconds.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import inspect
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import BaseRoute
from websockets.asyncio.client import ClientConnection

from rtbroadcast import Broadcaster
from rtbroadcast.asgi import ChannelResolver, channel_from_query
from rtbroadcast.starlette import broadcast_routes, lifespan

#: The suite's unit of time, in seconds: a millisecond times ``RTB_TEST_TIMEOUT_FACTOR`` (default 1), as in
#: websockets' own test suite.
MS = 0.001 * float(os.environ.get("RTB_TEST_TIMEOUT_FACTOR", "1"))


def _describe(condition: Callable[..., Any]) -> str:
    """What ``condition`` checks, for a failure message: a lambda's source, else the function's name."""
    name = getattr(condition, "__qualname__", repr(condition))
    if not name.endswith("<lambda>"):
        return f"{name}()"
    try:
        source = inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return name
    with contextlib.suppress(SyntaxError):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Lambda):
                return ast.get_source_segment(source, node) or source
    return source[source.find("lambda") :]


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5_000 * MS,
    *,
    changed: asyncio.Event | None = None,
) -> None:
    """Wait until ``condition()`` is true; fail the test, naming the condition, after ``timeout`` seconds.

    ``condition`` may return an awaitable (``lambda: redis.exists(key)``). With ``changed``, an event that
    whoever changes the state sets, the condition is checked each time it is set instead of every 10 ms.
    """

    async def check() -> bool:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)

    timer = asyncio.timeout(timeout)
    try:
        async with timer:
            while True:
                if changed is not None:
                    changed.clear()
                if await check():
                    return
                if changed is not None:
                    await changed.wait()
                else:
                    await asyncio.sleep(10 * MS)
    except TimeoutError:
        if not timer.expired():
            raise  # the condition's own timeout, not ours
        raise AssertionError(f"still false after {timeout:.2f} s: {_describe(condition)}") from None


def _task_name(task: asyncio.Task[Any]) -> str:
    coroutine = task.get_coro()
    return f"{task.get_name()} ({getattr(coroutine, '__qualname__', coroutine)})"


async def no_task_left(since: set[asyncio.Task[Any]], timeout: float = 5_000 * MS) -> None:
    """Wait until every task started after ``since = set(asyncio.all_tasks())`` was taken has ended.

    The tasks themselves are compared, not their number: a leaked task fails the test, naming it, even
    when some task that was already running ended meanwhile.
    """

    def left() -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() - since if not task.done()]

    try:
        await until(lambda: not left(), timeout)
    except AssertionError:
        names = ", ".join(sorted(_task_name(task) for task in left()))
        raise AssertionError(f"tasks still running after {timeout:.2f} s: {names}") from None


#: The channel most test apps use: ``?room=a`` is channel ``room:a``.
ROOM = channel_from_query("room", prefix="room:")


def broadcast_app(
    broadcaster: Broadcaster,
    path: str = "/ws",
    *,
    channel: ChannelResolver = ROOM,
    routes: Sequence[BaseRoute] = (),
    with_lifespan: bool = True,
    drain_on_signal: bool = True,
    **options: Any,
) -> Starlette:
    """A Starlette app with the broadcast WebSocket at ``path`` (and SSE at ``path/sse``) plus ``routes``.

    ``options`` go to the endpoint (``authorize``, ``max_messages_per_second``...). The app connects and
    disconnects ``broadcaster`` in its lifespan (``drain_on_signal`` is the lifespan's) unless
    ``with_lifespan=False`` (the test does it itself).
    """
    return Starlette(
        routes=[*broadcast_routes(path, broadcaster, channel=channel, **options), *routes],
        lifespan=lifespan(broadcaster, drain_on_signal=drain_on_signal) if with_lifespan else None,
    )


@contextlib.asynccontextmanager
async def serve(app: Any, **config: Any) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 and a free port, in this event loop; yield ``host:port``."""
    options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "lifespan": "on"}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        # uvicorn sets a flag, not an event, once it listens (after the lifespan's startup).
        await until(lambda: server.started or task.done())
        if not server.started:
            task.result()
            raise RuntimeError("uvicorn exited before it started")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15_000 * MS)


async def recv_json(ws: ClientConnection, timeout: float = 5_000 * MS) -> dict[str, Any]:
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
    kwargs.setdefault("open_timeout", 5_000 * MS)
    return await websockets.connect(url, **kwargs)


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
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 5_000 * MS)
            if not chunk:
                raise ConnectionError("server closed during the handshake")
            response += chunk
        if not response.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {response!r}")
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    async def read_text_frames(self, count: int, timeout: float = 10_000 * MS) -> list[str]:
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


#: The repository root: subprocess servers run from there, so ``-m examples.restaurant_app`` imports.
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A server in a subprocess of the test (``python <args>``), its stderr collected when asked."""

    process: asyncio.subprocess.Process
    host: str
    stderr: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def collect_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr.append(line.decode(errors="replace"))

    async def stop(self, timeout: float = 10_000 * MS) -> float:
        """Send SIGTERM (and SIGCONT, should it be stopped); return the seconds until it was gone.

        Killed if still running after ``timeout``.
        """
        started = time.monotonic()
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)  # never leave it stopped, whatever happened
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        elapsed = time.monotonic() - started
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 5_000 * MS)
        return elapsed

    def log(self) -> str:
        return "".join(self.stderr)


@contextlib.asynccontextmanager
async def server_process(
    *args: str, env: dict[str, str] | None = None, health: str = "/health", stderr: bool = False
) -> AsyncIterator[ServerProcess]:
    """Run ``python <args> --host 127.0.0.1 --port <free port>`` from the repository root until ``health``
    answers 200; stop it (SIGTERM, then kill) on the way out if the test did not.

    ``stderr=True`` collects its standard error in :attr:`ServerProcess.stderr`; otherwise it is the
    test's own.
    """
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, "--host", "127.0.0.1", "--port", str(port),
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE if stderr else None,
    )  # fmt: skip
    server = ServerProcess(process, f"127.0.0.1:{port}")
    if stderr:
        server.reader = asyncio.get_running_loop().create_task(server.collect_stderr())
    try:
        async with httpx.AsyncClient() as http:

            async def serving() -> bool:
                if process.returncode is not None:
                    raise RuntimeError(f"{' '.join(args)} exited with {process.returncode}:\n{server.log()}")
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get(f"http://{server.host}{health}")).status_code == 200
                return False

            await until(serving, 20_000 * MS)
        yield server
    finally:
        await server.stop()
