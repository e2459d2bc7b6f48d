"""Reference (3): encode/broadcaster (PyPI ``broadcaster``) with Starlette, memory or Redis backend.

This is the endpoint shape of broadcaster's own README example: one task forwards the subscription
to the socket while another reads the socket to notice the disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


def make_app(url: str) -> Starlette:
    broadcast = Broadcast(url)

    async def forward(websocket: WebSocket, channel: str) -> None:
        async with broadcast.subscribe(channel) as subscriber:
            async for event in subscriber:  # type: ignore[union-attr]
                if event is None:
                    return
                await websocket.send_text(event.message)

    async def drain(websocket: WebSocket) -> None:
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass

    async def subscribe(websocket: WebSocket) -> None:
        channel = websocket.query_params["channel"]
        await websocket.accept()
        sender = asyncio.create_task(forward(websocket, channel))
        receiver = asyncio.create_task(drain(websocket))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)

    async def publish(request: Request) -> Response:
        text = (await request.body()).decode()
        await broadcast.publish(request.path_params["channel"], text)
        return Response(b"{}", media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broadcast.connect()
        try:
            yield
        finally:
            await broadcast.disconnect()

    return Starlette(
        routes=[
            WebSocketRoute("/ws", subscribe),
            Route("/publish/{channel}", publish, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
