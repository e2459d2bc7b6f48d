"""Starlette and FastAPI integration: routes for the broadcast endpoint, and a lifespan helper.

This is the only module of rtbroadcast that imports Starlette (install ``rtbroadcast[starlette]``)::

    from starlette.applications import Starlette
    from rtbroadcast import Broadcaster
    from rtbroadcast.starlette import broadcast_routes, lifespan

    broadcaster = Broadcaster("memory://")
    app = Starlette(
        routes=broadcast_routes("/realtime", broadcaster, channel=channel_from_query("room")),
        lifespan=lifespan(broadcaster),
    )
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from ._config import wait_seconds
from ._shutdown import drain_on_signals
from .asgi import IDENTITY_SCOPE_KEY, Authorizer, BroadcastEndpoint, ChannelResolver
from .broadcaster import Broadcaster
from .errors import ConfigurationError
from .identity import Identity

__all__ = ["broadcast_routes", "lifespan", "serve_websocket", "sse_response", "websocket_route"]

AppT = TypeVar("AppT")


def websocket_route(
    path: str,
    broadcaster: Broadcaster,
    *,
    channel: ChannelResolver,
    authorize: Authorizer | None = None,
    name: str | None = None,
    **options: Any,
) -> WebSocketRoute:
    """Return a WebSocket route that subscribes each connection to the channel ``channel`` resolves.

    ``options`` are passed to :class:`~rtbroadcast.asgi.BroadcastEndpoint` (``allowed_origins``,
    ``max_frame_size``, ``max_messages_per_second``, ``idle_timeout``, ``direct_write``).
    """
    endpoint = BroadcastEndpoint(broadcaster, channel, authorize=authorize, sse=False, **options)
    return WebSocketRoute(path, endpoint, name=name)


def broadcast_routes(
    path: str,
    broadcaster: Broadcaster,
    *,
    channel: ChannelResolver,
    authorize: Authorizer | None = None,
    sse_path: str | None = None,
    **options: Any,
) -> list[BaseRoute]:
    """Return the WebSocket route at ``path`` and the Server-Sent Events route at ``sse_path``.

    ``sse_path`` defaults to ``path + "/sse"``; both share one endpoint, so they resolve, authorize and
    resume alike.
    """
    endpoint = BroadcastEndpoint(broadcaster, channel, authorize=authorize, **options)
    return [
        WebSocketRoute(path, endpoint),
        Route(sse_path or path.rstrip("/") + "/sse", endpoint, methods=["GET"]),
    ]


def lifespan(
    broadcaster: Broadcaster,
    *,
    also: Iterable[Callable[[AppT], Any]] = (),
    drain_on_signal: bool = True,
    drain_timeout: float = 2.0,
) -> Callable[[AppT], contextlib.AbstractAsyncContextManager[None]]:
    """Return a lifespan function that connects ``broadcaster`` at startup and disconnects it at shutdown.

    ``also`` takes further lifespan functions (``app -> async context manager``) entered inside it, so
    your own startup work can publish.

    ASGI servers close their connections before the lifespan's shutdown runs (uvicorn closes WebSockets
    with ``1012`` and waits for every SSE stream to end), so with ``drain_on_signal`` the first SIGTERM or
    SIGINT first drains the broadcaster (:meth:`~rtbroadcast.Broadcaster.drain`: WebSocket clients get
    ``1001``, SSE streams end with a ``retry:`` line), for at most ``drain_timeout`` seconds, and then
    reaches the server's own handler. This chains a handler the server installed with
    :func:`signal.signal` (uvicorn does, in the main thread); where there is none, nothing changes.

    Raises:
        ConfigurationError: ``drain_timeout`` is not a finite number of seconds >= 0.
    """
    wait_seconds("drain_timeout", drain_timeout)

    @contextlib.asynccontextmanager
    async def _lifespan(app: AppT) -> AsyncIterator[None]:
        async with broadcaster, contextlib.AsyncExitStack() as stack:
            if drain_on_signal:
                stack.enter_context(drain_on_signals(broadcaster, timeout=drain_timeout))
            for other in also:
                await stack.enter_async_context(other(app))
            yield

    return _lifespan


async def serve_websocket(
    endpoint: BroadcastEndpoint, websocket: WebSocket, *, identity: Identity | None = None
) -> None:
    """Serve ``websocket``, which a Starlette or FastAPI route received, as the connection of ``identity``.

    The FastAPI way to reuse the app's own authentication (``Depends``) on the realtime route: the route
    resolves its dependencies as for any other route (a dependency that raises ``HTTPException`` refuses
    the handshake before anything is accepted), then hands the socket to the endpoint with the identity
    it established. The endpoint does everything else as usual (Origin check, channel, ``authorize``
    with ``request.identity``, resume, expiry at ``identity.expires_at``); its own ``authenticate`` hook
    is not called::

        realtime = BroadcastEndpoint(broadcaster, channel=channel_of_user)

        @app.websocket("/realtime")
        async def realtime_route(websocket: WebSocket, user: User = Depends(current_user)) -> None:
            await serve_websocket(realtime, websocket, identity=Identity(user.id, expires_at=user.expires))

    Call it before anything else touches the socket (do not ``accept()`` it): the endpoint accepts. For
    the Server-Sent Events route, see :func:`sse_response`.

    Raises:
        ConfigurationError: ``identity`` is neither an :class:`~rtbroadcast.Identity` nor ``None``.
    """
    _check_identity(identity)
    scope = dict(websocket.scope)
    scope[IDENTITY_SCOPE_KEY] = identity
    await endpoint(scope, websocket.receive, websocket.send)


def sse_response(endpoint: BroadcastEndpoint, *, identity: Identity | None = None) -> Response:
    """Return the response that streams ``endpoint``'s Server-Sent Events to ``identity``, from a route.

    The SSE twin of :func:`serve_websocket`: a FastAPI ``GET`` route resolves the app's own
    dependencies (one that raises ``HTTPException`` answers before any stream starts), then returns
    this response, and the endpoint serves the request as the connection of ``identity``, as it serves
    an SSE request it was routed itself (channel, ``authorize`` with ``request.identity``,
    ``Last-Event-ID`` resume, the end of the stream at ``identity.expires_at``); its own
    ``authenticate`` hook is not called::

        @app.get("/realtime/sse")
        async def realtime_sse(user: User = Depends(current_user)) -> Response:
            return sse_response(realtime, identity=Identity(user.id, expires_at=user.expires))

    The endpoint writes the status and headers itself (``200`` and ``text/event-stream``, or the
    refusal's ``403`` / ``400`` / ``503``): the response's own ``status_code``, ``headers`` and
    ``media_type`` are not sent. A background task FastAPI attaches runs once the stream has ended.

    Raises:
        ConfigurationError: ``endpoint`` was made with ``sse=False``, or ``identity`` is neither an
            :class:`~rtbroadcast.Identity` nor ``None``.
    """
    _check_identity(identity)
    if not endpoint.sse:
        raise ConfigurationError("this endpoint was made with sse=False: it serves no Server-Sent Events")
    return _EndpointResponse(endpoint, identity)


def _check_identity(identity: object) -> None:
    if identity is not None and not isinstance(identity, Identity):
        raise ConfigurationError(
            f"identity must be an rtbroadcast.Identity (say Identity(user.id)) or None, not {identity!r}"
        )


class _EndpointResponse(Response):
    """A response that hands the request to a :class:`BroadcastEndpoint` with an identity in its scope."""

    def __init__(self, endpoint: BroadcastEndpoint, identity: Identity | None) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope = {**scope, IDENTITY_SCOPE_KEY: self.identity}
        await self.endpoint(scope, receive, send)
        if self.background is not None:
            await self.background()
