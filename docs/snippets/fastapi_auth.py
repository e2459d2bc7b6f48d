"""A FastAPI service whose realtime route reuses the app's own authentication (Depends), with token expiry."""

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Response, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from rtbroadcast import Broadcaster, Identity
from rtbroadcast.asgi import BroadcastEndpoint, ConnectionRequest, Deny
from rtbroadcast.starlette import lifespan, serve_websocket, sse_response


class User(BaseModel):
    id: str
    token_expires_at: datetime


SESSIONS = {  # stands in for your token check
    "token-ada": User(id="ada", token_expires_at=datetime(2100, 1, 1, tzinfo=UTC)),
}

bearer = HTTPBearer()


# --8<-- [start:depends]
async def current_user(credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer)]) -> User:
    """The app's authentication, for its HTTP routes and its realtime route alike."""
    user = SESSIONS.get(credentials.credentials)
    if user is None:
        raise HTTPException(401, "invalid token")  # the WebSocket handshake gets 401 too
    return user


def my_channel(request: ConnectionRequest) -> str | Deny:
    """Each user follows their own channel; the identity comes from the route's dependency."""
    if request.identity is None:
        return Deny("sign in first")
    return f"user:{request.identity.id}"


broadcaster = Broadcaster("memory://")
app = FastAPI(lifespan=lifespan(broadcaster))
realtime = BroadcastEndpoint(broadcaster, my_channel)


@app.websocket("/realtime")
async def realtime_route(websocket: WebSocket, user: Annotated[User, Depends(current_user)]) -> None:
    # Closed with 4003 "token expired" when expires_at passes; the client reconnects with a fresh token.
    identity = Identity(user.id, expires_at=user.token_expires_at)
    await serve_websocket(realtime, websocket, identity=identity)


@app.get("/realtime/sse")
async def realtime_sse(user: Annotated[User, Depends(current_user)]) -> Response:
    # The same for Server-Sent Events: the stream ends with "closed 4003 token expired" and a retry: line.
    identity = Identity(user.id, expires_at=user.token_expires_at)
    return sse_response(realtime, identity=identity)


@app.get("/me")
async def me(user: Annotated[User, Depends(current_user)]) -> dict[str, str]:
    return {"id": user.id}


# --8<-- [end:depends]
