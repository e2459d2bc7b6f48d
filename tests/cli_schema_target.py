"""Objects for ``rtbroadcast schema MODULE:ATTR`` to point at, in tests/test_cli.py."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Depends, FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from rtbroadcast import Broadcaster, Event
from rtbroadcast.asgi import BroadcastEndpoint, channel_from_query
from rtbroadcast.schema import ChannelSpec, asyncapi_document
from rtbroadcast.starlette import broadcast_routes, serve_websocket


class PingPong(Event):
    """A ball crossed the net."""

    type: Literal["cli_target.ping_pong"] = "cli_target.ping_pong"
    side: str


broadcaster = Broadcaster("memory://")
SPEC = ChannelSpec("/beeps?room={room}", name="beeps", parameters={"room": "The room."}, events=[PingPong])
NOT_A_SOURCE = 42


def make_document() -> dict[str, Any]:
    return asyncapi_document(SPEC, events=[PingPong], title="Made")


# A FastAPI app, as a user's service module holds one: the CLI finds its broadcast endpoints in its routes,
# including one mounted under a prefix behind an ASGI wrapper that keeps it as ``app``.
class Wrapper:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


app = FastAPI()
app.router.routes.extend(broadcast_routes("/realtime", broadcaster, channel=channel_from_query("room")))
app.mount(
    "/mounted",
    Starlette(
        routes=[WebSocketRoute("/live", Wrapper(BroadcastEndpoint(broadcaster, lambda r: "c", sse=False)))]
    ),
)
empty_app = FastAPI()


# The FastAPI auth how-to's shape: the realtime route is a function behind the app's own Depends, which
# the CLI cannot see into; it says so, and what to pass instead.
def current_user() -> str:
    return "ada"


depends_app = FastAPI()
hidden = BroadcastEndpoint(broadcaster, channel_from_query("room"))


@depends_app.websocket("/private")
async def private(websocket: WebSocket, user: str = Depends(current_user)) -> None:
    await serve_websocket(hidden, websocket)


mixed_app = FastAPI()
mixed_app.router.routes.extend(broadcast_routes("/realtime", broadcaster, channel=channel_from_query("room")))
mixed_app.router.routes.extend(depends_app.router.routes)
