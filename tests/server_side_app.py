"""A small service for the cross-process server-side subscription tests:
``python -m uvicorn tests.server_side_app:app``.

Configured by the environment: ``RTB_REDIS_URL`` (required) and ``RTB_KEY_PREFIX``. Connections say who
they are with ``?device=<id>&tags=<a,b>`` (the ``authenticate`` hook trusts them: a test app) and which
restaurant they watch with ``?restaurant=<id>`` (WebSocket at ``/ws``, SSE at ``/ws/sse``; protocol 1 or
``?protocol=2``). ``POST /publish {"channel", "n"}`` publishes, ``POST /control {"action", "identity" |
"tag", "channel" | "code", "reason"}`` calls the broadcaster's ``*_connections()`` method and returns what
it changed in this process, ``GET /health`` reports the stats.
"""

from __future__ import annotations

import os
from typing import Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, Event, Identity
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.starlette import broadcast_routes, lifespan


class Written(Event):
    type: Literal["written"] = "written"
    n: int
    by: int


PROCESS = os.getpid()

broadcaster = Broadcaster(
    backend=RedisBackend(os.environ["RTB_REDIS_URL"], key_prefix=os.environ.get("RTB_KEY_PREFIX", "rtb"))
)


def authenticate(request: ConnectionRequest) -> Identity | None:
    device = request.query.get("device")
    if not device:
        return None
    tags = frozenset(tag for tag in request.query.get("tags", "").split(",") if tag)
    return Identity(device, tags)


def restaurant(request: ConnectionRequest) -> str | None:
    rid = request.query.get("restaurant")
    return f"restaurant:{rid}" if rid else None


async def publish(request: Request) -> JSONResponse:
    body = await request.json()
    seq = await broadcaster.publish(body["channel"], Written(n=body["n"], by=PROCESS))
    return JSONResponse({"seq": seq, "by": PROCESS})


async def control(request: Request) -> JSONResponse:
    body = await request.json()
    action = body.pop("action")
    if action == "subscribe":
        changed = await broadcaster.subscribe_connections(**body)
    elif action == "unsubscribe":
        changed = await broadcaster.unsubscribe_connections(**body)
    else:
        changed = await broadcaster.disconnect_connections(**body)
    return JSONResponse({"changed": changed, "by": PROCESS})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": PROCESS, **broadcaster.stats().as_dict()})


app = Starlette(
    routes=[
        *broadcast_routes("/ws", broadcaster, channel=restaurant, authenticate=authenticate),
        Route("/publish", publish, methods=["POST"]),
        Route("/control", control, methods=["POST"]),
        Route("/health", health),
    ],
    lifespan=lifespan(broadcaster),
)
