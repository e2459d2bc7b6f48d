"""HTTP routes: guests, tables, atomic transactions and health. Writes go through the service layer."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from rtbroadcast import Broadcaster, BroadcasterState, ConfigurationError, RTBroadcastError, StreamPosition

from .asyncapi import document as asyncapi_document
from .auth import AccessPolicy, DeviceClaims, Forbidden, TokenError, require_restaurant
from .devices import send_device_message
from .schemas import (
    RESTAURANT_ID_PATTERN,
    AtomicRequest,
    AtomicResult,
    DeviceMessageCreate,
    DeviceMessageResult,
    EntityId,
    Guest,
    GuestCreate,
    GuestList,
    GuestStatus,
    GuestUpdate,
    NotFoundBody,
    OnlineDevice,
    OnlineDeviceList,
    Table,
    TableCreate,
    TableList,
    TableUpdate,
)
from .schemas import RestaurantId as RestaurantIdText
from .service import CHANNEL_PREFIX, RestaurantService, Snapshot, channel_for

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter()


def _service(request: Request) -> RestaurantService:
    service = request.app.state.service
    assert isinstance(service, RestaurantService), "create_app() sets app.state.service"
    return service


def _broadcaster(request: Request) -> Broadcaster:
    broadcaster = request.app.state.broadcaster
    assert isinstance(broadcaster, Broadcaster), "create_app() sets app.state.broadcaster"
    return broadcaster


Service = Annotated[RestaurantService, Depends(_service)]


# -- authorization: a device token bound to the restaurant ----------------------------------------------

_RESTAURANT_ID = re.compile(RESTAURANT_ID_PATTERN)
_bearer = HTTPBearer(
    auto_error=False,
    description="A device token (`python -m examples.restaurant_app token --restaurant RID`).",
)


def _unauthorized(reason: str) -> HTTPException:
    challenge = 'Bearer error="invalid_token"' if reason != "token required" else "Bearer"
    return HTTPException(401, reason, headers={"WWW-Authenticate": challenge})


async def _device(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> DeviceClaims | None:
    """The device the request's ``Authorization: Bearer`` token names (``None``: the mode needs none).

    Runs before the body is validated, so an unauthenticated request learns nothing but 401.
    """
    policy = request.app.state.access
    assert isinstance(policy, AccessPolicy), "create_app() sets app.state.access"
    try:
        return policy.authenticate(credentials.credentials if credentials is not None else None)
    except TokenError as exc:
        raise _unauthorized(exc.reason) from None


Device = Annotated[DeviceClaims | None, Depends(_device)]


def _check_restaurant(device: DeviceClaims | None, restaurant_id: str) -> None:
    try:
        require_restaurant(device, restaurant_id)
    except Forbidden as exc:
        raise HTTPException(403, exc.reason) from None


async def _restaurant_access(request: Request, device: Device) -> None:
    """Refuse (403) a token bound to another restaurant than the path's ``restaurant_id``.

    A malformed id names no restaurant: it is left to the path's validation (422).
    """
    restaurant_id = request.path_params["restaurant_id"]
    if _RESTAURANT_ID.fullmatch(restaurant_id) is not None:
        _check_restaurant(device, restaurant_id)


_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No token, or an invalid or expired one (when a secret is configured)."},
    403: {"description": "The token is bound to another restaurant."},
    503: {
        "description": "The database could not complete the request in time (a lock held past "
        "``lock_timeout``, a session ended while stalled); nothing was changed: retry after Retry-After."
    },
}
#: Every route under ``/restaurants/{restaurant_id}``, reads included (the lists hold guests' names and
#: phone numbers); included into ``router`` at the end of the module.
restaurants = APIRouter(dependencies=[Depends(_restaurant_access)], responses=_AUTH_RESPONSES)
RestaurantId = Annotated[RestaurantIdText, Path(description="Letters, digits, '_' and '-'; 1 to 64.")]
# An id that cannot exist is refused (422) before any query: a NUL in a path reaches no database.
GuestId = Annotated[EntityId, Path(description="A guest's id: letters, digits, '_' and '-'; 1 to 48.")]
TableId = Annotated[EntityId, Path(description="A table's id: letters, digits, '_' and '-'; 1 to 48.")]
IfNoneMatch = Annotated[str | None, Header(description="ETag of the list the client already has.")]

_SNAPSHOT_RESPONSES: dict[int | str, dict[str, Any]] = {
    304: {"description": "The list has not changed since the ETag in If-None-Match."}
}
#: Every route that reads a JSON body (the 422 of a body that fails validation FastAPI lists itself).
_BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "The body could not be parsed: not UTF-8, or a number of more than 4300 digits."},
    413: {"description": "The body is larger than the service's MAX_BODY_SIZE (default 1 MiB)."},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": NotFoundBody, "description": "The restaurant has no guest or table with that id."}
}


# -- snapshots: ETag, If-None-Match and the stream position they reflect ----------------------------


def _position_headers(position: StreamPosition | None) -> dict[str, str]:
    if position is None:
        return {}
    return {"X-Stream-Epoch": position.epoch, "X-Stream-Seq": str(position.seq)}


def _etag_matches(header: str | None, etag: str) -> bool:
    """Weak comparison, as RFC 9110 prescribes for If-None-Match."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == etag for candidate in header.split(","))


def _snapshot_response(snapshot: Snapshot[Any], if_none_match: str | None, body: BaseModel) -> Response:
    headers = {
        "ETag": snapshot.etag,
        # Caches may keep the list but must revalidate it every time: it changes whenever anyone writes.
        "Cache-Control": "no-cache",
        **_position_headers(snapshot.position),
    }
    if _etag_matches(if_none_match, snapshot.etag):
        return Response(status_code=304, headers=headers)
    return JSONResponse(body.model_dump(mode="json", by_alias=True), headers=headers)


# -- guests -----------------------------------------------------------------------------------------


@restaurants.post(
    "/restaurants/{restaurant_id}/guests", status_code=201, responses=_BODY_RESPONSES, tags=["guests"]
)
async def create_guest(restaurant_id: RestaurantId, body: GuestCreate, service: Service) -> Guest:
    """Add a guest to the waitlist (status ``waiting``); broadcasts ``guest_created``."""
    return await service.create_guest(restaurant_id, body)


@restaurants.get(
    "/restaurants/{restaurant_id}/guests",
    response_model=GuestList,
    responses=_SNAPSHOT_RESPONSES,
    tags=["guests"],
)
async def list_guests(
    restaurant_id: RestaurantId,
    service: Service,
    status: GuestStatus | None = None,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """List the guests, oldest first; ``epoch`` and ``seq`` say which stream position the list reflects."""
    snapshot = await service.list_guests(restaurant_id, status)
    position = snapshot.position
    body = GuestList(
        restaurant_id=restaurant_id,
        epoch=position.epoch if position else None,
        seq=position.seq if position else None,
        guests=snapshot.items,
    )
    return _snapshot_response(snapshot, if_none_match, body)


@restaurants.get("/restaurants/{restaurant_id}/guests/{guest_id}", responses=_NOT_FOUND, tags=["guests"])
async def get_guest(
    restaurant_id: RestaurantId, guest_id: GuestId, service: Service, response: Response
) -> Guest:
    """Return one guest."""
    guest, position = await service.get_guest(restaurant_id, guest_id)
    response.headers.update(_position_headers(position))
    return guest


@restaurants.put(
    "/restaurants/{restaurant_id}/guests/{guest_id}",
    responses={**_NOT_FOUND, **_BODY_RESPONSES},
    tags=["guests"],
)
async def update_guest(
    restaurant_id: RestaurantId, guest_id: GuestId, body: GuestUpdate, service: Service
) -> Guest:
    """Change the fields sent; broadcasts ``guest_updated`` when something changed."""
    return await service.update_guest(restaurant_id, guest_id, body)


@restaurants.delete(
    "/restaurants/{restaurant_id}/guests/{guest_id}", status_code=204, responses=_NOT_FOUND, tags=["guests"]
)
async def delete_guest(restaurant_id: RestaurantId, guest_id: GuestId, service: Service) -> Response:
    """Remove a guest; broadcasts ``guest_deleted`` (and ``table_updated`` for a table it was at)."""
    await service.delete_guest(restaurant_id, guest_id)
    return Response(status_code=204)


# -- tables -----------------------------------------------------------------------------------------


@restaurants.post(
    "/restaurants/{restaurant_id}/tables", status_code=201, responses=_BODY_RESPONSES, tags=["tables"]
)
async def create_table(restaurant_id: RestaurantId, body: TableCreate, service: Service) -> Table:
    """Add a table (status ``available``); broadcasts ``table_created``."""
    return await service.create_table(restaurant_id, body)


@restaurants.get(
    "/restaurants/{restaurant_id}/tables",
    response_model=TableList,
    responses=_SNAPSHOT_RESPONSES,
    tags=["tables"],
)
async def list_tables(
    restaurant_id: RestaurantId, service: Service, if_none_match: IfNoneMatch = None
) -> Response:
    """List the tables, oldest first; ``epoch`` and ``seq`` say which stream position the list reflects."""
    snapshot = await service.list_tables(restaurant_id)
    position = snapshot.position
    body = TableList(
        restaurant_id=restaurant_id,
        epoch=position.epoch if position else None,
        seq=position.seq if position else None,
        tables=snapshot.items,
    )
    return _snapshot_response(snapshot, if_none_match, body)


@restaurants.get("/restaurants/{restaurant_id}/tables/{table_id}", responses=_NOT_FOUND, tags=["tables"])
async def get_table(
    restaurant_id: RestaurantId, table_id: TableId, service: Service, response: Response
) -> Table:
    """Return one table."""
    table, position = await service.get_table(restaurant_id, table_id)
    response.headers.update(_position_headers(position))
    return table


@restaurants.put(
    "/restaurants/{restaurant_id}/tables/{table_id}",
    responses={**_NOT_FOUND, **_BODY_RESPONSES},
    tags=["tables"],
)
async def update_table(
    restaurant_id: RestaurantId, table_id: TableId, body: TableUpdate, service: Service
) -> Table:
    """Change the fields sent; broadcasts ``table_updated`` when something changed."""
    return await service.update_table(restaurant_id, table_id, body)


# -- devices: who is online, direct messages ----------------------------------------------------------

DeviceId = Annotated[
    EntityId, Path(description="A device's id (its token's `sub`): letters, digits, '_' and '-'.")
]


@restaurants.get(
    "/restaurants/{restaurant_id}/devices",
    tags=["devices"],
    responses={
        404: {"description": "This service runs without presence (its broadcast backend keeps none)."},
        503: {"description": "The broadcast backend is down."},
    },
)
async def online_devices(restaurant_id: RestaurantId, request: Request) -> OnlineDeviceList:
    """List the devices connected to the restaurant's channel (presence: protocol-2 connections).

    Each entry is one subscription, named from its token (``device``, ``name``), never by the client.
    At most 100 are listed (``count`` is the full count, ``truncated`` says so).
    """
    try:
        snapshot = await _broadcaster(request).presence(channel_for(restaurant_id))
    except ConfigurationError:
        raise HTTPException(
            404, "this service runs without presence: its broadcast backend keeps none"
        ) from None
    except RTBroadcastError as exc:
        raise HTTPException(503, f"presence unavailable: {exc}") from None
    devices = [
        OnlineDevice(
            device=member.identity,
            name=_text(member.info.get("name")),
            connection=member.client,
        )
        for member in snapshot.members
    ]
    return OnlineDeviceList(
        restaurant_id=restaurant_id, count=snapshot.count, devices=devices, truncated=snapshot.truncated
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


@restaurants.post(
    "/restaurants/{restaurant_id}/devices/{device_id}/messages",
    status_code=202,
    tags=["devices"],
    responses={
        **_BODY_RESPONSES,
        503: {"description": "The broadcast backend is down: nothing was sent; retry."},
    },
)
async def send_message(
    restaurant_id: RestaurantId,
    device_id: DeviceId,
    body: DeviceMessageCreate,
    request: Request,
    device: Device,
) -> DeviceMessageResult:
    """Send a direct message to one device of the restaurant (e.g. from the manager's device).

    Published as ``device_message`` on the device's own channel ``device:<restaurant_id>:<device_id>``,
    which the device receives over protocol 2 (and on resume, from the channel's history, if it was
    offline briefly). ``sender`` is the id of the token that sent it. Accepted (202) whether or not the
    device is connected.
    """
    try:
        channel, seq = await send_device_message(
            _broadcaster(request),
            restaurant_id,
            device_id,
            body.text,
            sender=device.device_id if device is not None else None,
        )
    except RTBroadcastError as exc:
        logger.warning("device message to %s (restaurant %s) not sent: %s", device_id, restaurant_id, exc)
        raise HTTPException(
            503, "the broadcast backend is unavailable; nothing was sent", headers={"Retry-After": "1"}
        ) from None
    return DeviceMessageResult(channel=channel, seq=seq)


router.include_router(restaurants)


# -- atomic transactions ------------------------------------------------------------------------------


@router.post(
    "/transactions/atomic",
    tags=["transactions"],
    responses={**_AUTH_RESPONSES, **_NOT_FOUND, **_BODY_RESPONSES},
)
async def atomic_transaction(body: AtomicRequest, service: Service, device: Device) -> AtomicResult:
    """Apply the operations in one database transaction, all or none.

    Broadcasts one ``atomic_transaction_complete`` on success. An operation naming an unknown id fails
    the whole transaction with 404 and its ``operation_index``; nothing is written or broadcast.
    """
    _check_restaurant(device, body.restaurant_id)
    return await service.run_atomic(body.restaurant_id, body.operations)


# -- health -------------------------------------------------------------------------------------------


@router.get("/asyncapi.json", tags=["operations"])
async def asyncapi(request: Request) -> JSONResponse:
    """Return the AsyncAPI 3.0 document of the realtime channel: every message, with JSON Schemas."""
    scheme = "wss" if request.url.scheme == "https" else "ws"
    return JSONResponse(asyncapi_document(f"{scheme}://{request.url.netloc}"))


@router.get(
    "/health",
    tags=["operations"],
    responses={503: {"description": "The database is down (``status`` is ``unhealthy``)."}},
)
async def health(request: Request, service: Service) -> JSONResponse:
    """Report the database, the broadcast backend and the realtime connections.

    ``status`` is ``ok``, ``degraded`` (the broadcast backend is down: writes still succeed, clients
    miss events until it is back) or ``unhealthy`` (the database is down; HTTP 503).
    """
    broadcaster = _broadcaster(request)
    stats = broadcaster.stats()
    database: dict[str, object] = {"status": "ok", "dialect": service.engine.dialect.name}
    try:
        async with asyncio.timeout(5):
            await service.check_database()
    except Exception as exc:  # any failure means the same thing here: the database cannot serve
        logger.warning("health check: database unavailable: %r", exc)
        database.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
    backend_up = stats.backend_available and stats.state is BroadcasterState.CONNECTED
    restaurants = {
        channel.removeprefix(CHANNEL_PREFIX): count
        for channel, count in stats.channels.items()
        if channel.startswith(CHANNEL_PREFIX)
    }
    if database["status"] != "ok":
        status = "unhealthy"
    elif not backend_up:
        status = "degraded"
    else:
        status = "ok"
    access = request.app.state.access
    body = {
        "status": status,
        "auth": access.mode if isinstance(access, AccessPolicy) else None,
        "backend": {
            "name": stats.backend_name,
            "available": backend_up,
            "state": stats.state.value,
        },
        "database": database,
        "websocket": {
            "total_connections": stats.connections,
            "restaurants": restaurants,
            "messages_sent": stats.messages_sent,
            "messages_dropped": stats.messages_dropped,
        },
    }
    outbox = getattr(request.app.state, "outbox", None)
    if outbox is not None:
        body["outbox"] = {
            "pending": await outbox.pending(),
            "rows": await outbox.size(),
            "published": outbox.published,
            "pruned": outbox.pruned,
            "backend_outage": outbox.outage_since is not None,
        }
    return JSONResponse(body, status_code=503 if status == "unhealthy" else 200)
