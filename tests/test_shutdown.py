"""Shutdown: a real uvicorn process stopped by SIGTERM with SSE streams and WebSockets open.

uvicorn closes WebSockets itself (1012) and waits for every HTTP response, an endless SSE stream
included, before the lifespan's shutdown runs. The lifespan helper drains the broadcaster on the signal
first: WebSocket clients get 1001, SSE streams end with a ``retry:`` line, and the process exits at once,
with nothing logged at ERROR.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import httpx
import pytest
import websockets
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection

from rtbroadcast import Broadcaster, BroadcasterState, CloseCode, ConfigurationError, Event, StateError
from rtbroadcast.asgi import drain_on_signals
from rtbroadcast.protocol import ObservedCloseCode
from rtbroadcast.starlette import lifespan

from .support import MS, ServerProcess, broadcast_app, connect, recv_json, serve, server_process, until

ROOT = Path(__file__).resolve().parent.parent

#: How long after SIGTERM the process must be gone (it takes well under a second).
EXIT_BOUND = 4.0


async def read_sse(http: httpx.AsyncClient, url: str, lines: list[str], opened: asyncio.Event) -> None:
    """Read an SSE stream line by line into ``lines`` until the server ends it."""
    async with http.stream("GET", url, timeout=None) as response:
        assert response.status_code == 200
        opened.set()
        async for line in response.aiter_lines():
            lines.append(line)


async def close_code(ws: ClientConnection) -> int | None:
    """Wait for the server to close ``ws``; return the code of its close frame (None: no close frame)."""
    try:
        async with asyncio.timeout(EXIT_BOUND):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


async def check_sigterm(server: ServerProcess, ws_path: str, sse_path: str) -> None:
    """Open two WebSockets and an SSE stream, SIGTERM the server, and check what everyone saw."""
    host = server.host
    sockets = [await connect(f"ws://{host}{ws_path}") for _ in range(2)]
    for ws in sockets:
        assert (await recv_json(ws))["type"] == "welcome"
    lines: list[str] = []
    opened = asyncio.Event()
    async with httpx.AsyncClient() as http:
        stream = asyncio.get_running_loop().create_task(
            read_sse(http, f"http://{host}{sse_path}", lines, opened)
        )
        await asyncio.wait_for(opened.wait(), 5_000 * MS)
        await until(lambda: any(line.startswith("data: ") for line in lines))
        closes = asyncio.gather(*(close_code(ws) for ws in sockets))
        elapsed = await server.stop(2 * EXIT_BOUND)
        codes = await closes
        stream_ended = False
        with contextlib.suppress(TimeoutError, httpx.TransportError):
            await asyncio.wait_for(stream, 1)
            stream_ended = True
        if not stream.done():
            stream.cancel()
    log = server.log()
    assert elapsed < EXIT_BOUND, f"still running {elapsed:.1f} s after SIGTERM:\n{log}"
    assert codes == [CloseCode.GOING_AWAY] * 2, log
    assert stream_ended, f"the SSE stream did not end: {lines}"
    assert any(line.startswith("retry: ") for line in lines), lines
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log


@pytest.mark.parametrize(
    "options",
    [
        pytest.param([], id="default"),
        # uvicorn cancels what still runs after 5 s and logs each at ERROR: nothing may still run.
        pytest.param(["--timeout-graceful-shutdown", "5"], id="graceful-timeout"),
        pytest.param(["--ws", "wsproto"], id="wsproto"),
        pytest.param(["--loop", "uvloop", "--http", "h11"], id="uvloop-h11"),
    ],
)
@pytest.mark.asyncio_only  # the server is a subprocess; this loop only runs its clients
async def test_sigterm_ends_sse_streams_and_closes_websockets_with_1001(options: list[str]) -> None:
    async with server_process("-m", "uvicorn", "tests.shutdown_app:app", *options, stderr=True) as server:
        await check_sigterm(server, "/ws?room=1", "/ws/sse?room=1")


@pytest.mark.asyncio_only  # the server is a subprocess; this loop only runs its clients
async def test_without_the_drain_websocket_clients_get_1012_from_uvicorn() -> None:
    """The close-code table's 1012 row: what uvicorn sends on its own when nothing drained first."""
    async with server_process(
        "-m", "uvicorn", "tests.shutdown_app:app", env={"RTB_DRAIN": "0"}, stderr=True
    ) as server:
        sockets = [await connect(f"ws://{server.host}/ws?room=1") for _ in range(2)]
        for ws in sockets:
            assert (await recv_json(ws))["type"] == "welcome"
        closes = asyncio.gather(*(close_code(ws) for ws in sockets))
        elapsed = await server.stop(2 * EXIT_BOUND)
        assert await closes == [ObservedCloseCode.SERVICE_RESTART] * 2, server.log()
    assert elapsed < EXIT_BOUND, server.log()


@pytest.mark.asyncio_only  # the server is a subprocess; this loop only runs its clients
async def test_the_example_service_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'restaurant.db'}",
        "BROADCAST_URL": "memory://",
        "LOG_LEVEL": "INFO",
        "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED": "1",
    }
    async with server_process("-m", "examples.restaurant_app", env=env, stderr=True) as server:
        query = "?restaurant_id=shutdown-restaurant"
        await check_sigterm(server, f"/realtime{query}", f"/realtime/sse{query}")


# -- the drain, in process ----------------------------------------------------------------------------


def make_app(broadcaster: Broadcaster) -> Starlette:
    return broadcast_app(broadcaster, drain_on_signal=False)


async def test_drain_closes_connections_with_1001_and_refuses_new_ones_while_publishing_works() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(make_app(broadcaster)) as host, httpx.AsyncClient() as http:
        ws = await connect(f"ws://{host}/ws?room=1")
        assert (await recv_json(ws))["type"] == "welcome"
        await broadcaster.drain(timeout=5)
        assert broadcaster.state is BroadcasterState.DRAINING
        assert await close_code(ws) == CloseCode.GOING_AWAY
        assert broadcaster.connection_count() == 0
        # Requests still in flight may publish; new subscribers are sent away.
        assert await broadcaster.publish_json("room:1", '{"type": "late"}') == 1
        late = await connect(f"ws://{host}/ws?room=1")
        assert await close_code(late) == CloseCode.GOING_AWAY
        response = await http.get(f"http://{host}/ws/sse?room=1")
        assert response.status_code == 503
        with pytest.raises(StateError, match="draining"):
            async with broadcaster.subscribe("room:1"):
                pass
    assert broadcaster.stats().state is BroadcasterState.CLOSED


async def test_drain_waits_for_the_sse_stream_to_end_with_a_retry_line() -> None:
    broadcaster = Broadcaster("memory://")
    lines: list[str] = []
    opened = asyncio.Event()
    async with serve(make_app(broadcaster)) as host, httpx.AsyncClient() as http:
        stream = asyncio.get_running_loop().create_task(
            read_sse(http, f"http://{host}/ws/sse?room=1", lines, opened)
        )
        await asyncio.wait_for(opened.wait(), 5_000 * MS)
        await broadcaster.drain(timeout=5)
        await asyncio.wait_for(stream, 5_000 * MS)
    farewell, retry, blank = lines[-3:]
    assert (farewell, blank) == (": closed 1001 server shutting down", ""), lines
    assert retry.startswith("retry: "), lines
    assert 500 <= int(retry.removeprefix("retry: ")) <= 2500


# -- the signal chain ---------------------------------------------------------------------------------


@contextlib.contextmanager
def recording_handler(
    calls: list[tuple[int, BroadcasterState]], broadcaster: Broadcaster
) -> Iterator[Callable[[int, FrameType | None], None]]:
    """Install a SIGTERM handler, as a server would, that records the broadcaster's state when called."""

    def handler(signum: int, frame: FrameType | None) -> None:
        calls.append((signum, broadcaster.state))

    original = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, original)


async def test_the_first_signal_reaches_the_servers_handler_after_the_drain() -> None:
    calls: list[tuple[int, BroadcasterState]] = []
    async with Broadcaster("memory://") as broadcaster:
        with recording_handler(calls, broadcaster) as server_handler:
            with drain_on_signals(broadcaster, timeout=5):
                assert signal.getsignal(signal.SIGTERM) is not server_handler
                async with broadcaster.subscribe("room:1", model=Event) as subscription:
                    signal.raise_signal(signal.SIGTERM)
                    assert calls == []  # the server hears of it once the drain is done
                    await until(lambda: bool(calls))
                    assert subscription.connection.close_code == CloseCode.GOING_AWAY
            assert calls == [(signal.SIGTERM, BroadcasterState.DRAINING)]
            assert signal.getsignal(signal.SIGTERM) is server_handler


async def test_a_second_signal_reaches_the_servers_handler_at_once() -> None:
    calls: list[tuple[int, BroadcasterState]] = []
    async with Broadcaster("memory://") as broadcaster:
        with recording_handler(calls, broadcaster), drain_on_signals(broadcaster, timeout=5):
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # before the drain even started
            assert [signum for signum, _ in calls] == [signal.SIGTERM, signal.SIGTERM]


async def test_nothing_is_chained_where_no_server_installed_a_handler() -> None:
    broadcaster = Broadcaster("memory://")
    # What Python starts with: the default action for SIGTERM, KeyboardInterrupt for SIGINT.
    term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with drain_on_signals(broadcaster):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, interrupt)


@pytest.mark.parametrize("drain_timeout", [float("nan"), float("inf"), -1.0, "2", True])
def test_a_nonsense_drain_timeout_is_refused_when_the_lifespan_is_made(drain_timeout: object) -> None:
    # Found at startup, not at the first SIGTERM, when the drain would need it.
    with pytest.raises(ConfigurationError, match=r"^drain_timeout must be a finite number of seconds >= 0"):
        lifespan(Broadcaster(), drain_timeout=drain_timeout)  # type: ignore[arg-type]
    assert lifespan(Broadcaster(), drain_timeout=0) is not None
