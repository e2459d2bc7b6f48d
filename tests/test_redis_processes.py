"""Scale-out: two uvicorn processes share channels through one Redis."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest

from .support import ServerProcess, connect, recv_json, server_process

pytestmark = [pytest.mark.asyncio_only, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def uvicorn_process(redis_url: str, prefix: str) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    """Run the small test app ``tests.redis_app`` under uvicorn."""
    return server_process(
        "-m", "uvicorn", "tests.redis_app:app", "--log-level", "warning",
        env={"RTB_REDIS_URL": redis_url, "RTB_KEY_PREFIX": prefix},
    )  # fmt: skip


async def test_a_write_through_one_process_reaches_clients_of_the_other(
    redis_url: str, redis_prefix: str
) -> None:
    async with (
        uvicorn_process(redis_url, redis_prefix) as server_one,
        uvicorn_process(redis_url, redis_prefix) as server_two,
        httpx.AsyncClient() as http,
    ):
        one, two = server_one.host, server_two.host
        pids = {(await http.get(f"http://{host}/health")).json()["pid"] for host in (one, two)}
        assert len(pids) == 2
        on_two = await connect(f"ws://{two}/ws?room=r")
        on_one = await connect(f"ws://{one}/ws?room=r")
        welcomes = [await recv_json(ws) for ws in (on_two, on_one)]
        assert {w["epoch"] for w in welcomes} == {welcomes[0]["epoch"]} and welcomes[0]["seq"] == 0

        # Writes alternate between the processes, one after the other: clients see them in write order.
        writers: list[int] = []
        for n in range(30):
            reply = (
                await http.post(f"http://{(one, two)[n % 2]}/publish", json={"room": "r", "n": n})
            ).json()
            assert reply["seq"] == n + 1
            writers.append(reply["by"])
        assert set(writers) == pids
        for ws in (on_two, on_one):
            got = [await recv_json(ws) for _ in range(30)]
            assert [m["n"] for m in got] == list(range(30))
            assert [m["seq"] for m in got] == list(range(1, 31))
            assert [m["by"] for m in got] == writers

        # Concurrent writes through both processes: one contiguous numbering, each write exactly once.
        replies = await asyncio.gather(
            *(
                http.post(f"http://{(one, two)[n % 2]}/publish", json={"room": "r", "n": n})
                for n in range(30, 70)
            )
        )
        seq_of = {n: reply.json()["seq"] for n, reply in zip(range(30, 70), replies, strict=True)}
        assert sorted(seq_of.values()) == list(range(31, 71))
        for ws in (on_two, on_one):
            got = [await recv_json(ws) for _ in range(40)]
            assert [m["seq"] for m in got] == list(range(31, 71))
            assert {m["n"]: m["seq"] for m in got} == seq_of
        # A client of process two that resumes from the middle gets the rest from the shared history.
        resumed = await connect(f"ws://{two}/ws?room=r&epoch={welcomes[0]['epoch']}&last_seq=60")
        assert (await recv_json(resumed))["resumed"] is True
        assert [(await recv_json(resumed))["seq"] for _ in range(10)] == list(range(61, 71))
        stats = (await http.get(f"http://{two}/health")).json()
        assert stats["backend"]["state"] == "connected" and stats["backend"]["subscribed"] == 1
        for ws in (on_two, on_one, resumed):
            await ws.close()


async def test_two_processes_of_the_example_service_share_a_restaurant(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    separator = "&" if "?" in redis_url else "?"
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'restaurant.db'}",
        "BROADCAST_URL": f"{redis_url}{separator}key_prefix={redis_prefix}",
        "LOG_LEVEL": "WARNING",
        # Device tokens are tested elsewhere; here the processes run open, as legacy deployments do.
        "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED": "1",
    }
    rid = "redis-test-restaurant"
    # Entered one after the other: the first process creates the schema before the second starts.
    async with (
        server_process("-m", "examples.restaurant_app", env=env) as server_one,
        server_process("-m", "examples.restaurant_app", env=env) as server_two,
        httpx.AsyncClient() as http,
    ):
        one, two = server_one.host, server_two.host
        device = await connect(f"ws://{two}/realtime?restaurant_id={rid}")
        welcome = await recv_json(device)
        assert welcome["type"] == "welcome" and welcome["seq"] == 0
        names = [f"Guest {n}" for n in range(12)]
        for n, name in enumerate(names):
            host = (one, two)[n % 2]
            reply = await http.post(
                f"http://{host}/restaurants/{rid}/guests", json={"guestName": name, "partySize": 2}
            )
            assert reply.status_code == 201, reply.text
        events = [await recv_json(device) for _ in names]
        assert [e["type"] for e in events] == ["guest_created"] * len(names)
        assert [e["data"]["guestName"] for e in events] == names
        assert [e["seq"] for e in events] == list(range(1, len(names) + 1))
        # A snapshot from either process names the same stream position the device reached.
        for host in (one, two):
            snapshot = await http.get(f"http://{host}/restaurants/{rid}/guests")
            assert snapshot.headers["x-stream-epoch"] == welcome["epoch"]
            assert snapshot.headers["x-stream-seq"] == str(len(names))
        await device.close()
