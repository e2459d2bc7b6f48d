"""Server-side subscription changes: the control commands, the registry's index, and their path to every
process (memory: this one; Redis: two broadcasters on one Redis, as two processes would be).

The cross-process tests with real server processes are in tests/test_server_side_processes.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
import redis.asyncio

from rtbroadcast import Broadcaster, ConfigurationError, Event, StateError
from rtbroadcast._control import (
    CONTROL_CHANNEL,
    ControlAction,
    ControlCommand,
    decode_control,
    encode_control,
)
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.connection import Connection, item_text_v2
from rtbroadcast.errors import InvalidChannel
from rtbroadcast.identity import Identity
from rtbroadcast.protocol import CloseCode, decode_client_frame, is_valid_channel
from rtbroadcast.registry import ConnectionRegistry

from .redis_support import RedisServer
from .support import MS, until

pytestmark = pytest.mark.asyncio_only


class Tick(Event):
    type: Literal["server_side_tick"] = "server_side_tick"
    n: int


def identified(channel: str, id: str, *tags: str) -> Connection:
    return Connection(channel, identity=Identity(id, frozenset(tags)))


# -- the commands ---------------------------------------------------------------------------------------


def test_the_control_channel_is_no_channel_a_client_can_name() -> None:
    assert not is_valid_channel(CONTROL_CHANNEL)
    # Redis keys are derived from the name: a valid name never escapes to the same hash tag.
    assert (
        RedisBackend("redis://127.0.0.1:1").keys(CONTROL_CHANNEL)["pubsub"] == "rtb:{\x1frtbroadcast:control}"
    )


@pytest.mark.parametrize(
    "command",
    [
        ControlCommand(ControlAction.SUBSCRIBE, identity="device-1", channel="restaurant:B"),
        ControlCommand(ControlAction.SUBSCRIBE, tag="role:host", channel="r", info={"name": "Ana", "n": [1]}),
        ControlCommand(ControlAction.UNSUBSCRIBE, identity="d", channel="restaurant:A", nonce="abc"),
        ControlCommand(ControlAction.DISCONNECT, identity="user-9", code=4003, reason="banned ✋"),
        ControlCommand(ControlAction.DISCONNECT, tag="tenant:t", code=1000),
    ],
)
def test_commands_round_trip(command: ControlCommand) -> None:
    text = encode_control(command)
    assert json.loads(text)["type"] == "rtb_control"
    decoded = decode_control(text)
    assert decoded == command and decoded.nonce == command.nonce
    # The backend inserts seq; decoding ignores it.
    assert decode_control(text[:-1] + ',"seq":12}') == command


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "subscribe", "channel": "c"}, "exactly one of identity"),
        ({"action": "subscribe", "channel": "c", "identity": "a", "tag": "b"}, "not both"),
        ({"action": "subscribe", "channel": "c", "identity": ""}, "non-empty string"),
        ({"action": "subscribe", "channel": "c", "identity": 7}, "non-empty string"),
        ({"action": "subscribe", "channel": "c", "tag": "x" * 257}, "at most 256"),
        ({"action": "subscribe", "identity": "a"}, "invalid channel name None"),
        ({"action": "subscribe", "identity": "a", "channel": CONTROL_CHANNEL}, "invalid channel name"),
        ({"action": "unsubscribe", "identity": "a", "channel": ""}, "invalid channel name"),
        ({"action": "subscribe", "identity": "a", "channel": "c", "info": [1]}, "mapping"),
        ({"action": "subscribe", "identity": "a", "channel": "c", "info": {"x": object()}}, "JSON"),
        ({"action": "subscribe", "identity": "a", "channel": "c", "info": {"x": float("nan")}}, "JSON"),
        ({"action": "unsubscribe", "identity": "a", "channel": "c", "info": {}}, "subscribe only"),
        ({"action": "disconnect", "identity": "a", "channel": "c"}, "no channel"),
        ({"action": "disconnect", "identity": "a", "code": 1006}, "close code"),
        ({"action": "disconnect", "identity": "a", "code": 5000}, "close code"),
        ({"action": "disconnect", "identity": "a", "code": True}, "close code"),
        ({"action": "disconnect", "identity": "a", "reason": "é" * 62}, "123 UTF-8 bytes"),
        ({"action": "explode", "identity": "a"}, "unknown control action"),
    ],
)
def test_invalid_commands_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ControlCommand(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[1]",
        '{"type": "message_posted"}',
        '{"type": "rtb_control", "action": "reboot", "identity": "a"}',  # a newer version's action
        '{"type": "rtb_control", "action": "disconnect"}',
        '{"type": "rtb_control", "action": "disconnect", "identity": "a", "code": NaN}',
        '{"type": "rtb_control", "action": "subscribe", "identity": "a", "channel": "c", "nonce": 3}',
    ],
)
def test_garbage_on_the_control_channel_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- the message varies; the type is the contract
        decode_control(text)


# -- the registry's index -------------------------------------------------------------------------------


def test_the_registry_indexes_connections_by_identity_and_tag() -> None:
    registry = ConnectionRegistry()
    one = identified("a", "u1", "tenant:t", "role:host")
    two = identified("b", "u1", "tenant:t")
    three = identified("a", "u2")
    anonymous = Connection("a")
    for connection in (one, two, three, anonymous):
        registry.add(connection)
    assert registry.matching(identity="u1") == (one, two)
    assert registry.matching(tag="tenant:t") == (one, two)
    assert registry.matching(tag="role:host") == (one,)
    assert registry.matching(identity="tenant:t") == () and registry.matching(tag="u1") == ()
    assert registry.identified == 3
    registry.add(one)  # registering again indexes nothing twice
    assert registry.matching(identity="u1") == (one, two) and registry.identified == 3
    registry.remove(one)
    assert registry.matching(identity="u1") == (two,) and registry.matching(tag="role:host") == ()
    for connection in (two, three, anonymous):
        registry.remove(connection)
    assert registry.identified == 0 and registry.matching(tag="tenant:t") == ()
    assert not registry._by_identity and not registry._by_tag  # nothing left behind per id


# -- on one process (memory) ----------------------------------------------------------------------------


async def test_disconnect_connections_closes_the_selected_connections() -> None:
    async with Broadcaster() as broadcaster:
        banned = [identified("room:1", "user-9"), identified("room:2", "user-9", "tenant:t")]
        other = identified("room:1", "user-1", "tenant:t")
        anonymous = Connection("room:1")
        for connection in (*banned, other, anonymous):
            await broadcaster.attach(connection)
        assert await broadcaster.disconnect_connections(identity="user-9", reason="banned") == 2
        assert [(c.close_code, c.close_reason) for c in banned] == [(4003, "banned")] * 2
        assert not other.closed and not anonymous.closed
        assert broadcaster.connection_count() == 2
        # Again: nobody left to close.
        assert await broadcaster.disconnect_connections(identity=Identity("user-9")) == 0
        assert await broadcaster.disconnect_connections(tag="tenant:t", code=1001, reason="moved") == 1
        assert other.close_code == 1001 and not anonymous.closed
        assert broadcaster.stats().control_applied == 3


async def test_the_control_subscription_lives_as_long_as_identified_connections() -> None:
    async with Broadcaster() as broadcaster:
        backend = broadcaster.backend
        anonymous = Connection("room:1")
        await broadcaster.attach(anonymous)
        assert backend.stats()["subscribed"] == 1  # room:1 only: no identity, nothing to control
        # Nobody here to change: the command is published, and this process does not wait for it.
        assert await broadcaster.disconnect_connections(identity="nobody") == 0
        first = identified("room:1", "u1")
        second = identified("room:2", "u2")
        await broadcaster.attach(first)
        await broadcaster.attach(second)
        assert backend.stats()["subscribed"] == 3
        assert broadcaster.connection_count() == 3  # the control inbox is not a connection
        assert broadcaster.stats().channels == {"room:1": 2, "room:2": 1}
        first.close()
        await until(lambda: backend.stats()["subscribed"] == 3)
        second.close()
        await until(lambda: backend.stats()["subscribed"] == 1)
        anonymous.close()
        await until(lambda: backend.stats()["subscribed"] == 0)
        # And back: a new identified connection subscribes again, and commands reach it.
        third = identified("room:3", "u3")
        await broadcaster.attach(third)
        assert await broadcaster.disconnect_connections(identity="u3") == 1
        await until(lambda: backend.stats()["subscribed"] == 0)


def frames_of(connection: Connection) -> list[dict[str, Any]]:
    """Take every frame queued on a protocol-2 connection, parsed."""
    frames = []
    while (item := connection.get_nowait()) is not None:
        frames.append(json.loads(item_text_v2(item)))
    return frames


async def test_server_side_subscriptions_on_one_process() -> None:
    async with Broadcaster() as broadcaster:
        device = Connection(
            protocol=2, identity=Identity("d1", frozenset({"restaurant:A"})), max_subscriptions=2
        )
        legacy = Connection("restaurant:A", identity=Identity("d1"))
        await broadcaster.attach(device)
        await broadcaster.attach(legacy)
        await broadcaster.add_subscription(device, "restaurant:A", request_id="r1")
        assert [f["type"] for f in frames_of(device)] == ["welcome", "subscribed"]
        await broadcaster.publish("device:d1", Tick(n=1))  # before: not delivered

        # The protocol-1 connection of the same device is not counted: its one channel is fixed.
        assert await broadcaster.subscribe_connections("device:d1", identity="d1", info={"name": "Host"}) == 1
        (subscribed,) = frames_of(device)
        assert subscribed == {
            "type": "subscribed",
            "id": None,
            "channel": "device:d1",
            "epoch": subscribed["epoch"],
            "seq": 1,
            "resumed": False,
        }
        cursor = device.cursor_for("device:d1")
        assert cursor is not None and dict(cursor.info) == {"name": "Host"}
        # At its max_subscriptions: an error frame for the server's subscription, nothing else changes.
        assert await broadcaster.subscribe_connections("device:other", identity="d1") == 0
        assert frames_of(device) == [
            {
                "type": "error",
                "id": None,
                "channel": "device:other",
                "code": "too_many_subscriptions",
                "message": "at most 2 subscriptions per connection",
            }
        ]
        # Already subscribed: not counted, and no frame.
        assert await broadcaster.subscribe_connections("device:d1", tag="restaurant:A") == 0
        assert frames_of(device) == []

        assert await broadcaster.unsubscribe_connections("restaurant:A", tag="restaurant:A") == 1
        assert frames_of(device) == [
            {"type": "unsubscribed", "id": None, "channel": "restaurant:A", "reason": "server"}
        ]
        await broadcaster.publish("restaurant:A", Tick(n=2))
        await broadcaster.publish("device:d1", Tick(n=3))
        assert [(f["channel"], f["event"]["n"]) for f in frames_of(device)] == [("device:d1", 3)]
        assert legacy.queued == 2  # its welcome, and restaurant:A's event
        assert await broadcaster.unsubscribe_connections("restaurant:A", identity="d1") == 0
        assert broadcaster.connection_count("restaurant:A") == 1


async def test_misuse_fails_loudly() -> None:
    broadcaster = Broadcaster()
    with pytest.raises(StateError, match="async with broadcaster"):
        await broadcaster.disconnect_connections(identity="u")
    async with broadcaster:
        with pytest.raises(ConfigurationError, match="exactly one of identity"):
            await broadcaster.disconnect_connections()
        with pytest.raises(ConfigurationError, match="invalid channel name"):
            await broadcaster.subscribe_connections(CONTROL_CHANNEL, identity="u")
        with pytest.raises(ConfigurationError, match="close code"):
            await broadcaster.disconnect_connections(tag="t", code=1011)
        # Nobody but the broadcaster itself publishes or listens on the reserved channel.
        with pytest.raises(ConfigurationError, match="invalid channel name"):
            await broadcaster.publish(CONTROL_CHANNEL, Tick(n=1))
        with pytest.raises(ConfigurationError, match="invalid channel name"):
            await broadcaster.publish_json(CONTROL_CHANNEL, '{"type":"rtb_control","action":"disconnect"}')
        with pytest.raises(ConfigurationError, match="invalid channel name"):
            broadcaster.subscribe(CONTROL_CHANNEL)
        connection = Connection(protocol=2)
        await broadcaster.attach(connection)
        with pytest.raises(ConfigurationError, match="invalid channel name"):
            await broadcaster.add_subscription(connection, CONTROL_CHANNEL)
    frame = json.dumps({"type": "subscribe", "id": "r1", "channel": CONTROL_CHANNEL})
    with pytest.raises(InvalidChannel):
        decode_client_frame(frame, protocol=2)


# -- two broadcasters on one Redis ----------------------------------------------------------------------


@pytest.fixture
async def two_on_redis(redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[Broadcaster, Broadcaster]]:
    one = Broadcaster(backend=RedisBackend(redis_url, key_prefix=redis_prefix))
    two = Broadcaster(backend=RedisBackend(redis_url, key_prefix=redis_prefix))
    async with one, two:
        yield one, two


@pytest.mark.redis
async def test_a_disconnect_from_one_process_closes_connections_on_both(
    two_on_redis: tuple[Broadcaster, Broadcaster],
) -> None:
    one, two = two_on_redis
    here = identified("room:1", "user-9")
    there = [identified("room:1", "user-9"), identified("room:2", "user-9")]
    bystander = identified("room:1", "user-1")
    await one.attach(here)
    for connection in (*there, bystander):
        await two.attach(connection)
    # The count is this process's; the other one applies the same command from Redis.
    assert await one.disconnect_connections(identity="user-9", reason="banned") == 1
    assert here.close_code == CloseCode.FORBIDDEN
    await until(lambda: all(c.closed for c in there))
    assert [(c.close_code, c.close_reason) for c in there] == [(4003, "banned")] * 2
    assert not bystander.closed
    assert await two.disconnect_connections(identity="user-1") == 1


@pytest.mark.redis
async def test_commands_lost_on_the_way_are_read_from_history(
    two_on_redis: tuple[Broadcaster, Broadcaster], redis_url: str
) -> None:
    one, two = two_on_redis
    victim = identified("room:1", "user-9")
    await two.attach(victim)
    # A command that reached the stream but not process two's PUB/SUB connection (published here
    # straight to the stream, as a lost PUB/SUB message would leave it): the next one reveals the gap.
    client = redis.asyncio.Redis.from_url(redis_url)
    backend = one.backend
    assert isinstance(backend, RedisBackend)
    keys = backend.keys(CONTROL_CHANNEL)
    try:
        seq = int(await client.hincrby(keys["meta"], "seq", 1))
        lost = encode_control(ControlCommand(ControlAction.DISCONNECT, identity="user-9", reason="lost"))
        await client.xadd(keys["stream"], {"d": lost[:-1] + f',"seq":{seq}}}', "t": 0}, id=f"{seq}-0")
    finally:
        await client.aclose()
    assert await one.disconnect_connections(identity="nobody") == 0
    await until(lambda: victim.closed, 5_000 * MS)
    assert victim.close_reason == "lost"
    assert two.stats().repairs >= 1


async def test_a_command_waits_for_this_process_to_apply_it_in_order() -> None:
    async with Broadcaster() as broadcaster:
        connections = [identified("room:1", f"u{n % 3}") for n in range(9)]
        for connection in connections:
            await broadcaster.attach(connection)
        counts = await asyncio.gather(
            *(broadcaster.disconnect_connections(identity=f"u{n}") for n in (0, 1, 2, 0))
        )
        assert counts == [3, 3, 3, 0]
        assert all(c.closed for c in connections)


@pytest.mark.redis
@pytest.mark.slow
async def test_a_redis_restart_that_loses_everything_is_reported_and_commands_flow_again(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    one = Broadcaster(backend=RedisBackend(redis_server.url, timeout=1.0))
    two = Broadcaster(backend=RedisBackend(redis_server.url, timeout=1.0))
    async with one, two:
        victim = identified("room:1", "user-9")
        await two.attach(victim)
        assert two.stats().control_lost == 0
        await asyncio.to_thread(redis_server.restart)  # no persistence: the control channel's stream is gone
        await until(lambda: two.backend.available and one.backend.available, 10_000 * MS)
        # Process two cannot know whether a command was published while it was cut off: it says so.
        await until(lambda: two.stats().control_lost == 1, 10_000 * MS)
        assert "server-side subscription commands may have been lost" in caplog.text
        # And the path works again, on the new stream.
        assert not victim.closed
        assert await one.disconnect_connections(identity="user-9", reason="after") == 0
        await until(lambda: victim.closed)
        assert victim.close_reason == "after"


async def test_an_inbox_closed_under_its_task_reopens_where_it_stood(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Broadcaster() as broadcaster:
        victim = identified("room:1", "user-9")
        await broadcaster.attach(victim)
        inbox = broadcaster._control._connection
        assert inbox is not None
        # As a failed repair would (1011): the command published right after is not lost with it.
        inbox.close(CloseCode.INTERNAL_ERROR, "repair failed")
        assert await broadcaster.disconnect_connections(identity="user-9", reason="still") == 1
        assert victim.close_reason == "still"
        assert "reopening it" in caplog.text
