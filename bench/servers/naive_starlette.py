"""Reference (2): a naive Starlette app that loops over its sockets in the POST handler.

``for ws in clients: await ws.send_text(text)``: what a first implementation usually looks like.
The POST returns only once every subscriber's send has completed, so one slow socket holds up the
others.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

clients: dict[str, set[WebSocket]] = {}


async def subscribe(websocket: WebSocket) -> None:
    channel = websocket.query_params["channel"]
    await websocket.accept()
    sockets = clients.setdefault(channel, set())
    sockets.add(websocket)
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        sockets.discard(websocket)


async def publish(request: Request) -> Response:
    text = (await request.body()).decode()
    for ws in list(clients.get(request.path_params["channel"], ())):
        try:
            await ws.send_text(text)
        except (RuntimeError, OSError, WebSocketDisconnect):
            clients[request.path_params["channel"]].discard(ws)
    return Response(b"{}", media_type="application/json")


app = Starlette(
    routes=[
        WebSocketRoute("/ws", subscribe),
        Route("/publish/{channel}", publish, methods=["POST"]),
    ]
)
