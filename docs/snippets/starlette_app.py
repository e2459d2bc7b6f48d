"""Starlette with the channel in the path, an authorize hook and an Origin allow-list."""

from starlette.applications import Starlette

from rtbroadcast import Broadcaster
from rtbroadcast.asgi import ConnectionRequest, Deny
from rtbroadcast.starlette import lifespan, websocket_route

broadcaster = Broadcaster("memory://")

# Which rooms each token may read. A real service verifies a signed token instead (PyJWT, for example).
MEMBERS = {"token-ada": {"lobby", "kitchen"}, "token-bob": {"lobby"}}


def room_channel(request: ConnectionRequest) -> str:
    return f"room:{request.path_params['room']}"


async def authorize(request: ConnectionRequest, channel: str) -> bool | Deny:
    token = request.headers.get("authorization", "").removeprefix("Bearer ") or request.query.get("token")
    rooms = MEMBERS.get(token or "")
    if rooms is None:
        return Deny("unknown or missing token")
    if channel.removeprefix("room:") not in rooms:
        return Deny("not a member of this room")
    return True


app = Starlette(
    routes=[
        websocket_route(
            "/rooms/{room}/ws",
            broadcaster,
            channel=room_channel,
            authorize=authorize,
            allowed_origins=["https://chat.example.com"],  # browsers on other sites are refused
            idle_timeout=90,  # close connections that sent nothing (not even a ping) for 90 s
        )
    ],
    lifespan=lifespan(broadcaster),
)
