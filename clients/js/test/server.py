"""A real rtbroadcast service for the JavaScript client's tests, with control endpoints the tests drive.

Run with the repository's virtualenv: ``python test/server.py --port 0``. It prints ``PORT <n>`` once
uvicorn listens on 127.0.0.1, and serves:

- ``/realtime?room=R`` (WebSocket) and ``/realtime/sse?room=R`` (Server-Sent Events): channel ``room:R``.
  A ``token`` query parameter, if given, must not be revoked (else close code 4003). With ``protocol=2``
  ``room=R`` is a server-side subscription (and optional); clients subscribe to ``room:...`` channels,
  of which ``room:forbidden...`` ones are denied (``error`` ``forbidden``).
- ``GET /rooms/R/items``: the snapshot: every item published in the room, with the stream position it
  reflects in the body and in ``X-Stream-Epoch`` / ``X-Stream-Seq`` headers.
- ``POST /control/publish?room=R&n=N[&size=B][&background=1]``: publish N items (``size`` bytes of padding
  each), one after the other; with ``background`` the response comes at once.
- ``POST /control/close?room=R&code=C``: close every connection of the room with close code C.
- ``POST /control/gate?open=0|1``: with the gate shut, new WebSocket connections are closed with 1013
  and SSE requests get 503 (the service is "down" while the process keeps its history).
- ``POST /control/revoke?token=T``: refuse token T from now on (4003 "token expired").
- ``/pkg/...``: with ``--serve-package``, the files of ``clients/js`` (the built module, the test page).
- ``GET /control/stats``: connection attempts (per transport and token), refusals, the broadcaster's stats,
  and whether this rtbroadcast has presence (``--presence PREFIX`` turns it on for those channels).
- A ``device=NAME`` query parameter authenticates the connection as ``Identity(NAME, info={"name": NAME})``.

Items are kept in ``--state FILE`` (JSON) when given, so that a restarted process still has the data of
its "database" while the memory backend's stream starts again in a new epoch.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from rtbroadcast import Broadcaster, Event, Identity, QueueLimits
from rtbroadcast.asgi import ConnectionRequest, Deny, channel_from_query
from rtbroadcast.starlette import broadcast_routes, lifespan


class Item(Event):
    """One published item; ``n`` numbers the room's items from 1, across restarts."""

    type: Literal["item"] = "item"
    room: str
    n: int
    pad: str = ""


#: Whether this rtbroadcast has presence (``Broadcaster(presence=...)``): ``--presence`` needs it.
HAS_PRESENCE = "presence" in inspect.signature(Broadcaster).parameters


def build_app(args: argparse.Namespace) -> Any:
    options: dict[str, Any] = {}
    if args.presence:
        if HAS_PRESENCE:
            options["presence"] = (args.presence,)
        else:  # the tests ask /control/stats and skip what needs it
            sys.stderr.write("server.py: --presence ignored: this rtbroadcast has no presence\n")
    broadcaster = Broadcaster(
        args.backend,
        heartbeat_interval=args.heartbeat,
        queue_limits=QueueLimits(max_size=args.queue_max_size),
        max_resume=100_000,
        **options,
    )
    state_file = Path(args.state) if args.state else None
    items: dict[str, list[dict[str, Any]]] = (
        json.loads(state_file.read_text()) if state_file is not None and state_file.exists() else {}
    )
    lock = asyncio.Lock()
    revoked: set[str] = set()
    gate = {"open": True}
    counts: dict[str, int] = {}
    tasks: set[asyncio.Task[tuple[int, int]]] = set()

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    def authorize(request: ConnectionRequest, channel: str) -> bool | Deny:
        token = request.query.get("token")
        count(f"{request.transport}:{token or '-'}")
        if token is not None and token in revoked:
            count("refused")
            return Deny("token expired")
        if channel.startswith("room:forbidden"):
            return Deny("not your room")
        return True

    def authenticate(request: ConnectionRequest) -> Identity | None:
        # ``device=NAME``: the connection's identity (its presence member shows it); none: anonymous.
        device = request.query.get("device")
        return Identity(device, info={"name": device}) if device else None

    async def publish(room: str, n: int, size: int) -> tuple[int, int]:
        first = last = 0
        for _ in range(n):
            async with lock:  # publish and store as one step, so that a snapshot lines up with the stream
                stored = items.setdefault(room, [])
                number = len(stored) + 1
                # Random padding: WebSocket compression (which Node's client negotiates) cannot shrink it.
                item = Item(room=room, n=number, pad=base64.b64encode(os.urandom(size * 3 // 4)).decode())
                last = await broadcaster.publish(f"room:{room}", item)
                first = first or last
                stored.append({"n": number, "room": room})
                if state_file is not None:
                    state_file.write_text(json.dumps(items))
        return first, last

    async def control_publish(request: Request) -> JSONResponse:
        room = request.query_params["room"]
        n = int(request.query_params.get("n", "1"))
        size = int(request.query_params.get("size", "0"))
        if request.query_params.get("background"):
            task = asyncio.get_running_loop().create_task(publish(room, n, size))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return JSONResponse({"started": n}, status_code=202)
        first, last = await publish(room, n, size)
        return JSONResponse({"first": first, "last": last})

    async def control_close(request: Request) -> JSONResponse:
        channel = "room:" + request.query_params["room"]
        code = int(request.query_params.get("code", "1012"))
        closed = 0
        for connection in broadcaster.registry.fanout(channel):
            connection.close(code, "closed by the test")
            closed += 1
        return JSONResponse({"closed": closed})

    async def control_gate(request: Request) -> JSONResponse:
        gate["open"] = request.query_params.get("open") == "1"
        return JSONResponse(gate)

    async def control_revoke(request: Request) -> JSONResponse:
        revoked.add(request.query_params["token"])
        return JSONResponse({"revoked": sorted(revoked)})

    async def control_stats(request: Request) -> JSONResponse:
        return JSONResponse(
            {"counts": counts, "broadcaster": broadcaster.stats().as_dict(), "presence": HAS_PRESENCE}
        )

    async def snapshot(request: Request) -> JSONResponse:
        room = request.path_params["room"]
        async with lock:
            position = await broadcaster.backend.position(f"room:{room}")
            body = {"items": list(items.get(room, [])), "epoch": position.epoch, "seq": position.seq}
        headers = {"X-Stream-Epoch": position.epoch, "X-Stream-Seq": str(position.seq)}
        return JSONResponse(body, headers=headers)

    routes = [
        Route("/rooms/{room}/items", snapshot, methods=["GET"]),
        Route("/control/publish", control_publish, methods=["POST"]),
        Route("/control/close", control_close, methods=["POST"]),
        Route("/control/gate", control_gate, methods=["POST"]),
        Route("/control/revoke", control_revoke, methods=["POST"]),
        Route("/control/stats", control_stats, methods=["GET"]),
        *broadcast_routes(
            "/realtime",
            broadcaster,
            channel=channel_from_query("room", prefix="room:"),
            authorize=authorize,
            authenticate=authenticate,
        ),
    ]
    if args.serve_package:
        package = Path(__file__).resolve().parent.parent
        routes.append(Mount("/pkg", StaticFiles(directory=package), name="pkg"))
    app = Starlette(routes=routes, lifespan=lifespan(broadcaster))

    async def gated(scope: Any, receive: Any, send: Any) -> None:
        # The gate stands in front of the stream only; control endpoints stay reachable.
        if not gate["open"] and scope["type"] == "websocket":
            count("gated")
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": 1013, "reason": "down for the test"})
            return
        if not gate["open"] and scope["type"] == "http" and scope["path"].endswith("/sse"):
            count("gated")
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"down for the test"})
            return
        await app(scope, receive, send)

    return gated


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend", default="memory://?history_size=1000")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--queue-max-size", type=int, default=1024 * 1024)
    parser.add_argument("--state", default="")
    parser.add_argument("--serve-package", action="store_true")
    parser.add_argument("--presence", default="", metavar="PREFIX", help="channels with presence")
    args = parser.parse_args()
    config = uvicorn.Config(
        build_app(args), host="127.0.0.1", port=args.port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise SystemExit("uvicorn exited before it started")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {port}\n")  # the tests wait for this line
    sys.stdout.flush()
    await task


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
