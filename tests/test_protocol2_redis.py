"""Protocol 2 on Redis over real sockets: a Redis restart resyncs each subscription, naming its channel."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from rtbroadcast import Broadcaster
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.backends.redis import RedisBackend

from .redis_support import RedisServer
from .support import MS, broadcast_app, connect, recv_json, serve, until

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _none(request: ConnectionRequest) -> None:
    return None


async def _subscribe(ws: Any, request_id: str, channel: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "subscribe", "id": request_id, "channel": channel}))
    answer: dict[str, Any] = await recv_json(ws)
    assert answer["type"] == "subscribed" and answer["id"] == request_id
    return answer


async def test_a_redis_restart_resyncs_every_subscription_per_channel(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, timeout=1.0)
    broadcaster = Broadcaster(backend=backend)
    async with serve(broadcast_app(broadcaster, channel=_none)) as host:
        both = await connect(f"ws://{host}/ws?protocol=2")
        only_x = await connect(f"ws://{host}/ws?protocol=2")
        for ws in (both, only_x):
            assert (await recv_json(ws))["type"] == "welcome"
        old = {
            "x": (await _subscribe(both, "r1", "x"))["epoch"],
            "y": (await _subscribe(both, "r2", "y"))["epoch"],
        }
        await _subscribe(only_x, "r1", "x")
        for n in range(3):
            for channel in ("x", "y"):
                await broadcaster.publish_json(channel, json.dumps({"type": "t", "n": n}))
        expected = {(both, "x"): 3, (both, "y"): 3, (only_x, "x"): 3}
        got: dict[tuple[Any, str], list[int]] = {key: [] for key in expected}
        for ws in (both, only_x):
            for _ in range(sum(count for (w, _), count in expected.items() if w is ws)):
                frame = await recv_json(ws)
                got[(ws, frame["channel"])].append(frame["event"]["seq"])
        assert all(seqs == [1, 2, 3] for seqs in got.values())

        await asyncio.to_thread(redis_server.kill)
        await until(lambda: not broadcaster.backend.available)
        await asyncio.to_thread(redis_server.start)
        await until(lambda: broadcaster.backend.available, timeout=10_000 * MS)

        # Each subscription hears, for its own channel, that the stream it followed is gone.
        resyncs: dict[tuple[Any, str], dict[str, Any]] = {}
        for ws, count in ((both, 2), (only_x, 1)):
            for _ in range(count):
                frame = await recv_json(ws, timeout=15_000 * MS)
                assert frame["type"] == "resync_required", frame
                resyncs[(ws, frame["channel"])] = frame
        assert set(resyncs) == set(expected)
        for (_, channel), frame in resyncs.items():
            assert frame["reason"] == "epoch_changed" and frame["epoch"] != old[channel]
        # Then the new streams' events, on every subscription of its channel only.
        for channel in ("x", "y"):
            seq = await broadcaster.publish_json(channel, json.dumps({"type": "t", "n": 99}))
            for ws, followed in ((both, {"x", "y"}), (only_x, {"x"})):
                if channel in followed:
                    frame = await recv_json(ws)
                    assert (frame["channel"], frame["event"]["seq"]) == (channel, seq)
        await only_x.send('{"type":"ping"}')
        assert (await recv_json(only_x))["type"] == "pong"  # nothing of y reached it
        for ws in (both, only_x):
            await ws.close()
