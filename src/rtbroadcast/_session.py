"""The connection state machine that both protocols' client sessions share.

A *session* is what owns a client's WebSocket: on protocol 1 the one subscription of the connection
(:class:`rtbroadcast.client._SingleSubscription`), on protocol 2 the multiplexer that carries every
subscription (:class:`rtbroadcast._client2._Multiplexer`). The rules of the connection's life are the
same on both, and live here: the handshake and its refusals, the heartbeat, and what follows a close:
retry after a backoff delay, ask ``get_token`` for a fresh credential, stop (:class:`Refused`), give up
(:class:`Unreachable`) or end (close code ``1000``, or the application closed the client). What the first
frame must be, how frames are read and where they go is each protocol's own.

Imported by :mod:`rtbroadcast.client` once the names below it imports exist (the two modules need each
other): import :mod:`rtbroadcast.client`, not this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final, NoReturn

from .client import (
    Client,
    ClientError,
    DisconnectInfo,
    Refused,
    TokenRequest,
    Unreachable,
    close_action,
)
from .errors import ConfigurationError, ProtocolError
from .protocol import (
    CloseCode,
    ObservedCloseCode,
    Ping,
    Pong,
    ServerFrame,
    Welcome,
    WelcomeV2,
    decode_server_frame,
    encode_client_frame,
)

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

_ABNORMAL: Final = int(ObservedCloseCode.ABNORMAL_CLOSURE)
_PING: Final = encode_client_frame(Ping())
#: How long a close waits for the server's close frame before it cuts the connection.
_CLOSE_TIMEOUT: Final = 2.0
#: Handshake statuses: a credential refused (as 4003), and a request that cannot succeed (as 4004).
_FORBIDDEN_STATUSES: Final = frozenset({401, 403})
_BAD_STATUSES: Final = frozenset({400, 404})


class _Closed(Exception):
    """The current connection ended with ``code`` (internal: turned into a retry, a stop or an end)."""

    def __init__(self, code: int, reason: str, status: int | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.status = status


class _Ended(Exception):
    """The stream ended on purpose (close code 1000, or :meth:`Client.close`)."""


class _Session(ABC):
    """One client connection at a time, reopened after every drop until it stops or ends.

    A subclass says where to connect (:meth:`_url`), whether the application is closing the session
    (:meth:`_closing`), and what to do with the first frame and the ones after it; it calls
    :meth:`_handshake` for each attempt, :meth:`_connected` once the welcome is accepted,
    :meth:`_receive` to read, and :meth:`_after_close` whenever a connection or an attempt ended.
    """

    _client: Client

    def __init__(self, client: Client) -> None:
        self._client = client
        self._ws: ClientConnection | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._ping_sent: float | None = None
        self._read_timeout = 0.0
        self._connected_at = 0.0
        self._retry = 0  # retries since the last stable connection: the backoff's step
        self._failures = 0  # attempts in a row without a welcome: for max_retries
        self._next_delay: float | None = None
        self._welcomed_attempt = False
        self._drop_reason: str | None = None
        self._status: int | None = None  # the HTTP status of the last refused handshake

    @abstractmethod
    def _url(self) -> str:
        """The address of the next attempt (its resume parameters and token included)."""

    @abstractmethod
    def _closing(self) -> bool:
        """Whether the application closed the session: a connection that ends then ends the stream."""

    # -- an attempt --------------------------------------------------------------------------------

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before the next attempt (a subclass may end the wait early)."""
        await asyncio.sleep(delay)

    async def _start_attempt(self) -> None:
        """Wait out the backoff delay a close left, then count the attempt as started (no welcome yet)."""
        client = self._client
        if self._next_delay is not None:
            client._state = "waiting"
            delay, self._next_delay = self._next_delay, None
            await self._pause(delay)
        client._state = "connecting"
        self._welcomed_attempt = False

    async def _ensure_token(self) -> None:
        """Ask ``get_token`` for a credential before an attempt if none was given."""
        client = self._client
        if client.token is None and client.get_token is not None:
            client.token = await self._ask_token(TokenRequest("connect"))

    async def _ask_token(self, request: TokenRequest) -> str | None:
        assert self._client.get_token is not None
        result = self._client.get_token(request)
        if isinstance(result, Awaitable):
            result = await result
        if result is not None and not isinstance(result, str):
            raise ConfigurationError(f"get_token must return a str or None, not {type(result).__name__}")
        return result

    async def _handshake(self) -> tuple[ClientConnection, ServerFrame | None]:
        """Open a connection and read its first frame, within ``connect_timeout``.

        Returns the connection and the first frame decoded (``None``: unreadable, reported).

        Raises:
            _Closed: the attempt failed; a refused handshake carries the close code it stands for.
            ConfigurationError: the URL is invalid.
        """
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

        client = self._client
        client.stats.attempts += 1
        self._status = None
        url = self._url()
        if client.on_connecting is not None:
            client.on_connecting(url)
        ws: ClientConnection | None = None
        try:
            async with asyncio.timeout(client.connect_timeout):
                ws = await connect(
                    url,
                    additional_headers=client.headers,
                    open_timeout=None,  # the timeout above covers the handshake and the welcome
                    ping_interval=None,  # the JSON heartbeat sees dead connections instead
                    close_timeout=_CLOSE_TIMEOUT,
                    max_size=None,
                )
                text = await ws.recv()
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in _FORBIDDEN_STATUSES:
                self._status = status
                raise _Closed(int(CloseCode.FORBIDDEN), f"HTTP {status} on the handshake") from None
            if status in _BAD_STATUSES:
                self._status = status
                raise _Closed(int(CloseCode.BAD_REQUEST), f"HTTP {status} on the handshake") from None
            raise _Closed(_ABNORMAL, f"HTTP {status} on the handshake") from None
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (_ABNORMAL, "")
            raise _Closed(code, reason or "closed before the welcome") from None
        except TimeoutError:
            _abort(ws)
            raise _Closed(_ABNORMAL, f"no welcome within {client.connect_timeout} s") from None
        except InvalidURI as exc:
            raise ConfigurationError(f"invalid url: {exc}") from None
        except (OSError, InvalidHandshake) as exc:
            _abort(ws)
            raise _Closed(_ABNORMAL, f"cannot connect: {exc or type(exc).__name__}") from None
        except BaseException:
            _abort(ws)
            raise
        try:
            frame = decode_server_frame(text)
        except ProtocolError as exc:
            frame = None
            client._report(ClientError(f"unreadable first frame: {exc}"))
        if frame is not None and client.on_frame is not None:
            client.on_frame(frame)
        return ws, frame

    def _connected(self, ws: ClientConnection, welcome: Welcome | WelcomeV2) -> None:
        """The welcome was accepted: the connection is current, the heartbeat starts, ``on_connect``."""
        client = self._client
        self._ws = ws
        self._failures = 0
        self._welcomed_attempt = True
        self._connected_at = time.monotonic()
        client.stats.welcomes += 1
        interval = max(0.1, client.heartbeat_interval or welcome.heartbeat_interval)
        self._read_timeout = interval + client.heartbeat_timeout
        self._ping_sent = None
        self._pinger = asyncio.get_running_loop().create_task(
            self._ping(ws, interval), name="rtbroadcast-ping"
        )
        client._state = "connected"
        if client.on_connect is not None:
            client.on_connect(welcome)

    # -- the open connection -------------------------------------------------------------------------

    async def _receive(self, ws: ClientConnection) -> str:
        """The next text frame; raise :class:`_Closed` when the connection ends or falls silent."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                # Silence counts only while reading: a consumer busy with an event is not a dead network.
                async with asyncio.timeout(self._read_timeout):
                    message = await ws.recv()
            except TimeoutError:
                self._client.stats.heartbeat_timeouts += 1
                raise _Closed(_ABNORMAL, f"no frame within {self._read_timeout:g} s") from None
            except ConnectionClosed as exc:
                if self._drop_reason is not None:
                    reason, self._drop_reason = self._drop_reason, None
                    raise _Closed(_ABNORMAL, reason) from None
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (_ABNORMAL, "")
                raise _Closed(code, reason) from None
            if isinstance(message, str):
                return message
            self._client._report(ClientError("a binary frame arrived: ignored"))

    def _decode_frame(self, text: str) -> ServerFrame | None:
        """Decode a frame (``None``: unreadable, reported), time a pong, and show it to ``on_frame``."""
        client = self._client
        try:
            frame = decode_server_frame(text)
        except ProtocolError as exc:
            client._report(ClientError(f"unreadable frame ({exc}): {text[:200]}"))
            return None
        if isinstance(frame, Pong) and self._ping_sent is not None:
            client.stats.round_trip = time.monotonic() - self._ping_sent
            self._ping_sent = None
        if client.on_frame is not None:
            client.on_frame(frame)
        return frame

    def _drop_connection(self, reason: str) -> None:
        """Give up on the connection at once: the session reconnects (after a backoff) with resume."""
        if self._ws is not None:
            self._drop_reason = reason
            _abort(self._ws)

    async def _ping(self, ws: ClientConnection, interval: float) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                await asyncio.sleep(interval)
                self._ping_sent = time.monotonic()
                await ws.send(_PING)
        except ConnectionClosed:
            return

    async def _disconnect(self, *, graceful: bool = False) -> None:
        """Stop the heartbeat and end the connection: a close handshake (``1000``) or a cut."""
        ws, self._ws = self._ws, None
        pinger, self._pinger = self._pinger, None
        if pinger is not None:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
        if ws is None:
            return
        if graceful:
            await ws.close(int(CloseCode.NORMAL), "client closed")
        else:
            _abort(ws)
            with contextlib.suppress(Exception):
                await ws.wait_closed()

    # -- after a close ---------------------------------------------------------------------------------

    async def _after_close(self, code: int, reason: str) -> None:
        """Decide, after a connection or an attempt ended with ``code``: retry, refresh, stop or end.

        Returns with the delay before the next attempt set (a retry); otherwise raises.

        Raises:
            _Ended: the application closed the session, or the server closed with ``1000``.
            Refused: the server refused, and no fresh token came.
            Unreachable: ``max_retries`` attempts in a row failed.
        """
        client = self._client
        await self._disconnect()
        if self._closing():
            raise _Ended
        if self._connected_at and time.monotonic() - self._connected_at >= client.stable_after:
            self._retry = 0
        self._connected_at = 0.0
        action = close_action(code)
        if action == "refresh_token":
            await self._refresh_token(code, reason)
        elif action == "stop":
            if code == CloseCode.NORMAL:
                self._notify(code, reason, None)
                raise _Ended
            self._stop(code, reason)
        if not self._welcomed_attempt:
            self._failures += 1
            if client.max_retries is not None and self._failures > client.max_retries:
                self._notify(code, reason, None)
                last = f"{code} {reason}".rstrip()
                raise Unreachable(f"giving up: {self._failures} attempt(s) in a row failed ({last})", code)
        delay = client.backoff.delay(self._retry)
        self._retry += 1
        self._next_delay = delay
        self._notify(code, reason, delay)

    async def _refresh_token(self, code: int, reason: str) -> None:
        """After a refusal: take a fresh token from ``get_token``, or stop (none, or the same again)."""
        client = self._client
        if client.get_token is None:
            self._stop(code, reason)
        previous = client.token
        try:
            fresh = await self._ask_token(TokenRequest("refused", code, reason))
        except Exception as exc:
            client._report(_failed("get_token failed", exc))
            fresh = previous
        if fresh is None or fresh == previous:
            self._stop(code, reason)
        client.token = fresh

    def _stop(self, code: int, reason: str) -> NoReturn:
        self._notify(code, reason, None)
        status, self._status = self._status, None
        raise Refused(f"the server refused the connection: {code} {reason}".rstrip(), code, status=status)

    def _notify(self, code: int, reason: str, retry_in: float | None) -> None:
        client = self._client
        client._state = "closed" if retry_in is None else "waiting"
        if client.on_disconnect is not None:
            retry = 0 if retry_in is None else self._retry
            client.on_disconnect(DisconnectInfo(code, reason, retry_in, retry))


def _abort(ws: ClientConnection | None) -> None:
    """Cut the connection without a closing handshake (a dead peer would never answer one)."""
    if ws is not None:
        ws.transport.abort()


def _failed(message: str, exc: BaseException) -> ClientError:
    error = ClientError(f"{message}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
