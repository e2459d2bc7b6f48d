"""The restaurant page for client developers: its reference client and its AsyncAPI document, checked
against the real example service (SQLite, real sockets)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from examples.restaurant_app import Settings, create_app
from examples.restaurant_app.auth import mint_token
from examples.restaurant_app.db import create_engine

from rtbroadcast import Broadcaster, CloseCode

from .asyncapi_support import asyncapi_errors
from .support import MS, connect, recv_json, serve, until
from .test_docs_snippets import DOCS, docs_hooks, snippet

RID = "docs-restaurant"
SECRET = "docs-test-secret-that-is-at-least-32-bytes-long"
TOKEN = mint_token(SECRET, RID, device_id="docs-test")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[str, Broadcaster]]:
    """The example service on a SQLite file, with a small history so that a resync can be provoked."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'restaurant.db'}")
    broadcaster = Broadcaster("memory://?history_size=5")
    settings = Settings(token_secret=SECRET)
    try:
        async with serve(create_app(settings, engine=engine, broadcaster=broadcaster)) as host:
            yield f"http://{host}", broadcaster
    finally:
        await engine.dispose()


def _keep(entity: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: entity.get(name) for name in fields}


async def _server_state(http: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    guests = (await http.get(f"/restaurants/{RID}/guests")).json()["guests"]
    tables = (await http.get(f"/restaurants/{RID}/tables")).json()["tables"]
    return {g["id"]: g for g in guests}, {t["id"]: t for t in tables}


async def _assert_in_sync(client: Any, http: httpx.AsyncClient) -> None:
    """Wait until the client's guests and tables equal the server's (events go out through the outbox)."""
    guest_fields = ("id", "guestName", "partySize", "status", "table_id")
    table_fields = ("id", "name", "capacity", "status", "guest_id")

    def views(guests: dict[str, Any], tables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            {k: _keep(v, guest_fields) for k, v in guests.items()},
            {k: _keep(v, table_fields) for k, v in tables.items()},
        )

    server = views(*await _server_state(http))

    async def in_sync() -> bool:
        nonlocal server
        server = views(*await _server_state(http))
        return views(client.guests, client.tables) == server

    try:
        await until(in_sync, 10_000 * MS)
    except AssertionError:
        assert views(client.guests, client.tables) == server  # the difference, in pytest's words
        raise


async def test_reference_client_stays_in_sync_through_drops_and_resyncs(
    running: tuple[str, Broadcaster],
) -> None:
    base, broadcaster = running
    client = snippet("restaurant_client").RestaurantClient(base, RID, TOKEN)
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=AUTH) as http:
        table = (await http.post(f"/restaurants/{RID}/tables", json={"name": "T1", "capacity": 4})).json()
        await http.post(f"/restaurants/{RID}/guests", json={"guestName": "Ada", "partySize": 2})
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await until(lambda: broadcaster.connection_count(f"restaurant:{RID}") == 1, 10_000 * MS)
            guest = (
                await http.post(f"/restaurants/{RID}/guests", json={"guestName": "Bo", "partySize": 4})
            ).json()
            await http.put(f"/restaurants/{RID}/guests/{guest['id']}", json={"status": "notified"})
            operations = [
                {"op": "update_guest", "guest_id": guest["id"], "changes": {"status": "seated", "table_id": table["id"]}},
                {"op": "update_table", "table_id": table["id"], "changes": {"status": "occupied", "guest_id": guest["id"]}},
            ]  # fmt: skip
            reply = await http.post(
                "/transactions/atomic", json={"restaurant_id": RID, "operations": operations}
            )
            assert reply.status_code == 200, reply.text
            await _assert_in_sync(client, http)
            assert client.guests[guest["id"]]["status"] == "seated"  # learnt by reloading the entities

            for connection in list(broadcaster.registry):  # a dropped connection: resumed from history
                connection.close(CloseCode.SLOW_CONSUMER, "test")
            await http.delete(f"/restaurants/{RID}/guests/{guest['id']}")
            await _assert_in_sync(client, http)
            assert client.snapshots == 1

            for connection in list(broadcaster.registry):  # more missed than history holds: resync
                connection.close(CloseCode.GOING_AWAY, "test")
            for n in range(8):
                await http.post(f"/restaurants/{RID}/tables", json={"name": f"X{n}", "capacity": 2})
            await _assert_in_sync(client, http)
            assert client.snapshots == 2
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_restaurant_asyncapi_document_matches_what_devices_receive(
    running: tuple[str, Broadcaster],
) -> None:
    """Every event the service sends validates against the payload schema the published document gives."""
    document = json.loads(_generated_document())
    assert asyncapi_errors(document) == []
    base, _ = running
    host = base.removeprefix("http://")
    async with (
        httpx.AsyncClient(base_url=base, timeout=10, headers=AUTH) as http,
        await connect(f"ws://{host}/realtime?restaurant_id={RID}&token={TOKEN}") as ws,
    ):
        assert (await recv_json(ws))["type"] == "welcome"
        table = (await http.post(f"/restaurants/{RID}/tables", json={"name": "T1", "capacity": 4})).json()
        guest = (
            await http.post(f"/restaurants/{RID}/guests", json={"guestName": "Ada", "partySize": 2})
        ).json()
        await http.put(f"/restaurants/{RID}/guests/{guest['id']}", json={"partySize": 3})
        await http.put(f"/restaurants/{RID}/tables/{table['id']}", json={"status": "cleaning"})
        operations = [{"op": "update_guest", "guest_id": guest["id"], "changes": {"status": "seated"}}]
        await http.post("/transactions/atomic", json={"restaurant_id": RID, "operations": operations})
        await http.delete(f"/restaurants/{RID}/guests/{guest['id']}")
        seen = []
        for _ in range(6):
            event = await recv_json(ws)
            message = document["components"]["messages"][event["type"]]
            schema = _resolve(document, message["payload"]["$ref"])
            resolver_doc = {**schema, "components": document["components"]}
            errors = list(jsonschema.Draft202012Validator(resolver_doc).iter_errors(event))
            assert errors == [], (event, errors)
            seen.append(event["type"])
    assert seen == [
        "table_created",
        "guest_created",
        "guest_updated",
        "table_updated",
        "atomic_transaction_complete",
        "guest_deleted",
    ]


def _generated_document() -> str:
    return str(docs_hooks().generated("asyncapi/restaurant.json"))


def _resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def test_restaurant_page_examples_match_the_event_models() -> None:
    """The page's JSON examples are events of the example service, field for field."""
    from examples.restaurant_app import events

    page = (DOCS / "restaurant.md").read_text()
    models = {m.model_fields["type"].default: m for m in vars(events).values() if isinstance(m, type)
              and issubclass(m, events.RestaurantEvent) and m is not events.RestaurantEvent}  # fmt: skip
    found = set()
    for block in re.findall(r"```json\n(.*?)```", page, flags=re.S):
        frame = json.loads(block)
        if frame.get("type") in models:
            body = {k: v for k, v in frame.items() if k != "seq"}
            assert isinstance(frame["seq"], int)
            models[frame["type"]].model_validate(body)
            found.add(frame["type"])
    assert found == set(models)


async def test_the_service_serves_its_asyncapi_document(running: tuple[str, Broadcaster]) -> None:
    base, _ = running
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        response = await http.get("/asyncapi.json")
    assert response.status_code == 200
    served = response.json()
    assert asyncapi_errors(served) == []
    assert served["servers"]["local"]["host"] == base.removeprefix("http://")
    assert set(served["components"]["messages"]) >= {"guest_created", "atomic_transaction_complete"}
    # AsyncAPI 3.0 allows no query in an address: restaurant_id and token are in the bindings.
    restaurant = served["channels"]["restaurant"]
    assert restaurant["address"] == "/realtime"
    assert {"restaurant_id", "token"} <= set(restaurant["bindings"]["ws"]["query"]["properties"])
    assert served["channels"]["restaurant_sse"]["address"] == "/realtime/sse"
    schemes = served["components"]["securitySchemes"]
    assert schemes["deviceToken"]["in"] == "query" and schemes["bearer"]["scheme"] == "bearer"
    assert len(served["operations"]["restaurant.send"]["security"]) == 2
    assert served["components"]["messages"]["error"]["title"] == "ErrorFrame"
