"""Protocol 2 in the Python client: several channels' subscriptions over one connection.

One :class:`_Multiplexer` per :class:`~rtbroadcast.client.Client` owns the connection: it connects,
reads every frame and routes it to the subscription of its channel, pings, and reconnects with the same
backoff, heartbeat and refusal rules as protocol 1. Each :class:`ChannelSubscription` keeps its own
position and resync callback: the decisions about an event (apply, duplicate, gap, ignore) and the resync
run when the application reads the subscription, between two of its events, exactly as in protocol 1, so
a snapshot never races with the application's own code.

Reading is bounded: a subscription holds at most :data:`_QUEUE_LIMIT` frames the application has not read;
past that the connection is not read until it catches up, and the server's backpressure applies to the
connection (a ``4001`` close, after which every subscription resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._session import _ABNORMAL, _abort, _Closed, _Ended, _failed, _Session
from .client import (
    Client,
    ClientError,
    Position,
    Received,
    Refused,
    ResyncCallback,
    ResyncInfo,
    Subscription,
    _position,
)
from .protocol import (
    ChannelEvent,
    CloseCode,
    ErrorFrameV2,
    PresenceJoin,
    PresenceLeave,
    PresenceMember,
    ResumePoint,
    ResyncRequired,
    Subscribe,
    Subscribed,
    SubscriptionErrorCode,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    WelcomeV2,
    encode_client_frame,
    encode_positions,
)

E = TypeVar("E")

#: Frames a subscription holds that the application has not read yet, before the connection waits.
_QUEUE_LIMIT: Final = 1024


class SubscriptionDenied(Refused):
    """The server refused one subscription (protocol 2); the connection and the others go on.

    ``error_code`` is the ``error`` frame's code (``forbidden``, ``invalid_channel``,
    ``too_many_subscriptions``, ...); ``code`` is ``None`` (no connection was closed).
    """

    def __init__(self, message: str, error_code: str) -> None:
        super().__init__(message)
        self.error_code = error_code


@dataclass(slots=True)
class Presence:
    """Who is on a channel, as this subscription last heard (protocol 2, ``presence=True``).

    ``members`` maps each member's ``client`` (its connection id) to it, in join order; ``count`` is
    the channel's full count (``members`` holds at most the server's snapshot limit when ``truncated``).
    """

    count: int = 0
    members: dict[str, PresenceMember] = field(default_factory=dict)
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A ``presence_join`` or ``presence_leave`` on a subscription's channel, and the presence after it."""

    kind: Literal["join", "leave", "snapshot"]
    channel: str
    member: PresenceMember | None
    presence: Presence


PresenceCallback = Callable[[PresenceChange], object]


class _Wake:
    """A frame-queue item that wakes a reader: the connection failed or the client closed."""


_WAKE: Final = _Wake()


class ChannelSubscription(Subscription[E]):
    """Protocol 2: one channel's subscription on a connection shared with others.

    Created by :meth:`Client.subscribe <rtbroadcast.client.Client.subscribe>` on a ``protocol=2``
    client, or for a subscription the server made (``server_side``). Iterate it like any
    :class:`~rtbroadcast.client.Subscription`; :meth:`close` unsubscribes (the connection stays).
    """

    def __init__(
        self,
        client: Client,
        mux: _Multiplexer,
        channel: str,
        *,
        model: type[Any] | None,
        position: Position | None,
        resync: ResyncCallback | None,
        presence: bool = False,
        on_presence: PresenceCallback | None = None,
        server_side: bool = False,
    ) -> None:
        super().__init__(client, model=model, position=position, resync=resync)
        self._mux = mux
        self._channel = channel
        self._wants_presence = presence
        self._on_presence = on_presence
        #: Whether the server makes this subscription (at connect, or later): the client never asks.
        self.server_side = server_side
        #: The last ``subscribed`` frame of this channel.
        self.subscribed: Subscribed | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._space = asyncio.Event()
        self._confirmed = asyncio.Event()  # set when the reader routed a subscribed (or an error) here
        self._refusal: ErrorFrameV2 | None = None
        self._last_routed: Subscribed | None = None  # the subscribed the reader routed on this connection
        self._ready = position is not None or resync is None or server_side  # no initial snapshot due
        self._request_id: str | None = None
        self._retries = 0
        self._closed = False

    @property
    def channel(self) -> str:
        """The channel."""
        return self._channel

    async def connected(self) -> Subscribed:
        """Connect and subscribe now if not done; return the ``subscribed`` frame (handy in tests).

        Raises:
            Refused, Unreachable: as iteration would; :class:`SubscriptionDenied` when the server refused
                this subscription.
        """
        async with self._turn():
            while True:
                try:
                    self._check_open()
                except StopAsyncIteration:
                    raise ClientError(f"the subscription to {self._channel!r} is closed") from None
                if not self._ready:
                    await self._initial()
                    continue
                self._mux.start()
                if self._confirmed.is_set() and self._last_routed is not None:
                    return self._last_routed
                await self._wait(self._confirmed.wait())
                refusal = self._refusal
                if refusal is not None and refusal.code == SubscriptionErrorCode.TRY_AGAIN_LATER:
                    self._confirmed.clear()
                    self._retries += 1
                    await asyncio.sleep(self._client.backoff.delay(self._retries - 1))
                    self._request_id = None
                    await self._mux.request(self)
                elif refusal is not None:
                    self._closed = True
                    self._mux.forget(self)
                    raise self._denied(refusal)

    async def close(self) -> None:
        """Unsubscribe (the connection stays for the others) and end the iteration."""
        if self._closed:
            return
        self._closed = True
        await self._mux.unsubscribe(self)
        self._space.set()  # a reader waiting for room in this queue goes on
        self._queue.put_nowait(_WAKE)

    async def __anext__(self) -> Received[E]:
        async with self._turn():
            while True:
                self._check_open()
                if self._pending_resync is not None:  # one a cancellation interrupted
                    await self._run_resync(self._pending_resync)
                    continue
                if self._requested:
                    self._requested = False
                    await self._run_resync(ResyncInfo("requested", self._channel))
                    continue
                if not self._ready:
                    await self._initial()
                    continue
                self._mux.start()
                item = await self._queue.get()
                self._space.set()
                received = await self._handle(item)
                if received is not None:
                    return received

    # -- the application's side: decisions in the order the frames came ---------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StopAsyncIteration
        failure = self._mux.failure
        if failure is not None:
            raise failure
        if self._mux.ended:
            raise StopAsyncIteration

    async def _wait(self, waiting: Awaitable[Any]) -> None:
        """Wait for ``waiting``, or for the connection to fail or the client to close."""
        tasks = {asyncio.ensure_future(waiting), asyncio.ensure_future(self._mux.stopped.wait())}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        try:
            self._check_open()
        except StopAsyncIteration:
            raise ClientError(f"the subscription to {self._channel!r} ended") from None

    async def _initial(self) -> None:
        """Load the first snapshot (no position given, a resync callback): then subscribe from it."""
        assert self._resync_callback is not None
        self.stats.resyncs += 1
        try:
            snapshot = await self._resync_callback(ResyncInfo("initial", self._channel))
        except Exception as exc:
            self._client._report(_failed(f"resync (initial) of {self._channel!r} failed", exc))
            self._retries += 1
            await asyncio.sleep(self._client.backoff.delay(self._retries - 1))
            return
        self._tracker.reset(_position(snapshot))
        self._ready = True
        await self._mux.request(self)

    async def _handle(self, item: Any) -> Received[E] | None:
        if isinstance(item, _Wake):
            self._check_open()
            return None
        if isinstance(item, Subscribed):
            self.subscribed = item
            self._stream_epoch = item.epoch
            self._retries = 0
            if self._tracker.position is None:
                self._tracker.reset(ResumePoint(item.epoch, item.seq))
            return None
        if isinstance(item, ChannelEvent):
            return self._judged(item.event)
        if isinstance(item, ResyncRequired):
            self._stream_epoch = item.epoch
            await self._run_resync(ResyncInfo(item.reason, self._channel, item.epoch, item.seq))
            return None
        if isinstance(item, ErrorFrameV2):
            if item.code == SubscriptionErrorCode.TRY_AGAIN_LATER:
                self._client._report(ClientError(f"subscribe {self._channel!r}: {item.code}: {item.message}"))
                self._retries += 1
                await asyncio.sleep(self._client.backoff.delay(self._retries - 1))
                self._request_id = None
                await self._mux.request(self)
                return None
            self._closed = True
            self._mux.forget(self)
            raise self._denied(item)
        if isinstance(item, Unsubscribed):
            self._closed = True
            self._mux.forget(self)
            raise StopAsyncIteration
        return None

    def _denied(self, frame: ErrorFrameV2) -> SubscriptionDenied:
        return SubscriptionDenied(
            f"the server refused the subscription to {self._channel!r}: {frame.code}: {frame.message}",
            frame.code,
        )

    def _drop(self, reason: str) -> None:
        self._mux._drop_connection(reason)

    def _about(self, preposition: str) -> str:
        return f" {preposition} {self._channel!r}"

    # -- the reader's side ----------------------------------------------------------------------------

    async def _deliver(self, item: Any) -> None:
        """Queue a frame for the application; wait while it has :data:`_QUEUE_LIMIT` unread."""
        if isinstance(item, Subscribed):
            self._last_routed = item
            self._refusal = None
            self._confirmed.set()
            if item.presence is not None:
                self.presence = Presence(
                    item.presence.count, {m.client: m for m in item.presence.members}, item.presence.truncated
                )
                self._presence_changed("snapshot", None)
        elif isinstance(item, ErrorFrameV2):
            self._refusal = item
            self._confirmed.set()
        self._queue.put_nowait(item)
        while self._queue.qsize() >= _QUEUE_LIMIT and not self._closed and not self._mux.stopping:
            self._space.clear()
            await self._space.wait()

    def _presence(self, frame: PresenceJoin | PresenceLeave) -> None:
        presence = self.presence
        if presence is None:
            presence = self.presence = Presence()
        member = frame.member
        if isinstance(frame, PresenceJoin):
            if member.client not in presence.members:
                presence.count += 1
            presence.members[member.client] = member
            self._presence_changed("join", member)
        else:
            if presence.members.pop(member.client, None) is not None or presence.truncated:
                presence.count = max(0, presence.count - 1)
            self._presence_changed("leave", member)

    def _presence_changed(
        self, kind: Literal["join", "leave", "snapshot"], member: PresenceMember | None
    ) -> None:
        if self._on_presence is not None and self.presence is not None:
            self._on_presence(PresenceChange(kind, self._channel, member, self.presence))

    def _disconnected(self) -> None:
        """The connection ended: what it queued is stale (the next one resumes from the position)."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._confirmed.clear()
        self._last_routed = None
        self._refusal = None
        self._request_id = None
        self._space.set()


class _Multiplexer(_Session):
    """The one connection of a protocol-2 client and the subscriptions it carries."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.subscriptions: dict[str, ChannelSubscription[Any]] = {}
        self.requests: dict[str, ChannelSubscription[Any]] = {}
        self.welcome: WelcomeV2 | None = None
        #: Why the client stopped for good (a refusal, unreachable), once it has.
        self.failure: ClientError | None = None
        #: Whether the stream ended on purpose (close code 1000, or the client closed).
        self.ended = False
        self.stopped = asyncio.Event()  # failure or ended
        self.stopping = False
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and not self.stopped.is_set():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rtbroadcast-client")

    def add(self, subscription: ChannelSubscription[Any]) -> None:
        self.subscriptions[subscription.channel] = subscription

    def forget(self, subscription: ChannelSubscription[Any]) -> None:
        if self.subscriptions.get(subscription.channel) is subscription:
            del self.subscriptions[subscription.channel]

    async def request(self, subscription: ChannelSubscription[Any]) -> None:
        """Send ``subscribe`` for ``subscription`` now if connected (else it goes at the next connect)."""
        ws = self._ws
        if ws is None or subscription.server_side or subscription.channel not in self.subscriptions:
            return
        if subscription._request_id is not None:
            return  # asked already on this connection (the connect and the first snapshot can cross)
        request_id = f"s{next(self._ids)}"
        subscription._request_id = request_id
        self.requests[request_id] = subscription
        frame = Subscribe(
            request_id, subscription.channel, subscription.position, subscription._wants_presence
        )
        with contextlib.suppress(Exception):  # a connection that just died: the next one subscribes
            await ws.send(encode_client_frame(frame))

    async def unsubscribe(self, subscription: ChannelSubscription[Any]) -> None:
        self.forget(subscription)
        ws = self._ws
        # Asked for, or made by the server, on this connection: the server knows it and must drop it.
        if ws is not None and (subscription._last_routed is not None or subscription._request_id is not None):
            with contextlib.suppress(Exception):
                await ws.send(encode_client_frame(Unsubscribe(f"u{next(self._ids)}", subscription.channel)))

    async def close(self) -> None:
        """Stop for good: close the connection with 1000 and end every subscription."""
        self.stopping = True
        self.ended = True
        self.stopped.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(int(CloseCode.NORMAL), "client closed")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._wake_all()
        self._client._state = "closed"

    def _wake_all(self) -> None:
        for subscription in list(self.subscriptions.values()):
            subscription._space.set()
            subscription._queue.put_nowait(_WAKE)

    # -- the connection's life -------------------------------------------------------------------------

    async def _run(self) -> None:
        client = self._client
        try:
            while not self.stopping:
                await self._start_attempt()
                try:
                    await self._ensure_token()
                    await self._open()
                    await self._read_all()
                except _Closed as closed:
                    await self._after_close(closed.code, closed.reason)
        except _Ended:
            self.ended = True
        except ClientError as exc:
            self.failure = exc
        finally:
            await self._disconnect()
            if not self.stopping:
                client._state = "closed"
            self.stopped.set()
            self._wake_all()

    def _closing(self) -> bool:
        return self.stopping

    def _url(self) -> str:
        client = self._client
        parts = urlsplit(client.url)
        replaced = {"protocol", "resume", client.token_param}
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in replaced]
        query.append(("protocol", "2"))
        positions = {
            channel: sub.position
            for channel, sub in self.subscriptions.items()
            if sub.server_side and sub.position is not None
        }
        if positions:
            query.append(("resume", encode_positions(positions)))
        if client.token is not None:
            query.append((client.token_param, client.token))
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def _open(self) -> None:
        ws, frame = await self._handshake()
        if isinstance(frame, Welcome):
            _abort(ws)
            raise ClientError("the server answered with protocol 1: it does not speak protocol 2")
        if not isinstance(frame, WelcomeV2):
            _abort(ws)
            raise _Closed(_ABNORMAL, "the first frame was not a welcome")
        self.welcome = frame
        self._connected(ws, frame)
        for subscription in list(self.subscriptions.values()):
            if subscription._ready:
                await self.request(subscription)

    async def _read_all(self) -> None:
        ws = self._ws
        assert ws is not None
        while True:
            await self._route(await self._receive(ws))

    async def _route(self, text: str) -> None:
        client = self._client
        frame = self._decode_frame(text)
        if isinstance(frame, ChannelEvent | ResyncRequired | Unsubscribed | PresenceJoin | PresenceLeave):
            subscription = self.subscriptions.get(frame.channel or "")
            if subscription is None:
                return  # an event queued before an unsubscribe, or a channel nobody follows
            if isinstance(frame, PresenceJoin | PresenceLeave):
                subscription._presence(frame)
            else:
                await subscription._deliver(frame)
        elif isinstance(frame, Subscribed):
            await self._subscribed(frame)
        elif isinstance(frame, ErrorFrameV2):
            await self._error(frame)
        elif isinstance(frame, Welcome | WelcomeV2):
            client._report(ClientError("a second welcome on one connection: ignored"))

    async def _subscribed(self, frame: Subscribed) -> None:
        client = self._client
        subscription = self.requests.pop(frame.id, None) if frame.id is not None else None
        if subscription is None:
            subscription = self.subscriptions.get(frame.channel)
        if subscription is None and frame.id is None and client.on_server_subscription is not None:
            subscription = ChannelSubscription(
                client, self, frame.channel, model=None, position=None, resync=None, server_side=True
            )
            self.add(subscription)
            client.on_server_subscription(subscription)
        if subscription is None or subscription.channel != frame.channel:
            return
        if frame.resumed:
            client.stats.resumed += 1
        await subscription._deliver(frame)

    async def _error(self, frame: ErrorFrameV2) -> None:
        subscription = self.requests.pop(frame.id, None) if frame.id is not None else None
        if subscription is not None and frame.code != SubscriptionErrorCode.PRESENCE_UNAVAILABLE:
            await subscription._deliver(frame)
            return
        where = f" ({frame.channel!r})" if frame.channel else ""
        self._client._report(
            ClientError(f"the server rejected a frame{where}: {frame.code}: {frame.message}")
        )

    async def _disconnect(self, *, graceful: bool = False) -> None:
        """End the connection; what every subscription asked for or queued on it is stale now."""
        self._drop_reason = None
        self.requests.clear()
        for subscription in self.subscriptions.values():
            subscription._disconnected()
        await super()._disconnect(graceful=graceful)
