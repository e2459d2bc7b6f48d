"""rtbroadcast.client against real servers: order, resume across restarts, resync, refusals, dead networks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, CloseCode, ConfigurationError, Event, ResumePoint
from rtbroadcast.asgi import ConnectionRequest, Deny
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.client import (
    Backoff,
    Client,
    DisconnectInfo,
    Received,
    Refused,
    ResumeTracker,
    ResyncInfo,
    Unreachable,
    close_action,
)

from .support import MS, broadcast_app, free_port, serve, until


class Ticked(Event):
    type: Literal["client_test_ticked"] = "client_test_ticked"
    n: int


class Tocked(Event):
    type: Literal["client_test_tocked"] = "client_test_tocked"
    n: int


#: Quick retries, so that a test spends its time on what it checks.
FAST = Backoff(initial_delay=0.05, max_delay=0.2)


def close_all(broadcaster: Broadcaster, channel: str, code: int) -> None:
    """Close every connection of ``channel`` from the server's side, as the server itself would."""
    for connection in list(broadcaster.registry):
        if connection.channel == channel:
            connection.close(code, "test")


async def publish(broadcaster: Broadcaster, channel: str, numbers: range) -> None:
    for n in numbers:
        await broadcaster.publish(channel, Ticked(n=n))


# -- sans I/O ----------------------------------------------------------------------------------------


def test_the_tracker_applies_the_next_seq_drops_older_ones_and_sees_gaps() -> None:
    tracker = ResumeTracker()
    assert tracker.judge(1) == "ignore" and tracker.resume_params() == {}
    tracker.reset(("e", 4))
    assert [tracker.judge(seq) for seq in (3, 4, 5, 6)] == ["duplicate", "duplicate", "apply", "gap"]
    assert tracker.judge(5, "e") == "apply" and tracker.judge(5, "another-epoch") == "ignore"
    tracker.advance(5)
    assert tracker.position == ResumePoint("e", 5)
    assert tracker.resume_params() == {"epoch": "e", "last_seq": "5"}


def test_backoff_is_full_jitter_below_a_capped_doubling_ceiling() -> None:
    backoff = Backoff(initial_delay=0.5, max_delay=10.0)
    assert [backoff.ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.ceiling(10_000) == 10.0  # no overflow after a long outage
    assert backoff.delay(3, rand=lambda: 0.0) == 0.0
    assert backoff.delay(3, rand=lambda: 0.5) == 2.0
    delays = [backoff.delay(2) for _ in range(500)]
    assert all(0 <= d <= 2.0 for d in delays) and max(delays) > 1.5 and min(delays) < 0.5


def test_close_codes_decide_between_reconnecting_refreshing_and_stopping() -> None:
    assert close_action(4003) == "refresh_token"
    assert close_action(4004) == "stop" and close_action(1000) == "stop"
    for code in (1001, 1006, 1011, 1012, 1013, 4001, 4002, 4008):
        assert close_action(code) == "reconnect", code


def test_importing_the_client_does_not_import_websockets() -> None:
    import subprocess
    import sys

    code = "import sys, rtbroadcast.client\nassert 'websockets' not in sys.modules, 'imported websockets'\n"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- against a server --------------------------------------------------------------------------------


async def test_live_events_arrive_in_order_decoded_into_models() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster)) as host:
        async with Client(f"ws://{host}/ws?room=live") as client:
            subscription = client.subscribe("room:live", model=Event)
            welcome = await subscription.connected()
            assert welcome.channel == "room:live" and welcome.seq == 0
            for n in range(20):
                await broadcaster.publish("room:live", Ticked(n=n) if n % 2 else Tocked(n=n))
            received = await subscription.take(20)
        assert [r.seq for r in received] == list(range(1, 21))
        assert [type(r.event) for r in received] == [Tocked, Ticked] * 10
        assert [r.event.n for r in received] == list(range(20))  # type: ignore[attr-defined]
        assert all(isinstance(r, Received) and r.channel == "room:live" for r in received)
        assert client.state == "closed" and client.stats.attempts == 1


async def test_without_a_model_events_are_dicts_and_params_name_the_channel() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster)) as host, Client(f"ws://{host}/ws") as client:
        subscription = client.subscribe(params={"room": "plain"})
        await subscription.connected()
        seq = await broadcaster.publish("room:plain", Ticked(n=7))
        [received] = await subscription.take(1)
    assert received.seq == seq and received.channel == "room:plain"
    assert received.event == {"type": "client_test_ticked", "n": 7, "timestamp": received.event["timestamp"]}


async def test_a_server_restarted_on_redis_resumes_with_nothing_lost(
    redis_url: str, redis_prefix: str
) -> None:
    """Two processes in a row on one port and one Redis: history survives, the client resumes."""

    def app() -> Any:
        return broadcast_app(Broadcaster(backend=RedisBackend(redis_url, key_prefix=redis_prefix)))

    port = free_port()
    disconnects: list[DisconnectInfo] = []
    async with (
        Broadcaster(backend=RedisBackend(redis_url, key_prefix=redis_prefix)) as publisher,
        Client(f"ws://127.0.0.1:{port}/ws?room=r", backoff=FAST, on_disconnect=disconnects.append) as client,
    ):
        subscription = client.subscribe(model=Ticked)
        async with serve(app(), port=port):
            await subscription.connected()
            await publish(publisher, "room:r", range(3))
            first = await subscription.take(3)
        # The server is gone (in-process uvicorn closes with 1012: no drain ran). Events published meanwhile are in Redis's history.
        await publish(publisher, "room:r", range(3, 8))
        async with serve(app(), port=port):
            rest = await subscription.take(5)
            await publish(publisher, "room:r", range(8, 10))
            rest += await subscription.take(2)
    assert [r.event.n for r in first + rest] == list(range(10))
    assert [r.seq for r in first + rest] == list(range(1, 11))
    assert disconnects[0].code == 1012 and disconnects[0].retry_in is not None
    assert client.stats.resumed == 1 and subscription.stats.resyncs == 0


async def test_history_gone_calls_resync_then_continues_from_the_snapshot() -> None:
    """A memory backend restarted (new epoch): resync_required, the snapshot is loaded, events go on.

    An event published while the snapshot loads is both in the snapshot and on the connection: it is
    dropped, not applied twice.
    """
    state: dict[str, Any] = {"n": None}
    servers: list[Broadcaster] = []

    def app(broadcaster: Broadcaster) -> Any:
        async def snapshot(request: Request) -> JSONResponse:
            position = await broadcaster.backend.position("room:s")
            return JSONResponse(
                {"n": state["n"]},
                headers={"X-Stream-Epoch": position.epoch, "X-Stream-Seq": str(position.seq)},
            )

        servers.append(broadcaster)
        return broadcast_app(broadcaster, routes=[Route("/snapshot", snapshot)])

    port = free_port()
    calls: list[ResyncInfo] = []
    snapshots: list[dict[str, Any]] = []

    async def resync(info: ResyncInfo) -> tuple[str, int]:
        calls.append(info)
        if info.reason == "epoch_changed":  # published while the snapshot loads: in it, and on the wire
            await publish(servers[-1], "room:s", range(102, 103))
            state["n"] = 102
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{port}/snapshot")
        snapshots.append(response.json())
        return response.headers["X-Stream-Epoch"], int(response.headers["X-Stream-Seq"])

    async with Client(f"ws://127.0.0.1:{port}/ws?room=s", backoff=FAST) as client:
        subscription = client.subscribe(model=Ticked, resync=resync)
        first = Broadcaster("memory://")
        async with serve(app(first), port=port):
            await subscription.connected()  # the initial snapshot came first
            await publish(first, "room:s", range(3))
            before = await subscription.take(3)
        second = Broadcaster("memory://")
        async with serve(app(second), port=port):
            await publish(second, "room:s", range(100, 102))  # lost for this client: it resyncs
            state["n"] = 101
            taking = asyncio.get_running_loop().create_task(subscription.take(1))
            await until(lambda: len(snapshots) == 2)
            await publish(second, "room:s", range(103, 104))
            after = await taking
    assert [info.reason for info in calls] == ["initial", "epoch_changed"]
    assert [r.event.n for r in before] == [0, 1, 2]
    assert snapshots == [{"n": None}, {"n": 102}]
    assert [(r.seq, r.event.n) for r in after] == [(4, 103)]
    assert subscription.position is not None and subscription.position.seq == 4
    assert subscription.position.epoch == calls[1].epoch != calls[0].epoch
    assert subscription.stats.resyncs == 2 and subscription.stats.duplicates == 1
    assert client.stats.welcomes == 2 and client.stats.resumed == 1  # the first resumed from the snapshot


async def test_a_refusal_is_not_retried_without_a_fresh_token() -> None:
    asked: list[str | None] = []

    def authorize(request: ConnectionRequest, channel: str) -> bool | Deny:
        asked.append(request.query.get("token"))
        return True if request.query.get("token") == "fresh" else Deny("token expired")

    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster, authorize=authorize)) as host:
        url = f"ws://{host}/ws?room=x"
        async with Client(url, token="stale", backoff=Backoff(0, 0)) as client:
            subscription = client.subscribe()
            with pytest.raises(Refused) as refused:
                await asyncio.wait_for(anext(subscription), 5_000 * MS)
            assert refused.value.code == CloseCode.FORBIDDEN
            await asyncio.sleep(1_000 * MS)  # nothing retries in the background either
        assert client.stats.attempts == 1 and asked == ["stale"] and client.state == "closed"

        # A token callback that has nothing new: one more ask, then stop. Zero backoff: a storm would show.
        asked.clear()
        async with Client(
            url, token="stale", get_token=lambda request: "stale", backoff=Backoff(0, 0)
        ) as again:
            with pytest.raises(Refused):
                await asyncio.wait_for(again.subscribe().connected(), 5_000 * MS)
            await asyncio.sleep(1_000 * MS)
        assert again.stats.attempts == 1 and asked == ["stale"]

        # A fresh token: the client comes back with it, and stays.
        asked.clear()

        async def get_token(request: Any) -> str:
            return "fresh"

        async with Client(url, token="stale", get_token=get_token, backoff=FAST) as refreshed:
            welcome = await asyncio.wait_for(refreshed.subscribe().connected(), 5_000 * MS)
        assert welcome.channel == "room:x" and asked == ["stale", "fresh"] and refreshed.stats.attempts == 2


async def test_a_bad_request_stops_and_an_unreachable_server_gives_up() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster)) as host, Client(f"ws://{host}/ws", backoff=FAST) as client:
        with pytest.raises(Refused) as refused:  # no room: 4004
            await asyncio.wait_for(client.subscribe().connected(), 5_000 * MS)
    assert refused.value.code == CloseCode.BAD_REQUEST and client.stats.attempts == 1

    port = free_port()  # nothing listens there
    async with Client(f"ws://127.0.0.1:{port}/ws?room=a", backoff=FAST, max_retries=3) as gone:
        with pytest.raises(Unreachable):
            await asyncio.wait_for(gone.subscribe().connected(), 10_000 * MS)
    assert gone.stats.attempts == 4


class Dark:
    """What a :func:`cuttable_proxy` carries: ``cut()`` silences every connection open now (bytes are
    read and dropped both ways, nothing is closed): a network that went dark. Later ones go through."""

    def __init__(self) -> None:
        self.open: list[asyncio.Event] = []

    def cut(self) -> None:
        for silenced in self.open:
            silenced.set()


@contextlib.asynccontextmanager
async def cuttable_proxy(target: str) -> AsyncIterator[tuple[str, Dark]]:
    """A TCP proxy on loopback to ``target``, whose connections the test can silence."""
    dark = Dark()
    host, port = target.rsplit(":", 1)
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, silenced: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not silenced.is_set():
                    writer.write(data)
                    await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        silenced = asyncio.Event()
        dark.open.append(silenced)
        for task in (pipe(reader, upstream_writer, silenced), pipe(upstream_reader, writer, silenced)):
            tasks.add(asyncio.get_running_loop().create_task(task))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", dark
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_a_silent_network_is_detected_within_the_heartbeat_bound() -> None:
    broadcaster = Broadcaster("memory://", heartbeat_interval=25.0)
    dropped: list[tuple[float, DisconnectInfo]] = []
    interval, timeout = 0.2, 0.5
    async with (
        serve(broadcast_app(broadcaster)) as host,
        cuttable_proxy(host) as (proxy, dark),
        Client(
            f"ws://{proxy}/ws?room=dark",
            heartbeat_interval=interval,
            heartbeat_timeout=timeout,
            backoff=FAST,
            on_disconnect=lambda info: dropped.append((time.monotonic(), info)),
        ) as client,
    ):
        subscription = client.subscribe(model=Ticked)
        await subscription.connected()
        await publish(broadcaster, "room:dark", range(2))
        await subscription.take(2)
        await asyncio.sleep(3 * interval)  # pings and pongs flow meanwhile: no false alarm
        assert client.stats.heartbeat_timeouts == 0
        dark.cut()
        silenced = time.monotonic()
        await publish(broadcaster, "room:dark", range(2, 4))  # lost in the dark: resumed later
        taking = asyncio.get_running_loop().create_task(subscription.take(2))
        later = await taking
    detected_after = dropped[0][0] - silenced
    assert dropped[0][1].code == 1006 and client.stats.heartbeat_timeouts == 1
    assert detected_after <= interval + timeout + 0.5, detected_after  # the bound, with slack for load
    assert [r.event.n for r in later] == [2, 3] and client.stats.resumed == 1


async def test_a_slow_consumer_close_reconnects_and_resumes() -> None:
    broadcaster = Broadcaster("memory://")
    async with (
        serve(broadcast_app(broadcaster)) as host,
        Client(f"ws://{host}/ws?room=slow", backoff=FAST) as client,
    ):
        subscription = client.subscribe(model=Ticked)
        await subscription.connected()
        await publish(broadcaster, "room:slow", range(3))
        got = await subscription.take(2)
        close_all(broadcaster, "room:slow", CloseCode.SLOW_CONSUMER)
        await publish(broadcaster, "room:slow", range(3, 6))
        got += await subscription.take(4)
    assert [r.event.n for r in got] == list(range(6))
    assert client.stats.attempts == 2 and client.stats.resumed == 1
    assert subscription.stats.duplicates == 0 and subscription.stats.resyncs == 0


async def test_a_resync_cut_short_by_a_timeout_runs_again_at_the_next_read() -> None:
    broadcaster = Broadcaster("memory://")
    calls: list[str] = []

    async def resync(info: ResyncInfo) -> ResumePoint:
        calls.append(info.reason)
        if len(calls) == 1:
            await asyncio.Event().wait()  # the first load hangs: the test's timeout cancels it
        assert subscription.welcome is not None
        return ResumePoint(subscription.welcome.epoch, 0)  # the state before anything was published

    async with serve(broadcast_app(broadcaster)) as host, Client(f"ws://{host}/ws?room=cut") as client:
        subscription = client.subscribe(model=Ticked, position=("another-epoch", 5), resync=resync)
        with pytest.raises(TimeoutError):
            await subscription.take(1, timeout=300 * MS)
        assert calls == ["epoch_changed"]
        await publish(broadcaster, "room:cut", range(2))
        received = await subscription.take(2)
    assert calls == ["epoch_changed", "epoch_changed"]
    assert [r.event.n for r in received] == [0, 1]


async def test_backoff_spreads_attempts_while_the_server_is_down_and_resets_once_stable() -> None:
    port = free_port()
    broadcaster = Broadcaster("memory://")
    disconnects: list[DisconnectInfo] = []
    backoff = Backoff(initial_delay=0.1, max_delay=0.8)
    async with Client(
        f"ws://127.0.0.1:{port}/ws?room=b",
        backoff=backoff,
        stable_after=0.3,
        on_disconnect=disconnects.append,
    ) as client:
        subscription = client.subscribe()
        connecting = asyncio.get_running_loop().create_task(subscription.connected())
        await asyncio.sleep(2_000 * MS)  # nothing listens: attempts back off
        down_attempts = client.stats.attempts
        async with serve(broadcast_app(broadcaster), port=port):
            await connecting
            failed = len(disconnects)
            assert [d.retry for d in disconnects] == list(range(1, len(disconnects) + 1))
            assert all(
                d.retry_in is not None and d.retry_in <= backoff.ceiling(d.retry - 1) for d in disconnects
            )

            # A connection that did not last: the next retry keeps climbing.
            close_all(broadcaster, "room:b", CloseCode.INTERNAL_ERROR)
            await broadcaster.publish("room:b", Ticked(n=1))
            await subscription.take(1)  # reads the close, reconnects, resumes
            assert disconnects[-1].code == CloseCode.INTERNAL_ERROR and disconnects[-1].retry == failed + 1
            # One that stayed up past stable_after: the backoff starts over.
            await asyncio.sleep(500 * MS)
            close_all(broadcaster, "room:b", CloseCode.INTERNAL_ERROR)
            await broadcaster.publish("room:b", Ticked(n=2))
            await subscription.take(1)
            assert disconnects[-1].code == CloseCode.INTERNAL_ERROR and disconnects[-1].retry == 1
    # Full jitter below 0.1, 0.2, 0.4, 0.8, 0.8 ... s: a handful of attempts in 2 s, not a storm.
    assert 3 <= down_attempts <= 25, down_attempts


async def test_an_expired_token_is_refreshed_and_the_stream_resumes() -> None:
    valid = {"t1"}
    broadcaster = Broadcaster("memory://")

    def authorize(request: ConnectionRequest, channel: str) -> bool | Deny:
        return request.query.get("token") in valid or Deny("token expired")

    asked: list[tuple[str, int | None]] = []

    def get_token(request: Any) -> str:
        asked.append((request.reason, request.code))
        return "t2"

    app = broadcast_app(broadcaster, authorize=authorize)
    async with (
        serve(app) as host,
        Client(f"ws://{host}/ws?room=tok", token="t1", get_token=get_token, backoff=FAST) as client,
    ):
        subscription = client.subscribe(model=Ticked)
        await subscription.connected()
        await publish(broadcaster, "room:tok", range(2))
        got = await subscription.take(2)
        valid = {"t2"}  # t1 expires; the connection drops
        close_all(broadcaster, "room:tok", CloseCode.INTERNAL_ERROR)
        await publish(broadcaster, "room:tok", range(2, 5))
        got += await subscription.take(3)
    assert [r.event.n for r in got] == list(range(5))
    assert asked == [("refused", CloseCode.FORBIDDEN)]
    assert client.stats.attempts == 3 and client.stats.resumed == 1 and client.token == "t2"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"heartbeat_timeout": float("nan")}, r"^heartbeat_timeout must be a finite number of seconds > 0"),
        ({"connect_timeout": float("inf")}, r"^connect_timeout must be a finite number of seconds > 0"),
        ({"stable_after": "5"}, r"^stable_after must be a finite number of seconds > 0"),
        ({"heartbeat_interval": 0}, r"^heartbeat_interval must be a finite number of seconds > 0 or None"),
        ({"max_retries": -1}, r"^max_retries must be an integer >= 0 or None"),
        ({"max_retries": 2.5}, r"^max_retries must be an integer >= 0 or None"),
    ],
)
def test_nonsense_client_options_are_refused_naming_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Client("ws://127.0.0.1:1/ws", **options)
