"""Auth the library owns: a resolver's refusal, token expiry, bearer and cookie helpers, FastAPI Depends."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Response, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from websockets.exceptions import InvalidStatus

from rtbroadcast import Broadcaster, CloseCode, ConfigurationError, Identity
from rtbroadcast.asgi import (
    TOKEN_EXPIRED,
    BroadcastEndpoint,
    ConnectionRequest,
    Deny,
    bearer_token,
    channel_from_query,
    cookie,
)
from rtbroadcast.starlette import lifespan, serve_websocket, sse_response
from rtbroadcast.testing import connect, serve

from .sse_support import open_sse
from .support import broadcast_app, until


def request_with(headers: dict[str, str], query: dict[str, str] | None = None) -> ConnectionRequest:
    return ConnectionRequest(
        scope={}, transport="websocket", path="/ws", query=query or {}, headers=headers, client=None
    )


def test_bearer_token_reads_the_header_then_the_query_when_asked() -> None:
    assert bearer_token(request_with({"authorization": "Bearer abc"})) == "abc"
    assert bearer_token(request_with({"authorization": "bearer  abc "})) == "abc"
    assert bearer_token(request_with({"authorization": "Basic abc"})) is None
    assert bearer_token(request_with({"authorization": "Bearer"})) is None
    assert bearer_token(request_with({"authorization": "Bearer a b"})) is None
    assert bearer_token(request_with({}, {"token": "q"})) is None  # the query only when asked
    assert bearer_token(request_with({}, {"token": "q"}), query="token") == "q"
    assert bearer_token(request_with({}, {"token": ""}), query="token") is None
    # A header that is there but wrong is not overridden by the query.
    assert bearer_token(request_with({"authorization": "Basic x"}, {"token": "q"}), query="token") is None


def test_cookie_reads_one_cookie() -> None:
    headers = {"cookie": 'theme=dark; session="s3cret"; empty='}
    assert cookie(request_with(headers), "session") == "s3cret"
    assert cookie(request_with(headers), "theme") == "dark"
    assert cookie(request_with(headers), "empty") == ""
    assert cookie(request_with(headers), "missing") is None
    assert cookie(request_with({}), "session") is None


def session_channel(request: ConnectionRequest) -> str | Deny:
    """The channel comes from the session: a signed-out client has none, and is told why."""
    user = cookie(request, "session")
    return f"user:{user}" if user else Deny("sign in first")


async def test_a_resolvers_refusal_reason_reaches_the_client() -> None:
    broadcaster = Broadcaster()
    async with serve(broadcast_app(broadcaster, channel=session_channel)) as server:
        async with connect(server.ws_url("/ws"), headers={"Cookie": "session=ada"}) as ws:
            assert ws.welcome is not None and ws.welcome.channel == "user:ada"  # type: ignore[union-attr]
        async with connect(server.ws_url("/ws")) as refused:
            assert refused.welcome is None
            assert (refused.close_code, refused.close_reason) == (CloseCode.FORBIDDEN, "sign in first")
        async with httpx.AsyncClient() as http:
            response = await http.get(server.url("/ws/sse"))
        assert (response.status_code, response.text) == (403, "sign in first")


def expiring_in(seconds: float) -> object:
    def authenticate(request: ConnectionRequest) -> Identity | Deny:
        token = bearer_token(request, query="token")
        if token is None:
            return Deny("no token")
        return Identity(token, expires_at=datetime.now(UTC) + timedelta(seconds=seconds))

    return authenticate


async def test_a_connection_is_closed_when_its_identity_expires() -> None:
    broadcaster = Broadcaster()
    app = broadcast_app(broadcaster, authenticate=expiring_in(0.5))
    async with serve(app) as server:
        started = time.monotonic()
        async with connect(server.ws_url("/ws", room="1"), headers={"Authorization": "Bearer ada"}) as ws:
            assert ws.welcome is not None
            code, reason = await ws.closed(timeout=5)
        elapsed = time.monotonic() - started
        assert (code, reason) == (CloseCode.FORBIDDEN, TOKEN_EXPIRED)
        assert 0.3 < elapsed < 4
        assert broadcaster.connection_count() == 0
        # Server-Sent Events: the stream ends, saying why, with a retry delay.
        async with (
            httpx.AsyncClient() as http,
            http.stream("GET", server.url("/ws/sse", room="1", token="bob")) as response,
        ):
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        assert response.status_code == 200
        assert b": closed 4003 token expired\nretry: " in body


async def test_an_identity_already_expired_is_refused_and_a_later_expiry_is_forgotten_on_close() -> None:
    broadcaster = Broadcaster()
    app = broadcast_app(broadcaster, authenticate=expiring_in(-1))
    async with serve(app) as server, connect(server.ws_url("/ws", room="1", token="ada")) as ws:
        assert ws.welcome is None
        assert (ws.close_code, ws.close_reason) == (CloseCode.FORBIDDEN, TOKEN_EXPIRED)
    broadcaster = Broadcaster()
    async with serve(broadcast_app(broadcaster, authenticate=expiring_in(0.3))) as server:
        async with connect(server.ws_url("/ws", room="1", token="ada")) as ws:
            assert ws.welcome is not None
        await asyncio.sleep(0.5)  # the timer of the closed connection fires into nothing, or was cancelled
        async with connect(server.ws_url("/ws", room="1", token="ada")) as again:
            assert again.welcome is not None


# -- FastAPI: the app's own Depends on the realtime route ----------------------------------------------

TOKENS = {"good": ("ada", 3600.0), "short": ("bob", 0.5)}
User = tuple[str, float]


bearer = HTTPBearer()


async def current_user(credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer)]) -> User:
    """The app's own authentication, as its HTTP routes use it."""
    if credentials.credentials not in TOKENS:
        raise HTTPException(401, "bad token")
    return TOKENS[credentials.credentials]


def fastapi_app(broadcaster: Broadcaster) -> FastAPI:
    seen: list[str | None] = []

    def authorize(request: ConnectionRequest, channel: str) -> bool:
        seen.append(request.identity.id if request.identity else None)
        return channel == f"user:{request.identity.id}" if request.identity else False

    endpoint = BroadcastEndpoint(broadcaster, channel_from_query("user", prefix="user:"), authorize=authorize)
    app = FastAPI(lifespan=lifespan(broadcaster))
    app.state.seen = seen

    @app.websocket("/realtime")
    async def realtime(websocket: WebSocket, user: Annotated[User, Depends(current_user)]) -> None:
        name, ttl = user
        identity = Identity(name, expires_at=datetime.now(UTC) + timedelta(seconds=ttl))
        await serve_websocket(endpoint, websocket, identity=identity)

    @app.get("/realtime/sse")
    async def realtime_sse(user: Annotated[User, Depends(current_user)]) -> Response:
        name, ttl = user
        identity = Identity(name, expires_at=datetime.now(UTC) + timedelta(seconds=ttl))
        return sse_response(endpoint, identity=identity)

    return app


async def test_a_fastapi_route_reuses_the_apps_depends_authentication() -> None:
    broadcaster = Broadcaster()
    app = fastapi_app(broadcaster)
    async with serve(app) as server:
        url = server.ws_url("/realtime", user="ada")
        async with connect(url, headers={"Authorization": "Bearer good"}) as ws:
            assert ws.welcome is not None and ws.welcome.channel == "user:ada"  # type: ignore[union-attr]
            await broadcaster.publish_json("user:ada", '{"type":"auth_note"}')
            assert (await ws.event())["type"] == "auth_note"
        assert app.state.seen == ["ada"]  # authorize saw the identity the dependency established
        # Another user's channel: authorize refuses.
        async with connect(url, headers={"Authorization": "Bearer short"}) as ws:
            assert ws.close_code == CloseCode.FORBIDDEN
        # The dependency refuses: the handshake is answered 401, before anything is accepted.
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, headers={"Authorization": "Bearer nope"}):
                pass
        assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            async with connect(url):
                pass
        # The dependency's expiry closes the connection, as with authenticate.
        async with connect(
            server.ws_url("/realtime", user="bob"), headers={"Authorization": "Bearer short"}
        ) as ws:
            assert ws.welcome is not None
            assert await ws.closed() == (CloseCode.FORBIDDEN, TOKEN_EXPIRED)


async def test_a_fastapi_sse_route_reuses_the_apps_depends_authentication() -> None:
    broadcaster = Broadcaster()
    app = fastapi_app(broadcaster)
    good, short = {"Authorization": "Bearer good"}, {"Authorization": "Bearer short"}
    async with serve(app) as server:
        url = server.url("/realtime/sse", user="ada")
        async with httpx.AsyncClient(headers=good) as http, open_sse(http, url) as stream:
            welcome = await stream.next_json()
            assert (welcome["type"], welcome["channel"]) == ("welcome", "user:ada")
            await broadcaster.publish_json("user:ada", '{"type":"auth_note"}')
            event = await stream.next()
            assert event.json()["type"] == "auth_note"
            assert event.id == f"{welcome['epoch']}:1"
        assert app.state.seen == ["ada"]  # authorize saw the identity the dependency established
        async with httpx.AsyncClient() as http:
            # The dependency refuses: FastAPI's own 401 (or 403 without a header), no stream.
            refused = await http.get(url, headers={"Authorization": "Bearer nope"})
            assert (refused.status_code, refused.json()) == (401, {"detail": "bad token"})
            assert (await http.get(url)).status_code in (401, 403)
            # Another user's channel: authorize refuses, as on an SSE route the endpoint was routed.
            denied = await http.get(url, headers=short)
            assert (denied.status_code, denied.text) == (403, "forbidden")
        # A resume through Last-Event-ID is the endpoint's, as ever.
        async with (
            httpx.AsyncClient(headers=good) as http,
            open_sse(http, url, last_event_id=f"{welcome['epoch']}:0") as stream,
        ):
            assert (await stream.next_json())["resumed"] is True
            assert (await stream.next_json())["type"] == "auth_note"
        # The dependency's expiry ends the stream, saying why, as with authenticate.
        async with (
            httpx.AsyncClient(headers=short) as http,
            open_sse(http, server.url("/realtime/sse", user="bob")) as stream,
        ):
            assert (await stream.next_json())["type"] == "welcome"
            assert await stream.until_end() == []
            assert f"closed {CloseCode.FORBIDDEN} {TOKEN_EXPIRED}" in stream.comments
            assert stream.retry is not None
    assert broadcaster.connection_count() == 0


def test_the_route_helpers_refuse_what_they_cannot_serve() -> None:
    broadcaster = Broadcaster()
    websocket_only = BroadcastEndpoint(broadcaster, channel_from_query("user"), sse=False)
    with pytest.raises(ConfigurationError, match="sse=False"):
        sse_response(websocket_only)
    endpoint = BroadcastEndpoint(broadcaster, channel_from_query("user"))
    with pytest.raises(ConfigurationError, match="Identity"):
        sse_response(endpoint, identity="ada")  # type: ignore[arg-type]


async def test_serve_websocket_works_with_direct_writes_and_a_client_that_leaves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broadcaster = Broadcaster()
    app = fastapi_app(broadcaster)
    async with serve(app, ws="rtbroadcast.uvicorn:WebSocketProtocol") as server:
        url = server.ws_url("/realtime", user="ada")
        for _ in range(2):
            async with connect(url, headers={"Authorization": "Bearer good"}) as ws:
                await broadcaster.publish_json("user:ada", '{"type":"auth_note"}')
                assert (await ws.event())["type"] == "auth_note"
            await until(lambda: broadcaster.connection_count() == 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_the_python_client_refreshes_an_expired_token_and_resumes_without_a_gap() -> None:
    from rtbroadcast.client import Backoff, Client

    lifetimes = {"t1": 0.6, "t2": 3600.0}

    def authenticate(request: ConnectionRequest) -> Identity | Deny:
        token = request.query.get("token", "")
        if token not in lifetimes:
            return Deny("invalid token")
        return Identity(token, expires_at=datetime.now(UTC) + timedelta(seconds=lifetimes[token]))

    asked: list[tuple[str, int | None, str]] = []

    def get_token(request: Any) -> str:
        asked.append((request.reason, request.code, request.message))
        return "t2"

    broadcaster = Broadcaster()
    fast = Backoff(initial_delay=0.05, max_delay=0.2)
    async with (
        serve(broadcast_app(broadcaster, authenticate=authenticate)) as server,
        Client(server.ws_url("/ws", room="exp"), token="t1", get_token=get_token, backoff=fast) as client,
    ):
        subscription = client.subscribe()
        await subscription.connected()
        for n in range(6):  # before, across and after the expiry
            await broadcaster.publish_json("room:exp", f'{{"type":"auth_tick","n":{n}}}')
            await asyncio.sleep(0.2)
        got = await subscription.take(6)
    assert [r.seq for r in got] == [1, 2, 3, 4, 5, 6]
    assert asked == [("refused", CloseCode.FORBIDDEN, TOKEN_EXPIRED)]
    assert client.stats.resumed == 1 and client.token == "t2"
