"""Nothing lost between database and devices: the example service's outbox across a Redis outage.

Real processes: the service runs under uvicorn in a subprocess on a Redis of the test's own (persistent,
so that the channel's history survives the restart, as a production Redis would be configured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
