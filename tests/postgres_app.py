"""A small service for the PostgreSQL cross-process tests: ``python -m uvicorn tests.postgres_app:app``.

Configured by the environment: ``RTB_PG_URL`` and ``RTB_PG_SCHEMA`` (both required; the schema holds the
backend's tables and the app's ``writes`` table). It mounts the broadcast WebSocket at ``/ws?room=...``;
``POST /write {"room", "n", "rollback", "hold_ms"}`` inserts ``n`` into ``writes`` and publishes it in the
same transaction, holds the transaction open ``hold_ms``, then commits it or rolls it back;
``GET /health`` reports the broadcaster's stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any, Literal

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, Event
from rtbroadcast.asgi import channel_from_query
from rtbroadcast.backends.postgres import PostgresBackend
from rtbroadcast.starlette import lifespan, websocket_route


class Written(Event):
    type: Literal["written"] = "written"
    n: int
    by: int


class RolledBack(Exception):
    """Raised inside the write's transaction to roll it back."""


PROCESS = os.getpid()
URL = os.environ["RTB_PG_URL"]
SCHEMA = os.environ["RTB_PG_SCHEMA"]

broadcaster = Broadcaster(backend=PostgresBackend(URL, schema=SCHEMA), position_check_interval=1.0)
state: dict[str, Any] = {}


@contextlib.asynccontextmanager
async def database(app: Starlette) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(URL, min_size=1, max_size=20)
    async with pool.acquire() as conn:
        await conn.execute(f'CREATE TABLE IF NOT EXISTS "{SCHEMA}".writes (n int PRIMARY KEY, by int)')
    state["pool"] = pool
    try:
        yield
    finally:
        await pool.close()


async def write(request: Request) -> JSONResponse:
    body = await request.json()
    pool: asyncpg.Pool = state["pool"]
    seq = None
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(f'INSERT INTO "{SCHEMA}".writes VALUES ($1, $2)', body["n"], PROCESS)
            seq = await broadcaster.publish(
                f"room:{body['room']}", Written(n=body["n"], by=PROCESS), transaction=conn
            )
            await asyncio.sleep(body.get("hold_ms", 0) / 1000)
            if body.get("rollback"):
                raise RolledBack
    except RolledBack:
        return JSONResponse({"seq": seq, "committed": False, "by": PROCESS})
    return JSONResponse({"seq": seq, "committed": True, "by": PROCESS})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": PROCESS, **broadcaster.stats()})


app = Starlette(
    routes=[
        websocket_route("/ws", broadcaster, channel=channel_from_query("room", prefix="room:")),
        Route("/write", write, methods=["POST"]),
        Route("/health", health),
    ],
    lifespan=lifespan(broadcaster, also=[database]),
)
