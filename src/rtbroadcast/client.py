"""The Python asyncio client of rtbroadcast streams (wire protocol 1).

::

    async with Client("ws://127.0.0.1:8000/realtime?room=lobby") as client:
        async for received in client.subscribe(model=ChatEvent, resync=load_snapshot):
            apply(received.event)  # in seq order, each once, across reconnects

It implements the client state machine of the wire protocol (docs/reference/protocol.md), the same
one as the TypeScript client (``clients/js``): connect; read ``welcome``; apply events in seq order and
drop the ones already applied; on ``resync_required`` (or before the first connection, without a
``position``) call the application's ``resync`` callback, which reloads its snapshot and returns the
snapshot's ``(epoch, seq)``, and continue from there; send a ``ping`` every heartbeat interval and treat a
connection on which nothing arrives for ``heartbeat_interval + heartbeat_timeout`` seconds as dead;
reconnect after every drop with capped exponential backoff and full jitter, resuming from the last event
applied; stop on refusals (``4003``, ``4004``) unless ``get_token`` returns a fresh credential.

Protocol 1 carries one channel per connection, named by the URL, so a :class:`Client` carries one
:class:`Subscription`. Protocol 2 will let one connection carry several; :meth:`Client.subscribe` keeps
its signature then.

The connection is read as the subscription is iterated: a consumer that stops iterating stops reading,
and the server's backpressure applies to it like to any client (a ``4001`` close, after which the client
resumes). The ``websockets`` library (``pip install 'rtbroadcast[client]'``) is imported at the first
connection, not with this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, Self, TypeAlias, TypeVar, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError

from ._config import optional_count, optional_seconds, seconds
from .errors import ConfigurationError, InvalidEvent, RTBroadcastError
from .events import Event, EventRegistry, registry
from .protocol import (
    CloseCode,
    ErrorFrame,
    EventFrame,
    EventVerdict,
    ResumePoint,
    ResyncRequired,
    ServerFrame,
    Subscribed,
    Welcome,
    WelcomeV2,
    is_valid_channel,
    judge_event,
)

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from ._client2 import _Multiplexer

__all__ = [
    "Backoff",
    "ChannelSubscription",
    "Client",
    "ClientError",
    "ClientState",
    "ClientStats",
    "CloseAction",
    "DisconnectInfo",
    "Presence",
    "PresenceChange",
    "Received",
    "Refused",
    "ResumeTracker",
    "ResyncInfo",
    "Subscription",
    "SubscriptionDenied",
    "SubscriptionStats",
    "TokenRequest",
    "Unreachable",
    "Verdict",
    "close_action",
]

logger = logging.getLogger("rtbroadcast.client")

E = TypeVar("E")
T = TypeVar("T")

#: What ``resync`` may return: a :class:`~rtbroadcast.ResumePoint` or an ``(epoch, seq)`` pair.
Position: TypeAlias = ResumePoint | tuple[str, int]

# -- errors ----------------------------------------------------------------------------------------


class ClientError(RTBroadcastError):
    """The client stopped, or reports a problem.

    ``code`` is the close code if any (a refused handshake counts as the close code it stands for: HTTP
    401/403 as ``4003``, 400/404 as ``4004``); ``status`` is the HTTP status of a refused handshake.
    """

    def __init__(self, message: str, code: int | None = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class Refused(ClientError):
    """The server refused the connection (``4003``, ``4004``, HTTP 401/403/404): retrying will not help."""


class Unreachable(ClientError, ConnectionError):
    """``max_retries`` connection attempts in a row failed before any ``welcome``."""


# -- sans I/O: position, verdicts, backoff, close codes ------------------------------------------

#: What to do with an event (:func:`rtbroadcast.protocol.judge_event` decides): ``apply`` it, drop it as
#: a ``duplicate``, reconnect on a ``gap``, or ``ignore`` it (no position yet, or another stream's).
Verdict: TypeAlias = EventVerdict


class ResumeTracker:
    """One subscription's place in its channel's stream: the last event applied, or a snapshot's position.

    What the client resumes from after a drop. Sans I/O (no sockets, no clock), so a client on another
    platform can copy it line by line; the decision itself is :func:`rtbroadcast.protocol.judge_event`.
    (The server's :class:`rtbroadcast.cursor.Cursor` is the other end: where a server-side subscription
    stands in what it delivered.)
    """

    def __init__(self, position: Position | None = None) -> None:
        self.position: ResumePoint | None = None if position is None else _position(position)

    def judge(self, seq: int, epoch: str | None = None) -> Verdict:
        """Judge an event at ``seq`` of the stream in ``epoch`` (``None``: the position's own)."""
        return judge_event(self.position, seq, epoch=epoch)

    def advance(self, seq: int) -> None:
        """Record that the event at ``seq`` was applied."""
        if self.position is None:
            raise RuntimeError("advance() before the tracker has a position")
        self.position = ResumePoint(self.position.epoch, seq)

    def reset(self, position: Position | None) -> None:
        """Move to ``position`` (a welcome without resume, a snapshot), or forget the position."""
        self.position = None if position is None else _position(position)

    def resume_params(self) -> dict[str, str]:
        """The query parameters that resume from here (none without a position)."""
        if self.position is None:
            return {}
        return {"epoch": self.position.epoch, "last_seq": str(self.position.seq)}


def _position(value: object) -> ResumePoint:
    if isinstance(value, ResumePoint):
        point = value
    elif isinstance(value, tuple) and len(value) == 2:
        point = ResumePoint(value[0], value[1])
    else:
        raise ConfigurationError(
            f"a stream position is a ResumePoint or an (epoch, seq) tuple, not {type(value).__name__}"
        )
    if not point.epoch or len(point.epoch) > 128:
        raise ConfigurationError("a stream position needs a non-empty epoch of at most 128 characters")
    return point


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays, in seconds: "full jitter" below a ceiling that grows per failed attempt.

    The delay before retry number ``n`` (0 for the first) is uniformly random between 0 and
    ``min(max_delay, initial_delay * multiplier ** n)``, so that clients dropped at the same moment come
    back spread over the window instead of all at once.
    """

    initial_delay: float = 0.5
    max_delay: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 <= self.initial_delay <= self.max_delay) or self.multiplier < 1:
            raise ConfigurationError(
                "Backoff needs 0 <= initial_delay <= max_delay and multiplier >= 1, not "
                f"{self.initial_delay}, {self.max_delay}, {self.multiplier}"
            )

    def ceiling(self, attempt: int) -> float:
        """The upper bound of :meth:`delay` for retry number ``attempt``."""
        # Capped before it is raised to a power, so that a long outage cannot overflow a float.
        steps = min(max(0, attempt), 64)
        return float(min(self.max_delay, self.initial_delay * self.multiplier**steps))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """A random delay before retry number ``attempt``."""
        return rand() * self.ceiling(attempt)


#: What the client does after a close: ``reconnect`` with resume; ``refresh_token`` (ask ``get_token``,
#: stop without a fresh one); ``stop``.
CloseAction: TypeAlias = Literal["reconnect", "refresh_token", "stop"]


def close_action(code: int) -> CloseAction:
    """Decide what a close code means for a client (the protocol's close-code table, in one place)."""
    if code == CloseCode.FORBIDDEN:
        return "refresh_token"
    if code in (CloseCode.BAD_REQUEST, CloseCode.NORMAL):
        return "stop"
    return "reconnect"


# -- what the application sees ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received(Generic[E]):
    """An event received from the server, with its place in the stream.

    The same shape as :class:`rtbroadcast.Received`, which in-process subscriptions yield; ``event`` is
    the subscription's model, or a ``dict`` without one.
    """

    channel: str
    seq: int
    event: E


@dataclass(frozen=True, slots=True)
class ResyncInfo:
    """Why ``resync`` is called, and where the server stands.

    ``reason`` is ``"initial"`` (before the first connection, without a ``position``), a reason the server
    sent (``epoch_changed``, ``history_trimmed``, ``seq_ahead``, ``backend_interrupted``, ...),
    ``"requested"`` (:meth:`Subscription.resync`), or ``"resume_overflow"`` (two resumes in a row were
    closed with ``4001`` before any event arrived: the backlog is larger than the server lets a connection
    queue). ``epoch`` and ``seq`` are the server's position for the server's reasons, else ``None``.
    """

    reason: str
    channel: str | None
    epoch: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """Why ``get_token`` is called: ``"connect"`` (no ``token`` was given) or ``"refused"`` (a 4003)."""

    reason: Literal["connect", "refused"]
    code: int | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class DisconnectInfo:
    """A connection ended. ``code`` is 1006 when it dropped without a close frame (or the heartbeat gave
    up); ``retry_in`` is the delay before the next attempt, ``None`` when the client stops; ``retry``
    counts the retries since the last stable connection."""

    code: int
    reason: str
    retry_in: float | None
    retry: int


@dataclass(slots=True)
class ClientStats:
    """Counters of the connection state machine, for tests, dashboards and people."""

    #: Connection attempts started.
    attempts: int = 0
    #: ``welcome`` frames received.
    welcomes: int = 0
    #: Welcomes with ``"resumed": true``.
    resumed: int = 0
    #: Connections declared dead by the heartbeat.
    heartbeat_timeouts: int = 0
    #: Seconds between the last ``ping`` and the ``pong`` that answered it; ``None`` before the first.
    round_trip: float | None = None


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription: events applied, duplicates dropped, gaps seen, resyncs run."""

    applied: int = 0
    duplicates: int = 0
    gaps: int = 0
    resyncs: int = 0


#: ``idle`` (nothing opened yet), ``connecting`` (opening, or loading a snapshot, or asking for a token),
#: ``connected`` (welcomed), ``waiting`` (backing off before the next attempt), ``closed`` (for good).
ClientState: TypeAlias = Literal["idle", "connecting", "connected", "waiting", "closed"]

TokenCallback: TypeAlias = Callable[[TokenRequest], Awaitable[str | None] | str | None]
ResyncCallback: TypeAlias = Callable[[ResyncInfo], Awaitable[Position]]

_SLOW_CONSUMER: Final = int(CloseCode.SLOW_CONSUMER)


class Client:
    """A connection to one rtbroadcast stream that keeps itself up.

    It reconnects with capped exponential backoff and full jitter, resumes from the last event applied,
    detects dead connections with a heartbeat, and stops on refusals. Use it as an async context manager
    (or call :meth:`close`), and read the stream through :meth:`subscribe`.

    Args:
        url: the stream's ``ws://`` or ``wss://`` address with its channel parameters, for example
            ``ws://host/realtime?room=lobby``. ``epoch`` and ``last_seq`` in it are replaced by the
            subscription's position.
        token: a credential, sent as the query parameter ``token_param``.
        token_param: the query parameter that carries the token.
        get_token: returns a credential (it may be a coroutine function): before the first connection
            when ``token`` is not given, and after a ``4003`` refusal (or an HTTP 401/403 handshake). The
            same token again, or ``None``, stops the client with :class:`Refused`; a new one is used for the
            next attempt, after the usual backoff (so a server that refuses every token is not stormed).
        headers: extra HTTP headers for the handshake (``Authorization``, ``Origin``).
        backoff: the reconnect delays.
        stable_after: a connection that stayed up this many seconds resets the backoff to its first step.
        heartbeat_interval: seconds between ``ping`` frames; default: the welcome's ``heartbeat_interval``.
        heartbeat_timeout: how long past a ping period the client waits for any frame: silence for
            ``heartbeat_interval + heartbeat_timeout`` seconds while reading declares the connection dead
            (it is cut and the client reconnects, with resume).
        connect_timeout: an attempt that brings no ``welcome`` within this many seconds is abandoned.
        max_retries: failed attempts in a row (without a welcome) after which iteration raises
            :class:`Unreachable`; ``None`` retries for ever.
        events: the registry that maps event types to models (default: :data:`rtbroadcast.registry`).
        on_connect: called with each ``welcome`` (a :class:`~rtbroadcast.protocol.WelcomeV2` on
            protocol 2).
        on_disconnect: called when a connection ends, with what happens next.
        on_error: called with problems that do not stop the client (an ``error`` frame, an unreadable
            frame, a failed ``resync``); default: logged on the ``rtbroadcast.client`` logger.
        protocol: the wire protocol: 1 (one channel per connection, named by the URL) or 2 (one
            connection carries every :meth:`subscribe`; the server must speak it).
        on_server_subscription: protocol 2: called with a :class:`Subscription` the server made (a
            ``subscribed`` frame without a request) for a channel not subscribed to with
            ``server_side=True``; without it, such channels are ignored.
        on_connecting: called before each connection attempt with the URL it opens (the resume
            parameters and the token included: mind where you log it).
        on_frame: called with every frame the server sends (decoded: a :class:`~rtbroadcast.Welcome`,
            an event, a pong...) before the client acts on it; for tools, traces and tests.

    Raises:
        ConfigurationError: an option is invalid.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_param: str = "token",
        get_token: TokenCallback | None = None,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        backoff: Backoff = Backoff(),  # frozen: one shared default is safe
        stable_after: float = 5.0,
        heartbeat_interval: float | None = None,
        heartbeat_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        max_retries: int | None = None,
        events: EventRegistry | None = None,
        on_connect: Callable[[Welcome | WelcomeV2], object] | None = None,
        on_disconnect: Callable[[DisconnectInfo], object] | None = None,
        on_error: Callable[[ClientError], object] | None = None,
        on_connecting: Callable[[str], object] | None = None,
        on_frame: Callable[[ServerFrame], object] | None = None,
        protocol: int = 1,
        on_server_subscription: Callable[[Subscription[Any]], object] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ConfigurationError(f"url must be a ws:// or wss:// address, not {url!r}")
        seconds("stable_after", stable_after)
        seconds("heartbeat_timeout", heartbeat_timeout)
        seconds("connect_timeout", connect_timeout)
        optional_seconds("heartbeat_interval", heartbeat_interval)
        optional_count("max_retries", max_retries, minimum=0)
        if protocol not in (1, 2) or isinstance(protocol, bool):
            raise ConfigurationError(f"protocol must be 1 or 2, not {protocol!r}")
        if not isinstance(backoff, Backoff):
            raise ConfigurationError(f"backoff must be a Backoff, not {type(backoff).__name__}")
        self.url = url
        self.token = token
        self.token_param = token_param
        self.get_token = get_token
        self.headers = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        self.backoff = backoff
        self.stable_after = stable_after
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.events = events if events is not None else registry
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_error = on_error
        self.on_connecting = on_connecting
        self.on_frame = on_frame
        #: The wire protocol this client speaks (1 or 2).
        self.protocol = protocol
        self.on_server_subscription = on_server_subscription
        self._multiplexer: _Multiplexer | None = None
        #: Counters of the connection state machine.
        self.stats = ClientStats()
        self._state: ClientState = "idle"
        self._subscription: Subscription[Any] | None = None

    @property
    def state(self) -> ClientState:
        """Where the client's connection stands (see :data:`ClientState`)."""
        return self._state

    @property
    def subscription(self) -> Subscription[Any] | None:
        """The subscription this client carries, if any."""
        return self._subscription

    @overload
    def subscribe(
        self,
        channel: str | None = None,
        *,
        params: Mapping[str, str] | None = None,
        model: None = None,
        position: Position | None = None,
        resync: ResyncCallback | None = None,
        presence: bool = False,
        on_presence: Callable[[PresenceChange], object] | None = None,
        server_side: bool = False,
    ) -> Subscription[dict[str, Any]]: ...

    @overload
    def subscribe(
        self,
        channel: str | None = None,
        *,
        params: Mapping[str, str] | None = None,
        model: type[E],
        position: Position | None = None,
        resync: ResyncCallback | None = None,
        presence: bool = False,
        on_presence: Callable[[PresenceChange], object] | None = None,
        server_side: bool = False,
    ) -> Subscription[E]: ...

    def subscribe(
        self,
        channel: str | None = None,
        *,
        params: Mapping[str, str] | None = None,
        model: type[Any] | None = None,
        position: Position | None = None,
        resync: ResyncCallback | None = None,
        presence: bool = False,
        on_presence: Callable[[PresenceChange], object] | None = None,
        server_side: bool = False,
    ) -> Subscription[Any]:
        """Subscribe to a channel's stream; iterate the result to receive its events.

        Protocol 1 carries one channel per connection, so a client has one subscription. Protocol 2
        carries any number on one connection, each with its own position and ``resync``. Nothing is
        opened until a subscription is iterated (or :meth:`Subscription.connected` is awaited).

        Args:
            channel: protocol 1: the channel the server must confirm in its ``welcome`` (the URL names
                it; a different one raises :class:`ClientError`), optional. Protocol 2: the channel to
                subscribe to, required.
            params: protocol 1: query parameters added to the URL (``{"room": "lobby"}``).
            model: decode events into this model: an :class:`~rtbroadcast.Event` subclass (a base class
                of several events works: each event is decoded into the model its ``type`` is registered
                with) or any pydantic model. Without it, events are ``dict``\\ s (their ``type``
                included, their ``seq`` not: that is :attr:`Received.seq`).
            position: where the application's state stands (a snapshot's ``epoch`` and ``seq``): the
                stream resumes after it.
            resync: ``async def resync(info: ResyncInfo) -> ResumePoint | tuple[str, int]``: reload the
                application's state (its snapshot) and return the position it reflects. Called before the
                first connection when no ``position`` is given, and whenever the server says
                ``resync_required``. Without it the subscription continues from the server's position,
                and the events missed are missing (logged at WARNING).
            presence: protocol 2: ask for the channel's presence (where the channel has it):
                :attr:`ChannelSubscription.presence` is kept up to date.
            on_presence: protocol 2: called with each :class:`PresenceChange` (snapshot, join, leave).
            server_side: protocol 2: the server makes this subscription (its resolver at connect, or
                the service later): the client does not ask for it, only receives it (and resumes it
                at each reconnect through the ``resume`` query parameter).

        Raises:
            ClientError: the client already has its subscription (protocol 1) or one of this channel
                (protocol 2), or is closed.
            ConfigurationError: ``position`` is not a stream position, or an argument does not fit the
                client's protocol.
        """
        if self._state == "closed":
            raise ClientError("the client is closed")
        if self.protocol == 2:
            return self._subscribe_v2(
                channel, params, model, position, resync, presence, on_presence, server_side
            )
        if presence or on_presence is not None or server_side:
            raise ConfigurationError("presence, on_presence and server_side need protocol=2")
        if self._subscription is not None:
            raise ClientError(
                "protocol 1 carries one channel per connection: this client already has its subscription"
            )
        subscription: Subscription[Any] = _SingleSubscription(
            self, channel=channel, params=params, model=model, position=position, resync=resync
        )
        self._subscription = subscription
        return subscription

    @property
    def subscriptions(self) -> Mapping[str, Subscription[Any]]:
        """The subscriptions this client carries, by channel (protocol 1: once the channel is known)."""
        if self._multiplexer is not None:
            return dict(self._multiplexer.subscriptions)
        single = self._subscription
        return {single.channel: single} if single is not None and single.channel is not None else {}

    @property
    def connection_id(self) -> str | None:
        """Protocol 2: the server's id of the current connection (presence's ``client``), else ``None``."""
        welcome = self._multiplexer.welcome if self._multiplexer is not None else None
        return welcome.connection if welcome is not None else None

    def _subscribe_v2(
        self,
        channel: str | None,
        params: Mapping[str, str] | None,
        model: type[Any] | None,
        position: Position | None,
        resync: ResyncCallback | None,
        presence: bool,
        on_presence: Callable[[PresenceChange], object] | None,
        server_side: bool,
    ) -> Subscription[Any]:
        from ._client2 import _Multiplexer

        if channel is None or not is_valid_channel(channel):
            raise ConfigurationError(f"protocol 2 subscribes to a channel by name: not {channel!r}")
        if params:
            raise ConfigurationError("params name a protocol-1 channel; on protocol 2 put them in the url")
        if self._multiplexer is None:
            self._multiplexer = _Multiplexer(self)
        if channel in self._multiplexer.subscriptions:
            raise ClientError(f"this client already has a subscription to {channel!r}")
        subscription: ChannelSubscription[Any] = ChannelSubscription(
            self, self._multiplexer, channel, model=model, position=position, resync=resync,
            presence=presence, on_presence=on_presence, server_side=server_side,
        )  # fmt: skip
        self._multiplexer.add(subscription)
        return subscription

    async def close(self) -> None:
        """Stop for good: close the connection (code 1000), end every subscription's iteration."""
        self._state = "closed"
        if self._subscription is not None:
            await self._subscription.close()
        if self._multiplexer is not None:
            await self._multiplexer.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _report(self, error: ClientError) -> None:
        if self.on_error is not None:
            self.on_error(error)
        else:
            logger.warning("%s", error)


class Subscription(ABC, Generic[E]):
    """One channel's stream as the application sees it: events in seq order, each once.

    Created by :meth:`Client.subscribe`. Iterating it yields :class:`~rtbroadcast.Received` items (the
    event, its ``seq`` and its channel) and drives the connection: it connects, reconnects and resyncs
    as needed, and raises :class:`Refused` or :class:`Unreachable` when it stops for good. Iteration
    ends when the server closes with ``1000``, the client is closed, or (protocol 2) the subscription is
    closed or ended by the server.

    An event that does not decode into the subscription's ``model`` raises
    :class:`~rtbroadcast.InvalidEvent`; the position has moved past it, so iteration can go on.
    """

    def __init__(
        self,
        client: Client,
        *,
        model: type[Any] | None,
        position: Position | None,
        resync: ResyncCallback | None,
    ) -> None:
        self._client = client
        self._model = model
        self._tracker = ResumeTracker(position)
        self._resync_callback = resync
        #: Counters: events applied, duplicates dropped, gaps seen, resyncs run.
        self.stats = SubscriptionStats()
        #: Protocol 2, ``presence=True`` on a channel with presence: who is there, kept current.
        self.presence: Presence | None = None
        self._requested = False
        self._busy = False
        self._stream_epoch: str | None = None  # the epoch of the events the connection delivers now
        self._pending_resync: ResyncInfo | None = None

    @property
    @abstractmethod
    def channel(self) -> str | None:
        """The channel: as given to :meth:`Client.subscribe`, else from the server's welcome."""

    @property
    def client(self) -> Client:
        """The client that carries this subscription."""
        return self._client

    @property
    def position(self) -> ResumePoint | None:
        """The last event applied (or the snapshot's position); ``None`` before the first welcome."""
        return self._tracker.position

    def resync(self) -> None:
        """Reload the snapshot through the ``resync`` callback before the next event is returned."""
        if self._resync_callback is None:
            raise ClientError("resync() needs a resync callback: pass resync= to Client.subscribe()")
        self._requested = True

    @abstractmethod
    async def connected(self) -> Welcome | Subscribed:
        """Connect now if not connected; return the ``welcome`` (protocol 1) or ``subscribed`` (2).

        Events that follow wait until the subscription is iterated (handy in tests: publish after it).

        Raises:
            Refused, Unreachable: as iteration would.
        """

    @abstractmethod
    async def close(self) -> None:
        """End the subscription (protocol 1: close the connection with code 1000) and its iteration."""

    @abstractmethod
    async def __anext__(self) -> Received[E]:
        """Return the next event in seq order, connecting, resuming and resyncing as needed.

        Raises:
            Refused: the server refused the connection and no fresh token came.
            Unreachable: ``max_retries`` attempts in a row failed.
            InvalidEvent: the event does not decode into the subscription's model.
            ClientError: the server confirmed another channel than the one subscribed to, or refused
                the subscription (protocol 2: ``code`` is ``None``, the message names the error code).
        """

    # The bound is the helper's point: its error says how many events did arrive.
    async def take(self, count: int, *, timeout: float = 10.0) -> list[Received[E]]:  # noqa: ASYNC109
        """Return the next ``count`` events, or fail after ``timeout`` seconds (for tests).

        Raises:
            TimeoutError: fewer than ``count`` events arrived in time; the message says how many did.
            ClientError: the stream ended first.
        """
        received: list[Received[E]] = []
        try:
            async with asyncio.timeout(timeout):
                while len(received) < count:
                    received.append(await self.__anext__())
        except TimeoutError:
            raise TimeoutError(f"{len(received)} of {count} events within {timeout} s") from None
        except StopAsyncIteration:
            raise ClientError(f"the stream ended after {len(received)} of {count} events") from None
        return received

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    @contextlib.asynccontextmanager
    async def _turn(self) -> Any:
        if self._busy:
            raise ClientError("the subscription is already being read by another task")
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def _decode(self, frame: EventFrame) -> E:
        event: E = _decode_event(frame, self._model, self._client.events)
        return event

    # -- an event, a resync: what both protocols decide, between two of the application's reads -------

    @abstractmethod
    def _drop(self, reason: str) -> None:
        """Give up on the connection at once: it reconnects (after a backoff) and resumes."""

    def _about(self, preposition: str) -> str:
        """The channel, as a message names it (``" on 'room:a'"``); protocol 1 names none (one channel)."""
        return ""

    def _judged(self, frame: EventFrame) -> Received[E] | None:
        """Apply an event (return it) or drop it: a duplicate, another stream's, or a gap (reconnect)."""
        position = self._tracker.position
        # "ignore": an event of another stream than the position's: a resync_required is on its way (the
        # resume failed), or the snapshot came from another epoch and a reconnect is under way.
        verdict = self._tracker.judge(frame.seq, self._stream_epoch)
        if verdict == "ignore" or position is None:
            return None
        if verdict == "duplicate":
            self.stats.duplicates += 1
            return None
        if verdict == "gap":
            # A correct server never skips a seq; reconnecting from the last applied event lets it replay
            # what is missing, or say resync_required where it cannot.
            self.stats.gaps += 1
            self._client._report(
                ClientError(f"gap{self._about('on')}: expected seq {position.seq + 1}, received {frame.seq}")
            )
            self._drop(f"gap{self._about('on')} after seq {position.seq}")
            return None
        self._tracker.advance(frame.seq)
        self.stats.applied += 1
        return Received(self.channel or "", frame.seq, self._decode(frame))

    async def _run_resync(self, info: ResyncInfo) -> None:
        """Reload the snapshot through the ``resync`` callback (without one: go on from the server's)."""
        self.stats.resyncs += 1
        if self._resync_callback is None:
            if info.epoch is not None and info.seq is not None:
                logger.warning(
                    "resync_required (%s) on %r without a resync callback: continuing from the server's "
                    "position, without the events missed",
                    info.reason,
                    self.channel,
                )
                self._tracker.reset(ResumePoint(info.epoch, info.seq))
            return
        # Kept until the callback returns: an iteration cancelled meanwhile (a timeout around it) runs it
        # again next time instead of going on from a position the stream has left.
        self._pending_resync = info
        try:
            position = _position(await self._resync_callback(info))
        except Exception as exc:
            # No consistent state to continue from: reconnect from the old position, after a backoff. The
            # server replays from there, or says resync_required again and this runs again.
            self._pending_resync = None
            self._client._report(_failed(f"resync ({info.reason}){self._about('of')} failed", exc))
            self._drop("resync failed")
            return
        self._pending_resync = None
        self._tracker.reset(position)
        stream_epoch = info.epoch or self._stream_epoch
        if stream_epoch is not None and position.epoch != stream_epoch:
            # The snapshot belongs to another stream than this connection's (the server restarted between
            # the two): resume from the snapshot on a new connection.
            self._drop(f"the snapshot's epoch differs from the stream's{self._about('on')}")
        # Events that follow and that the snapshot already contains are dropped as duplicates; a snapshot
        # older than the server's position shows up as a gap (reconnect, resume).


def _decode_event(frame: EventFrame, model: type[Any] | None, events: EventRegistry) -> Any:
    """Decode an event frame into ``model`` (see :meth:`Client.subscribe`), or a ``dict`` without one.

    Raises:
        InvalidEvent: the event does not fit the model.
        ConfigurationError: ``model`` is not a pydantic model class.
    """
    obj = {"type": frame.type, **frame.data}
    if model is None:
        return obj
    try:
        if isinstance(model, type) and issubclass(model, Event):
            registered = events.get(frame.type)
            if registered is not None and issubclass(registered, model):
                return registered.model_validate(obj)
            if model.__rtbroadcast_type__ != frame.type:
                raise InvalidEvent(
                    f"event of type {frame.type!r} (seq {frame.seq}) is not a {model.__qualname__}; "
                    "subscribe with the base class of every event on the channel"
                )
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(obj)
    except ValidationError as exc:
        raise InvalidEvent(
            f"event of type {frame.type!r} (seq {frame.seq}) does not match {model.__qualname__}: {exc}"
        ) from exc
    raise ConfigurationError(f"model must be a pydantic model class, not {model!r}")


# The session base class needs the names above (and this module needs it): imported here, on purpose.
from ._session import _ABNORMAL, _abort, _Closed, _Ended, _failed, _Session  # noqa: E402


class _SingleSubscription(Subscription[E], _Session):
    """Protocol 1: the one channel of a connection; iterating it drives the connection."""

    def __init__(
        self,
        client: Client,
        *,
        channel: str | None,
        params: Mapping[str, str] | None,
        model: type[Any] | None,
        position: Position | None,
        resync: ResyncCallback | None,
    ) -> None:
        Subscription.__init__(self, client, model=model, position=position, resync=resync)
        _Session.__init__(self, client)
        self._channel = channel
        self._expected_channel = channel
        self._params = dict(params or {})
        #: The last ``welcome`` received.
        self.welcome: Welcome | None = None
        self._attempt_from: ResumePoint | None = None
        self._stalled_resumes = 0
        self._restart_reason: str | None = "initial" if position is None and resync is not None else None
        self._closed = asyncio.Event()

    @property
    def channel(self) -> str | None:
        """The channel: as given to :meth:`Client.subscribe`, else from the server's welcome."""
        return self._channel

    async def connected(self) -> Welcome:
        """Connect now if not connected, and return the connection's ``welcome`` (handy in tests).

        Events that follow the welcome wait on the connection until the subscription is iterated.

        Raises:
            Refused, Unreachable: as iteration would.
        """
        async with self._turn():
            try:
                await self._stopping_on_errors(self._connection())
            except StopAsyncIteration:
                raise ClientError("the subscription is closed") from None
        assert self.welcome is not None
        return self.welcome

    async def close(self) -> None:
        """Close the connection (code 1000) and end the iteration."""
        self._closed.set()
        self._client._state = "closed"
        await self._disconnect(graceful=True)

    async def __anext__(self) -> Received[E]:
        async with self._turn():
            return await self._stopping_on_errors(self._next())

    async def _stopping_on_errors(self, step: Awaitable[T]) -> T:
        try:
            return await step
        except _Ended:
            self._closed.set()
            self._client._state = "closed"
            await self._disconnect(graceful=True)
            raise StopAsyncIteration from None
        except ClientError:
            self._closed.set()
            self._client._state = "closed"
            await self._disconnect(graceful=True)
            raise

    # -- the state machine (the part both protocols share is _Session's) -------------------------------

    def _closing(self) -> bool:
        return self._closed.is_set()

    async def _pause(self, delay: float) -> None:
        """Wait out the backoff delay, or end at once if the subscription is closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closed.wait()
        if self._closed.is_set():
            raise _Ended

    async def _next(self) -> Received[E]:
        while True:
            if self._pending_resync is not None:  # one a cancellation interrupted
                await self._run_resync(self._pending_resync)
                continue
            if self._requested:
                self._requested = False
                await self._run_resync(ResyncInfo("requested", self._channel))
                continue
            ws = await self._connection()
            if self._drop_reason is not None:
                # Before reading on: an aborted connection may still hand out the frames it buffered.
                reason, self._drop_reason = self._drop_reason, None
                await self._after_close(_ABNORMAL, reason)
                continue
            try:
                text = await self._receive(ws)
            except _Closed as closed:
                await self._after_close(closed.code, closed.reason)
                continue
            item = await self._handle(text)
            if item is not None:
                return item

    async def _connection(self) -> ClientConnection:
        """The open, welcomed connection; open one (after the backoff delay) if there is none."""
        while self._ws is None:
            if self._closed.is_set():
                raise _Ended
            await self._start_attempt()
            try:
                await self._prepare()
                await self._open()
            except _Closed as closed:
                await self._after_close(closed.code, closed.reason)
        return self._ws

    async def _prepare(self) -> None:
        """Before an attempt: load a snapshot if one is due, and a token if none was given."""
        reason = self._restart_reason
        if reason is not None:
            self.stats.resyncs += 1
            if self._resync_callback is None:
                self._tracker.reset(None)  # start at the server's current position
            else:
                try:
                    snapshot = await self._resync_callback(ResyncInfo(reason, self._channel))
                    self._tracker.reset(_position(snapshot))
                except Exception as exc:
                    self._client._report(_failed(f"resync ({reason}) failed", exc))
                    raise _Closed(_ABNORMAL, "resync failed") from None
            self._restart_reason = None  # only now: a cancelled load runs again at the next attempt
        await self._ensure_token()

    def _url(self) -> str:
        parts = urlsplit(self._client.url)
        replaced = {"epoch", "last_seq", self._client.token_param, *self._params}
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in replaced]
        query += list(self._params.items())
        query += list(self._tracker.resume_params().items())
        if self._client.token is not None:
            query.append((self._client.token_param, self._client.token))
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def _open(self) -> None:
        """One attempt: handshake, then the welcome, within ``connect_timeout``."""
        self._attempt_from = self._tracker.position
        ws, frame = await self._handshake()
        if not isinstance(frame, Welcome):
            _abort(ws)
            raise _Closed(_ABNORMAL, "the first frame was not a welcome")
        self._welcomed(ws, frame)

    def _welcomed(self, ws: ClientConnection, welcome: Welcome) -> None:
        if self._expected_channel is not None and welcome.channel != self._expected_channel:
            _abort(ws)
            raise ClientError(
                f"the server sent channel {welcome.channel!r}, the subscription asked for "
                f"{self._expected_channel!r}"
            )
        self.welcome = welcome
        self._channel = welcome.channel
        self._stream_epoch = welcome.epoch
        self._client.stats.resumed += welcome.resumed
        # Without a position, start at the channel's current one. With one, either the resume succeeded,
        # or a resync_required follows at once.
        if self._tracker.position is None:
            self._tracker.reset(ResumePoint(welcome.epoch, welcome.seq))
        self._connected(ws, welcome)

    async def _handle(self, text: str) -> Received[E] | None:
        frame = self._decode_frame(text)
        if isinstance(frame, EventFrame):
            return self._judged(frame)
        if isinstance(frame, ResyncRequired):
            self._stream_epoch = frame.epoch
            await self._run_resync(ResyncInfo(frame.reason, self._channel, frame.epoch, frame.seq))
        elif isinstance(frame, ErrorFrame):
            self._client._report(ClientError(f"the server rejected a frame: {frame.code}: {frame.message}"))
        elif isinstance(frame, Welcome):
            self._client._report(ClientError("a second welcome on one connection: ignored"))
        return None

    def _drop(self, reason: str) -> None:
        self._drop_connection(reason)

    async def _after_close(self, code: int, reason: str) -> None:
        """Count the resumes a ``4001`` closed before any event arrived, then decide as every session."""
        if code == _SLOW_CONSUMER and self._attempt_from is not None and self._attempt_from == self.position:
            # Closed for falling behind before a single event was applied: the replay of what was missed
            # is larger than the server's queue bound, so resuming again would fail again. Reload instead.
            self._stalled_resumes += 1
            if self._stalled_resumes >= 2:
                self._stalled_resumes = 0
                self._restart_reason = "resume_overflow"
        elif code == _SLOW_CONSUMER:
            self._stalled_resumes = 0
        await super()._after_close(code, reason)


# Protocol 2 lives in its own module, which builds on everything above: imported last, on purpose.
from ._client2 import ChannelSubscription, Presence, PresenceChange, SubscriptionDenied  # noqa: E402
