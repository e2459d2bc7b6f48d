"""One Redis command connection that carries many requests at once.

Requests made during one turn of the event loop go out together, in writes of up to 16; Redis answers them
in order on the same connection, and each reply resolves its own request's future. So 64 concurrent
publishes cost a few writes instead of 64 round trips, Redis starts on the first ones while the rest are
being made, and a single publish at low load costs what it did (it is written at the end of the loop turn
it was made in).

Each request keeps its own deadline: when the oldest unanswered request passes it, the connection is taken
for stalled, closed, and every request still on it fails (its command may or may not have been applied,
which is what a timeout always meant). A later request opens a new connection. Error replies are per
request: a script error fails that request only, and the replies of the others stay in step.

This is an :class:`asyncio.Protocol` fed by ``hiredis``' reader: replies are parsed in C and resolve their
futures straight from ``data_received``, with no task, stream or per-request timer in between (that is
what made a publish through redis-py's client cost three to four times a round trip). The connection's
address, TLS context and credentials are read from a redis-py connection object built from the client's
pool (its public attributes), so ``redis://``, ``rediss://`` and ``unix://`` URLs mean the same here as
to redis-py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "CommandPipe",
    "PushConnection",
    "array_head",
    "bulks",
    "check_login",
    "connect",
    "login_commands",
    "open_pipe",
    "open_push",
    "pack",
    "pack_after",
]

logger = logging.getLogger("rtbroadcast.redis")

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


# The RESP headers of arrays and bulk strings of the common lengths, made once: formatting them per part
# was most of what packing a publish cost.
_ARRAY_HEADS: Final = tuple(b"*%d\r\n" % n for n in range(64))
_BULK_HEADS: Final = tuple(b"$%d\r\n" % n for n in range(1024))

# Requests of one loop turn go out together, but never more than this many in one write: Redis can then run
# the first ones while the publishers make the next, instead of the two taking turns (64 publishers at once:
# ~31k -> ~41k publishes/s on the bench's host).
_FLUSH_AT: Final = 16


def array_head(count: int) -> bytes:
    """Return the RESP header of an array of ``count`` elements."""
    return _ARRAY_HEADS[count] if count < 64 else b"*%d\r\n" % count


def bulks(*parts: bytes) -> bytes:
    """Encode ``parts`` as RESP bulk strings, one after the other (the elements of an array, no header)."""
    chunks: list[bytes] = []
    _append_bulks(chunks, parts)
    return b"".join(chunks)


def pack(*parts: bytes) -> bytes:
    """Encode one command in RESP: an array of bulk strings."""
    return pack_after(b"", len(parts), parts)


def pack_after(packed: bytes, count: int, *groups: Sequence[bytes]) -> bytes:
    """Encode a command of ``count`` bulk strings: those already in ``packed``, then those of ``groups``.

    ``packed`` is what :func:`bulks` makes of the leading ones: a command's fixed head, encoded once.
    """
    chunks = [array_head(count), packed]
    for parts in groups:
        _append_bulks(chunks, parts)
    return b"".join(chunks)


def _append_bulks(chunks: list[bytes], parts: Sequence[bytes]) -> None:
    append = chunks.append
    for part in parts:
        size = len(part)
        append(_BULK_HEADS[size] if size < 1024 else b"$%d\r\n" % size)
        append(part)
        append(b"\r\n")


class CommandPipe(asyncio.Protocol):
    """Send requests on one connection as they come, batched per loop turn; read the replies in order.

    Build it with :func:`open_pipe`.

    Args:
        timeout: seconds a request may wait for its reply.
        where: where the connection leads, for messages.
    """

    def __init__(self, *, timeout: float, where: str) -> None:
        self._timeout = timeout
        self.where = where
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(protocolError=RedisConnectionError, replyError=ResponseError)
        self._transport: asyncio.Transport | None = None
        # Futures of every request not answered yet, in the order they are (or will be) written, with their
        # deadlines; the replies come back in the same order.
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None
        self._lost = self._loop.create_future()

    @property
    def closed(self) -> bool:
        """Whether the pipe failed or was closed; a closed pipe takes no requests."""
        return self._error is not None

    @property
    def in_flight(self) -> int:
        """How many requests wait for their reply."""
        return len(self._pending)

    def deadline(self) -> float:
        """Return the loop time by which a request made now must be answered (``timeout`` from now)."""
        return self._loop.time() + self._timeout

    def request(self, command: bytes, deadline: float | None = None) -> asyncio.Future[Any]:
        """Queue one packed command; its future resolves to the reply (``ResponseError`` for an error reply).

        Args:
            command: the command in RESP (see :func:`pack`).
            deadline: the loop time by which the reply must be there; default: ``timeout`` from now.

        Raises:
            redis.exceptions.ConnectionError: the pipe is closed (no future is made).
        """
        if self._error is not None:
            raise RedisConnectionError(f"the command connection to {self.where} is closed: {self._error}")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((future, self._loop.time() + self._timeout if deadline is None else deadline))
        self._outgoing.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        elif len(self._outgoing) >= _FLUSH_AT:
            self._write()
        if self._timer is None:
            self._arm()
        return future

    async def close(self) -> None:
        """Fail every pending request and close the connection. Never raises."""
        self.abort("closed")
        await asyncio.wait([self._lost], timeout=1.0)

    def abort(self, reason: str) -> None:
        """Fail every pending request and drop the connection now, without waiting for it to go."""
        self._fail(RedisConnectionError(f"the command connection to {self.where} was {reason}"))

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse replies and resolve their requests, oldest first."""
        reader, pending = self._reader, self._pending
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if not pending:
                    raise RedisConnectionError(f"unexpected reply from {self.where}: {reply!r:.80}")
                future, _ = pending.popleft()
                if not future.done():  # cancelled by its caller: the reply is dropped
                    future.set_result(reply)
        except RedisConnectionError as exc:  # a protocol error: nothing after it can be trusted
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail what is still pending."""
        self._fail(RedisConnectionError(f"lost the command connection to {self.where}: {exc or 'closed'}"))
        if not self._lost.done():
            self._lost.set_result(None)

    # -- writing and deadlines --------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._error is None and self._transport is not None and outgoing:
            self._transport.writelines(outgoing)

    def _arm(self) -> None:
        if self._pending and self._error is None:
            self._timer = self._loop.call_at(self._pending[0][1], self._check)

    def _check(self) -> None:
        # Only the oldest request can be the first past its deadline; later ones have later deadlines.
        self._timer = None
        if self._pending and self._pending[0][1] <= self._loop.time():
            self._fail(RedisTimeoutError(f"no answer from {self.where} within {self._timeout} s"))
        else:
            self._arm()

    def _fail(self, exc: BaseException) -> None:
        if self._error is not None:
            return
        self._error = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        if pending:
            logger.debug("failing %d Redis request(s) to %s: %r", len(pending), self.where, exc)
        for future, _ in pending:
            if not future.done():
                future.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()  # mid-reply or stalled: this connection is never used again
        elif not self._lost.done():
            self._lost.set_result(None)


class PushConnection(asyncio.Protocol):
    """A connection whose replies go, as they are parsed, to a callback: a PUB/SUB subscriber's.

    Messages are parsed by ``hiredis`` in ``data_received`` and handed to :attr:`on_reply` there, with no
    task, stream or timer per message (what reading them through redis-py cost). The replies to the login
    commands (:func:`open_push`) are taken before any reaches the callback. :attr:`lost` resolves, to the
    error, once the connection failed or was closed; :attr:`last_heard` (the loop time of the last data
    received) and :attr:`chunks` (how many were received) are for a keepalive.

    Build it with :func:`open_push`.
    """

    def __init__(self, *, where: str) -> None:
        self.where = where
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(protocolError=RedisConnectionError, replyError=ResponseError)
        self._transport: asyncio.Transport | None = None
        #: Called with every reply after the login ones.
        self.on_reply: Callable[[Any], None] = _ignore
        #: Resolves to why the connection ended (it never raises).
        self.lost: asyncio.Future[BaseException] = self._loop.create_future()
        self.last_heard = self._loop.time()
        self.chunks = 0
        self._login: deque[asyncio.Future[Any]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse replies and hand each to its login request or to :attr:`on_reply`, in order."""
        self.last_heard = self._loop.time()
        self.chunks += 1
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if self._login:
                    future = self._login.popleft()
                    if not future.done():
                        future.set_result(reply)
                else:
                    self.on_reply(reply)
                if self._transport is None:
                    return  # closed by the callback
        except RedisConnectionError as exc:  # a protocol error: nothing after it can be trusted
            self.close(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        """Resolve :attr:`lost` and fail the login requests still waiting."""
        self.close(RedisConnectionError(f"lost the PUB/SUB connection to {self.where}: {exc or 'closed'}"))

    def send(self, *commands: bytes) -> None:
        """Write packed commands (see :func:`pack`); nothing when the connection is closed."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.writelines(commands)

    def request(self, command: bytes) -> asyncio.Future[Any]:
        """Send a command whose reply is not for :attr:`on_reply` (the login); its future gets the reply."""
        future: asyncio.Future[Any] = self._loop.create_future()
        self._login.append(future)
        self.send(command)
        return future

    def close(self, exc: BaseException) -> None:
        """Close the connection at once, with ``exc`` as the reason :attr:`lost` gives. Never raises."""
        if not self.lost.done():
            self.lost.set_result(exc)
        login, self._login = self._login, deque()
        for future in login:
            if not future.done():
                future.set_exception(exc)
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()


def _ignore(reply: Any) -> None:
    pass


async def open_push(template: AbstractConnection, *, where: str) -> PushConnection:
    """Connect where ``template`` (a redis-py connection, never connected itself) would, and log in alike.

    The caller bounds the time (``asyncio.timeout``); on any failure the connection is closed.

    Raises:
        redis.exceptions.ConnectionError: the server cannot be reached or refused the login.
        OSError: the socket could not be opened.
    """
    push = await connect(template, lambda: PushConnection(where=where))
    try:
        steps = await login_commands(template)
        replies = await asyncio.gather(*(push.request(command) for _, command in steps))
        check_login(steps, replies, where)
    except BaseException as exc:
        push.close(exc)
        raise
    return push


async def open_pipe(template: AbstractConnection, *, request_timeout: float, where: str) -> CommandPipe:
    """Connect where ``template`` (a redis-py connection, never connected itself) would, and log in alike.

    The caller bounds the time (``asyncio.timeout``); on any failure the connection is closed.

    Raises:
        redis.exceptions.ConnectionError: the server cannot be reached or refused the login.
        OSError: the socket could not be opened.
    """
    pipe = await connect(template, lambda: CommandPipe(timeout=request_timeout, where=where))
    try:
        steps = await login_commands(template)
        replies = await asyncio.gather(*(pipe.request(command) for _, command in steps))
        check_login(steps, replies, where)
    except BaseException:
        await pipe.close()
        raise
    return pipe


async def connect(template: AbstractConnection, factory: Callable[[], _P]) -> _P:
    """Open the socket ``template`` describes (TCP, TLS or unix) with a protocol from ``factory``.

    Reads the template's public attributes: ``host``/``port`` or ``path``, ``ssl_context``,
    ``socket_keepalive`` and ``socket_keepalive_options``.

    Raises:
        OSError: the socket could not be opened.
    """
    loop = asyncio.get_running_loop()
    path = getattr(template, "path", None)
    if path:
        _, protocol = await loop.create_unix_connection(factory, path)
        return protocol
    ssl_context = getattr(template, "ssl_context", None)
    ssl = ssl_context.get() if ssl_context is not None else None
    host, port = getattr(template, "host"), getattr(template, "port")  # noqa: B009 - not on the base class
    transport, protocol = await loop.create_connection(factory, host, port, ssl=ssl)
    sock = transport.get_extra_info("socket")
    if sock is not None and getattr(template, "socket_keepalive", False):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (getattr(template, "socket_keepalive_options", None) or {}).items():
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return protocol


async def login_commands(template: AbstractConnection) -> list[tuple[str, bytes]]:
    """Return the commands (name, packed) that log a new connection in as ``template`` would be."""
    steps: list[tuple[str, bytes]] = []
    provider = getattr(template, "credential_provider", None)
    credentials: tuple[str, ...] = ()
    username, password = getattr(template, "username", None), getattr(template, "password", None)
    if provider is not None:
        credentials = tuple(await provider.get_credentials_async())
    elif password is not None or username:
        credentials = (username, password or "") if username else (password or "",)
    if credentials:
        steps.append(("AUTH", pack(b"AUTH", *(c.encode() for c in credentials))))
    client_name = getattr(template, "client_name", None)
    if client_name:
        steps.append(("CLIENT SETNAME", pack(b"CLIENT", b"SETNAME", str(client_name).encode())))
    db = getattr(template, "db", 0)
    if db:
        steps.append(("SELECT", pack(b"SELECT", b"%d" % int(db))))
    return steps


def check_login(steps: list[tuple[str, bytes]], replies: list[Any], where: str) -> None:
    """Raise if a login command was refused.

    Raises:
        redis.exceptions.AuthenticationError: AUTH was refused.
        redis.exceptions.ConnectionError: another login command was refused.
    """
    for (name, _), reply in zip(steps, replies, strict=True):
        if isinstance(reply, ResponseError):
            error = AuthenticationError if name == "AUTH" else RedisConnectionError
            raise error(f"{name} refused by {where}: {reply}")
