"""A service that publishes a timestamped event every 10 ms: ``python -m uvicorn tests.ticker_app:app``.

Subscribers connect to ``/ws?room=tick``; each event carries ``t``, the server's ``time.time()`` when it
was published, so a client on the same machine can measure how late events arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster
from rtbroadcast.asgi import channel_from_query
from rtbroadcast.starlette import websocket_route

broadcaster = Broadcaster("memory://")


async def _tick() -> None:
    while True:
        await broadcaster.publish_json("tick", json.dumps({"type": "tick", "t": time.time()}))
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcaster:
        task = asyncio.get_running_loop().create_task(_tick())
        try:
            yield
        finally:
            task.cancel()


async def _health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        websocket_route("/ws", broadcaster, channel=channel_from_query("room")),
        Route("/health", _health),
    ],
    lifespan=_lifespan,
)
