"""A framework-agnostic ASGI endpoint: WebSocket, with Server-Sent Events as the fallback transport.

:class:`BroadcastEndpoint` is a plain ASGI application; it imports no web framework. Mount it in Starlette or
FastAPI with :mod:`rtbroadcast.starlette`, or route to it from any ASGI server or framework.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl

from ._config import count, optional_seconds, seconds
from ._shutdown import drain_on_signals
from ._websocket import WebSocketSession, direct_transport
from .broadcaster import Broadcaster, BroadcasterState
from .connection import Connection
from .errors import (
    BackendUnavailable,
    ConfigurationError,
    ConnectionLimitReached,
    ProtocolError,
    StateError,
)
from .events import format_timestamp, utc_now
from .protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    CloseCode,
    ErrorFrame,
    Ping,
    Pong,
    ResumePoint,
    decode_client_frame,
    encode_server_frame,
    is_valid_channel,
    parse_resume_point,
)

__all__ = [
    "BroadcastEndpoint",
    "ChannelResolver",
    "ConnectionRequest",
    "Deny",
    "channel_from_query",
    "drain_on_signals",
]

logger = logging.getLogger("rtbroadcast.asgi")

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ConnectionRequest:
    """What a client asked for when it connected, as the channel resolver and ``authorize`` hook see it.

    ``query`` keeps the last value of each parameter; ``headers`` have lower-case names.
    """

    scope: Scope
    transport: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    client: tuple[str, int] | None
    subprotocols: tuple[str, ...] = ()
    path_params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scope(cls, scope: Scope) -> ConnectionRequest:
        """Build from an ASGI ``websocket`` or ``http`` scope."""
        raw_query = scope.get("query_string", b"").decode("latin-1")
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        client = scope.get("client")
        return cls(
            scope=scope,
            transport="websocket" if scope["type"] == "websocket" else "sse",
            path=scope.get("path", ""),
            query=dict(parse_qsl(raw_query, keep_blank_values=True)),
            headers=headers,
            client=(client[0], client[1]) if client else None,
            subprotocols=tuple(scope.get("subprotocols", ())),
            path_params=dict(scope.get("path_params", {})),
        )


@dataclass(frozen=True, slots=True)
class Deny:
    """Returned by an ``authorize`` hook to refuse a connection; ``reason`` goes to the client."""

    reason: str = "forbidden"


#: Maps a connection request to its channel; returns ``None`` (or raises ``KeyError``/``ValueError``)
#: when the request names no valid channel. May be a coroutine function.
ChannelResolver: TypeAlias = Callable[[ConnectionRequest], "str | Awaitable[str | None] | None"]
#: Decides whether a request may subscribe to a channel: ``True`` allows, ``False`` or :class:`Deny` refuses.
Authorizer: TypeAlias = Callable[[ConnectionRequest, str], "bool | Deny | Awaitable[bool | Deny]"]


def channel_from_query(
    name: str, *, prefix: str = "", pattern: str | None = None
) -> Callable[[ConnectionRequest], str | None]:
    """Make a channel resolver that reads query parameter ``name``, e.g. ``?restaurant_id=abc``.

    Args:
        name: the query parameter.
        prefix: prepended to the value to form the channel name (``"restaurant:"``).
        pattern: a regular expression the whole value must match; otherwise the request is refused.
    """
    import re

    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"name must be a non-empty string, not {name!r}")
    if not isinstance(prefix, str):
        raise ConfigurationError(f"prefix must be a string, not {prefix!r}")
    try:
        compiled = re.compile(pattern) if pattern is not None else None
    except (re.error, TypeError) as exc:
        raise ConfigurationError(f"pattern {pattern!r} is not a regular expression: {exc}") from None

    def resolve(request: ConnectionRequest) -> str | None:
        value = request.query.get(name)
        if not value or (compiled is not None and compiled.fullmatch(value) is None):
            return None
        return prefix + value

    return resolve


def _origins(value: Iterable[str] | None) -> frozenset[str] | None:
    # A lone string would become a set of characters, which allows no real origin.
    if value is None:
        return None
    if isinstance(value, str | bytes):
        raise ConfigurationError(f"allowed_origins must be a collection of origins, not the string {value!r}")
    try:
        origins = frozenset(value)
    except TypeError:
        raise ConfigurationError(f"allowed_origins must be a collection of origins, not {value!r}") from None
    wrong = [origin for origin in origins if not isinstance(origin, str)]
    if wrong:
        raise ConfigurationError(
            f"allowed_origins must hold strings such as 'https://example.com', not {wrong[0]!r}"
        )
    return origins


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigurationError(f"{name} must be True or False, not {value!r}")


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class BroadcastEndpoint:
    """ASGI application that subscribes each WebSocket (or SSE request) to one channel.

    Args:
        broadcaster: the broadcaster to attach connections to.
        channel: resolves the request to its channel name (see :func:`channel_from_query`).
        authorize: optional hook deciding whether the request may subscribe to the channel.
        allowed_origins: if given, WebSocket requests whose ``Origin`` header is not in it are refused
            (code 4003); requests without an Origin (native apps) are allowed.
        max_frame_size: largest client frame accepted, in bytes; larger ones get an ``error`` frame. The
            ASGI server's own limit is the one that keeps large frames out of memory: run it with the
            same limit (uvicorn: ``ws_max_size``), and frames over it are refused unread with close
            code 1009. Under :mod:`rtbroadcast.uvicorn` the endpoint warns once if the server's limit
            is larger.
        max_messages_per_second: client frames accepted per second (burst of the same size); past it the
            connection is closed with 4008.
        idle_timeout: close a connection (4002) that sent nothing for this many seconds; ``None`` leaves
            dead-peer detection to the server's WebSocket pings (uvicorn's ``ws_ping_interval``).
        sse: whether plain HTTP GET requests get a Server-Sent Events stream.
        direct_write: where the server offers it (uvicorn with
            ``ws="rtbroadcast.uvicorn:WebSocketProtocol"``), write each frame straight to the
            connection's transport (encoded, or compressed, once per event for all connections) instead
            of through one ASGI ``send`` per connection; other servers always use ASGI. ``False`` sends
            every frame through ASGI (the slow-consumer close still goes out ahead of flow control where
            the server offers it). See the performance page.

    Raises:
        ConfigurationError: an option of the wrong type or out of range (a lone string as
            ``allowed_origins``, a ``max_frame_size`` below 1, a rate or timeout that is not a finite
            number of seconds > 0), named in the message.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        channel: ChannelResolver,
        *,
        authorize: Authorizer | None = None,
        allowed_origins: Iterable[str] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_messages_per_second: float = 20.0,
        idle_timeout: float | None = None,
        sse: bool = True,
        direct_write: bool = True,
    ) -> None:
        if not isinstance(broadcaster, Broadcaster):
            raise ConfigurationError(f"broadcaster must be a Broadcaster, not {broadcaster!r}")
        if not callable(channel):
            raise ConfigurationError(f"channel must be a callable that resolves a request, not {channel!r}")
        if authorize is not None and not callable(authorize):
            raise ConfigurationError(f"authorize must be a callable or None, not {authorize!r}")
        self.broadcaster = broadcaster
        self.resolve_channel = channel
        self.authorize = authorize
        self.allowed_origins = _origins(allowed_origins)
        self.max_frame_size = count("max_frame_size", max_frame_size, minimum=1)
        self.max_messages_per_second = seconds("max_messages_per_second", max_messages_per_second)
        self.idle_timeout = optional_seconds("idle_timeout", idle_timeout)
        self.sse = _flag("sse", sse)
        self.direct_write = _flag("direct_write", direct_write)
        self._limit_checked = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            with self.broadcaster.serving():
                await self._websocket(scope, receive, send)
        elif scope["type"] == "http" and self.sse:
            with self.broadcaster.serving():
                await self._sse(scope, receive, send)
        elif scope["type"] == "http":
            await _plain_response(send, 404, "not found")
        else:
            raise RuntimeError(f"BroadcastEndpoint does not handle ASGI scope type {scope['type']!r}")

    async def _admit(self, request: ConnectionRequest) -> tuple[str, ResumePoint | None]:
        """Check origin, channel, resume point and authorization; raise :class:`_Refused` if any fails."""
        if self.allowed_origins is not None and request.transport == "websocket":
            origin = request.headers.get("origin")
            if origin is not None and origin not in self.allowed_origins:
                raise _Refused(CloseCode.FORBIDDEN, "origin not allowed")
        try:
            channel = await _maybe_await(self.resolve_channel(request))
        except (KeyError, ValueError):
            channel = None
        if not channel or not is_valid_channel(channel):
            raise _Refused(CloseCode.BAD_REQUEST, "no valid channel in the request")
        try:
            resume = parse_resume_point(request.query)
            if resume is None and request.transport == "sse":
                resume = _parse_last_event_id(request.headers.get("last-event-id"))
        except ProtocolError as exc:
            raise _Refused(CloseCode.BAD_REQUEST, exc.message) from None
        if self.authorize is not None:
            decision = await _maybe_await(self.authorize(request, channel))
            if decision is not True:
                reason = decision.reason if isinstance(decision, Deny) else "forbidden"
                raise _Refused(CloseCode.FORBIDDEN, reason)
        return channel, resume

    async def _attach(self, connection: Connection, resume: ResumePoint | None) -> None:
        try:
            await self.broadcaster.attach(connection, resume)
        except ConnectionLimitReached as exc:
            raise _Refused(CloseCode.TRY_AGAIN_LATER, str(exc)) from None
        except (BackendUnavailable, StateError) as exc:
            if self.broadcaster.state is BroadcasterState.DRAINING:
                raise _Refused(CloseCode.GOING_AWAY, "server shutting down") from None
            logger.warning("cannot attach a connection to %r: %s", connection.channel, exc)
            raise _Refused(CloseCode.TRY_AGAIN_LATER, "service unavailable, retry later") from None

    # -- WebSocket --------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        request = ConnectionRequest.from_scope(scope)
        connection: Connection | None = None
        try:
            channel, resume = await self._admit(request)
            await send({"type": "websocket.accept"})
            connection = Connection(channel, limits=self.broadcaster.queue_limits)
            connection.transport = request.transport
            await self._attach(connection, resume)
        except _Refused as refused:
            if connection is None:
                await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": int(refused.code), "reason": refused.reason})
            logger.info("refused %s connection: %s (%d)", request.path, refused.reason, refused.code)
            return
        direct = direct_transport(scope)
        if direct is not None:
            self._check_server_limit(direct.max_message_size)
        session = WebSocketSession(connection, send, direct, write_frames=self.direct_write)
        session.start()
        try:
            await self._read(connection, receive)
        except asyncio.CancelledError:
            # The session gave up on a close frame the server could not send: end this handler.
            if not session.abandoned:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            session.client_gone = connection.close_code is None
            connection.close(CloseCode.NORMAL, "client disconnected")
            await session.finish()

    def _check_server_limit(self, server_limit: int | None) -> None:
        """Warn once if the server buffers larger frames than this endpoint accepts."""
        if self._limit_checked:
            return
        self._limit_checked = True
        if server_limit is None or server_limit > self.max_frame_size:
            logger.warning(
                "the ASGI server accepts WebSocket messages of %s, this endpoint only of %d bytes: a "
                "larger frame is held in memory whole before it is refused; set the server's limit to "
                "max_frame_size (uvicorn: ws_max_size=%d, --ws-max-size %d) to refuse it unread (1009)",
                "any size" if server_limit is None else f"up to {server_limit} bytes",
                self.max_frame_size,
                self.max_frame_size,
                self.max_frame_size,
            )

    async def _read(self, connection: Connection, receive: Receive) -> None:
        """Read client frames until the client disconnects or the connection is closed."""
        rate = self.max_messages_per_second
        tokens = rate
        last = time.monotonic()
        while True:
            if self.idle_timeout is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        message = await receive()
                except TimeoutError:
                    connection.close(CloseCode.HEARTBEAT_TIMEOUT, "no message within the idle timeout")
                    return
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind != "websocket.receive" or connection.closed:
                continue
            now = time.monotonic()
            tokens = min(rate, tokens + (now - last) * rate)
            last = now
            if tokens < 1:
                connection.close(CloseCode.RATE_LIMITED, "too many messages")
                continue
            tokens -= 1
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            try:
                frame = decode_client_frame(data, max_size=self.max_frame_size)
            except ProtocolError as exc:
                connection.push_frame(encode_server_frame(ErrorFrame(exc.code, exc.message)))
                continue
            if isinstance(frame, Ping):
                connection.push_frame(encode_server_frame(Pong(format_timestamp(utc_now()))))

    # -- Server-Sent Events -----------------------------------------------------------------------

    async def _sse(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method", "GET") != "GET":
            await _plain_response(send, 405, "method not allowed")
            return
        request = ConnectionRequest.from_scope(scope)
        connection = None
        try:
            channel, resume = await self._admit(request)
            connection = Connection(channel, limits=self.broadcaster.queue_limits)
            connection.transport = request.transport
            await self._attach(connection, resume)
        except _Refused as refused:
            status = _SSE_STATUS.get(refused.code, 400)
            await _plain_response(send, status, refused.reason)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, connection))
        try:
            await self._stream(connection, send)
            code = connection.close_code
            connection.close(CloseCode.NORMAL, "stream ended")
            watcher.cancel()
            body = b"" if code in (None, CloseCode.NORMAL) else _sse_farewell(code, connection.close_reason)
            await send({"type": "http.response.body", "body": body, "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        except asyncio.CancelledError:
            if self.broadcaster.state not in _STOPPING:
                raise
            # The server is stopping and cancels what still runs once its graceful-shutdown time is up (a
            # reader that stopped reading holds its last write): the stream is over, not failed, and one
            # traceback per client in the server's log would say otherwise.
            logger.debug("SSE stream #%d cancelled during shutdown", connection.id)
        finally:
            connection.close(CloseCode.NORMAL, "stream ended")
            watcher.cancel()

    async def _stream(self, connection: Connection, send: Send) -> None:
        """Write the connection's frames as SSE events, with a comment every heartbeat, until it closes."""
        interval = self.broadcaster.heartbeat_interval
        while True:
            try:
                async with asyncio.timeout(interval):
                    item = await connection.get()
            except TimeoutError:
                await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
                continue
            if item is None:
                return
            if isinstance(item, str):
                chunk = f"data: {item}\n\n"
            else:
                chunk = f"id: {item.epoch}:{item.seq}\ndata: {item.data}\n\n"
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            connection.sent += 1


#: The broadcaster's states once the process has begun to stop.
_STOPPING: Final = frozenset(
    {BroadcasterState.DRAINING, BroadcasterState.DISCONNECTING, BroadcasterState.CLOSED}
)

#: HTTP status of an SSE request refused with a close code.
_SSE_STATUS: dict[int, int] = {
    CloseCode.FORBIDDEN: 403,
    CloseCode.GOING_AWAY: 503,
    CloseCode.TRY_AGAIN_LATER: 503,
}


#: Bounds of the ``retry:`` an SSE stream ended by the server announces, in milliseconds: spread out, so
#: that the clients of a stopping process do not all reconnect to the next one at the same instant.
SSE_RETRY_MS: Final = (500, 2500)


def _sse_farewell(code: int, reason: str) -> bytes:
    """The last chunk of an SSE stream the server ended: why (a comment), and when to reconnect."""
    reason = " ".join(reason.split())
    return f": closed {code} {reason}\nretry: {random.randint(*SSE_RETRY_MS)}\n\n".encode()


async def _watch_disconnect(receive: Receive, connection: Connection) -> None:
    """Close ``connection`` when the client goes (or the server says it has: ``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            connection.close(CloseCode.NORMAL, "client disconnected")
            return


def _parse_last_event_id(value: str | None) -> ResumePoint | None:
    if not value:
        return None
    epoch, _, seq = value.rpartition(":")
    return parse_resume_point({"epoch": epoch, "last_seq": seq})


async def _plain_response(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
