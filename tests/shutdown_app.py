"""A small service for the shutdown tests: ``python -m uvicorn tests.shutdown_app:app``.

It mounts the broadcast WebSocket at ``/ws?room=...`` and its Server-Sent Events stream at ``/ws/sse?room=...``
on the memory backend, publishes with ``POST /publish {"room", "n"}`` and answers ``GET /health``.
``RTB_DRAIN=0`` in the environment turns the lifespan helper's drain on SIGTERM off.
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
from rtbroadcast.starlette import broadcast_routes, lifespan


class Written(Event):
    type: Literal["written"] = "written"
    n: int


broadcaster = Broadcaster("memory://")


async def publish(request: Request) -> JSONResponse:
    body = await request.json()
    seq = await broadcaster.publish(f"room:{body['room']}", Written(n=body["n"]))
    return JSONResponse({"seq": seq})


async def health(request: Request) -> JSONResponse:
    return JSONResponse(broadcaster.stats().as_dict())


app = Starlette(
    routes=[
        *broadcast_routes("/ws", broadcaster, channel=channel_from_query("room", prefix="room:")),
        Route("/publish", publish, methods=["POST"]),
        Route("/health", health),
    ],
    lifespan=lifespan(broadcaster, drain_on_signal=os.environ.get("RTB_DRAIN", "1") != "0"),
)
