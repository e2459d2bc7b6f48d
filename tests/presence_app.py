"""A small service for the cross-process presence test: ``python -m uvicorn tests.presence_app:app``.

Configured by the environment: ``RTB_REDIS_URL`` (required), ``RTB_KEY_PREFIX`` and
``RTB_PRESENCE_HEARTBEAT`` (seconds). Channels ``room:*`` have presence; protocol 2 only (``?user=`` names
the identity). ``GET /presence?channel=...`` answers the broadcaster's snapshot; ``GET /health`` its stats.
"""

from __future__ import annotations

import dataclasses
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, Identity
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.starlette import lifespan, websocket_route

PROCESS = os.getpid()

broadcaster = Broadcaster(
    backend=RedisBackend(
        os.environ["RTB_REDIS_URL"],
        key_prefix=os.environ.get("RTB_KEY_PREFIX", "rtb"),
        presence_heartbeat=float(os.environ.get("RTB_PRESENCE_HEARTBEAT", "10")),
    ),
    presence=("room:",),
)


def authenticate(request: ConnectionRequest) -> Identity:
    return Identity(request.query.get("user", "anon"), info={"pid": PROCESS})


def no_channel(request: ConnectionRequest) -> None:
    return None


async def presence(request: Request) -> JSONResponse:
    snapshot = await broadcaster.presence(request.query_params["channel"])
    return JSONResponse(
        {
            "count": snapshot.count,
            "members": [dataclasses.asdict(m) for m in snapshot.members],
            "truncated": snapshot.truncated,
        }
    )


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": PROCESS, **broadcaster.stats().as_dict()})


app = Starlette(
    routes=[
        websocket_route("/ws", broadcaster, channel=no_channel, authenticate=authenticate),
        Route("/presence", presence),
        Route("/health", health),
    ],
    lifespan=lifespan(broadcaster),
)
