"""Redis dies mid-stream and comes back: over real sockets, nobody hangs and nobody is left in silence."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import pytest

from rtbroadcast import BackendUnavailable, Broadcaster, BroadcasterState, Event, Received, SubscriptionClosed
from rtbroadcast.backends.redis import RedisBackend

from .redis_support import RedisServer
from .support import MS, broadcast_app, connect, no_task_left, recv_json, serve, until

pytestmark = [pytest.mark.redis, pytest.mark.slow]


class Beat(Event):
    type: Literal["redis_fault_beat"] = "redis_fault_beat"
    n: int


async def test_redis_killed_mid_stream_then_restarted(redis_server: RedisServer) -> None:
    tasks_before = set(asyncio.all_tasks())
    # Only the publish timeout is shortened; the reconnect backoff is the default one.
    backend = RedisBackend(redis_server.url, timeout=1.0)
    broadcaster = Broadcaster(backend=backend)
    async with serve(broadcast_app(broadcaster)) as host:
        clients = [await connect(f"ws://{host}/ws?room=a") for _ in range(3)]
        for ws in clients:
            welcome = await recv_json(ws)
            assert welcome["type"] == "welcome" and welcome["seq"] == 0
        old_epoch = welcome["epoch"]

        # A publisher that keeps going through the outage, the way an API under load would.
        outcomes: list[tuple[str, float]] = []
        # The seq of every acknowledged publish, in order; those made after Redis came back are the new epoch's.
        acknowledged: list[int] = []
        stop = asyncio.Event()

        async def publish_continuously() -> None:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    acknowledged.append(await broadcaster.publish("room:a", Beat(n=n)))
                    outcomes.append(("ok", time.monotonic() - started))
                except BackendUnavailable:
                    outcomes.append(("unavailable", time.monotonic() - started))
                n += 1
                await asyncio.sleep(0.01)

        publisher = asyncio.create_task(publish_continuously())
        try:
            await until(lambda: len(outcomes) >= 20)
            await asyncio.to_thread(redis_server.kill)
            await until(lambda: not broadcaster.backend.available)
            # Stay down long enough for the reconnect backoff to grow (0.1, 0.2, 0.4, 0.8, 1.6 s...).
            await asyncio.sleep(2.0)
            assert sum(1 for o, _ in outcomes if o == "unavailable") >= 20
            stats = broadcaster.stats()
            assert stats.backend_available is False
            assert stats.backend["state"] == "reconnecting"
            restarted = time.monotonic()
            await asyncio.to_thread(redis_server.start)
            await until(lambda: broadcaster.backend.available, timeout=5_000 * MS)
            listener_back = time.monotonic() - restarted
            await until(lambda: outcomes[-1][0] == "ok")
            recovered = len(outcomes)
            await until(
                lambda: [o for o, _ in outcomes[recovered:]].count("ok") >= 10
            )  # the new epoch's events
        finally:
            stop.set()
            await publisher
        assert listener_back < 5.0
        failures = [took for outcome, took in outcomes if outcome == "unavailable"]
        assert failures and max(failures) < 1.5  # each failed publish gave up within the timeout (1 s)

        # Every client: the old epoch's events without a gap, then resync_required for the new epoch,
        # then the new epoch's events without a gap. Never a silent jump.
        # Redis came back empty, so the last acknowledged publish is the new epoch's last event. (The old epoch's
        # last acknowledged events may have died with Redis before the listener saw them: that is what
        # resync_required is for, so the old epoch is checked for gaps, not for its count.)
        new_epoch_last = acknowledged[-1]
        for ws in clients:
            seqs: list[int] = []
            while True:
                message = await recv_json(ws)
                if message["type"] == "resync_required":
                    break
                assert message["type"] == "redis_fault_beat"
                seqs.append(message["seq"])
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 20
            assert message["reason"] == "epoch_changed" and message["epoch"] != old_epoch
            new_epoch, resync_seq = message["epoch"], message["seq"]
            after: list[int] = []
            while (after[-1] if after else resync_seq) < new_epoch_last:
                message = await recv_json(ws)
                assert message["type"] == "redis_fault_beat"
                after.append(message["seq"])
            assert after == list(range(resync_seq + 1, resync_seq + 1 + len(after)))

        # And a publish after the dust settled reaches everyone, in the new epoch.
        seq = await broadcaster.publish("room:a", Beat(n=-1))
        assert (await backend.position("room:a")).epoch == new_epoch
        for ws in clients:
            message = await recv_json(ws)
            assert (message["type"], message["n"], message["seq"]) == ("redis_fault_beat", -1, seq)
        stats = broadcaster.stats()
        assert stats.backend["reconnects"] == 1
        assert stats.interruptions >= 1 and stats.resyncs >= 3
        for ws in clients:
            await ws.close()
    # The lifespan disconnected the broadcaster: the listener task and every per-connection task are gone.
    await no_task_left(since=tasks_before)
    assert broadcaster.backend.stats()["state"] == "closed"


async def test_a_subscription_whose_repair_fails_is_closed_as_backend_unavailable_not_shutdown(
    redis_server: RedisServer,
) -> None:
    # The listener gives up at once, asks for every subscription to be repaired, and the repair's history
    # read finds Redis gone: the subscription ends, though nothing shut down.
    backend = RedisBackend(redis_server.url, max_reconnect_attempts=1, timeout=0.5)
    async with (
        Broadcaster(backend=backend) as broadcaster,
        broadcaster.subscribe("room:a", model=Beat) as sub,
    ):
        seq = await broadcaster.publish("room:a", Beat(n=1))
        first = await asyncio.wait_for(anext(sub), 5)
        assert isinstance(first, Received) and first.seq == seq
        await asyncio.to_thread(redis_server.kill)
        with pytest.raises(SubscriptionClosed) as closed:
            await asyncio.wait_for(anext(sub), 15)
        assert closed.value.reason == "backend_unavailable"
        assert str(closed.value) == "subscription closed: backend_unavailable"
        assert broadcaster.state is BroadcasterState.FAILED
        assert broadcaster.stats().repairs >= 1
