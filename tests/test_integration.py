"""End to end over real sockets: uvicorn on a loopback port, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Literal

import pytest

from rtbroadcast import Broadcaster, Event, QueueLimits

from . import support
from .support import MS, StalledClient, broadcast_app, connect, no_task_left, recv_json, serve, until


@pytest.fixture(autouse=True, params=["deflate", None], ids=["asgi-send", "direct-write"])
def client_compression(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run every test twice: clients with permessage-deflate (frames through ASGI) and without (direct)."""
    support.client_compression = request.param
    try:
        yield
    finally:
        support.client_compression = "deflate"


class ItemChanged(Event):
    type: Literal["item_changed"] = "item_changed"
    room: str
    n: int


async def test_clients_receive_their_channel_in_order() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster)) as host:
        tasks_before = set(asyncio.all_tasks())
        a1 = await connect(f"ws://{host}/ws?room=a")
        a2 = await connect(f"ws://{host}/ws?room=a")
        b1 = await connect(f"ws://{host}/ws?room=b")
        for ws, room in ((a1, "a"), (a2, "a"), (b1, "b")):
            welcome = await recv_json(ws)
            assert welcome["type"] == "welcome"
            assert welcome["channel"] == f"room:{room}"
            assert welcome["seq"] == 0
        for n in range(50):
            room = "a" if n % 3 else "b"
            await broadcaster.publish(f"room:{room}", ItemChanged(room=room, n=n))
        expected_a = [n for n in range(50) if n % 3]
        expected_b = [n for n in range(50) if not n % 3]
        for ws, expected in ((a1, expected_a), (a2, expected_a), (b1, expected_b)):
            got = [await recv_json(ws) for _ in expected]
            assert [m["n"] for m in got] == expected
            assert [m["seq"] for m in got] == list(range(1, len(expected) + 1))
            assert all(m["type"] == "item_changed" for m in got)
        # Nothing else is pending: a ping is answered next, proving no stray event was queued.
        for ws in (a1, a2, b1):
            await ws.send('{"type":"ping"}')
            assert (await recv_json(ws))["type"] == "pong"
        assert broadcaster.connection_count() == 3
        for ws in (a1, a2, b1):
            await ws.close()
        await until(lambda: broadcaster.connection_count() == 0)
        assert broadcaster.registry.channels() == []
        # Every per-connection task (uvicorn's handlers, our writers, channel releases) has ended.
        await no_task_left(since=tasks_before)
        assert broadcaster.backend.stats()["subscribed"] == 0


async def test_slow_client_is_dropped_while_others_keep_up() -> None:
    broadcaster = Broadcaster("memory://", queue_limits=QueueLimits(max_messages=50, max_size=2**20))
    payload = "x" * 16000
    async with serve(broadcast_app(broadcaster)) as host:
        slow = await StalledClient.open(host, "/ws?room=a")
        # The fast reader shares this event loop with the publisher; without compression it needs room to
        # take frames as they come (the client's own queue), or it would fall behind too.
        fast = await connect(f"ws://{host}/ws?room=a", max_queue=None)
        await recv_json(fast)
        received: list[int] = []

        async def read_fast() -> None:
            while len(received) < 2000:
                message = await recv_json(fast)
                received.append(message["seq"])

        reader = asyncio.create_task(read_fast())
        for _ in range(2000):
            await broadcaster.publish_json("room:a", json.dumps({"type": "blob", "blob": payload}))
            await asyncio.sleep(0)
        await asyncio.wait_for(reader, 20_000 * MS)
        assert received == list(range(1, 2001))
        await until(lambda: broadcaster.connection_count("room:a") == 1)
        stats = broadcaster.stats()
        assert stats.slow_consumers_closed == 1
        await fast.close()
        slow.close()
        await until(lambda: broadcaster.connection_count() == 0)


async def test_dead_peer_is_closed_by_server_pings_and_unregistered() -> None:
    # Protocol-level pings are the ASGI server's job (uvicorn's ws_ping_interval / ws_ping_timeout); the
    # endpoint must notice the resulting disconnect and clean up.
    broadcaster = Broadcaster("memory://")
    async with serve(broadcast_app(broadcaster), ws_ping_interval=0.2, ws_ping_timeout=0.3) as host:
        dead = await StalledClient.open(host, "/ws?room=a")
        alive = await connect(f"ws://{host}/ws?room=a")
        await recv_json(alive)
        await until(lambda: broadcaster.connection_count() == 2)
        await until(lambda: broadcaster.connection_count() == 1)
        await broadcaster.publish("room:a", ItemChanged(room="a", n=1))
        assert (await recv_json(alive))["n"] == 1
        await alive.close()
        dead.close()


async def test_a_reader_that_pauses_and_catches_up_loses_nothing() -> None:
    # While the client does not read, the server's sends hit TCP backpressure and wait in the writer;
    # once it reads again, everything arrives, in order, once.
    broadcaster = Broadcaster("memory://", queue_limits=QueueLimits(max_messages=5000, max_size=64 * 2**20))
    payload = "y" * 8000
    async with serve(broadcast_app(broadcaster)) as host:
        client = await StalledClient.open(host, "/ws?room=a")
        for _ in range(1500):
            await broadcaster.publish_json("room:a", json.dumps({"type": "blob", "blob": payload}))
            await asyncio.sleep(0)
        # No event says "the writer is blocked": give a writer that could drain the queue the time to do it.
        await asyncio.sleep(200 * MS)
        (connection,) = broadcaster.registry.fanout("room:a")
        assert connection.queued > 0  # the transport pushed back: frames wait in the queue
        frames = await client.read_text_frames(1501)
        assert json.loads(frames[0])["type"] == "welcome"
        assert [json.loads(f)["seq"] for f in frames[1:]] == list(range(1, 1501))
        assert broadcaster.stats().slow_consumers_closed == 0
        client.close()
