"""Fixtures of the example service's suite: every test runs once on SQLite and once on PostgreSQL.

The service runs with a token secret, as in production: ``Running.http`` and ``Running.ws_url`` add a valid
token for the restaurant each request names, so the contract tests exercise the authenticated path; the
security tests send their own (or no) credentials.

PostgreSQL is taken from ``RTB_TEST_POSTGRES_URL``, else ``127.0.0.1:5432/test`` as ``postgres`` or
``root`` (trust auth). Each test gets its own schema, dropped afterwards. When PostgreSQL is not reachable
its tests are skipped, unless ``CI=true``: then they fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from examples.restaurant_app import Settings, create_app
from examples.restaurant_app.auth import mint_token
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

#: The token secret of the test services.
TEST_SECRET = "test-secret-0123456789abcdef0123456789abcdef"
#: Restaurant a token is minted for when a request names none (an atomic body without ``restaurant_id``).
FALLBACK_RESTAURANT = "r1"

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


#: id(engine) -> the ``postgresql://`` broadcast URL of a ``pg-broadcast`` engine (its own schema).
_BROADCAST_URLS: dict[int, str] = {}


@pytest.fixture(
    params=[
        pytest.param("sqlite"),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("pg-broadcast", marks=pytest.mark.postgresql),
    ],
)
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A database engine on an empty database: a SQLite file, or a fresh PostgreSQL schema.

    ``pg-broadcast`` is PostgreSQL too, and the services :func:`start_service` starts on it (with the
    default broadcaster) broadcast through the ``postgresql://`` backend on the same database: their
    writes publish inside their transactions, with no outbox.
    """
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
    if request.param == "pg-broadcast":
        plain = url.replace("postgresql+asyncpg://", "postgresql://")
        _BROADCAST_URLS[id(pg_engine)] = f"{plain}?schema={schema}"
    try:
        yield pg_engine
    finally:
        _BROADCAST_URLS.pop(id(pg_engine), None)
        await pg_engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


_RESTAURANT_PATH = re.compile(r"^/restaurants/([^/]+)")


def restaurant_of(request: httpx.Request) -> str | None:
    """The restaurant an HTTP request is about: from its path, or the atomic transaction's body."""
    match = _RESTAURANT_PATH.match(request.url.path)
    if match:
        return match.group(1)
    if request.url.path == "/transactions/atomic":
        try:
            body = json.loads(request.content)
        except ValueError:
            return FALLBACK_RESTAURANT
        restaurant = body.get("restaurant_id") if isinstance(body, dict) else None
        return restaurant if isinstance(restaurant, str) else FALLBACK_RESTAURANT
    return None


class DeviceAuth(httpx.Auth):
    """Adds ``Authorization: Bearer`` with a token for the restaurant the request names, unless the
    request sets its own ``Authorization`` header."""

    requires_request_body = True

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        restaurant = restaurant_of(request)
        if restaurant is not None and "authorization" not in request.headers:
            try:
                token = mint_token(self.secret, restaurant)
            except ValueError:  # not a valid restaurant id: any token will do, the route refuses it
                token = mint_token(self.secret, FALLBACK_RESTAURANT)
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


_AUTO: Any = object()


@dataclass
class Running:
    """A running service: its address, the app, its settings, and an HTTP client on it."""

    address: str
    app: FastAPI
    http: httpx.AsyncClient
    settings: Settings

    def token(self, restaurant_id: str, **options: Any) -> str:
        """A valid device token for ``restaurant_id`` (``mint_token`` options: ``ttl``, ``now``...)."""
        assert self.settings.token_secret is not None, "this service has no token secret"
        return mint_token(self.settings.token_secret, restaurant_id, **options)

    def ws_url(self, restaurant_id: str | None, *, token: str | None = _AUTO, **params: str | int) -> str:
        """URL of the realtime endpoint for ``restaurant_id`` (and resume parameters).

        ``token`` defaults to a valid one for ``restaurant_id`` when the service has a secret; ``None``
        leaves it out.
        """
        query = {"restaurant_id": restaurant_id} if restaurant_id is not None else {}
        query.update({name: str(value) for name, value in params.items()})
        if token is _AUTO:
            token = None
            if self.settings.token_secret is not None and restaurant_id is not None:
                with contextlib.suppress(ValueError):  # an invalid id: the endpoint refuses it first
                    token = self.token(restaurant_id)
        if token is not None:
            query["token"] = token
        return f"ws://{self.address}/realtime?{urlencode(query)}"


StartService = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_service(engine: AsyncEngine) -> AsyncIterator[StartService]:
    """Start the service on a real uvicorn server: ``await start_service(broadcaster=...)``."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            *, broadcaster: Broadcaster | None = None, settings: Settings | None = None
        ) -> Running:
            settings = settings or Settings(token_secret=TEST_SECRET)
            pg_broadcast = _BROADCAST_URLS.get(id(engine))
            if pg_broadcast is not None and broadcaster is None and settings.broadcast_url == "memory://":
                settings = dataclasses.replace(settings, broadcast_url=pg_broadcast)
            app = create_app(settings, engine=engine, broadcaster=broadcaster)
            address = await stack.enter_async_context(serve(app))
            auth = DeviceAuth(settings.token_secret) if settings.token_secret is not None else None
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://{address}", timeout=10, auth=auth)
            )
            return Running(address, app, http, settings)

        yield start


@pytest.fixture
async def service(start_service: StartService) -> Running:
    """The service on its default settings (memory backend), a token secret, and the test's database."""
    return await start_service()
