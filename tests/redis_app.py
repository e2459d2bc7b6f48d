"""A small service for the cross-process test: ``python -m uvicorn tests.redis_app:app``.

Configured by the environment: ``RTB_REDIS_URL`` (required) and ``RTB_KEY_PREFIX``. It mounts the
broadcast WebSocket at ``/ws?room=...``, publishes with ``POST /publish {"room", "n"}`` and reports its
broadcaster's stats at ``GET /health``.
"""

from __future__ import annotations

import os
from typing import Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, Event
from rtbroadcast.asgi import channel_from_query
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.starlette import lifespan, websocket_route


class Written(Event):
    type: Literal["written"] = "written"
    n: int
    by: int


PROCESS = os.getpid()

broadcaster = Broadcaster(
    backend=RedisBackend(os.environ["RTB_REDIS_URL"], key_prefix=os.environ.get("RTB_KEY_PREFIX", "rtb"))
)


async def publish(request: Request) -> JSONResponse:
    body = await request.json()
    seq = await broadcaster.publish(f"room:{body['room']}", Written(n=body["n"], by=PROCESS))
    return JSONResponse({"seq": seq, "by": PROCESS})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": PROCESS, **broadcaster.stats().as_dict()})


app = Starlette(
    routes=[
        websocket_route("/ws", broadcaster, channel=channel_from_query("room", prefix="room:")),
        Route("/publish", publish, methods=["POST"]),
        Route("/health", health),
    ],
    lifespan=lifespan(broadcaster),
)
