"""Two uvicorn processes share channels through PostgreSQL: transactional publishes in commit order, and a
listener killed and a server restarted mid-stream with nothing lost for resuming clients.

Both tests run on a PostgreSQL cluster of their own (tests/postgres_support.py ``throwaway_postgres``):
the first needs ``track_commit_timestamp`` (the witness of commit order), the second restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .postgres_support import ThrowawayPostgres, new_schema, throwaway_postgres
from .support import MS, ServerProcess, connect, recv_json, server_process, until

pytestmark = [pytest.mark.asyncio_only, pytest.mark.postgresql, pytest.mark.slow]


@contextlib.asynccontextmanager
async def two_processes(cluster: ThrowawayPostgres) -> AsyncIterator[tuple[str, str]]:
    env = {"RTB_PG_URL": cluster.url, "RTB_PG_SCHEMA": new_schema()}

    def process() -> contextlib.AbstractAsyncContextManager[ServerProcess]:
        return server_process("-m", "uvicorn", "tests.postgres_app:app", "--log-level", "warning", env=env)

    # One after the other: the first creates the schema.
    async with process() as one, process() as two:
        yield one.host, two.host


async def commit_order(url: str) -> list[int]:
    """The ``n`` of every committed write, in the order PostgreSQL committed them."""
    conn = await asyncpg.connect(url)
    try:
        schema = await conn.fetchval(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'writes'"
        )
        records = await conn.fetch(
            f'SELECT n FROM "{schema}".writes ORDER BY pg_xact_commit_timestamp(xmin), n'
            if await conn.fetchval("SHOW track_commit_timestamp") == "on"
            else f'SELECT n FROM "{schema}".writes ORDER BY n'
        )
        return [r["n"] for r in records]
    finally:
        await conn.close()


async def test_concurrent_transactions_in_two_processes_reach_every_client_once_in_commit_order() -> None:
    with throwaway_postgres({"track_commit_timestamp": "on", "max_connections": "100"}) as cluster:
        async with two_processes(cluster) as (one, two), httpx.AsyncClient(timeout=30) as http:
            clients = [await connect(f"ws://{host}/ws?room=r") for host in (one, two)]
            welcomes = [await recv_json(ws) for ws in clients]
            assert [w["seq"] for w in welcomes] == [0, 0]
            rng = random.Random(17)
            gate = asyncio.Semaphore(24)
            writes = 1000

            async def write(n: int) -> dict[str, Any]:
                body = {"room": "r", "n": n, "rollback": n % 7 == 3, "hold_ms": rng.choice([0, 0, 1, 3])}
                async with gate:
                    reply = await http.post(f"http://{(one, two)[n % 2]}/write", json=body)
                assert reply.status_code == 200, reply.text
                result: dict[str, Any] = reply.json()
                return result

            replies = await asyncio.gather(*(write(n) for n in range(writes)))
            committed = {n for n, r in enumerate(replies) if r["committed"]}
            assert len(committed) == writes - len(range(3, writes, 7))
            assert {r["by"] for r in replies} == {
                (await http.get(f"http://{host}/health")).json()["pid"] for host in (one, two)
            }
            order = await commit_order(cluster.url)
            assert set(order) == committed
            for ws in clients:
                got = [await recv_json(ws) for _ in committed]
                assert [m["seq"] for m in got] == list(range(1, len(committed) + 1))
                assert [m["n"] for m in got] == order  # commit order, each committed write once
                # The seq a committed transaction was told is the seq its event went out with.
                assert all(replies[m["n"]]["seq"] == m["seq"] for m in got)
            # Nothing else arrives: the rolled-back writes woke no one.
            for ws in clients:
                with pytest.raises(TimeoutError):
                    await recv_json(ws, timeout=300 * MS)
            resumed = await connect(
                f"ws://{two}/ws?room=r&epoch={welcomes[0]['epoch']}&last_seq={len(committed) - 5}"
            )
            assert (await recv_json(resumed))["resumed"] is True
            assert [(await recv_json(resumed))["n"] for _ in range(5)] == order[-5:]
            for ws in (*clients, resumed):
                await ws.close()


@dataclass
class Follower:
    """A WebSocket client that reconnects and resumes from the last seq it received, whatever happens."""

    host: str
    received: list[dict[str, Any]] = field(default_factory=list)
    resyncs: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    epoch: str | None = None

    async def run(self) -> None:
        while True:
            query = "room=r"
            if self.epoch is not None:
                last = self.received[-1]["seq"] if self.received else 0
                query += f"&epoch={self.epoch}&last_seq={last}"
            try:
                ws = await connect(f"ws://{self.host}/ws?{query}")
            except (OSError, InvalidStatus, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            try:
                async for raw in ws:
                    message = json.loads(raw)
                    if message["type"] == "welcome":
                        self.epoch = self.epoch or message["epoch"]
                    elif message["type"] == "resync_required":
                        self.resyncs.append(message)
                    elif message["type"] == "written":
                        self.received.append(message)
            except ConnectionClosed:
                pass
            self.reconnects += 1
            await asyncio.sleep(0.05)


async def test_a_killed_listener_and_a_restarted_server_lose_nothing_for_resuming_clients() -> None:
    with throwaway_postgres() as cluster:
        async with two_processes(cluster) as (one, two), httpx.AsyncClient(timeout=10) as http:
            followers = [Follower(one), Follower(two)]
            tasks = [asyncio.create_task(f.run()) for f in followers]
            try:
                await until(lambda: all(f.epoch for f in followers), 5_000 * MS)
                n = 0
                acknowledged: list[int] = []

                async def write_some(count: int) -> None:
                    nonlocal n
                    for _ in range(count):
                        n += 1
                        with contextlib.suppress(httpx.HTTPError):
                            reply = await http.post(
                                f"http://{(one, two)[n % 2]}/write", json={"room": "r", "n": n}
                            )
                            if reply.status_code == 200:
                                acknowledged.append(n)

                await write_some(40)
                # Kill both processes' listening connections while writes go on.
                pids = [
                    (await http.get(f"http://{h}/health")).json()["backend"]["listener_pid"]
                    for h in (one, two)
                ]
                assert all(pids)
                killer = await asyncpg.connect(cluster.url)
                try:
                    writing = asyncio.create_task(write_some(40))
                    await asyncio.sleep(0.05)
                    assert await killer.fetch(
                        "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", pids
                    )
                    await writing
                finally:
                    await killer.close()
                await until(lambda: all(len(f.received) >= len(acknowledged) for f in followers), 10_000 * MS)
                # Restart PostgreSQL mid-stream: writes fail while it is down, and go on after.
                writing = asyncio.create_task(write_some(80))
                await asyncio.sleep(0.1)
                await asyncio.to_thread(cluster.stop, "fast")
                await asyncio.sleep(0.5)
                await asyncio.to_thread(cluster.start)
                await writing
                await write_some(20)
                order = await commit_order(cluster.url)
                assert set(acknowledged) <= set(order)
                assert len(acknowledged) >= 100  # most writes went through

                def caught_up() -> bool:
                    return all(len(f.received) >= len(order) for f in followers)

                await until(caught_up, 20_000 * MS)
                for follower in followers:
                    assert follower.resyncs == []
                    assert [m["seq"] for m in follower.received] == list(range(1, len(order) + 1))
                    assert [m["n"] for m in follower.received] == order
                stats = [(await http.get(f"http://{h}/health")).json() for h in (one, two)]
                assert all(s["backend"]["reconnects"] >= 2 for s in stats), stats
                assert all(s["backend"]["state"] == "connected" for s in stats)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


async def test_two_processes_of_the_example_service_share_a_restaurant_with_no_outbox(
    postgres_url: str, postgres_schema: str
) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{postgres_schema}"')
    finally:
        await conn.close()
    database = postgres_url.replace("postgresql://", "postgresql+asyncpg://")
    env = {
        "DATABASE_URL": f"{database}?search_path={postgres_schema}",
        "BROADCAST_URL": f"{postgres_url}?schema={postgres_schema}",
        "LOG_LEVEL": "WARNING",
        "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED": "1",
    }
    rid = "pg-test-restaurant"
    async with (
        server_process("-m", "examples.restaurant_app", env=env) as server_one,
        server_process("-m", "examples.restaurant_app", env=env) as server_two,
        httpx.AsyncClient(timeout=30) as http,
    ):
        one, two = server_one.host, server_two.host
        health = (await http.get(f"http://{one}/health")).json()
        assert "outbox" not in health, health  # events commit with the writes: no outbox, no relay
        devices = [await connect(f"ws://{host}/realtime?restaurant_id={rid}") for host in (one, two)]
        welcomes = [await recv_json(device) for device in devices]
        assert [w["seq"] for w in welcomes] == [0, 0]
        names = [f"Guest {n}" for n in range(40)]

        async def add(n: int) -> None:
            reply = await http.post(
                f"http://{(one, two)[n % 2]}/restaurants/{rid}/guests",
                json={"guestName": names[n], "partySize": 2},
            )
            assert reply.status_code == 201, reply.text

        for n in range(10):  # one after the other: in write order
            await add(n)
        await asyncio.gather(*(add(n) for n in range(10, 40)))  # concurrently, through both processes
        for device in devices:
            events = [await recv_json(device) for _ in names]
            assert [e["seq"] for e in events] == list(range(1, 41))
            assert [e["data"]["guestName"] for e in events[:10]] == names[:10]
            assert sorted(e["data"]["guestName"] for e in events) == sorted(names)
        for host in (one, two):
            snapshot = await http.get(f"http://{host}/restaurants/{rid}/guests")
            assert snapshot.headers["x-stream-epoch"] == welcomes[0]["epoch"]
            assert snapshot.headers["x-stream-seq"] == "40"
            assert len(snapshot.json()["guests"]) == 40
        for device in devices:
            await device.close()
