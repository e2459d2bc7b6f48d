"""The application factory: FastAPI routes, the realtime endpoint and the lifespan that ties them up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException
from starlette.routing import Route, WebSocketRoute

from rtbroadcast import Broadcaster
from rtbroadcast.asgi import BroadcastEndpoint
from rtbroadcast.backends import load_backend
from rtbroadcast.starlette import lifespan

from . import api
from .auth import AccessPolicy
from .config import Settings
from .db import create_engine, create_schema
from .devices import RealtimeAccess
from .limits import RequestBodyLimit, validation_error_response
from .outbox import TransactionalOutbox
from .schemas import TableCreate
from .service import (
    CHANNEL_PREFIX,
    EventDispatcher,
    NotFound,
    PublishInTransaction,
    RestaurantService,
    channel_for,
)

__all__ = ["DEMO_RESTAURANT_ID", "DEMO_TABLES", "create_app", "publishes_in_transaction"]

logger = logging.getLogger(__name__)

#: The restaurant ``--demo`` seeds, as in the reference.
DEMO_RESTAURANT_ID = "test-restaurant-1"
#: Its tables: (name, capacity).
DEMO_TABLES: tuple[tuple[str, int], ...] = (("T1", 2), ("T2", 2), ("T3", 4), ("T4", 4), ("T5", 6), ("T6", 8))
#: The host-stand page's HTML, CSS and JavaScript, served under ``/host-stand/``.
STATIC_DIR = Path(__file__).parent / "static"


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

    Raises:
        ValueError: the settings configure neither ``token_secret`` nor ``allow_legacy_unauthenticated``
            (``python -m examples.restaurant_app --demo`` generates a secret when none is set).
    """
    settings = settings or Settings.from_env()
    access = AccessPolicy(settings)
    _log_access_mode(settings)
    owns_engine = engine is None
    database = engine if engine is not None else create_engine(settings.database_url)
    if broadcaster is None:
        # Who is online at a restaurant (protocol 1 never sees it), where the backend keeps presence:
        # memory and Redis do, PostgreSQL and Redis Cluster do not (the page then says so).
        backend = load_backend(settings.broadcast_url)
        broadcaster = Broadcaster(
            backend=backend,
            heartbeat_interval=settings.heartbeat_interval,
            presence=(CHANNEL_PREFIX,) if backend.supports_presence else None,
        )
    outbox: TransactionalOutbox | None = None
    dispatcher: EventDispatcher | None = None
    if publishes_in_transaction(settings.broadcast_url, database):
        # Events commit with the writes, in commit order: no outbox needed.
        dispatcher = PublishInTransaction(broadcaster)
    elif settings.outbox:
        dispatcher = outbox = TransactionalOutbox(
            database, broadcaster, channel_for=channel_for, retention=settings.outbox_retention
        )
    service = RestaurantService(database, broadcaster, dispatcher=dispatcher)

    @asynccontextmanager
    async def storage(app: FastAPI) -> AsyncIterator[None]:
        # Entered after the broadcaster connected, so that seeding can broadcast.
        await create_schema(database)
        relay = asyncio.get_running_loop().create_task(outbox.run()) if outbox is not None else None
        if settings.demo:
            created = await service.seed_tables(
                DEMO_RESTAURANT_ID, (TableCreate(name=name, capacity=size) for name, size in DEMO_TABLES)
            )
            logger.info("demo restaurant %s ready (%d tables created)", DEMO_RESTAURANT_ID, created)
        try:
            yield
        finally:
            if relay is not None:
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
            if owns_engine:
                await database.dispose()

    app = FastAPI(
        title="rtbroadcast example: restaurant service",
        summary="Guests, tables and atomic transactions, broadcast to every device of a restaurant.",
        lifespan=lifespan(broadcaster, also=[storage]),
    )
    app.state.service = service
    app.state.broadcaster = broadcaster
    app.state.outbox = outbox
    app.state.access = access
    app.include_router(api.router)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_middleware(RequestBodyLimit, max_body_size=settings.max_body_size)
    app.add_api_route("/", _to_host_stand, include_in_schema=False)
    if settings.metrics:
        app.add_api_route("/metrics", _metrics_endpoint(broadcaster), include_in_schema=False)
    app.mount("/host-stand", StaticFiles(directory=STATIC_DIR, html=True), name="host-stand")
    # The library closes a connection when its token expires (the identity's expires_at). Protocol 1:
    # ?restaurant_id= names the one channel; protocol 2: see devices.py (presence, the device channel).
    devices = RealtimeAccess(access)
    realtime = BroadcastEndpoint(
        broadcaster,
        devices.channel,
        authenticate=devices.authenticate,
        authorize=devices.authorize,
        allowed_origins=settings.allowed_origins,
    )
    app.router.routes.extend(
        [WebSocketRoute("/realtime", realtime), Route("/realtime/sse", realtime, methods=["GET"])]
    )
    return app


def publishes_in_transaction(broadcast_url: str, engine: AsyncEngine) -> bool:
    """Whether writes publish inside their own transaction: a ``postgresql://`` broadcast backend on the
    service's own PostgreSQL database.

    Raises:
        ValueError: the broadcast backend is on PostgreSQL but not on the service's database (its events
            could not commit with the writes).
    """
    if urlsplit(broadcast_url).scheme not in ("postgresql", "postgres"):
        return False
    if engine.dialect.name != "postgresql":
        raise ValueError(
            "BROADCAST_URL is a PostgreSQL database but DATABASE_URL is not: put both on the same "
            "PostgreSQL database (events then commit with the writes), or use memory:// or redis://"
        )
    broadcast = make_url(broadcast_url)
    database = engine.url

    def where(url: URL) -> tuple[str, int, str | None]:
        return (url.host or "localhost", url.port or 5432, url.database)

    if where(broadcast) != where(database):
        raise ValueError(
            f"BROADCAST_URL names PostgreSQL database {where(broadcast)} but DATABASE_URL {where(database)}: "
            "the broadcast backend must be on the service's own database, so that events commit with the "
            "writes"
        )
    return True


def _log_access_mode(settings: Settings) -> None:
    mode = settings.auth_mode
    if mode == "open":
        logger.warning(
            "AUTHENTICATION DISABLED: RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED is set and no "
            "RESTAURANT_TOKEN_SECRET; anyone who can reach this service can read and change every "
            "restaurant's data"
        )
    elif mode == "tokens+legacy":
        logger.warning(
            "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED is set: requests WITHOUT a device token are accepted "
            "(bare /realtime?restaurant_id=... URLs); anyone who knows a restaurant id can read and change "
            "its data. Turn it off once every device sends a token"
        )
    else:
        logger.info("device tokens required on /realtime and /restaurants/...")
    if settings.allowed_origins is not None:
        logger.info("WebSocket origins allowed: %s", ", ".join(settings.allowed_origins))


def _metrics_endpoint(broadcaster: Broadcaster) -> Callable[[], Awaitable[Response]]:
    """Serve the broadcaster's Prometheus metrics (imported here: only a service that enables them pays)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    from rtbroadcast.metrics import PrometheusMetrics

    # A registry per app, so that tests (and reloads) can build several apps in one process.
    registry = CollectorRegistry()
    PrometheusMetrics(broadcaster, registry=registry)

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


async def _to_host_stand(request: Request) -> RedirectResponse:
    # The host-stand page reads ?restaurant_id= (and ?token=) itself: keep the query.
    query = request.url.query
    return RedirectResponse(f"/host-stand/{'?' + query if query else ''}", status_code=307)


_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _documented_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI document lists for the path template that ``path`` matches."""
    for template, operations in app.openapi()["paths"].items():
        parts = re.split(r"(\{[^}]+\})", template)
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
        if re.fullmatch(pattern, path):
            return sorted(method.upper() for method in operations if method in _HTTP_METHODS)
    return []


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405 and (methods := _documented_methods(request.app, request.url.path)):
        # The router names the methods of one route only (GET of "/guests/{id}", not its PUT and
        # DELETE); RFC 9110 wants every method of the resource in Allow: the document has them all.
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(methods)}
    return await http_exception_handler(request, exc)


#: SQLSTATEs of a write that may succeed if sent again: a lock not had within ``lock_timeout``, a session
#: ended by ``idle_in_transaction_session_timeout`` (this process stalled in its transaction), a statement
#: over ``statement_timeout``, a server shutting down, a serialisation failure or deadlock.
RETRYABLE_SQLSTATES = frozenset({"55P03", "25P03", "57014", "57P01", "40001", "40P01"})


async def _database_error(request: Request, exc: Exception) -> Response:
    """Answer 503 with ``Retry-After`` for a database error that a retry may not meet; re-raise others."""
    assert isinstance(exc, DBAPIError)
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if not exc.connection_invalidated and sqlstate not in RETRYABLE_SQLSTATES:
        raise exc
    logger.warning(
        "%s %s: database unavailable (%s): %s", request.method, request.url.path, sqlstate, exc.orig
    )
    # Nothing of the write was committed: the transaction was rolled back with its outbox rows.
    return JSONResponse(
        {"detail": "The database could not complete the request in time; nothing was changed. Retry."},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotFound)
    body: dict[str, object] = {"detail": exc.message, "entity": exc.kind, "id": exc.entity_id}
    if exc.operation_index is not None:
        body["operation_index"] = exc.operation_index
    return JSONResponse(body, status_code=404)
