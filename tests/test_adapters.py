"""The ASGI endpoint through Starlette and FastAPI: refusals, client frames, resume, SSE."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from websockets.exceptions import ConnectionClosed

from rtbroadcast import Broadcaster, CloseCode, ConfigurationError, Event
from rtbroadcast.asgi import BroadcastEndpoint, ConnectionRequest, Deny, channel_from_query
from rtbroadcast.starlette import lifespan, websocket_route

from .support import MS, broadcast_app, connect, recv_json, serve


class Note(Event):
    type: Literal["note"] = "note"
    text: str


def deny_room_b(request: ConnectionRequest, channel: str) -> bool | Deny:
    if request.query.get("token") == "bad":
        return False
    return Deny("room b is private") if channel == "room:b" else True


def room_or_raw(request: ConnectionRequest) -> str | None:
    # ``raw`` passes the value through unchecked, as a careless resolver would.
    return request.query.get("raw") or channel_from_query("room", prefix="room:", pattern=r"[a-z]{1,8}")(
        request
    )


def app_for(broadcaster: Broadcaster, **options: Any) -> Starlette:
    return broadcast_app(broadcaster, channel=room_or_raw, authorize=deny_room_b, **options)


async def expect_close(url: str, code: int) -> str:
    ws = await connect(url)
    with pytest.raises(ConnectionClosed) as info:
        await recv_json(ws)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == code
    return info.value.rcvd.reason


async def test_refusals_have_documented_close_codes() -> None:
    broadcaster = Broadcaster()
    async with serve(app_for(broadcaster, allowed_origins=["https://ok.example"])) as host:
        assert "channel" in await expect_close(f"ws://{host}/ws", CloseCode.BAD_REQUEST)
        await expect_close(f"ws://{host}/ws?room=NOT-VALID", CloseCode.BAD_REQUEST)
        await expect_close(f"ws://{host}/ws?room=a&epoch=x", CloseCode.BAD_REQUEST)
        await expect_close(f"ws://{host}/ws?raw=%0A", CloseCode.BAD_REQUEST)
        await expect_close(f"ws://{host}/ws?raw=" + "x" * 300, CloseCode.BAD_REQUEST)
        assert await expect_close(f"ws://{host}/ws?room=b", CloseCode.FORBIDDEN) == "room b is private"
        assert await expect_close(f"ws://{host}/ws?room=a&token=bad", CloseCode.FORBIDDEN) == "forbidden"
        ws = await connect(f"ws://{host}/ws?room=a", origin="https://evil.example")  # type: ignore[arg-type]
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.FORBIDDEN
        ok = await connect(f"ws://{host}/ws?room=a", origin="https://ok.example")  # type: ignore[arg-type]
        assert (await recv_json(ok))["type"] == "welcome"
        await ok.close()
        assert broadcaster.stats().published == 0


async def test_client_frames_get_answers_and_errors_keep_the_connection() -> None:
    broadcaster = Broadcaster()
    async with serve(app_for(broadcaster)) as host:
        ws = await connect(f"ws://{host}/ws?room=a")
        await recv_json(ws)
        await ws.send('{"type": "ping"}')
        pong = await recv_json(ws)
        assert pong["type"] == "pong" and pong["timestamp"].endswith("Z")
        for bad, code in (
            ("nope", "malformed_frame"),
            ('{"type": "subscribe"}', "unknown_type"),
            (b"\xff\xfe", "malformed_frame"),
            ('{"type":"ping","x":"' + "y" * 20000 + '"}', "frame_too_large"),
        ):
            await ws.send(bad)
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == code
        await broadcaster.publish("room:a", Note(text="still here"))
        assert (await recv_json(ws))["text"] == "still here"
        await ws.close()


async def test_floods_are_closed_with_rate_limited() -> None:
    broadcaster = Broadcaster()
    async with serve(app_for(broadcaster, max_messages_per_second=5)) as host:
        ws = await connect(f"ws://{host}/ws?room=a")
        await recv_json(ws)
        for _ in range(50):
            await ws.send('{"type": "ping"}')
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await recv_json(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.RATE_LIMITED


async def test_idle_timeout_closes_silent_connections() -> None:
    broadcaster = Broadcaster()
    async with serve(app_for(broadcaster, idle_timeout=0.3)) as host:
        ws = await connect(f"ws://{host}/ws?room=a")
        await recv_json(ws)
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.HEARTBEAT_TIMEOUT


async def test_reconnect_with_resume_gets_the_missed_events() -> None:
    broadcaster = Broadcaster()
    async with serve(app_for(broadcaster)) as host:
        ws = await connect(f"ws://{host}/ws?room=a")
        welcome = await recv_json(ws)
        await broadcaster.publish("room:a", Note(text="1"))
        assert (await recv_json(ws))["seq"] == 1
        await ws.close()
        for text in ("2", "3"):
            await broadcaster.publish("room:a", Note(text=text))
        ws = await connect(f"ws://{host}/ws?room=a&epoch={welcome['epoch']}&last_seq=1")
        again = await recv_json(ws)
        assert again["type"] == "welcome" and again["resumed"] is True
        await broadcaster.publish("room:a", Note(text="4"))
        got = [await recv_json(ws) for _ in range(3)]
        assert [(m["seq"], m["text"]) for m in got] == [(2, "2"), (3, "3"), (4, "4")]
        await ws.close()


async def test_shutdown_closes_clients_with_going_away() -> None:
    broadcaster = Broadcaster()
    async with serve(app_for(broadcaster)) as host:
        ws = await connect(f"ws://{host}/ws?room=a")
        await recv_json(ws)
        await broadcaster.disconnect()
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.GOING_AWAY


async def test_works_unchanged_in_fastapi() -> None:
    broadcaster = Broadcaster()
    app = FastAPI(lifespan=lifespan(broadcaster))
    app.router.routes.append(
        websocket_route("/realtime", broadcaster, channel=channel_from_query("restaurant_id"))
    )

    @app.post("/notes/{rid}")
    async def post_note(rid: str, text: str) -> dict[str, int]:
        return {"seq": await broadcaster.publish(rid, Note(text=text))}

    async with serve(app) as host:
        ws = await connect(f"ws://{host}/realtime?restaurant_id=r1")
        assert (await recv_json(ws))["channel"] == "r1"
        async with httpx.AsyncClient(base_url=f"http://{host}") as client:
            response = await client.post("/notes/r1", params={"text": "hello"})
        assert response.json() == {"seq": 1}
        event = await recv_json(ws)
        assert (event["type"], event["text"], event["seq"]) == ("note", "hello", 1)
        await ws.close()


async def test_sse_fallback_streams_events_with_ids_and_resumes() -> None:
    broadcaster = Broadcaster()
    async with serve(app_for(broadcaster)) as host, httpx.AsyncClient(base_url=f"http://{host}") as client:
        refused = await client.get("/ws/sse", params={"room": "b"})
        assert refused.status_code == 403
        async with client.stream("GET", "/ws/sse", params={"room": "a"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            welcome = json.loads((await anext(lines)).removeprefix("data: "))
            assert welcome["type"] == "welcome"
            await broadcaster.publish("room:a", Note(text="over sse"))
            chunk = []
            while len(chunk) < 2:
                line = await asyncio.wait_for(anext(lines), 5_000 * MS)
                if line:
                    chunk.append(line)
            assert chunk[0] == f"id: {welcome['epoch']}:1"
            assert json.loads(chunk[1].removeprefix("data: "))["text"] == "over sse"
        await broadcaster.publish("room:a", Note(text="missed"))
        headers = {"last-event-id": f"{welcome['epoch']}:1"}
        async with client.stream("GET", "/ws/sse", params={"room": "a"}, headers=headers) as response:
            data = [json.loads(line[6:]) async for line in _data_lines(response, 2)]
        assert data[0]["resumed"] is True
        assert (data[1]["seq"], data[1]["text"]) == (2, "missed")
    assert broadcaster.connection_count() == 0


async def _data_lines(response: httpx.Response, count: int) -> Any:
    seen = 0
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line
            seen += 1
            if seen == count:
                return


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"allowed_origins": "https://a.example"}, r"^allowed_origins must be a collection of origins"),
        ({"allowed_origins": [b"https://a.example"]}, r"^allowed_origins must hold strings"),
        ({"allowed_origins": 3}, r"^allowed_origins must be a collection of origins"),
        ({"max_frame_size": 0}, r"^max_frame_size must be an integer >= 1"),
        ({"max_frame_size": 16.5}, r"^max_frame_size must be an integer >= 1"),
        ({"max_messages_per_second": float("nan")}, r"^max_messages_per_second must be a finite number"),
        ({"max_messages_per_second": 0}, r"^max_messages_per_second must be a finite number"),
        ({"idle_timeout": -1}, r"^idle_timeout must be a finite number of seconds > 0 or None"),
        ({"idle_timeout": "30"}, r"^idle_timeout must be a finite number of seconds > 0 or None"),
        ({"sse": "no"}, r"^sse must be True or False"),
        ({"direct_write": 1}, r"^direct_write must be True or False"),
        ({"authorize": "yes"}, r"^authorize must be a callable or None"),
    ],
)
def test_nonsense_endpoint_options_are_refused_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        BroadcastEndpoint(Broadcaster(), channel_from_query("room"), **options)


def test_an_endpoint_needs_a_broadcaster_and_a_resolver() -> None:
    with pytest.raises(ConfigurationError, match=r"^broadcaster must be a Broadcaster"):
        BroadcastEndpoint("memory://", channel_from_query("room"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^channel must be a callable"):
        BroadcastEndpoint(Broadcaster(), "room")  # type: ignore[arg-type]


def test_a_resolver_with_a_broken_pattern_is_refused_when_made() -> None:
    with pytest.raises(ConfigurationError, match=r"^pattern '\[a-z' is not a regular expression"):
        channel_from_query("room", pattern="[a-z")


def test_an_origin_list_allows_exactly_its_origins() -> None:
    endpoint = BroadcastEndpoint(
        Broadcaster(), channel_from_query("room"), allowed_origins=("https://a.example",)
    )
    assert endpoint.allowed_origins == frozenset({"https://a.example"})
