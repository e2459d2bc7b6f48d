"""Scale-out: two uvicorn processes share channels through one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from .redis_support import free_port
from .support import connect, recv_json

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def uvicorn_process(redis_url: str, prefix: str) -> AsyncIterator[str]:
    """Run ``tests.redis_app`` in its own uvicorn process; yield its ``host:port`` once it serves."""
    port = free_port()
    env = {**os.environ, "RTB_REDIS_URL": redis_url, "RTB_KEY_PREFIX": prefix}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "tests.redis_app:app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        cwd=ROOT, env=env,
    )  # fmt: skip
    host = f"127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http, asyncio.timeout(15):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"uvicorn exited with {process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"http://{host}/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield host
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_a_write_through_one_process_reaches_clients_of_the_other(
    redis_url: str, redis_prefix: str
) -> None:
    async with (
        uvicorn_process(redis_url, redis_prefix) as one,
        uvicorn_process(redis_url, redis_prefix) as two,
        httpx.AsyncClient() as http,
    ):
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
