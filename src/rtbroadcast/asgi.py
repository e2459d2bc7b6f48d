"""A framework-agnostic ASGI endpoint: WebSocket, with Server-Sent Events as the fallback transport.

:class:`BroadcastEndpoint` is a plain ASGI application; it imports no web framework. Mount it in Starlette or
FastAPI with :mod:`rtbroadcast.starlette`, or route to it from any ASGI server or framework.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl

from ._config import count, optional_seconds, seconds
from ._shutdown import drain_on_signals
from ._websocket import WebSocketSession, direct_transport
from .backends import Envelope
from .broadcaster import Broadcaster, BroadcasterState
from .connection import Connection
from .errors import (
    BackendUnavailable,
    ConfigurationError,
    ConnectionLimitReached,
    ProtocolError,
    StateError,
    SubscriptionRefused,
)
from .events import format_timestamp, utc_now
from .identity import Allow, Deny, Identity, presence_info
from .protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    CloseCode,
    ErrorFrame,
    ErrorFrameV2,
    Ping,
    Pong,
    ResumePoint,
    Subscribe,
    SubscriptionErrorCode,
    Unsubscribe,
    decode_client_frame,
    decode_positions,
    encode_positions,
    encode_server_frame,
    is_valid_channel,
    parse_protocol,
    parse_resume_point,
)

# Deny, Allow and Identity live in rtbroadcast.identity (in-process code uses them too) and are
# re-exported here, where the hooks that return them are.
__all__ = [
    "DEFAULT_MAX_SUBSCRIPTIONS",
    "IDENTITY_SCOPE_KEY",
    "TOKEN_EXPIRED",
    "Allow",
    "Authenticator",
    "Authorizer",
    "BroadcastEndpoint",
    "ChannelResolver",
    "ConnectionRequest",
    "Deny",
    "Identity",
    "bearer_token",
    "channel_from_query",
    "cookie",
    "drain_on_signals",
]

#: Default limit on the subscriptions of one protocol-2 connection (server-side ones included).
DEFAULT_MAX_SUBSCRIPTIONS: Final = 128

logger = logging.getLogger("rtbroadcast.asgi")

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ConnectionRequest:
    """What a client asked for when it connected, as the endpoint's hooks see it.

    ``query`` keeps the last value of each parameter; ``headers`` have lower-case names. ``protocol`` is
    the wire protocol the client chose (``?protocol=2``; 1 by default); ``identity`` is what the
    ``authenticate`` hook returned (``None`` before it ran, or for an anonymous connection).
    """

    scope: Scope
    transport: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    client: tuple[str, int] | None
    subprotocols: tuple[str, ...] = ()
    path_params: Mapping[str, Any] = field(default_factory=dict)
    protocol: int = 1
    identity: Identity | None = None

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


#: Maps a connection request to its channel (protocol 1), or to its server-side channels (protocol 2: a
#: sequence, or one name); returns ``None`` (or raises ``KeyError``/``ValueError``) when the request names
#: none. May be a coroutine function.
ChannelResolver: TypeAlias = Callable[
    [ConnectionRequest],
    "str | Sequence[str] | Deny | Awaitable[str | Sequence[str] | Deny | None] | None",
]
#: Decides whether a request may subscribe to a channel: ``True`` or :class:`Allow` (with presence info)
#: allows, ``False`` or :class:`Deny` refuses. Called for every channel a connection subscribes to.
Authorizer: TypeAlias = Callable[
    [ConnectionRequest, str], "bool | Deny | Allow | Awaitable[bool | Deny | Allow]"
]
#: Says who a request is, once per connection before anything else: an :class:`Identity`, ``None``
#: (anonymous) or :class:`Deny` (refused: 4003, SSE 403). May be a coroutine function.
Authenticator: TypeAlias = Callable[
    [ConnectionRequest], "Identity | Deny | Awaitable[Identity | Deny | None] | None"
]


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


def bearer_token(request: ConnectionRequest, *, query: str | None = None) -> str | None:
    """Return the token of ``Authorization: Bearer <token>`` (the scheme in any case), else ``None``.

    Browsers cannot set headers on a WebSocket: with ``query`` (``"token"``), a request without the header
    is read from that query parameter instead (keep such URLs out of access logs). For ``authenticate``::

        def authenticate(request: ConnectionRequest) -> Identity | Deny:
            token = bearer_token(request, query="token")
            if token is None:
                return Deny("sign in first")
            ...
    """
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token and " " not in token else None
    if query is not None:
        return request.query.get(query) or None
    return None


def cookie(request: ConnectionRequest, name: str) -> str | None:
    """Return the value of cookie ``name`` sent with the request (a session cookie), else ``None``.

    Browsers send the site's cookies with a WebSocket handshake and an ``EventSource`` request, so a
    service that signs its users in with a cookie authenticates its realtime connections with it too;
    restrict ``allowed_origins`` then, so that another site cannot open a connection with them.
    """
    header = request.headers.get("cookie")
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


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


@dataclass(frozen=True, slots=True)
class _Admission:
    """What :meth:`BroadcastEndpoint._admit` let in: the request (with protocol and identity), its
    resolved channels, protocol 1's authorization decision, and the resume points by channel."""

    request: ConnectionRequest
    channels: tuple[str, ...]
    allow: Allow | None
    positions: Mapping[str, ResumePoint]


def _channels(resolved: object) -> tuple[str, ...] | None:
    """Normalise what a resolver returned to a tuple of names; ``None`` if one of them is invalid."""
    if resolved is None or resolved == "":
        return ()
    if isinstance(resolved, str):
        resolved = (resolved,)
    if not isinstance(resolved, Sequence):
        return None
    names: list[str] = []
    for name in resolved:
        if not is_valid_channel(name):
            return None
        names.append(name)
    return tuple(dict.fromkeys(names))


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class BroadcastEndpoint:
    """ASGI application that subscribes each WebSocket (or SSE request) to its channel or channels.

    A client chooses the wire protocol with ``?protocol=``: absent or ``1``, protocol 1 (one channel,
    from the resolver); ``2``, protocol 2 (the resolver's channels as server-side subscriptions, then
    the client's ``subscribe`` frames); any other value is refused with ``4004``.

    Args:
        broadcaster: the broadcaster to attach connections to.
        channel: resolves the request to its channel name (see :func:`channel_from_query`); on protocol
            2 to its server-side channels (a sequence, one name, or ``None`` for none). It may refuse
            with a reason by returning :class:`Deny` (close 4003 with that reason, SSE 403): say "sign in
            first" rather than leave the client with 4004 "no valid channel in the request".
        authorize: optional hook deciding whether the request may subscribe to a channel; asked for
            every channel a connection subscribes to. ``True`` or :class:`Allow` allows, ``False`` or
            :class:`Deny` refuses (protocol 1: close 4003; protocol 2: an ``error`` frame for that
            subscription only).
        authenticate: optional hook run once per connection, after the Origin check and before the
            others: returns the connection's :class:`Identity` (then ``request.identity`` in the other
            hooks), ``None`` (anonymous) or :class:`Deny` (close 4003, SSE 403). An identity with an
            ``expires_at`` is closed when it passes: code 4003, reason :data:`TOKEN_EXPIRED` (``"token
            expired"``); one already past is refused so. The client gets fresh credentials, then
            reconnects and resumes.
        max_subscriptions: most subscriptions one protocol-2 connection may hold, server-side ones
            included; past it a ``subscribe`` gets ``error`` ``too_many_subscriptions``.
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
        authenticate: Authenticator | None = None,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
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
        if authenticate is not None and not callable(authenticate):
            raise ConfigurationError(f"authenticate must be a callable or None, not {authenticate!r}")
        self.broadcaster = broadcaster
        self.resolve_channel = channel
        self.authorize = authorize
        self.authenticate = authenticate
        self.max_subscriptions = count("max_subscriptions", max_subscriptions, minimum=1)
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

    async def _admit(self, request: ConnectionRequest) -> _Admission:
        """Check origin, protocol, identity, channels, resume points and (protocol 1) authorization.

        Raises:
            _Refused: one of them fails; the code says which (4003, 4004).
        """
        if self.allowed_origins is not None and request.transport == "websocket":
            origin = request.headers.get("origin")
            if origin is not None and origin not in self.allowed_origins:
                raise _Refused(CloseCode.FORBIDDEN, "origin not allowed")
        try:
            protocol = parse_protocol(request.query)
        except ProtocolError as exc:
            raise _Refused(CloseCode.BAD_REQUEST, exc.message) from None
        request = replace(request, protocol=protocol)
        authenticated = IDENTITY_SCOPE_KEY in request.scope or self.authenticate is not None
        if authenticated:
            if IDENTITY_SCOPE_KEY in request.scope:  # established by the app (serve_websocket, a middleware)
                identity = request.scope[IDENTITY_SCOPE_KEY]
            elif self.authenticate is not None:
                identity = await _maybe_await(self.authenticate(request))
            if isinstance(identity, Deny):
                raise _Refused(CloseCode.FORBIDDEN, identity.reason)
            if identity is not None and not isinstance(identity, Identity):
                raise TypeError(f"authenticate must return an Identity, a Deny or None, not {identity!r}")
            if identity is not None and identity.expires_at is not None and _seconds_left(identity) <= 0:
                raise _Refused(CloseCode.FORBIDDEN, TOKEN_EXPIRED)
            request = replace(request, identity=identity)
        try:
            resolved = await _maybe_await(self.resolve_channel(request))
        except (KeyError, ValueError):
            resolved = None
        if isinstance(resolved, Deny):  # a refusal with a reason, not a request without a channel
            raise _Refused(CloseCode.FORBIDDEN, resolved.reason)
        channels = _channels(resolved)
        if channels is None:
            raise _Refused(CloseCode.BAD_REQUEST, "no valid channel in the request")
        if protocol == 2:
            return _Admission(request, channels, None, self._positions(request))
        if len(channels) > 1:
            raise _Refused(
                CloseCode.BAD_REQUEST, "this endpoint resolves several channels; connect with ?protocol=2"
            )
        if not channels:
            raise _Refused(CloseCode.BAD_REQUEST, "no valid channel in the request")
        channel = channels[0]
        try:
            resume = parse_resume_point(request.query)
            if resume is None and request.transport == "sse":
                resume = _parse_last_event_id(request.headers.get("last-event-id"))
        except ProtocolError as exc:
            raise _Refused(CloseCode.BAD_REQUEST, exc.message) from None
        decision = await self._decide(request, channel)
        if isinstance(decision, Deny):
            raise _Refused(CloseCode.FORBIDDEN, decision.reason)
        return _Admission(request, channels, decision, {channel: resume} if resume is not None else {})

    def _positions(self, request: ConnectionRequest) -> dict[str, ResumePoint]:
        """Read protocol 2's ``resume`` query parameter (the positions of server-side subscriptions)."""
        if "epoch" in request.query or "last_seq" in request.query:
            raise _Refused(
                CloseCode.BAD_REQUEST,
                "protocol 2 resumes per channel: 'resume' (server-side channels) or subscribe frames",
            )
        token = request.query.get("resume")
        if not token:
            return {}
        try:
            return decode_positions(token)
        except ProtocolError as exc:
            raise _Refused(CloseCode.BAD_REQUEST, exc.message) from None

    async def _decide(self, request: ConnectionRequest, channel: str) -> Allow | Deny:
        """Ask the ``authorize`` hook about ``channel``: an :class:`Allow` or a :class:`Deny`."""
        if self.authorize is None:
            return Allow()
        decision = await _maybe_await(self.authorize(request, channel))
        if decision is True:
            return Allow()
        if isinstance(decision, Allow | Deny):
            return decision
        return Deny()

    async def _attach(self, connection: Connection, resume: ResumePoint | None) -> None:
        try:
            await self.broadcaster.attach(connection, resume)
            _close_at_expiry(connection)
        except ConnectionLimitReached as exc:
            raise _Refused(CloseCode.TRY_AGAIN_LATER, str(exc)) from None
        except (BackendUnavailable, StateError) as exc:
            if self.broadcaster.state is BroadcasterState.DRAINING:
                raise _Refused(CloseCode.GOING_AWAY, "server shutting down") from None
            logger.warning("cannot attach a connection to %r: %s", connection.channel, exc)
            raise _Refused(CloseCode.TRY_AGAIN_LATER, "service unavailable, retry later") from None

    def _connection(self, admission: _Admission) -> Connection:
        request = admission.request
        limits = self.broadcaster.queue_limits
        if request.protocol == 2:
            connection = Connection(
                protocol=2,
                limits=limits,
                identity=request.identity,
                max_subscriptions=self.max_subscriptions,
            )
        else:
            connection = Connection(admission.channels[0], limits=limits, identity=request.identity)
            connection.cursor.info = presence_info(admission.allow, request.identity)
        connection.transport = request.transport
        return connection

    # -- WebSocket --------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        request = ConnectionRequest.from_scope(scope)
        connection: Connection | None = None
        try:
            admission = await self._admit(request)
            request = admission.request
            await send({"type": "websocket.accept"})
            connection = self._connection(admission)
            await self._attach(connection, admission.positions.get(connection.channel))
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
            if request.protocol == 2:
                for channel in admission.channels:
                    await self._subscribe(
                        connection, request, None, channel, admission.positions.get(channel)
                    )
            await self._read(connection, request, receive)
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

    async def _subscribe(
        self,
        connection: Connection,
        request: ConnectionRequest,
        request_id: str | None,
        channel: str,
        resume: ResumePoint | None,
        presence: bool = False,
    ) -> None:
        """Authorize and make one protocol-2 subscription; queue its answer (subscribed, or an error)."""
        if connection.closed:
            return
        code = SubscriptionErrorCode.FORBIDDEN
        if connection.cursor_for(channel) is not None:
            self._refuse(connection, request_id, channel, SubscriptionErrorCode.ALREADY_SUBSCRIBED, "")
            return
        try:
            decision = await self._decide(request, channel)
        except Exception:
            logger.exception("the authorize hook failed on %r", channel)
            connection.close(CloseCode.INTERNAL_ERROR, "authorization failed")
            return
        if isinstance(decision, Deny):
            if request_id is None:
                logger.warning("server-side channel %r denied by authorize: %s", channel, decision.reason)
            self._refuse(connection, request_id, channel, code, decision.reason)
            return
        try:
            await self.broadcaster.add_subscription(
                connection,
                channel,
                resume,
                request_id=request_id,
                info=presence_info(decision, request.identity),
                presence=presence,
            )
        except SubscriptionRefused as exc:
            self._refuse(connection, request_id, channel, exc.code, exc.message)
        except ConnectionLimitReached as exc:
            self._refuse(connection, request_id, channel, SubscriptionErrorCode.TRY_AGAIN_LATER, str(exc))
        except BackendUnavailable as exc:
            logger.warning("cannot subscribe connection #%d to %r: %s", connection.id, channel, exc)
            self._refuse(
                connection, request_id, channel, SubscriptionErrorCode.TRY_AGAIN_LATER, "backend unavailable"
            )
        except StateError:
            pass  # the connection closed, or the broadcaster is draining (which closed it)

    def _refuse(
        self, connection: Connection, request_id: str | None, channel: str | None, code: str, message: str
    ) -> None:
        connection.push_frame(encode_server_frame(ErrorFrameV2(request_id, code, message or code, channel)))

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

    async def _read(self, connection: Connection, request: ConnectionRequest, receive: Receive) -> None:
        """Read client frames until the client disconnects or the connection is closed."""
        rate = self.max_messages_per_second
        tokens = rate
        last = time.monotonic()
        protocol = connection.protocol
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
                frame = decode_client_frame(data, max_size=self.max_frame_size, protocol=protocol)
            except ProtocolError as exc:
                if protocol == 1:
                    connection.push_frame(encode_server_frame(ErrorFrame(exc.code, exc.message)))
                else:
                    self._refuse(connection, exc.request_id, exc.channel, exc.code, exc.message)
                continue
            if isinstance(frame, Ping):
                connection.push_frame(encode_server_frame(Pong(format_timestamp(utc_now()))))
            elif isinstance(frame, Subscribe):
                await self._subscribe(
                    connection, request, frame.id, frame.channel, frame.resume, frame.presence
                )
            elif isinstance(frame, Unsubscribe):
                try:
                    self.broadcaster.remove_subscription(connection, frame.channel, request_id=frame.id)
                except SubscriptionRefused as exc:
                    self._refuse(connection, frame.id, frame.channel, exc.code, exc.message)

    # -- Server-Sent Events -----------------------------------------------------------------------

    async def _sse(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method", "GET") != "GET":
            await _plain_response(send, 405, "method not allowed")
            return
        request = ConnectionRequest.from_scope(scope)
        connection = None
        try:
            admission = await self._admit(request)
            connection = self._connection(admission)
            if admission.request.protocol == 2:
                await self._sse_subscribe(connection, admission)
            else:
                await self._attach(connection, admission.positions.get(connection.channel))
        except _Refused as refused:
            if connection is not None:
                connection.close(CloseCode.NORMAL, "refused")
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
            if connection.protocol == 2:
                await self._stream_v2(connection, send)
            else:
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
        while (item := await _next_item(connection, send, interval)) is not None:
            if isinstance(item, str):
                chunk = f"data: {item}\n\n"
            else:
                chunk = f"id: {item.epoch}:{item.seq}\ndata: {item.data}\n\n"
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            connection.sent += 1

    async def _sse_subscribe(self, connection: Connection, admission: _Admission) -> None:
        """Attach a protocol-2 SSE stream and subscribe it to the resolver's and the URL's channels.

        The channels are the resolver's (server-side) and those of the repeated ``channel=`` query
        parameters, each asked of ``authorize``; each resumes from the ``Last-Event-ID`` header (or the
        ``resume`` parameter). A denied channel gets an ``error`` frame and the stream goes on; a request
        none of whose channels could be subscribed is refused (403, or 503 if the backend is unavailable).

        Raises:
            _Refused: the channels, the positions, or every subscription failed.
        """
        request = admission.request
        raw_query = request.scope.get("query_string", b"").decode("latin-1")
        asked = [value for key, value in parse_qsl(raw_query, keep_blank_values=True) if key == "channel"]
        for channel in asked:
            if not is_valid_channel(channel):
                raise _Refused(
                    CloseCode.BAD_REQUEST,
                    f"invalid channel name in channel=: {channel[:64]!r} (1 to 256 characters, no control "
                    "characters)",
                )
        channels = tuple(dict.fromkeys((*admission.channels, *asked)))
        if len(channels) > self.max_subscriptions:
            raise _Refused(
                CloseCode.BAD_REQUEST,
                f"{len(channels)} channels, more than this endpoint's max_subscriptions "
                f"({self.max_subscriptions})",
            )
        positions = admission.positions
        last_event_id = request.headers.get("last-event-id")
        if last_event_id:
            # A reconnecting EventSource sends it with the URL it first opened: it is the newer position.
            try:
                positions = decode_positions(last_event_id)
            except ProtocolError as exc:
                raise _Refused(CloseCode.BAD_REQUEST, f"Last-Event-ID: {exc.message}") from None
        await self._attach(connection, None)
        for channel in channels:
            await self._subscribe(connection, request, None, channel, positions.get(channel))
        if channels and not connection.cursors:
            raise _Refused(*_refusal_of(connection))

    async def _stream_v2(self, connection: Connection, send: Send) -> None:
        """Write protocol-2 frames as SSE events; each that moves a channel's position gets an ``id:``.

        The id holds every channel's position after that frame (:func:`~rtbroadcast.protocol.
        encode_positions`), from what was written, not from the cursors (which run ahead by what is
        queued), so that the browser's ``Last-Event-ID`` resumes each channel right after its last event.
        """
        interval = self.broadcaster.heartbeat_interval
        positions: dict[str, ResumePoint] = {}
        while (item := await _next_item(connection, send, interval)) is not None:
            if isinstance(item, str):
                text = item
                moved = _track_position(positions, item)
            else:
                text = item.protocol2_text()
                positions[item.channel] = ResumePoint(item.epoch, item.seq)
                moved = True
            chunk = f"id: {encode_positions(positions)}\ndata: {text}\n\n" if moved else f"data: {text}\n\n"
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            connection.sent += 1


async def _next_item(connection: Connection, send: Send, interval: float) -> Envelope | str | None:
    """Wait for the connection's next frame, writing an SSE comment every ``interval`` seconds meanwhile.

    Returns ``None`` once the connection is closed.
    """
    while True:
        try:
            async with asyncio.timeout(interval):
                return await connection.get()
        except TimeoutError:
            await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})


def _track_position(positions: dict[str, ResumePoint], frame: str) -> bool:
    """Update ``positions`` from a protocol frame; return whether it moved one (then the id changes)."""
    # Only the frames that carry a position: subscribed, resync_required (set it), unsubscribed (drop it).
    if not frame.startswith(('{"type":"subscribed"', '{"type":"resync_required"', '{"type":"unsubscribed"')):
        return False
    body = json.loads(frame)
    channel = body.get("channel")
    if not isinstance(channel, str):
        return False
    if body["type"] == "unsubscribed":
        return positions.pop(channel, None) is not None
    positions[channel] = ResumePoint(body["epoch"], body["seq"])
    return True


def _refusal_of(connection: Connection) -> tuple[int, str]:
    """The close code and reason of a protocol-2 SSE request none of whose subscriptions succeeded.

    Read from the ``error`` frames queued for it: ``forbidden`` (403) unless the backend or a limit was
    the reason (``try_again_later``: 503).
    """
    code, reason = CloseCode.FORBIDDEN, "forbidden"
    while (item := connection.get_nowait()) is not None:
        if not isinstance(item, str) or not item.startswith('{"type":"error"'):
            continue
        error = json.loads(item)
        if error.get("code") == SubscriptionErrorCode.TRY_AGAIN_LATER:
            return CloseCode.TRY_AGAIN_LATER, str(error.get("message", "try again later"))
        if error.get("code") == SubscriptionErrorCode.FORBIDDEN:
            reason = str(error.get("message") or reason)
    return code, reason


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


#: The ASGI scope key under which an app hands the endpoint a connection's :class:`Identity` (or ``None``)
#: it established itself, as :func:`rtbroadcast.starlette.serve_websocket` does for a FastAPI route's
#: ``Depends``: the endpoint then uses it instead of calling ``authenticate``.
IDENTITY_SCOPE_KEY: Final = "rtbroadcast.identity"

#: The close reason (with code 4003) of a connection whose :attr:`Identity.expires_at` passed: the client
#: gets fresh credentials, then reconnects and resumes. An SSE request already expired gets 403 with it.
TOKEN_EXPIRED: Final = "token expired"


def _seconds_left(identity: Identity) -> float:
    assert identity.expires_at is not None
    return (identity.expires_at - datetime.now(UTC)).total_seconds()


def _close_at_expiry(connection: Connection) -> None:
    """Close ``connection`` with 4003 ``token expired`` when its identity's ``expires_at`` passes."""
    identity = connection.identity
    if identity is None or identity.expires_at is None:
        return
    loop = asyncio.get_running_loop()
    timer = loop.call_at(
        loop.time() + max(0.0, _seconds_left(identity)), connection.close, CloseCode.FORBIDDEN, TOKEN_EXPIRED
    )
    connection.add_close_callback(lambda _: timer.cancel())


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
