"""Helpers for testing a service that broadcasts: run the app on a real server, follow it with the client.

::

    from rtbroadcast.testing import serve

    async def test_a_post_reaches_the_room() -> None:
        async with serve(app) as server, server.client("/realtime?room=lobby") as client:
            subscription = client.subscribe(model=MessagePosted)
            await subscription.connected()
            async with server.http() as http:
                await http.post("/rooms/lobby/messages", json={"text": "hi"})
            [received] = await subscription.take(1)

:func:`serve` runs an ASGI app with uvicorn on a free loopback port in the test's own event loop, its
lifespan included, so that the test talks to it over real sockets, as a device would. For a server that
already runs elsewhere (a staging deployment), make a :class:`~rtbroadcast.client.Client` with its
address: the client's :meth:`~rtbroadcast.client.Subscription.connected` and
:meth:`~rtbroadcast.client.Subscription.take` are made for tests.

The other helpers:

- :func:`capture` subscribes in-process to a channel and collects what arrives, in the background.
- :func:`connect` opens a WebSocket that speaks rtbroadcast's protocol (1 or 2) and decodes every frame,
  for tests of the exact frames a device receives.
- :func:`read_frame` decodes a frame from FastAPI's (Starlette's) synchronous ``TestClient``.

Every wait has a timeout, so a test that waits for a broadcast that never comes fails (:class:`TestTimeout`,
saying what did arrive) instead of hanging.

Needs ``pip install 'rtbroadcast[testing]'`` (uvicorn, websockets, httpx); importing this module does not
import them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar
from urllib.parse import urlencode

from .errors import ConfigurationError, RTBroadcastError
from .events import Event
from .protocol import (
    ChannelEvent,
    ErrorFrameV2,
    EventFrame,
    Ping,
    Pong,
    ResumePoint,
    ResyncRequired,
    ServerFrame,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    WelcomeV2,
    decode_server_frame,
    encode_client_frame,
)

if TYPE_CHECKING:
    import httpx
    from websockets.asyncio.client import ClientConnection

    from .broadcaster import Broadcaster, Received
    from .client import Client

__all__ = [
    "Capture",
    "LiveServer",
    "ProtocolClient",
    "TestTimeout",
    "capture",
    "connect",
    "read_frame",
    "serve",
]

E = TypeVar("E", bound=Event)

#: Seconds every helper waits by default before it fails.
DEFAULT_TIMEOUT = 5.0


class TestTimeout(RTBroadcastError, AssertionError):
    """What a helper raises when what it waits for does not come in time; says what it got instead."""

    __test__ = False  # not a test class, whatever its name


@dataclass(frozen=True, slots=True)
class LiveServer:
    """A running server: where it listens, and clients for it.

    ``host`` is ``"127.0.0.1:PORT"``.
    """

    host: str

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``."""
        return f"http://{self.host}"

    def url(self, path: str = "/", **query: str | int) -> str:
        """The ``http://`` address of ``path``, with ``query`` parameters added (``room="lobby"``)."""
        return f"http://{self.host}{_path(path, query)}"

    def ws_url(self, path: str, **query: str | int) -> str:
        """The ``ws://`` address of ``path`` (query included: ``"/realtime?room=lobby"``, or as ``query``)."""
        return f"ws://{self.host}{_path(path, query)}"

    def client(self, path: str, **options: Any) -> Client:
        """A :class:`~rtbroadcast.client.Client` of the stream at ``path``; ``options`` go to it.

        Use it as an async context manager, so that it closes with the test.
        """
        from .client import Client

        return Client(self.ws_url(path), **options)

    def http(self, **options: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` with this server as its base URL (close it, or use ``async with``)."""
        import httpx

        return httpx.AsyncClient(base_url=self.base_url, **options)


@contextlib.asynccontextmanager
async def serve(
    app: Any, *, port: int = 0, startup_timeout: float = 10.0, **options: Any
) -> AsyncIterator[LiveServer]:
    """Run ``app`` with uvicorn on ``127.0.0.1`` in the current event loop until the block ends.

    The app's lifespan runs (``lifespan="on"``), so its broadcaster connects and, at the end, drains
    its connections as in production.

    Args:
        app: an ASGI application (Starlette, FastAPI, ...).
        port: the port; 0 (the default) picks a free one. A fixed port lets a test stop the server and
            start another one where clients reconnect.
        startup_timeout: seconds the server may take to start.
        options: more ``uvicorn.Config`` options (``ws=``, ``log_level=``, ...).

    Raises:
        ConfigurationError: ``uvicorn`` is not installed.
        RuntimeError: the server stopped, or did not start, within ``startup_timeout``.
    """
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError(
            "rtbroadcast.testing.serve needs uvicorn: pip install 'rtbroadcast[testing]'"
        ) from None

    class Server(uvicorn.Server):
        """uvicorn's server, kept off the test runner's signals: Ctrl-C stays pytest's."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config: dict[str, Any] = {"log_level": "warning", "lifespan": "on", **options}
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))

    async def run() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's answer to a failed lifespan startup: not the test's exit
            raise RuntimeError(f"uvicorn exited with status {exc.code}") from None

    task = asyncio.get_running_loop().create_task(run(), name="rtbroadcast-testing-serve")
    deadline = time.monotonic() + startup_timeout
    try:
        # uvicorn sets a flag, not an event, once it listens (after the lifespan's startup).
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                server.should_exit = True
                try:
                    await task
                except Exception as exc:
                    raise RuntimeError(f"uvicorn stopped before it started (see its log): {exc}") from exc
                raise RuntimeError(f"uvicorn did not start within {startup_timeout} s")
            await asyncio.sleep(0.01)
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    try:
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield LiveServer(f"127.0.0.1:{bound}")
    finally:
        server.should_exit = True
        await task


def _path(path: str, query: Mapping[str, str | int]) -> str:
    path = "/" + path.lstrip("/")
    if not query:
        return path
    return path + ("&" if "?" in path else "?") + urlencode({k: str(v) for k, v in query.items()})


@contextlib.asynccontextmanager
async def _deadline(seconds: float, what: str) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise TestTimeout(f"waited {seconds:g} s for {what}") from None


# -- a capturing subscriber ------------------------------------------------------------------------------


class Capture(Generic[E]):
    """What :func:`capture` yields: every event of a channel received since it started, in seq order.

    ``received`` holds them all (each a :class:`~rtbroadcast.Received`, with its ``seq``), ``resyncs``
    the ``resync_required`` notices. :meth:`take` waits for the next ones.
    """

    def __init__(self) -> None:
        self.received: list[Received[E]] = []
        self.resyncs: list[ResyncRequired] = []
        self._taken = 0
        self._changed = asyncio.Event()
        self._failure: BaseException | None = None

    @property
    def events(self) -> list[E]:
        """The events received so far (without their seq)."""
        return [item.event for item in self.received]

    async def take(self, count: int = 1, *, timeout: float = DEFAULT_TIMEOUT) -> list[Received[E]]:
        """Return the next ``count`` events not taken yet, waiting up to ``timeout`` seconds for them.

        Raises:
            TestTimeout: fewer arrived in time (the message says how many, and what they were).
            SubscriptionClosed: the subscription ended (the broadcaster shut down, it fell behind, or the
                backend could not be reached to fill a gap: see its ``reason``).
        """
        wanted = self._taken + count
        try:
            async with asyncio.timeout(timeout):
                while len(self.received) < wanted:
                    if self._failure is not None:
                        raise self._failure
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            got = self.received[self._taken :]
            raise TestTimeout(
                f"waited {timeout:g} s for {count} event(s), got {len(got)}: {[r.event for r in got]!r}"
            ) from None
        taken = self.received[self._taken : wanted]
        self._taken = wanted
        return taken

    async def take_one(self, *, timeout: float = DEFAULT_TIMEOUT) -> E:
        """Return the next event (its model instance), waiting up to ``timeout`` seconds.

        Raises:
            TestTimeout: nothing arrived in time.
        """
        [received] = await self.take(1, timeout=timeout)
        return received.event

    def _add(self, item: Received[E] | ResyncRequired) -> None:
        if isinstance(item, ResyncRequired):
            self.resyncs.append(item)
        else:
            self.received.append(item)
        self._changed.set()

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._changed.set()


@contextlib.asynccontextmanager
async def capture(
    broadcaster: Broadcaster,
    channel: str,
    *,
    model: type[E] = Event,  # type: ignore[assignment]
    resume: ResumePoint | None = None,
) -> AsyncIterator[Capture[E]]:
    """Subscribe to ``channel`` in-process and collect its events in the background while the block runs.

    The subscription is active when the block starts: everything published from then on is captured::

        async with capture(broadcaster, "room:1", model=MessagePosted) as room:
            await client.post("/rooms/1/messages", json={...})
            message = await room.take_one()

    ``broadcaster`` must be connected (by the app's lifespan, :func:`serve`, or ``async with``).

    Raises:
        StateError: the broadcaster is not connected.
        ConfigurationError: ``channel`` is not a valid channel name, or ``model`` is not an Event class.
    """
    collected: Capture[E] = Capture()
    subscription = broadcaster.subscribe(channel, model=model, resume=resume)
    async with subscription:

        async def pump() -> None:
            try:
                async for item in subscription:
                    collected._add(item)
            except Exception as exc:  # handed to the test through take(): it decides
                collected._fail(exc)

        task = asyncio.get_running_loop().create_task(pump())
        try:
            yield collected
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- a WebSocket client that speaks the protocol ----------------------------------------------------------


class ProtocolClient:
    """A WebSocket connection to an rtbroadcast endpoint, frames decoded (made by :func:`connect`).

    ``welcome`` is the first frame (``Welcome`` on protocol 1, ``WelcomeV2`` on protocol 2; ``None``
    when the server refused the connection with a close instead). Frames the helpers read past while
    looking for another kind (a ``pong`` while waiting for an event) are kept in ``skipped``.
    """

    def __init__(self, ws: ClientConnection, protocol: int) -> None:
        self.ws = ws
        self.protocol = protocol
        self.welcome: Welcome | WelcomeV2 | None = None
        self.skipped: list[ServerFrame] = []
        self._requests = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (code 1000) and wait for the server's answer."""
        await self.ws.close()

    @property
    def close_code(self) -> int | None:
        """The close code the server sent (``None`` while open)."""
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        """The close reason the server sent (``None`` while open)."""
        return self.ws.close_reason

    async def frame(self, *, timeout: float = DEFAULT_TIMEOUT) -> ServerFrame:
        """Return the next frame, decoded (see :func:`~rtbroadcast.protocol.decode_server_frame`).

        Raises:
            TestTimeout: no frame within ``timeout`` seconds.
            websockets.ConnectionClosed: the server closed the connection (its ``rcvd`` has the code).
        """
        return decode_server_frame(await self.text(timeout=timeout))

    async def text(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Return the next frame's raw text: what a client parses, byte for byte.

        Raises:
            TestTimeout: no frame within ``timeout`` seconds.
        """
        async with _deadline(timeout, "a frame from the server"):
            data = await self.ws.recv()
        return data if isinstance(data, str) else data.decode()

    async def expect(self, kind: type[Any], *, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Return the next frame of type ``kind`` (``Subscribed``, ``ResyncRequired``...), skipping others.

        Raises:
            TestTimeout: none within ``timeout`` seconds (the message lists the frames skipped).
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await self.frame(timeout=timeout)
                    if isinstance(frame, kind):
                        return frame
                    self.skipped.append(frame)
        except TimeoutError:
            raise TestTimeout(
                f"waited {timeout:g} s for a {kind.__name__} frame; skipped {self.skipped!r}"
            ) from None

    async def event(self, *, channel: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Return the next application event as a client sees it: its JSON object, ``seq`` included.

        On protocol 2 it is the wrapped event's inner object; give ``channel`` to skip other channels'.

        Raises:
            TestTimeout: no event within ``timeout`` seconds (the message lists the frames skipped).
        """
        kind = ChannelEvent if self.protocol == 2 else EventFrame
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await self.expect(kind, timeout=timeout)
                    if isinstance(frame, ChannelEvent):
                        if channel is not None and frame.channel != channel:
                            self.skipped.append(frame)
                            continue
                        frame = frame.event
                    return {"type": frame.type, **frame.data, "seq": frame.seq}
        except TimeoutError:
            raise TestTimeout(f"waited {timeout:g} s for an event; skipped {self.skipped!r}") from None

    async def ping(self, *, timeout: float = DEFAULT_TIMEOUT) -> Pong:
        """Send a ``ping`` and return the ``pong``: everything queued before it has then arrived."""
        await self.ws.send(encode_client_frame(Ping()))
        frame: Pong = await self.expect(Pong, timeout=timeout)
        return frame

    async def subscribe(
        self,
        channel: str,
        *,
        resume: ResumePoint | None = None,
        presence: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Subscribed | ErrorFrameV2:
        """Protocol 2: subscribe to ``channel``; return its ``subscribed``, or the ``error`` refusing it.

        Raises:
            ConfigurationError: the connection speaks protocol 1.
            TestTimeout: no answer within ``timeout`` seconds.
        """
        request = self._request_id("subscribe")
        await self.ws.send(encode_client_frame(Subscribe(request, channel, resume, presence)))
        answer: Subscribed | ErrorFrameV2 = await self._answer(request, Subscribed, timeout)
        return answer

    async def unsubscribe(
        self, channel: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> Unsubscribed | ErrorFrameV2:
        """Protocol 2: unsubscribe from ``channel``; return its ``unsubscribed``, or the ``error``.

        Raises:
            ConfigurationError: the connection speaks protocol 1.
            TestTimeout: no answer within ``timeout`` seconds.
        """
        request = self._request_id("unsubscribe")
        await self.ws.send(encode_client_frame(Unsubscribe(request, channel)))
        answer: Unsubscribed | ErrorFrameV2 = await self._answer(request, Unsubscribed, timeout)
        return answer

    async def closed(self, *, timeout: float = DEFAULT_TIMEOUT) -> tuple[int | None, str | None]:
        """Wait for the server to close the connection; return its close code and reason.

        Frames that arrive meanwhile are kept in ``skipped``.

        Raises:
            TestTimeout: the connection is still open after ``timeout`` seconds.
        """
        from websockets.exceptions import ConnectionClosed

        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.ws.recv()
                    self.skipped.append(decode_server_frame(data))
        except ConnectionClosed:
            return self.ws.close_code, self.ws.close_reason
        except TimeoutError:
            raise TestTimeout(f"the connection is still open after {timeout:g} s") from None

    def _request_id(self, action: str) -> str:
        if self.protocol != 2:
            raise ConfigurationError(f"{action} is a protocol-2 frame: connect(url, protocol=2)")
        self._requests += 1
        return f"t{self._requests}"

    async def _answer(self, request: str, kind: type[Any], timeout: float) -> Any:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await self.frame(timeout=timeout)
                    if isinstance(frame, kind | ErrorFrameV2) and getattr(frame, "id", None) == request:
                        return frame
                    self.skipped.append(frame)
        except TimeoutError:
            raise TestTimeout(f"no answer to request {request!r} within {timeout:g} s") from None


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    protocol: int | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **options: Any,
) -> AsyncIterator[ProtocolClient]:
    """Open a WebSocket to ``url`` and read its first frame into ``client.welcome``.

    ``protocol=2`` adds ``?protocol=2`` to the URL. ``headers`` are sent with the handshake
    (``{"Authorization": "Bearer ..."}``, ``{"Cookie": "session=..."}``); ``options`` go to
    ``websockets.connect``. A server that refuses the connection with a close code leaves
    ``client.welcome`` as ``None`` and the code in ``client.close_code``::

        async with connect(server.ws_url("/realtime", room="1")) as ws:
            assert ws.welcome.seq == 0
            ...
            assert (await ws.event())["type"] == "message_posted"

    Raises:
        TestTimeout: no handshake or first frame within ``timeout`` seconds.
    """
    import websockets
    from websockets.exceptions import ConnectionClosed

    if protocol is not None:
        url += ("&" if "?" in url else "?") + f"protocol={protocol}"
    options.setdefault("open_timeout", timeout)
    if headers:
        options["additional_headers"] = dict(headers)
    async with _deadline(timeout, f"the WebSocket handshake with {url}"):
        ws = await websockets.connect(url, **options)
    client = ProtocolClient(ws, protocol or 1)
    try:
        try:
            first = await client.frame(timeout=timeout)
        except ConnectionClosed:
            first = None
        if isinstance(first, Welcome | WelcomeV2):
            client.welcome = first
        elif first is not None:
            client.skipped.append(first)
        yield client
    finally:
        await ws.close()


# -- for FastAPI's and Starlette's TestClient --------------------------------------------------------------


def read_frame(session: Any) -> ServerFrame:
    """Read and decode the next frame from a Starlette/FastAPI ``TestClient`` WebSocket session.

    For tests that use ``with client.websocket_connect(url) as ws:`` (synchronous)::

        welcome = read_frame(ws)
        assert isinstance(welcome, Welcome)
    """
    text: str = session.receive_text()
    return decode_server_frame(text)
