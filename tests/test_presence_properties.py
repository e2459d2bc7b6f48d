"""Property: whatever the interleaving of subscribes, unsubscribes and disconnects (some concurrent), every
subscription that asked for presence ends up with exactly the channel's members: its snapshot plus the
joins and leaves it got, in order, never one about itself, never a join of a member it knows or a leave of
one it does not. On memory (one broadcaster) and on Redis (two broadcasters, as two processes)."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtbroadcast import Broadcaster, Connection
from rtbroadcast.backends.memory import MemoryBackend
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.connection import item_text_v2

from .redis_support import delete_keys
from .support import MS, until

CHANNEL = "room:p"
CLIENTS = 4

Op = tuple[Literal["sub", "unsub", "close", "wait"], int, bool]

operations = st.lists(
    st.tuples(st.sampled_from(["sub", "unsub", "close", "wait"]), st.integers(0, CLIENTS - 1), st.booleans()),
    max_size=25,
)


@dataclass
class Client:
    broadcaster: Broadcaster
    connection: Connection | None = None
    subscribed: bool = False
    watching: bool = False
    view: set[str] | None = None  # what the subscription knows, once its subscribed frame came
    frames: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> None:
        """Apply every queued frame to the view, checking each on the way."""
        connection = self.connection
        while connection is not None and (item := connection.get_nowait()) is not None:
            frame = json.loads(item_text_v2(item))
            self.frames.append(frame)
            kind = frame["type"]
            if kind == "subscribed":
                presence = frame.get("presence")
                assert (presence is not None) == self.watching
                if presence is not None:
                    assert not presence["truncated"] and presence["count"] == len(presence["members"])
                    self.view = {m["client"] for m in presence["members"]}
                    assert connection.client_id in self.view  # the snapshot includes the joiner
            elif kind == "unsubscribed":
                self.view = None
            elif kind in ("presence_join", "presence_leave"):
                assert self.view is not None, f"{kind} before subscribed or after unsubscribed: {self.frames}"
                client = frame["member"]["client"]
                assert client != connection.client_id, "a subscription heard about itself"
                if kind == "presence_join":
                    assert client not in self.view, f"join of a known member: {self.frames}"
                    self.view.add(client)
                else:
                    assert client in self.view, f"leave of an unknown member: {self.frames}"
                    self.view.discard(client)


async def apply(client: Client, op: Op) -> None:
    kind, _, presence = op
    broadcaster = client.broadcaster
    if kind == "sub" and not client.subscribed:
        if client.connection is None:
            client.connection = Connection(protocol=2)
            await broadcaster.attach(client.connection)
        client.subscribed = True
        client.watching = presence
        await broadcaster.add_subscription(client.connection, CHANNEL, presence=presence)
    elif kind == "unsub" and client.subscribed and client.connection is not None:
        client.read()
        client.subscribed = False
        broadcaster.remove_subscription(client.connection, CHANNEL)
    elif kind == "close" and client.connection is not None:
        client.read()
        client.connection.close()
        client.connection = None
        client.subscribed = False
        client.view = None


async def run(ops: list[Op], broadcasters: list[Broadcaster]) -> None:
    for broadcaster in broadcasters:
        await broadcaster.connect()
    try:
        clients = [Client(broadcasters[n % len(broadcasters)]) for n in range(CLIENTS)]
        batch: dict[int, Op] = {}
        for op in [*ops, ("wait", 0, False)]:
            if op[0] != "wait" and op[1] not in batch:
                batch[op[1]] = op  # one op per client in flight: the ops of a batch run concurrently
                continue
            await asyncio.gather(*(apply(clients[n], o) for n, o in batch.items()))
            batch = {op[1]: op} if op[0] != "wait" else {}
            for client in clients:
                client.read()
        for broadcaster in broadcasters:
            await broadcaster._finish_leaves()
        members = {c.connection.client_id for c in clients if c.subscribed and c.connection is not None}

        def converged() -> bool:
            for client in clients:
                client.read()
            return all(c.view == members for c in clients if c.subscribed and c.watching)

        await until(converged, 5_000 * MS)
        for broadcaster in broadcasters:
            snapshot = await broadcaster.presence(CHANNEL, limit=100)
            assert {m.client for m in snapshot.members} == members
    finally:
        for broadcaster in broadcasters:
            await broadcaster.disconnect()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_every_watcher_knows_exactly_the_members_on_memory(ops: list[Op]) -> None:
    asyncio.run(run(ops, [Broadcaster(backend=MemoryBackend(), presence=("room:",))]))


@pytest.mark.redis
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_every_watcher_knows_exactly_the_members_on_redis(redis_url: str, ops: list[Op]) -> None:
    prefix = f"rtbprop-{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(
            run(
                ops,
                [
                    Broadcaster(backend=RedisBackend(redis_url, key_prefix=prefix), presence=("room:",))
                    for _ in range(2)
                ],
            )
        )
    finally:
        delete_keys(redis_url, prefix)
