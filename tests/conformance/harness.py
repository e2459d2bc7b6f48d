"""The conformance harness: a real rtbroadcast service, and the faults the scenarios inflict on it.

Both clients' conformance runners (``tests/test_conformance.py`` for Python, ``clients/js/test/
conformance.test.js`` for JavaScript) start this script once per scenario and drive it over HTTP, so
that they run the scenarios of ``scenarios.json`` against the same server doing the same things. It
needs only the repository's virtualenv (rtbroadcast, uvicorn, starlette) and, for ``backend: redis``,
a ``redis-server`` binary (PATH, or ``$RTB_REDIS_SERVER``)::

    python tests/conformance/harness.py '{"backend": "memory", "history_size": 1000}'

It prints one line ``READY {"ws": ..., "http": ..., "control": ...}`` on stdout once everything listens,
and exits when its stdin closes (the runner died) or on SIGTERM/SIGINT, stopping its Redis with it.

What runs:

- **the service** (uvicorn on ``http``): ``/realtime?room=R`` (WebSocket, channel ``room:R``; a ``token``
  query parameter must not be revoked, else close ``4003``; rooms named ``secret...`` are refused;
  ``?protocol=2`` subscribes to ``room:R`` channels by name; with ``presence``, every room has presence),
  ``GET /rooms/R/items``: the snapshot (the room's items ``[{"n": 1}, ...]`` with the stream position
  they reflect, in the body as ``epoch``/``seq`` and in the ``X-Stream-Epoch``/``X-Stream-Seq``
  headers). Each event is ``{"type": "item", "room": R, "n": N, "seq": S}``; ``n`` numbers a room's items from 1 and survives
  every restart (the harness's memory stands in for the service's database).
- **a TCP proxy** in front of it: ``ws`` goes through it, so that ``POST /cut`` can silence the network.
- **Redis** (``backend: redis``): a throwaway ``redis-server`` that keeps nothing on disk.

The control API (``control``; every call answers JSON, ``POST`` changes something):

=========================================  =========================================================
``POST /publish?room=R&n=N``               publish N items (retried while the backend is down, 10 s)
``POST /close?room=R&code=C``              close every connection of room R with close code C
``POST /stop`` / ``POST /start``           stop the service (a drain: close 1001) / start it again
``POST /restart``                          stop, then start (memory: a new epoch; Redis: same stream)
``POST /restart_redis``                    kill Redis and start it empty (as a cache-only Redis would)
``POST /cut``                              silence every proxied connection open now (no close, no
                                           FIN: bytes are dropped both ways); later ones go through
``POST /gate?open=0|1``                    shut: WebSocket handshakes are accepted then closed 1013
``POST /revoke?token=T``                   refuse token T from now on (4003 "token expired")
``POST /arm_snapshot?room=R&n=N``          the next snapshot of R first publishes N items (which are
                                           then both in the snapshot and on the wire)
``GET /stats``                             ``attempts`` (WebSocket handshakes per token, ``-`` for
                                           none), ``refused``, ``gated``, ``snapshots``, ``items``
``GET /subscribers?room=R``                ``count``: the connections subscribed to room R now
``POST /join?room=R``, ``/leave?room=R``  another member joins room R (a protocol-2 connection of
                                           the harness's own, past the proxy) / leaves it
=========================================  =========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, Event, QueueLimits
from rtbroadcast.asgi import BroadcastEndpoint, ConnectionRequest, Deny, channel_from_query
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.client import Backoff, Client
from rtbroadcast.errors import BackendUnavailable
from rtbroadcast.starlette import broadcast_routes, lifespan

#: Server options a scenario may set, with their defaults.
DEFAULTS: dict[str, Any] = {
    "backend": "memory",  # or "redis"
    "history_size": 1000,
    "heartbeat": 1.0,  # the welcome's heartbeat_interval, seconds
    "queue_max_size": 1024 * 1024,
    "presence": False,  # presence on every room's channel (protocol 2)
}
#: Rooms whose names start with this are refused by the ``authorize`` hook (protocol 2: an error frame
#: ``forbidden`` for that subscribe request; protocol 1: close 4003).
REFUSED_ROOMS = "secret"


class Item(Event):
    """One item of a room; ``n`` numbers the room's items from 1, across restarts."""

    type: Literal["item"] = "item"
    room: str
    n: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the harness owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _start_uvicorn(app: Any, port: int) -> tuple[_Server, asyncio.Task[None]]:
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn exited before it started")
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 10 s")
        await asyncio.sleep(0.01)
    return server, task


class Redis:
    """A ``redis-server`` on a fixed port that keeps nothing: a restart loses every key."""

    def __init__(self) -> None:
        binary = os.environ.get("RTB_REDIS_SERVER") or shutil.which("redis-server")
        if binary is None:
            raise SystemExit("backend redis needs redis-server on PATH (or RTB_REDIS_SERVER)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="rtb-conformance-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", self.dir.name]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._pings():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def _pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class Proxy:
    """A TCP proxy on loopback whose open connections :meth:`cut` silences (a network gone dark)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> int:
        silenced = sum(not event.is_set() for event in self._open)
        for event in self._open:
            event.set()
        return silenced

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()  # the service is down: the client sees the connection fail
            return
        silenced = asyncio.Event()
        self._open = [event for event in self._open if not event.is_set()] + [silenced]
        for pipe in (
            self._pipe(reader, upstream_writer, silenced),
            self._pipe(upstream_reader, writer, silenced),
        ):
            task = asyncio.get_running_loop().create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, silenced: asyncio.Event
    ) -> None:
        try:
            while data := await reader.read(65536):
                if silenced.is_set():
                    continue  # dark: read and drop, never close (no FIN reaches anyone)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # a reset: the other side goes too (below), as a real network would pass it on
        finally:
            # One side ended (even with a reset: left open, the other side's client would hang until its
            # connect timeout): end the other, unless the network is dark.
            if not silenced.is_set():
                writer.close()


class Harness:
    """The service, its faults, and the control API."""

    def __init__(self, options: dict[str, Any]) -> None:
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"unknown server options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.options = {**DEFAULTS, **options}
        if self.options["backend"] not in ("memory", "redis"):
            raise SystemExit(f"backend must be memory or redis, not {self.options['backend']!r}")
        self.redis = Redis() if self.options["backend"] == "redis" else None
        self.prefix = f"rtbc-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.proxy = Proxy(self.port)
        self.items: dict[str, list[int]] = {}
        self.lock = asyncio.Lock()
        self.revoked: set[str] = set()
        self.gate_open = True
        self.armed: dict[str, int] = {}
        self.counts: dict[str, Any] = {"attempts": {}, "refused": 0, "gated": 0, "snapshots": 0}
        self.broadcaster: Broadcaster | None = None
        self.publisher: Broadcaster | None = None  # Redis: a separate process's broadcaster, in effect
        self.server: tuple[_Server, asyncio.Task[None]] | None = None
        self.members: dict[str, Client] = {}  # room -> the other member's client (join/leave)

    def _broadcaster(self) -> Broadcaster:
        options: dict[str, Any] = {
            "heartbeat_interval": float(self.options["heartbeat"]),
            "queue_limits": QueueLimits(max_size=int(self.options["queue_max_size"])),
            "max_resume": 100_000,
        }
        if self.options["presence"]:
            options["presence"] = ("room:",)
        if self.redis is not None:
            backend = RedisBackend(
                self.redis.url,
                key_prefix=self.prefix,
                history_size=int(self.options["history_size"]),
                timeout=1.0,
            )
            return Broadcaster(backend=backend, **options)
        return Broadcaster(f"memory://?history_size={int(self.options['history_size'])}", **options)

    # -- the service --------------------------------------------------------------------------------

    def _app(self, broadcaster: Broadcaster) -> Any:
        def check_token(request: ConnectionRequest) -> Deny | None:
            token = request.query.get("token")
            if token is not None and token in self.revoked:
                self.counts["refused"] += 1
                return Deny("token expired")
            return None

        def allowed(channel: str) -> bool | Deny:
            return Deny("a secret room") if channel.startswith(f"room:{REFUSED_ROOMS}") else True

        def authorize(request: ConnectionRequest, channel: str) -> bool | Deny:
            return check_token(request) or allowed(channel)

        # Where the server has an authenticate hook (protocol 2's), the token is checked once per
        # connection, so that a revoked one is refused with 4003 on both protocols; before it, in authorize.
        hooks: dict[str, Any] = {"authorize": authorize}
        if "authenticate" in inspect.signature(BroadcastEndpoint).parameters:
            hooks = {"authenticate": check_token, "authorize": lambda request, channel: allowed(channel)}

        async def snapshot(request: Request) -> JSONResponse:
            room = request.path_params["room"]
            self.counts["snapshots"] += 1
            armed = self.armed.pop(room, 0)
            if armed:
                await self.publish(room, armed)
            async with self.lock:
                position = await broadcaster.backend.position(f"room:{room}")
                items = [{"n": n} for n in self.items.get(room, [])]
            body = {"items": items, "epoch": position.epoch, "seq": position.seq}
            headers = {"X-Stream-Epoch": position.epoch, "X-Stream-Seq": str(position.seq)}
            return JSONResponse(body, headers=headers)

        routes = [
            Route("/rooms/{room}/items", snapshot, methods=["GET"]),
            *broadcast_routes(
                "/realtime",
                broadcaster,
                channel=channel_from_query("room", prefix="room:"),
                **hooks,
            ),
        ]
        app = Starlette(routes=routes, lifespan=lifespan(broadcaster, drain_on_signal=False))

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "websocket":
                query = dict(
                    pair.split("=", 1) if "=" in pair else (pair, "")
                    for pair in scope["query_string"].decode().split("&")
                    if pair
                )
                attempts = self.counts["attempts"]
                token = query.get("token", "-")
                attempts[token] = attempts.get(token, 0) + 1
                if not self.gate_open:
                    self.counts["gated"] += 1
                    if (await receive())["type"] == "websocket.connect":
                        await send({"type": "websocket.accept"})
                        await send({"type": "websocket.close", "code": 1013, "reason": "down for the test"})
                    return
            await app(scope, receive, send)

        return counted

    async def start(self) -> None:
        if self.server is not None:
            return
        self.broadcaster = self._broadcaster()
        self.server = await _start_uvicorn(self._app(self.broadcaster), self.port)

    async def stop(self) -> None:
        if self.server is None:
            return
        server, task = self.server
        self.server = None
        if self.broadcaster is not None:
            await self.broadcaster.drain()  # what the lifespan helper does on SIGTERM: close 1001
        server.should_exit = True
        await task

    async def publish(self, room: str, n: int) -> tuple[int, int]:
        first = last = 0
        deadline = time.monotonic() + 10
        for _ in range(n):
            while True:
                target = self.publisher or self.broadcaster
                if target is None:
                    raise RuntimeError("the service is stopped (memory backend): start it to publish")
                try:
                    async with (
                        self.lock
                    ):  # publish and store as one step: a snapshot lines up with the stream
                        number = len(self.items.get(room, [])) + 1
                        last = await target.publish(f"room:{room}", Item(room=room, n=number))
                        self.items.setdefault(room, []).append(number)
                    break
                except BackendUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            first = first or last
        return first, last

    # -- the control API ----------------------------------------------------------------------------

    def control_app(self) -> Starlette:
        def room_of(request: Request) -> str:
            return request.query_params["room"]

        async def publish(request: Request) -> JSONResponse:
            first, last = await self.publish(room_of(request), int(request.query_params.get("n", "1")))
            return JSONResponse({"first": first, "last": last})

        async def close(request: Request) -> JSONResponse:
            code = int(request.query_params.get("code", "1012"))
            closed = 0
            if self.broadcaster is not None:
                for connection in self.broadcaster.registry.fanout("room:" + room_of(request)):
                    connection.close(code, "closed by the test")
                    closed += 1
            return JSONResponse({"closed": closed})

        async def stop(request: Request) -> JSONResponse:
            await self.stop()
            return JSONResponse({"running": False})

        async def start(request: Request) -> JSONResponse:
            await self.start()
            return JSONResponse({"running": True})

        async def restart(request: Request) -> JSONResponse:
            await self.stop()
            await self.start()
            return JSONResponse({"running": True})

        async def restart_redis(request: Request) -> JSONResponse:
            if self.redis is None:
                return JSONResponse({"error": "backend is not redis"}, status_code=400)
            await asyncio.to_thread(self.redis.kill)
            await asyncio.to_thread(self.redis.start)
            return JSONResponse({"restarted": True})

        async def cut(request: Request) -> JSONResponse:
            return JSONResponse({"silenced": self.proxy.cut()})

        async def gate(request: Request) -> JSONResponse:
            self.gate_open = request.query_params.get("open") == "1"
            return JSONResponse({"open": self.gate_open})

        async def revoke(request: Request) -> JSONResponse:
            self.revoked.add(request.query_params["token"])
            return JSONResponse({"revoked": sorted(self.revoked)})

        async def arm_snapshot(request: Request) -> JSONResponse:
            self.armed[room_of(request)] = int(request.query_params.get("n", "1"))
            return JSONResponse(self.armed)

        async def stats(request: Request) -> JSONResponse:
            return JSONResponse({**self.counts, "items": self.items})

        async def join(request: Request) -> JSONResponse:
            room = room_of(request)
            if room not in self.members:
                member = Client(
                    f"ws://127.0.0.1:{self.port}/realtime", protocol=2, backoff=Backoff(0.05, 0.2)
                )
                await member.subscribe(f"room:{room}", presence=True).connected()
                self.members[room] = member
            return JSONResponse({"members": sorted(self.members)})

        async def leave(request: Request) -> JSONResponse:
            member = self.members.pop(room_of(request), None)
            if member is not None:
                await member.close()
            return JSONResponse({"members": sorted(self.members)})

        async def subscribers(request: Request) -> JSONResponse:
            if self.broadcaster is None:
                return JSONResponse({"count": 0})
            return JSONResponse({"count": self.broadcaster.registry.count("room:" + room_of(request))})

        post: list[tuple[str, Callable[[Request], Any]]] = [
            ("/publish", publish), ("/close", close), ("/stop", stop), ("/start", start),
            ("/restart", restart), ("/restart_redis", restart_redis), ("/cut", cut), ("/gate", gate),
            ("/revoke", revoke), ("/arm_snapshot", arm_snapshot), ("/join", join), ("/leave", leave),
        ]  # fmt: skip
        routes = [Route(path, handler, methods=["POST"]) for path, handler in post]
        routes.append(Route("/stats", stats, methods=["GET"]))
        routes.append(Route("/subscribers", subscribers, methods=["GET"]))
        return Starlette(routes=routes)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        if self.redis is not None:
            self.redis.start()
        try:
            await self.proxy.start()
            await self.start()
            if self.redis is not None:
                self.publisher = self._broadcaster()
                await self.publisher.connect()
            control, control_task = await _start_uvicorn(self.control_app(), 0)
            try:
                yield control.servers[0].sockets[0].getsockname()[1]
            finally:
                control.should_exit = True
                await control_task
        finally:
            for member in self.members.values():
                with contextlib.suppress(Exception):
                    await member.close()
            with contextlib.suppress(Exception):
                await self.stop()
            if self.publisher is not None:
                with contextlib.suppress(Exception):
                    await self.publisher.disconnect()
            await self.proxy.close()
            if self.redis is not None:
                self.redis.kill()


async def main(options: dict[str, Any]) -> None:
    harness = Harness(options)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    # The runner holds our stdin (a pipe, or a socket under uvloop): when it goes away, even killed, it
    # closes and we stop.
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        stdin = sys.stdin.fileno()

        def read() -> None:
            if not os.read(stdin, 4096):
                done.set()

        loop.add_reader(stdin, read)
    async with harness.running() as control_port:
        ready = {
            "ws": f"ws://127.0.0.1:{harness.proxy.port}/realtime",
            "http": f"http://127.0.0.1:{harness.port}",
            "control": f"http://127.0.0.1:{control_port}",
        }
        sys.stdout.write(f"READY {json.dumps(ready)}\n")
        sys.stdout.flush()
        await done.wait()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
