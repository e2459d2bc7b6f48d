"""Nothing lost between database and devices: the example service's outbox across a Redis outage.

Real processes: the service runs under uvicorn in a subprocess on a Redis of the test's own (persistent,
so that the channel's history survives the restart, as a production Redis would be configured).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from .redis_support import throwaway_server
from .support import MS, connect, recv_json, server_process, until

pytestmark = [pytest.mark.asyncio_only, pytest.mark.redis, pytest.mark.slow]

RID = "outbox-restaurant"


async def wait_until_relayed(http: httpx.AsyncClient, host: str) -> dict[str, Any]:
    health: dict[str, Any] = {}

    async def relayed() -> bool:
        nonlocal health
        health = (await http.get(f"http://{host}/health")).json()
        return bool(health["status"] == "ok" and health["outbox"]["pending"] == 0)

    await until(relayed, 30_000 * MS)
    return health


async def test_fifty_writes_during_an_outage_reach_a_resuming_client(tmp_path: Path) -> None:
    with throwaway_server(args=["--appendonly", "yes", "--appendfsync", "always"]) as redis_server:
        env = {
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'restaurant.db'}",
            "BROADCAST_URL": f"{redis_server.url}?timeout=1",
            "LOG_LEVEL": "WARNING",
            "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED": "1",
        }
        async with (
            server_process("-m", "examples.restaurant_app", env=env) as server,
            httpx.AsyncClient() as http,
        ):
            host = server.host
            base = f"http://{host}/restaurants/{RID}"
            ws = await connect(f"ws://{host}/realtime?restaurant_id={RID}")
            welcome = await recv_json(ws)
            epoch = welcome["epoch"]
            response = await http.post(f"{base}/guests", json={"guestName": "Before", "partySize": 2})
            assert response.status_code == 201
            before = await recv_json(ws)
            assert before["data"]["guestName"] == "Before"
            last_seq = before["seq"]
            await ws.close()

            redis_server.stop()
            names = [f"Guest {n}" for n in range(50)]
            for name in names:
                response = await http.post(f"{base}/guests", json={"guestName": name, "partySize": 2})
                assert response.status_code == 201, response.text
            health = (await http.get(f"http://{host}/health")).json()
            assert health["status"] == "degraded"
            assert health["outbox"]["pending"] == 50

            redis_server.start()
            await wait_until_relayed(http, host)

            ws = await connect(f"ws://{host}/realtime?restaurant_id={RID}&epoch={epoch}&last_seq={last_seq}")
            resumed = await recv_json(ws)
            assert (resumed["type"], resumed["resumed"], resumed["epoch"]) == ("welcome", True, epoch)
            events = [await recv_json(ws) for _ in names]
            assert [e["type"] for e in events] == ["guest_created"] * 50
            assert [e["data"]["guestName"] for e in events] == names
            assert [e["seq"] for e in events] == list(range(last_seq + 1, last_seq + 51))
            # Each once: the next frame after them is the answer to a ping.
            await ws.send('{"type": "ping"}')
            assert (await recv_json(ws))["type"] == "pong"
            await ws.close()


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
async def test_two_processes_prune_published_rows_under_writes_and_lose_no_event(
    database: str, request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    if database == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'restaurant.db'}"
    else:
        url, schema = request.getfixturevalue("postgres_url"), request.getfixturevalue("postgres_schema")
        connection = await asyncpg.connect(url, timeout=10)
        try:
            await connection.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await connection.close()
        database_url = f"{url}?search_path={schema}"
    separator = "&" if "?" in redis_url else "?"
    env = {
        "DATABASE_URL": database_url,
        "BROADCAST_URL": f"{redis_url}{separator}key_prefix={redis_prefix}&history_size=1000",
        "LOG_LEVEL": "WARNING",
        "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED": "1",
        "OUTBOX_RETENTION": "0",  # every published row is deleted at the next prune (once a second)
    }
    # Entered in order: A is up (its schema created) before B starts.
    async with (
        server_process("-m", "examples.restaurant_app", env=env) as server_a,
        server_process("-m", "examples.restaurant_app", env=env) as server_b,
        httpx.AsyncClient(timeout=30) as http,
    ):
        hosts = (server_a.host, server_b.host)
        devices = [await connect(f"ws://{host}/realtime?restaurant_id={RID}") for host in hosts]
        for ws in devices:
            assert (await recv_json(ws))["type"] == "welcome"

        async def write(host: str, label: str) -> list[str]:
            names = []
            for n in range(60):
                name = f"{label}-{n}"
                response = await http.post(
                    f"http://{host}/restaurants/{RID}/guests", json={"guestName": name, "partySize": 2}
                )
                assert response.status_code == 201, response.text
                names.append(name)
                if n % 20 == 19:
                    await asyncio.sleep(1.1)  # let a prune run between writes
            return names

        made = await asyncio.gather(write(hosts[0], "a"), write(hosts[1], "b"))
        for ws in devices:
            events = [await recv_json(ws, timeout=10) for _ in range(120)]
            assert [e["seq"] for e in events] == list(range(1, 121)), "gaps or repeats"
            seen = [e["data"]["guestName"] for e in events]
            for names in made:
                assert [name for name in seen if name[0] == names[0][0]] == names
            await ws.close()

        async def pruned() -> bool:
            outboxes = [(await http.get(f"http://{host}/health")).json()["outbox"] for host in hosts]
            return all(o["rows"] == 1 and o["pending"] == 0 for o in outboxes)

        await until(pruned, 15_000 * MS)
        outboxes = [(await http.get(f"http://{host}/health")).json()["outbox"] for host in hosts]
        assert sum(o["published"] for o in outboxes) == 120
        assert sum(o["pruned"] for o in outboxes) == 119
