"""The target: a small Starlette app on rtbroadcast's public API, memory or Redis backend."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rtbroadcast import Broadcaster
from rtbroadcast.protocol import DEFAULT_MAX_FRAME_SIZE
from rtbroadcast.starlette import lifespan, websocket_route

#: What a service deploying rtbroadcast sets, as the docs recommend: the opt-in protocol class (direct
#: writes, permessage-deflate declined) and uvicorn's frame limit equal to the endpoint's.
UVICORN_OVERRIDES = {"ws": "rtbroadcast.uvicorn:WebSocketProtocol", "ws_max_size": DEFAULT_MAX_FRAME_SIZE}
#: A service that chose compression: the same, but permessage-deflate accepted when a client offers it.
DEFLATE_OVERRIDES = {**UVICORN_OVERRIDES, "ws": "rtbroadcast.uvicorn:DeflateWebSocketProtocol"}


def make_app(url: str) -> Starlette:
    broadcaster = Broadcaster(url)

    async def publish(request: Request) -> Response:
        text = (await request.body()).decode()
        seq = await broadcaster.publish_json(request.path_params["channel"], text)
        # A plain Response, like the naive reference's (JSONResponse's json.dumps costs ~6% here).
        return Response(b'{"seq":%d}' % seq, media_type="application/json")

    return Starlette(
        routes=[
            websocket_route("/ws", broadcaster, channel=lambda req: req.query["channel"]),
            Route("/publish/{channel}", publish, methods=["POST"]),
        ],
        lifespan=lifespan(broadcaster),
    )
