"""A resume that missed more than the connection's queue holds gets ``resync_required``, not a 4001 loop.

The missed events are queued at attach, before anything is written; past the queue bound that closed the
connection as a slow consumer (4001) on every reconnect, so such a client could never resume.
"""

from __future__ import annotations

import json
from typing import Literal

from rtbroadcast import Broadcaster, Event, QueueLimits, Received, ResumePoint
from rtbroadcast.protocol import ResyncReason, ResyncRequired

from .support import broadcast_app, connect, recv_json, serve


class Line(Event):
    type: Literal["line"] = "line"
    n: int
    text: str


LIMITS = QueueLimits(max_messages=50, max_size=64 * 1024)
#: The channel the test app gives `?room=r` (its resolver adds the prefix).
CHANNEL = "room:r"


async def test_a_websocket_resume_past_the_queue_bound_is_told_to_resync_and_stays_open() -> None:
    broadcaster = Broadcaster(queue_limits=LIMITS)
    async with serve(broadcast_app(broadcaster)) as host:
        async with await connect(f"ws://{host}/ws?room=r") as ws:
            welcome = await recv_json(ws)
        for n in range(120):  # more messages than the queue takes
            await broadcaster.publish(CHANNEL, Line(n=n, text="x"))
        url = f"ws://{host}/ws?room=r&epoch={welcome['epoch']}&last_seq={welcome['seq']}"
        async with await connect(url) as ws:
            again = await recv_json(ws)
            assert again["type"] == "welcome" and again["resumed"] is False and again["seq"] == 120
            resync = await recv_json(ws)
            assert resync["type"] == "resync_required", resync
            assert resync["reason"] == ResyncReason.TOO_FAR_BEHIND and resync["seq"] == 120
            await broadcaster.publish(CHANNEL, Line(n=120, text="live"))
            live = await recv_json(ws)
            assert (live["type"], live["seq"], live["n"]) == ("line", 121, 120)


async def test_a_resume_past_the_size_bound_is_told_to_resync() -> None:
    broadcaster = Broadcaster(queue_limits=LIMITS)
    async with serve(broadcast_app(broadcaster)) as host:
        async with await connect(f"ws://{host}/ws?room=r") as ws:
            welcome = await recv_json(ws)
        for n in range(20):  # few messages, but 20 x 4 KiB > 64 KiB
            await broadcaster.publish(CHANNEL, Line(n=n, text="y" * 4096))
        url = f"ws://{host}/ws?room=r&epoch={welcome['epoch']}&last_seq={welcome['seq']}"
        async with await connect(url) as ws:
            assert (await recv_json(ws))["type"] == "welcome"
            resync = await recv_json(ws)
            assert (resync["type"], resync["reason"]) == ("resync_required", ResyncReason.TOO_FAR_BEHIND)


async def test_a_resume_that_fits_the_queue_still_replays_every_event() -> None:
    broadcaster = Broadcaster(queue_limits=LIMITS)
    async with serve(broadcast_app(broadcaster)) as host:
        async with await connect(f"ws://{host}/ws?room=r") as ws:
            welcome = await recv_json(ws)
        for n in range(40):
            await broadcaster.publish(CHANNEL, Line(n=n, text="z"))
        url = f"ws://{host}/ws?room=r&epoch={welcome['epoch']}&last_seq={welcome['seq']}"
        async with await connect(url) as ws:
            again = await recv_json(ws)
            assert again["resumed"] is True
            replayed = [await recv_json(ws) for _ in range(40)]
            assert [frame["seq"] for frame in replayed] == list(range(1, 41))
            assert json.dumps(replayed[0]).count('"seq"') == 1


async def test_an_in_process_resume_past_the_queue_bound_gets_the_resync() -> None:
    async with Broadcaster(queue_limits=LIMITS) as broadcaster:
        async with broadcaster.subscribe(CHANNEL, model=Line) as sub:
            position = sub.position
        for n in range(120):
            await broadcaster.publish(CHANNEL, Line(n=n, text="x"))
        async with broadcaster.subscribe(CHANNEL, model=Line, resume=position) as sub:
            first = await anext(sub)
            assert isinstance(first, ResyncRequired) and first.reason == ResyncReason.TOO_FAR_BEHIND
            await broadcaster.publish(CHANNEL, Line(n=120, text="live"))
            live = await anext(sub)
            assert isinstance(live, Received) and live.seq == 121
    assert isinstance(position, ResumePoint)
