"""A chat service: post a message over HTTP, receive it live over WebSocket. Run: uvicorn tutorial_app:app"""

from typing import Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, Event
from rtbroadcast.asgi import channel_from_query
from rtbroadcast.starlette import broadcast_routes, lifespan


# --8<-- [start:event]
class MessagePosted(Event):
    """Someone posted a message in a room."""

    type: Literal["message_posted"] = "message_posted"
    room: str
    author: str
    text: str


# --8<-- [end:event]

broadcaster = Broadcaster("memory://")
messages: dict[str, list[dict[str, object]]] = {}  # stands in for your database


async def post_message(request: Request) -> JSONResponse:
    room = request.path_params["room"]
    body = await request.json()
    event = MessagePosted(room=room, author=body["author"], text=body["text"])
    messages.setdefault(room, []).append(event.model_dump(mode="json"))  # save first...
    seq = await broadcaster.publish(f"room:{room}", event)  # ...then tell every subscriber
    return JSONResponse({"seq": seq}, status_code=201)


# --8<-- [start:snapshot]
async def list_messages(request: Request) -> JSONResponse:
    room = request.path_params["room"]
    # The snapshot says which point of the stream it reflects, so that a client can resume right after
    # it. In one process on the memory backend nothing runs between these two lines; with several
    # processes, store the seq with your data instead.
    position = await broadcaster.position(f"room:{room}")
    snapshot = list(messages.get(room, []))
    return JSONResponse({"epoch": position.epoch, "seq": position.seq, "messages": snapshot})


# --8<-- [end:snapshot]

app = Starlette(
    routes=[
        Route("/rooms/{room}/messages", post_message, methods=["POST"]),
        Route("/rooms/{room}/messages", list_messages, methods=["GET"]),
        # WebSocket at /realtime?room=lobby, Server-Sent Events at /realtime/sse?room=lobby
        *broadcast_routes("/realtime", broadcaster, channel=channel_from_query("room", prefix="room:")),
    ],
    lifespan=lifespan(broadcaster),
)
