"""Hostile clients against a live server: it stays up, answers with typed errors or documented close codes,
and a well-behaved client on the same channel receives every event, in order, throughout."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rtbroadcast import Broadcaster, CloseCode, Event
from rtbroadcast.asgi import channel_from_query

from .support import MS, broadcast_app, connect, recv_json, serve

DOCUMENTED_CLOSES = {int(code) for code in CloseCode}
ERROR_CODES = {"malformed_frame", "frame_too_large", "unknown_type", "invalid_frame"}


class Beat(Event):
    type: Literal["beat"] = "beat"
    n: int


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


hostile_frames = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.integers(1000, 200_000).map(lambda n: json.dumps({"type": "ping", "pad": "x" * n})),
    st.integers(10, 100_000).map(nested),
    st.integers(10, 5_000).map(lambda n: '{"type":' * n + "1" + "}" * n),
    st.sampled_from(
        [
            '{"type": "ping"}',
            '{"type": 1}',
            '{"type": null}',
            '{"type": "subscribe", "channel": "room:other"}',
            '{"type": "welcome"}',
            '"ping"',
            "[]",
            "null",
            "1e999999",
            '{"type": "ping"' + "," * 10,
            "\ud800",
        ]
    ),
)


def make_app(broadcaster: Broadcaster) -> Starlette:
    return broadcast_app(broadcaster, channel=channel_from_query("room"), max_messages_per_second=50)


async def hostile(host: str, frames: list[str | bytes]) -> None:
    try:
        ws = await connect(f"ws://{host}/ws?room=r", max_size=2**22)
    except InvalidStatus:
        return
    try:
        assert (await recv_json(ws))["type"] == "welcome"
        for frame in frames:
            if isinstance(frame, str) and not frame.isascii():
                try:
                    frame.encode()
                except UnicodeEncodeError:  # lone surrogates: send the invalid UTF-8 as bytes
                    frame = frame.encode("utf-8", "surrogatepass")
            try:
                await ws.send(frame)
            except ConnectionClosed:
                break
        # Everything we get back is a documented frame; the socket ends, if it does, with a documented code.
        while True:
            try:
                reply = await recv_json(ws, timeout=500 * MS)
            except TimeoutError:
                break
            assert reply["type"] in {"pong", "error", "beat"}, reply
            if reply["type"] == "error":
                assert reply["code"] in ERROR_CODES
    except ConnectionClosed as closed:
        assert closed.rcvd is not None
        assert closed.rcvd.code in DOCUMENTED_CLOSES
    finally:
        await ws.close()


async def scenario(frames: list[str | bytes]) -> None:
    broadcaster = Broadcaster()
    async with serve(make_app(broadcaster)) as host:
        good = await connect(f"ws://{host}/ws?room=r")
        assert (await recv_json(good))["type"] == "welcome"

        async def publish() -> None:
            for n in range(1, 31):
                await broadcaster.publish("r", Beat(n=n))
                await asyncio.sleep(0.002)

        await asyncio.gather(publish(), *(hostile(host, frames) for _ in range(3)))
        received = [await recv_json(good) for _ in range(30)]
        assert [(m["seq"], m["n"]) for m in received] == [(n, n) for n in range(1, 31)]
        await good.send('{"type":"ping"}')
        assert (await recv_json(good))["type"] == "pong"
        # The server still accepts new clients.
        late = await connect(f"ws://{host}/ws?room=r")
        assert (await recv_json(late))["seq"] == 30
        await late.close()
        await good.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_frames, min_size=1, max_size=30))
async def test_hostile_traffic_does_not_disturb_others(frames: list[str | bytes]) -> None:
    await scenario(frames)


async def test_ping_flood_is_closed_and_others_unaffected() -> None:
    await scenario(['{"type":"ping"}'] * 500)


async def test_connection_floods_are_refused_cleanly() -> None:
    broadcaster = Broadcaster(max_connections=8, max_connections_per_channel=5)
    async with serve(make_app(broadcaster)) as host:
        room_a = [await connect(f"ws://{host}/ws?room=a") for _ in range(5)]
        for ws in room_a:
            assert (await recv_json(ws))["type"] == "welcome"
        refused = await connect(f"ws://{host}/ws?room=a")
        try:
            await recv_json(refused)
            raise AssertionError("the sixth connection on one channel was accepted")
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            assert closed.rcvd.code == CloseCode.TRY_AGAIN_LATER
        room_b = [await connect(f"ws://{host}/ws?room=b") for _ in range(3)]
        for ws in room_b:
            assert (await recv_json(ws))["type"] == "welcome"
        over = await connect(f"ws://{host}/ws?room=c")
        try:
            await recv_json(over)
            raise AssertionError("the ninth connection in the process was accepted")
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            assert closed.rcvd.code == CloseCode.TRY_AGAIN_LATER
        await broadcaster.publish("a", Beat(n=1))
        for ws in room_a:
            assert (await recv_json(ws))["n"] == 1
        for ws in room_a + room_b:
            await ws.close()
