"""Tracing across processes: a publish in one uvicorn process, its delivery in another, through Redis,
Redis Cluster and PostgreSQL. The delivery span links to the publish span, once per envelope per process, and the
publish-to-write histogram of the delivering process moves. (One process: tests/test_tracing.py.)"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import pytest

from .support import MS, ServerProcess, connect, recv_json, server_process, until

pytestmark = [pytest.mark.asyncio_only, pytest.mark.slow]


def traced_process(backend_url: str) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    return server_process(
        "-m", "uvicorn", "tests.tracing_app:app", "--log-level", "warning",
        env={"RTB_TRACING_BACKEND": backend_url},
    )  # fmt: skip


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
    ]
)
def backend_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        return f"{url}{'&' if '?' in url else '?'}key_prefix={prefix}"
    if request.param == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        prefix = request.getfixturevalue("redis_cluster_prefix")
        return f"{cluster.url}/?key_prefix={prefix}"
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("postgres_schema")
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


async def spans(http: httpx.AsyncClient, host: str, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (await http.get(f"http://{host}/spans")).json()
    return [s for s in found if s["name"] == name]


async def test_the_delivery_span_of_another_process_links_to_the_publish_span(backend_url: str) -> None:
    # One after the other: on PostgreSQL the first creates the schema.
    async with (
        traced_process(backend_url) as server_one,
        traced_process(backend_url) as server_two,
        httpx.AsyncClient(timeout=10) as http,
    ):
        one, two = server_one.host, server_two.host
        clients = [await connect(f"ws://{two}/ws?room=r") for _ in range(3)]
        for ws in clients:
            assert (await recv_json(ws))["type"] == "welcome"
        published = [(await http.post(f"http://{one}/publish", json={"room": "r"})).json() for _ in range(3)]
        assert [p["seq"] for p in published] == [1, 2, 3]
        for ws in clients:
            events = [await recv_json(ws) for _ in range(3)]
            # Headers are for the servers: clients get the event as declared, plus seq.
            assert [e["seq"] for e in events] == [1, 2, 3]
            assert all(set(e) == {"type", "timestamp", "by", "seq"} for e in events)
        publishes = await spans(http, one, "publish room:r")
        assert [(s["kind"], s["attributes"]["messaging.rtbroadcast.message.seq"]) for s in publishes] == [
            ("PRODUCER", 1),
            ("PRODUCER", 2),
            ("PRODUCER", 3),
        ]

        async def delivered() -> bool:
            return len(await spans(http, two, "deliver room:r")) >= 3

        await until(delivered, 5_000 * MS)
        deliveries = await spans(http, two, "deliver room:r")
        # One span per envelope in the process that holds the connections (not one per connection)...
        assert [d["attributes"]["messaging.rtbroadcast.message.seq"] for d in deliveries] == [1, 2, 3]
        for publish, deliver in zip(publishes, deliveries, strict=True):
            assert deliver["kind"] == "CONSUMER" and deliver["parent"] is None
            assert deliver["links"] == [[publish["trace_id"], publish["span_id"]]]
            assert deliver["trace_id"] != publish["trace_id"]
            assert deliver["attributes"]["messaging.rtbroadcast.connections"] == 3
            assert deliver["attributes"]["messaging.system"] == "rtbroadcast"
            assert (
                deliver["attributes"]["messaging.rtbroadcast.message.epoch"]
                == publish["attributes"]["messaging.rtbroadcast.message.epoch"]
            )
        # ... and none in the publishing process, which has no connection on the channel.
        assert await spans(http, one, "deliver room:r") == []
        # The publish time came along: the process that delivered timed publish-to-write; the other did not.
        latency_two = (await http.get(f"http://{two}/latency")).json()
        assert latency_two["count"] == 3 and 0 <= latency_two["sum"] < 3 * 5.0
        assert (await http.get(f"http://{one}/latency")).json()["count"] == 0
        for ws in clients:
            await ws.close()
