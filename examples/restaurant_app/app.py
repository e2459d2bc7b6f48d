"""The application factory: FastAPI routes, the realtime endpoint and the lifespan that ties them up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncEngine

from rtbroadcast import Broadcaster
from rtbroadcast.asgi import channel_from_query
from rtbroadcast.starlette import broadcast_routes, lifespan

from . import api
from .config import Settings
from .db import create_engine, create_schema
from .schemas import RESTAURANT_ID_PATTERN, TableCreate
from .service import CHANNEL_PREFIX, NotFound, RestaurantService

__all__ = ["DEMO_RESTAURANT_ID", "DEMO_TABLES", "create_app"]

logger = logging.getLogger(__name__)

#: The restaurant ``--demo`` seeds, as in the reference.
DEMO_RESTAURANT_ID = "test-restaurant-1"
#: Its tables: (name, capacity).
DEMO_TABLES: tuple[tuple[str, int], ...] = (("T1", 2), ("T2", 2), ("T3", 4), ("T4", 4), ("T5", 6), ("T6", 8))


def create_app(
    settings: Settings | None = None,
    *,
    engine: AsyncEngine | None = None,
    broadcaster: Broadcaster | None = None,
) -> FastAPI:
    """Build the restaurant service.

    Args:
        settings: configuration; read from the environment when omitted.
        engine: a database engine to use instead of one built from ``settings.database_url`` (the caller
            then disposes it).
        broadcaster: a broadcaster to use instead of one built from ``settings.broadcast_url``.

    With uvicorn directly: ``uvicorn --factory examples.restaurant_app:create_app``.
    """
    settings = settings or Settings.from_env()
    owns_engine = engine is None
    database = engine if engine is not None else create_engine(settings.database_url)
    if broadcaster is None:
        broadcaster = Broadcaster(settings.broadcast_url, heartbeat_interval=settings.heartbeat_interval)
    service = RestaurantService(database, broadcaster)

    @asynccontextmanager
    async def storage(app: FastAPI) -> AsyncIterator[None]:
        # Entered after the broadcaster connected, so that seeding can broadcast.
        await create_schema(database)
        if settings.demo:
            created = await service.seed_tables(
                DEMO_RESTAURANT_ID, (TableCreate(name=name, capacity=size) for name, size in DEMO_TABLES)
            )
            logger.info("demo restaurant %s ready (%d tables created)", DEMO_RESTAURANT_ID, created)
        try:
            yield
        finally:
            if owns_engine:
                await database.dispose()

    app = FastAPI(
        title="rtbroadcast example: restaurant service",
        summary="Guests, tables and atomic transactions, broadcast to every device of a restaurant.",
        lifespan=lifespan(broadcaster, also=[storage]),
    )
    app.state.service = service
    app.state.broadcaster = broadcaster
    app.include_router(api.router)
    app.add_exception_handler(NotFound, _not_found)
    app.router.routes.extend(
        broadcast_routes(
            "/realtime",
            broadcaster,
            channel=channel_from_query("restaurant_id", prefix=CHANNEL_PREFIX, pattern=RESTAURANT_ID_PATTERN),
        )
    )
    return app


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotFound)
    body: dict[str, object] = {"detail": exc.message, "entity": exc.kind, "id": exc.entity_id}
    if exc.operation_index is not None:
        body["operation_index"] = exc.operation_index
    return JSONResponse(body, status_code=404)
