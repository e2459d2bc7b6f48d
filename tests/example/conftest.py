"""Fixtures of the example service's suite: every test runs once on SQLite and once on PostgreSQL.

PostgreSQL is taken from ``RTB_TEST_POSTGRES_URL``, else ``127.0.0.1:5432/test`` as ``postgres`` or
``root`` (trust auth). Each test gets its own schema, dropped afterwards. When PostgreSQL is not reachable
its tests are skipped, unless ``CI=true``: then they fail.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from examples.restaurant_app import Settings, create_app
from examples.restaurant_app.db import create_engine
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rtbroadcast import Broadcaster
from tests.support import serve

POSTGRES_CANDIDATES = (
    "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "postgresql+asyncpg://root@127.0.0.1:5432/test",
)

_postgres_probe: dict[str, str | None] = {}


async def _postgres_url() -> tuple[str | None, str]:
    """Return a PostgreSQL URL that accepts connections (probed once per session), and why not if none."""
    if "url" in _postgres_probe:
        return _postgres_probe["url"], _postgres_probe["error"] or ""
    configured = os.environ.get("RTB_TEST_POSTGRES_URL")
    candidates = (configured,) if configured else POSTGRES_CANDIDATES
    errors = []
    for url in candidates:
        engine = create_engine(url, connect_args={"timeout": 3})
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as exc:  # whatever the driver raises, this candidate is not usable
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
            continue
        finally:
            await engine.dispose()
        _postgres_probe.update(url=url, error=None)
        return url, ""
    _postgres_probe.update(url=None, error="; ".join(errors))
    return None, _postgres_probe["error"] or ""


@pytest.fixture(
    params=[pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgresql)],
)
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A database engine on an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        sqlite_engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'restaurant.db'}")
        yield sqlite_engine
        await sqlite_engine.dispose()
        return
    url, why = await _postgres_url()
    if url is None:
        message = f"PostgreSQL is not reachable ({why})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true requires it")
        pytest.skip(message)
    schema = f"rtb_example_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    async with admin.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    pg_engine = create_engine(url, connect_args={"server_settings": {"search_path": schema}})
    try:
        yield pg_engine
    finally:
        await pg_engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@dataclass
class Running:
    """A running service: its address, the app, and an HTTP client on it."""

    address: str
    app: FastAPI
    http: httpx.AsyncClient

    def ws_url(self, restaurant_id: str | None, **params: str | int) -> str:
        """URL of the realtime endpoint for ``restaurant_id`` (and resume parameters)."""
        query = {"restaurant_id": restaurant_id} if restaurant_id is not None else {}
        query.update({name: str(value) for name, value in params.items()})
        return f"ws://{self.address}/realtime?{urlencode(query)}"


StartService = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_service(engine: AsyncEngine) -> AsyncIterator[StartService]:
    """Start the service on a real uvicorn server: ``await start_service(broadcaster=...)``."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            *, broadcaster: Broadcaster | None = None, settings: Settings | None = None
        ) -> Running:
            app = create_app(settings or Settings(), engine=engine, broadcaster=broadcaster)
            address = await stack.enter_async_context(serve(app))
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://{address}", timeout=10)
            )
            return Running(address, app, http)

        yield start


@pytest.fixture
async def service(start_service: StartService) -> Running:
    """The service on its default settings (memory backend) and the test's database."""
    return await start_service()
