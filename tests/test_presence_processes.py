"""Presence across two uvicorn processes on one Redis, one of them killed with ``kill -9``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import pytest

from .support import MS, ServerProcess, connect, recv_json, server_process

pytestmark = [pytest.mark.asyncio_only, pytest.mark.redis, pytest.mark.slow]

HEARTBEAT = 1.0


def presence_process(redis_url: str, prefix: str) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    return server_process(
        "-m", "uvicorn", "tests.presence_app:app", "--log-level", "warning",
        env={"RTB_REDIS_URL": redis_url, "RTB_KEY_PREFIX": prefix, "RTB_PRESENCE_HEARTBEAT": str(HEARTBEAT)},
    )  # fmt: skip


async def subscribe(host: str, user: str, channel: str) -> tuple[Any, str, dict[str, Any]]:
    ws = await connect(f"ws://{host}/ws?protocol=2&user={user}")
    welcome = await recv_json(ws)
    await ws.send(json.dumps({"type": "subscribe", "id": "s", "channel": channel, "presence": True}))
    subscribed = await recv_json(ws)
    assert subscribed["type"] == "subscribed", subscribed
    return ws, welcome["connection"], subscribed["presence"]


async def test_presence_spans_processes_and_a_killed_process_leaves_within_two_heartbeats(
    redis_url: str, redis_prefix: str
) -> None:
    async with (
        presence_process(redis_url, redis_prefix) as one,
        presence_process(redis_url, redis_prefix) as doomed,
        httpx.AsyncClient() as http,
    ):
        pid_one = (await http.get(f"http://{one.host}/health")).json()["pid"]
        pid_doomed = (await http.get(f"http://{doomed.host}/health")).json()["pid"]
        alice, alice_id, first = await subscribe(one.host, "alice", "room:1")
        assert first["count"] == 1
        bob, bob_id, second = await subscribe(doomed.host, "bob", "room:1")
        assert [m["identity"] for m in second["members"]] == ["alice", "bob"]  # join order, across processes
        bob_member = {"client": bob_id, "identity": "bob", "info": {"pid": pid_doomed}}
        assert await recv_json(alice) == {"type": "presence_join", "channel": "room:1", "member": bob_member}
        carol, carol_id, _ = await subscribe(doomed.host, "carol", "room:1")
        assert (await recv_json(alice))["member"]["client"] == carol_id
        assert (await recv_json(bob))["member"]["client"] == carol_id  # the same process hears it too
        # Both processes answer the same snapshot.
        for host in (one.host, doomed.host):
            snapshot = (await http.get(f"http://{host}/presence", params={"channel": "room:1"})).json()
            assert [m["client"] for m in snapshot["members"]] == [alice_id, bob_id, carol_id]
            assert snapshot["count"] == 3 and snapshot["truncated"] is False

        # A graceful leave crosses processes at once.
        await carol.close()
        left = await recv_json(alice)
        assert left["type"] == "presence_leave" and left["member"]["client"] == carol_id

        # kill -9: no leave is ever sent by the dead process; the survivor's heartbeat removes its member.
        doomed.process.kill()
        await doomed.process.wait()
        killed = time.monotonic()
        left = await recv_json(alice, timeout=10_000 * MS)
        gone_after = time.monotonic() - killed
        assert left == {"type": "presence_leave", "channel": "room:1", "member": bob_member}
        assert gone_after <= 2 * HEARTBEAT + 0.5, gone_after  # the documented bound, plus latency slack
        print(f"killed process left after {gone_after:.2f} s (bound {2 * HEARTBEAT} s)")  # noqa: T201
        snapshot = (await http.get(f"http://{one.host}/presence", params={"channel": "room:1"})).json()
        assert snapshot["members"] == [{"client": alice_id, "identity": "alice", "info": {"pid": pid_one}}]
        # The survivor's own member is kept alive by its heartbeat well past the dead one's deadline.
        await asyncio.sleep(2 * HEARTBEAT)
        snapshot = (await http.get(f"http://{one.host}/presence", params={"channel": "room:1"})).json()
        assert snapshot["count"] == 1
        with contextlib.suppress(Exception):
            await bob.close()
        await alice.close()


async def test_a_process_that_stops_gracefully_takes_its_members_with_it_at_once(
    redis_url: str, redis_prefix: str
) -> None:
    env = {"RTB_REDIS_URL": redis_url, "RTB_KEY_PREFIX": redis_prefix, "RTB_PRESENCE_HEARTBEAT": "30"}
    app = ("-m", "uvicorn", "tests.presence_app:app", "--log-level", "warning")
    async with server_process(*app, env=env) as one, server_process(*app, env=env) as leaving:
        alice, _, _ = await subscribe(one.host, "alice", "room:1")
        bob, bob_id, _ = await subscribe(leaving.host, "bob", "room:1")
        assert (await recv_json(alice))["type"] == "presence_join"
        stopped = time.monotonic()
        await leaving.stop()  # SIGTERM: the lifespan drains, every connection leaves
        left = await recv_json(alice, timeout=10_000 * MS)
        assert left["type"] == "presence_leave" and left["member"]["client"] == bob_id
        # Far below the 60 s that expiry would take with this heartbeat.
        assert time.monotonic() - stopped < 5.0
        with contextlib.suppress(Exception):
            await bob.close()
        await alice.close()
