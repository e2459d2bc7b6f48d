"""The reference's test scenario over real sockets, and the all-or-nothing atomic transaction."""

from __future__ import annotations

from typing import Any

from tests.example.conftest import Running
from tests.example.restaurant_support import TIMESTAMP, assert_nothing_queued, strip_envelope, welcome
from tests.support import connect, recv_json

RID = "test-restaurant-1"
OTHER = "other-restaurant"


async def test_reference_scenario(service: Running) -> None:
    http = service.http
    table = (await http.post(f"/restaurants/{RID}/tables", json={"name": "T4", "capacity": 4})).json()
    table2 = (await http.post(f"/restaurants/{RID}/tables", json={"name": "T2", "capacity": 2})).json()
    walk_in = (
        await http.post(f"/restaurants/{RID}/guests", json={"guestName": "Jane Roe", "partySize": 2})
    ).json()
    await http.post(f"/restaurants/{OTHER}/tables", json={"name": "A1", "capacity": 4})

    async with (
        await connect(service.ws_url(RID)) as device_a,
        await connect(service.ws_url(RID)) as device_b,
        await connect(service.ws_url(OTHER)) as device_c,
    ):
        welcome_a, welcome_b, welcome_c = [await welcome(ws) for ws in (device_a, device_b, device_c)]
        assert welcome_b["channel"] == f"restaurant:{RID}"
        assert welcome_b["seq"] == 3  # two tables and a guest so far
        assert welcome_a["epoch"] == welcome_b["epoch"]
        assert welcome_c["channel"] == f"restaurant:{OTHER}"

        health = (await http.get("/health")).json()
        assert health["status"] == "ok"
        assert health["websocket"]["total_connections"] == 3
        assert health["websocket"]["restaurants"] == {RID: 2, OTHER: 1}

        # Device A's actions, as HTTP calls.
        response = await http.post(
            f"/restaurants/{RID}/guests", json={"guestName": "John Doe", "partySize": 4}
        )
        assert response.status_code == 201
        guest = response.json()
        assert guest["status"] == "waiting"
        gid, tid, tid2, wid = guest["id"], table["id"], table2["id"], walk_in["id"]

        response = await http.put(
            f"/restaurants/{RID}/guests/{gid}", json={"status": "seated", "table_id": tid}
        )
        assert response.status_code == 200
        assert response.json()["status"] == "seated"

        response = await http.put(
            f"/restaurants/{RID}/tables/{tid}", json={"status": "occupied", "guest_id": gid}
        )
        assert response.status_code == 200

        response = await http.post(
            "/transactions/atomic",
            json={
                "restaurant_id": RID,
                "operations": [
                    {
                        "op": "update_guest",
                        "guest_id": wid,
                        "changes": {"status": "seated", "table_id": tid2},
                    },
                    {
                        "op": "update_table",
                        "table_id": tid2,
                        "changes": {"status": "occupied", "guest_id": wid},
                    },
                ],
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["affected_entities"] == [wid, tid2]

        expected: list[dict[str, Any]] = [
            {
                "type": "guest_created",
                "restaurant_id": RID,
                "guest_id": gid,
                "data": {"id": gid, "guestName": "John Doe", "partySize": 4, "status": "waiting"},
            },
            {
                "type": "guest_updated",
                "restaurant_id": RID,
                "guest_id": gid,
                "action": "status_change",
                "data": {"id": gid, "status": "seated", "table_id": tid},
            },
            {
                "type": "table_updated",
                "restaurant_id": RID,
                "table_id": tid,
                "data": {"id": tid, "status": "occupied", "guest_id": gid},
            },
            {
                "type": "atomic_transaction_complete",
                "restaurant_id": RID,
                "affected_entities": [wid, tid2],
            },
        ]
        # Device B (and A, who made the changes) receive each message, in order, in the exact format.
        for device, start in ((device_b, welcome_b["seq"]), (device_a, welcome_a["seq"])):
            for offset, want in enumerate(expected, start=1):
                body, seq = strip_envelope(await recv_json(device))
                assert body == want
                assert seq == start + offset

        # The other restaurant's device received nothing; ping -> pong works on every device.
        await assert_nothing_queued(device_c)
        await assert_nothing_queued(device_b)
        await device_a.send('{"type": "ping"}')
        pong = await recv_json(device_a)
        assert set(pong) == {"type", "timestamp"}
        assert TIMESTAMP.fullmatch(pong["timestamp"])

        health = (await http.get("/health")).json()
        assert health["websocket"]["total_connections"] == 3
        assert health["websocket"]["messages_sent"] >= 2 * (1 + len(expected)) + 1 + 3
        assert health["websocket"]["messages_dropped"] == 0
        assert health["database"]["status"] == "ok"


async def _seat_fixture(service: Running) -> tuple[str, str]:
    http = service.http
    table = (await http.post(f"/restaurants/{RID}/tables", json={"name": "T1", "capacity": 4})).json()
    guest = (await http.post(f"/restaurants/{RID}/guests", json={"guestName": "Ann", "partySize": 3})).json()
    return guest["id"], table["id"]


async def _state(service: Running) -> tuple[Any, Any, str]:
    guests = await service.http.get(f"/restaurants/{RID}/guests")
    tables = await service.http.get(f"/restaurants/{RID}/tables")
    return guests.json(), tables.json(), guests.headers["etag"]


async def test_failing_atomic_transaction_writes_and_broadcasts_nothing(service: Running) -> None:
    gid, tid = await _seat_fixture(service)
    before = await _state(service)
    async with await connect(service.ws_url(RID)) as device:
        await welcome(device)
        response = await service.http.post(
            "/transactions/atomic",
            json={
                "restaurant_id": RID,
                "operations": [
                    {"op": "update_guest", "guest_id": gid, "changes": {"status": "seated", "table_id": tid}},
                    {"op": "update_table", "table_id": "table-missing", "changes": {"status": "occupied"}},
                ],
            },
        )
        assert response.status_code == 404
        error = response.json()
        assert error["operation_index"] == 1
        assert error["entity"] == "table"
        assert error["id"] == "table-missing"
        assert "operation 1" in error["detail"]

        # A create_guest before the failing operation is rolled back too.
        response = await service.http.post(
            "/transactions/atomic",
            json={
                "restaurant_id": RID,
                "operations": [
                    {"op": "create_guest", "guest": {"guestName": "Bob", "partySize": 2}},
                    {"op": "update_guest", "guest_id": gid, "changes": {"status": "notified"}},
                    {"op": "update_guest", "guest_id": "guest-missing", "changes": {"status": "seated"}},
                ],
            },
        )
        assert response.status_code == 404
        assert response.json()["operation_index"] == 2

        await assert_nothing_queued(device)
    assert await _state(service) == before


async def test_invalid_atomic_operation_is_rejected_with_its_location(service: Running) -> None:
    gid, tid = await _seat_fixture(service)
    before = await _state(service)
    response = await service.http.post(
        "/transactions/atomic",
        json={
            "restaurant_id": RID,
            "operations": [
                {"op": "update_guest", "guest_id": gid, "changes": {"status": "seated"}},
                {"op": "update_table", "table_id": tid, "changes": {"colour": "red"}},
            ],
        },
    )
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "operations", 1, "update_table", "changes", "colour"]
    assert error["type"] == "extra_forbidden"
    assert await _state(service) == before
