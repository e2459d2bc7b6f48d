"""Protocol 2 on the restaurant service: device identity, presence, the device channel, and who may see what.

Real uvicorn, real WebSocket clients (``websockets``); protocol 1 is covered, unchanged, by the scenario.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from examples.restaurant_app.auth import mint_token
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.example.conftest import TEST_SECRET, Running
from tests.example.restaurant_support import assert_nothing_queued
from tests.support import MS

RID = "devices-r1"
OTHER = "devices-r2"
TIMEOUT = 5_000 * MS


def url(service: Running, token: str | None, **query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"protocol": "2", **query}.items())
    return f"ws://{service.address}/realtime?{params}" + (f"&token={token}" if token else "")


async def frame(ws: ClientConnection) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await ws.recv(decode=True))
    return data


async def until_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        received = await frame(ws)
        if received["type"] == kind:
            return received


async def subscribe(
    ws: ClientConnection, request: str, channel: str, seen: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    """Send a subscribe and return its answer; frames received before it go to ``seen``."""
    await ws.send(json.dumps({"type": "subscribe", "id": request, "channel": channel, **extra}))
    while True:
        answer = await frame(ws)
        if answer.get("id") == request:
            return answer
        if seen is not None:
            seen.append(answer)


def skip_without_presence(request: pytest.FixtureRequest) -> None:
    """Skip on the ``pg-broadcast`` configuration: the PostgreSQL backend keeps no presence."""
    if "pg-broadcast" in request.node.callspec.id:
        pytest.skip("the postgresql:// backend keeps no presence; the service runs without it there")


async def test_a_device_is_subscribed_to_its_own_channel_and_named_from_its_token(
    service: Running, request: pytest.FixtureRequest
) -> None:
    skip_without_presence(request)
    token_a = mint_token(TEST_SECRET, RID, device_id="dev-a", name="Host stand")
    async with connect(url(service, token_a), open_timeout=TIMEOUT) as a:
        welcome = await frame(a)
        assert welcome["type"] == "welcome" and welcome["protocol"] == 2
        own = await frame(a)
        assert own["type"] == "subscribed" and own["id"] is None and own["channel"] == f"device:{RID}:dev-a"
        joined = await subscribe(a, "r1", f"restaurant:{RID}", presence=True)
        assert joined["type"] == "subscribed", joined
        assert joined["presence"]["members"] == [
            {
                "client": welcome["connection"],
                "identity": "dev-a",
                "info": {"device": "dev-a", "name": "Host stand"},
            }
        ]
        # A direct message arrives on the device channel, wrapped and named, with its own seq.
        sent = await service.http.post(
            f"/restaurants/{RID}/devices/dev-a/messages", json={"text": "  hello "}
        )
        assert sent.status_code == 202, sent.text
        event = await until_type(a, "event")
        assert event["channel"] == f"device:{RID}:dev-a"
        assert event["event"]["type"] == "device_message" and event["event"]["text"] == "hello"
        assert event["event"]["device_id"] == "dev-a" and event["event"]["seq"] == sent.json()["seq"]


@pytest.mark.parametrize(
    ("channel", "reason"),
    [
        (f"device:{RID}:dev-b", "another device's channel"),
        (f"device:{OTHER}:dev-a", "another device's channel"),
        (f"restaurant:{OTHER}", "token is for another restaurant"),
        ("restaurant:no spaces", "not a restaurant id"),
        ("guests:everything", "no such channel"),
    ],
)
async def test_a_device_cannot_subscribe_to_what_is_not_its_own(
    service: Running, channel: str, reason: str
) -> None:
    token_a = mint_token(TEST_SECRET, RID, device_id="dev-a")
    async with connect(url(service, token_a), open_timeout=TIMEOUT) as a:
        await until_type(a, "subscribed")  # its own device channel
        refused = await subscribe(a, "r1", channel)
        assert refused["type"] == "error" and refused["code"] == "forbidden", refused
        assert refused["message"] == reason
        # The connection stays, and a publish on the refused channel never reaches it.
        if channel.startswith("device:") and channel.endswith(":dev-b"):
            sent = await service.http.post(
                f"/restaurants/{RID}/devices/dev-b/messages", json={"text": "not yours"}
            )
            assert sent.status_code == 202
        seen: list[dict[str, Any]] = []
        allowed = await subscribe(a, "r2", f"restaurant:{RID}", seen)
        assert allowed["type"] == "subscribed"
        await assert_nothing_queued(a)
        assert seen == [], seen


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "token required"),
        ("not-a-token", "invalid token"),
        (mint_token(TEST_SECRET, RID, ttl=60, now=0), "token expired"),
    ],
)
async def test_protocol_2_without_a_valid_token_is_refused_with_4003(
    service: Running, token: str | None, reason: str
) -> None:
    async with connect(url(service, token), open_timeout=TIMEOUT) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await frame(ws)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4003, reason)


async def test_the_service_lists_who_is_online_and_messages_need_a_token_of_the_restaurant(
    service: Running, request: pytest.FixtureRequest
) -> None:
    skip_without_presence(request)
    token_a = mint_token(TEST_SECRET, RID, device_id="dev-a", name="Bar")
    empty = await service.http.get(f"/restaurants/{RID}/devices")
    assert empty.json() == {"restaurant_id": RID, "count": 0, "devices": [], "truncated": False}
    async with connect(url(service, token_a), open_timeout=TIMEOUT) as a:
        await until_type(a, "subscribed")
        await subscribe(a, "r1", f"restaurant:{RID}")
        online = (await service.http.get(f"/restaurants/{RID}/devices")).json()
        assert online["count"] == 1 and online["devices"][0]["device"] == "dev-a"
        assert online["devices"][0]["name"] == "Bar"
    other = {"Authorization": f"Bearer {mint_token(TEST_SECRET, OTHER)}"}
    assert (await service.http.get(f"/restaurants/{RID}/devices", headers=other)).status_code == 403
    body = {"text": "x"}
    assert (
        await service.http.post(f"/restaurants/{RID}/devices/dev-a/messages", json=body, headers=other)
    ).status_code == 403
    for bad in ({"text": ""}, {"text": "   "}, {"text": "x" * 501}, {"text": "x", "sender": "forged"}):
        answer = await service.http.post(f"/restaurants/{RID}/devices/dev-a/messages", json=bad)
        assert answer.status_code == 422, bad
    assert (
        await service.http.post(f"/restaurants/{RID}/devices/no%20spaces/messages", json=body)
    ).status_code == 422
