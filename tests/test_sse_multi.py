"""Server-Sent Events on protocol 2, over a real uvicorn and a real HTTP streaming client: several channels
on one stream, ids that resume every channel, authorization per channel, server-side subscriptions."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Literal

import httpx
import pytest

from rtbroadcast import Allow, Broadcaster, Deny, Event, Identity
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.protocol import ResumePoint, decode_positions, encode_positions

from .sse_support import SSEStream, open_sse
from .support import MS, ROOT, broadcast_app, serve, until


class Note(Event):
    type: Literal["sse_multi_note"] = "sse_multi_note"
    n: int


def authenticate(request: ConnectionRequest) -> Identity | None:
    user = request.query.get("user")
    if not user:
        return None
    return Identity(user, frozenset({f"tenant:{request.query.get('tenant', '')}"}))


def resolve(request: ConnectionRequest) -> str | list[str] | None:
    # Protocol 2: the user's own channel, server-side. Protocol 1: ?room=, as the suite's other apps.
    if request.protocol == 2:
        return [f"user:{request.identity.id}"] if request.identity is not None else None
    room = request.query.get("room")
    return f"room:{room}" if room else None


def authorize(request: ConnectionRequest, channel: str) -> bool | Deny | Allow:
    # A tenant's channels are "<tenant>:<name>"; a user channel is its user's alone.
    identity = request.identity
    if identity is None:
        return channel.startswith("room:")
    if channel.startswith("user:"):
        return channel == f"user:{identity.id}" or Deny("not your user channel")
    tenant, _, _ = channel.partition(":")
    return f"tenant:{tenant}" in identity.tags or Deny(f"channel {channel!r} is another tenant's")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Broadcaster, str, httpx.AsyncClient]]:
    broadcaster = Broadcaster()
    app = broadcast_app(broadcaster, channel=resolve, authenticate=authenticate, authorize=authorize)
    async with serve(app) as host, httpx.AsyncClient() as http:
        yield broadcaster, f"http://{host}/ws/sse", http


async def opening(stream: SSEStream, *channels: str) -> dict[str, ResumePoint]:
    """Read the welcome and a ``subscribed`` per channel; return the positions of the last id."""
    welcome = await stream.next()
    assert welcome.json()["type"] == "welcome" and welcome.json()["protocol"] == 2 and not welcome.has_id
    for channel in channels:
        event = await stream.next()
        frame = event.json()
        assert (frame["type"], frame["id"], frame["channel"]) == ("subscribed", None, channel), frame
        assert event.has_id
    assert stream.last_event_id is not None
    return decode_positions(stream.last_event_id)


async def test_one_stream_follows_the_resolvers_and_the_urls_channels(
    served: tuple[Broadcaster, str, httpx.AsyncClient],
) -> None:
    broadcaster, url, http = served
    await broadcaster.publish("t1:a", Note(n=0))
    async with open_sse(http, f"{url}?protocol=2&user=u1&tenant=t1&channel=t1:a&channel=t1:b") as stream:
        positions = await opening(stream, "user:u1", "t1:a", "t1:b")
        assert {c: p.seq for c, p in positions.items()} == {"user:u1": 0, "t1:a": 1, "t1:b": 0}
        for n, channel in enumerate(["t1:b", "user:u1", "t1:a", "t1:b"], start=1):
            await broadcaster.publish(channel, Note(n=n))
        got = [await stream.next() for _ in range(4)]
        frames = [event.json() for event in got]
        assert [(f["type"], f["channel"], f["event"]["n"]) for f in frames] == [
            ("event", "t1:b", 1),
            ("event", "user:u1", 2),
            ("event", "t1:a", 3),
            ("event", "t1:b", 4),
        ]
        # The event inside is protocol 1's frame, unchanged (its own type, its seq).
        inner = frames[2]["event"]
        assert (inner["type"], inner["n"], inner["seq"]) == ("sse_multi_note", 3, 2) and "timestamp" in inner
        # Every event's id carries every channel's position after it.
        assert all(event.has_id for event in got)
        assert {c: p.seq for c, p in decode_positions(got[-1].id or "").items()} == {
            "user:u1": 1,
            "t1:a": 2,
            "t1:b": 2,
        }


async def test_last_event_id_resumes_every_channel_after_a_burst(
    served: tuple[Broadcaster, str, httpx.AsyncClient],
) -> None:
    broadcaster, url, http = served
    channels = ["user:u1", "t1:a", "t1:b"]
    query = f"{url}?protocol=2&user=u1&tenant=t1&channel=t1:a&channel=t1:b"
    published: dict[str, list[int]] = {channel: [] for channel in channels}
    rng = random.Random(14)
    n = 0

    async def burst(count: int) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            channel = rng.choice(channels)
            await broadcaster.publish(channel, Note(n=n))
            published[channel].append(n)

    seen: dict[str, list[int]] = {channel: [] for channel in channels}
    async with open_sse(http, query) as stream:
        await opening(stream, *channels)
        await burst(20)
        for _ in range(20):
            frame = (await stream.next()).json()
            seen[frame["channel"]].append(frame["event"]["n"])
        last_id = stream.last_event_id
    await until(lambda: broadcaster.connection_count() == 0)
    await burst(150)  # while disconnected

    # The browser reconnects to the URL it first opened, with the id of the last event it got.
    async with open_sse(http, query, last_event_id=last_id) as stream:
        welcome = await stream.next_json()
        assert welcome["type"] == "welcome"
        # Each channel's subscribed (resumed), then what that channel missed, then the next channel.
        subscribed: list[str] = []
        for _ in range(150 + len(channels)):
            frame = (await stream.next()).json()
            if frame["type"] == "subscribed":
                assert frame["resumed"] is True and frame["id"] is None
                subscribed.append(frame["channel"])
            else:
                assert frame["type"] == "event" and frame["channel"] == subscribed[-1], frame
                seen[frame["channel"]].append(frame["event"]["n"])
        assert subscribed == channels
        await burst(3)  # and live again
        for _ in range(3):
            frame = (await stream.next()).json()
            seen[frame["channel"]].append(frame["event"]["n"])
    # Per channel: every event exactly once, in order.
    assert seen == published


async def test_a_channel_the_hook_denies_never_reaches_the_stream(
    served: tuple[Broadcaster, str, httpx.AsyncClient],
) -> None:
    broadcaster, url, http = served
    # A Last-Event-ID naming the other tenant's channel widens nothing: only the URL's channels count.
    forged = encode_positions({"t2:secret": ResumePoint("x", 0), "t1:a": ResumePoint("x", 0)})
    query = f"{url}?protocol=2&user=u1&tenant=t1&channel=t2:secret&channel=t1:a&channel=user:u2"
    async with open_sse(http, query, last_event_id=forged) as stream:
        assert (await stream.next_json())["type"] == "welcome"
        frames = [await stream.next_json() for _ in range(5)]
        assert [(f["type"], f["channel"]) for f in frames] == [
            ("subscribed", "user:u1"),
            ("error", "t2:secret"),
            ("subscribed", "t1:a"),
            # The forged epoch is not t1:a's: a fresh start, and the client is told to reload.
            ("resync_required", "t1:a"),
            ("error", "user:u2"),
        ]
        assert frames[1] == {
            "type": "error",
            "id": None,
            "channel": "t2:secret",
            "code": "forbidden",
            "message": "channel 't2:secret' is another tenant's",
        }
        assert frames[2]["resumed"] is False and frames[4]["code"] == "forbidden"
        for n in range(10):
            await broadcaster.publish("t2:secret", Note(n=n))
            await broadcaster.publish("user:u2", Note(n=n))
        await broadcaster.publish("t1:a", Note(n=99))
        frame = await stream.next_json()
        assert (frame["channel"], frame["event"]["n"]) == ("t1:a", 99)
        assert set(decode_positions(stream.last_event_id or "")) == {"user:u1", "t1:a"}
    assert broadcaster.connection_count("t2:secret") == 0
    # Nothing but denied channels: refused outright, so that an EventSource does not retry forever.
    refused = await http.get(f"{url}?protocol=2&channel=t2:secret")
    assert refused.status_code == 403 and refused.text == "forbidden"


async def test_bad_protocol_2_requests_are_refused(
    served: tuple[Broadcaster, str, httpx.AsyncClient],
) -> None:
    _, url, http = served
    base = f"{url}?protocol=2&user=u1&tenant=t1"
    for query, status, text in [
        (f"{base}&channel=", 400, "invalid channel name"),
        (f"{base}&channel=%01x", 400, "invalid channel name"),
        (f"{base}&{'&'.join(f'channel=t1:{n}' for n in range(130))}", 400, "max_subscriptions (128)"),
        (f"{base}&epoch=e&last_seq=1", 400, "protocol 2 resumes per channel"),
        (f"{url}?protocol=3", 400, "unsupported protocol"),
    ]:
        reply = await http.get(query)
        assert (reply.status_code, text in reply.text) == (status, True), (query, reply.text)
    reply = await http.get(f"{base}&channel=t1:a", headers={"last-event-id": "3f2a:12"})
    assert reply.status_code == 400 and reply.text.startswith("Last-Event-ID: ")


async def test_server_side_subscriptions_reach_sse_streams(
    served: tuple[Broadcaster, str, httpx.AsyncClient],
) -> None:
    broadcaster, url, http = served
    async with open_sse(http, f"{url}?protocol=2&user=u1&tenant=t1") as stream:
        await opening(stream, "user:u1")
        assert await broadcaster.subscribe_connections("t1:moved", identity="u1") == 1
        event = await stream.next()
        assert event.json() == {
            "type": "subscribed",
            "id": None,
            "channel": "t1:moved",
            "epoch": event.json()["epoch"],
            "seq": 0,
            "resumed": False,
        }
        assert set(decode_positions(event.id or "")) == {"user:u1", "t1:moved"}
        await broadcaster.publish("t1:moved", Note(n=1))
        assert (await stream.next_json())["event"]["n"] == 1
        assert await broadcaster.unsubscribe_connections("t1:moved", tag="tenant:t1") == 1
        event = await stream.next()
        assert event.json()["type"] == "unsubscribed" and event.json()["reason"] == "server"
        assert set(decode_positions(event.id or "")) == {"user:u1"}
        assert await broadcaster.disconnect_connections(identity="u1", code=4003, reason="banned") == 1
        assert await stream.until_end() == []
        assert stream.comments[-1] == "closed 4003 banned"


async def test_protocol_1_sse_ids_are_unchanged(served: tuple[Broadcaster, str, httpx.AsyncClient]) -> None:
    broadcaster, url, http = served
    async with open_sse(http, f"{url}?room=a") as stream:
        welcome = await stream.next()
        assert not welcome.has_id and welcome.json()["channel"] == "room:a"
        await broadcaster.publish("room:a", Note(n=1))
        event = await stream.next()
        assert event.data.startswith('{"type":"sse_multi_note",') and event.data.endswith(',"n":1,"seq":1}')
        assert event.id == f"{welcome.json()['epoch']}:1"
    await until(lambda: broadcaster.connection_count() == 0, 5_000 * MS)


def test_the_protocol_pages_example_ids_are_what_the_server_sends() -> None:
    page = (ROOT / "docs" / "reference" / "protocol.md").read_text()
    example = (
        page.split("### Server-Sent Events (protocol 2)", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    )
    positions: dict[str, ResumePoint] = {}
    blocks = [block.splitlines() for block in example.strip().split("\n\n")]
    assert len(blocks) == 5
    for lines in blocks:
        fields = dict(line.split(": ", 1) for line in lines)
        frame = json.loads(fields["data"])
        if frame["type"] == "subscribed":
            positions[frame["channel"]] = ResumePoint(frame["epoch"], frame["seq"])
        elif frame["type"] == "event":
            positions[frame["channel"]] = ResumePoint(
                positions[frame["channel"]].epoch, frame["event"]["seq"]
            )
        assert ("id" in fields) == (frame["type"] in ("subscribed", "event"))
        if "id" in fields:
            assert fields["id"] == encode_positions(positions)
