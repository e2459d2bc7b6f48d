"""The example service's HTTP contract: CRUD, validation, 404s, ETags, snapshots that line up with the
stream, broadcast failures, and the command that starts it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from rtbroadcast import BackendUnavailable, Broadcaster, StreamPosition
from rtbroadcast.backends.memory import MemoryBackend
from tests.example.conftest import Running, StartService
from tests.example.restaurant_support import assert_nothing_queued, strip_envelope, welcome
from tests.support import MS, connect, recv_json, until

RID = "r1"
ROOT = Path(__file__).resolve().parents[2]


async def _guest(service: Running, rid: str = RID, name: str = "Ann", size: int = 2) -> dict[str, Any]:
    response = await service.http.post(
        f"/restaurants/{rid}/guests", json={"guestName": name, "partySize": size}
    )
    assert response.status_code == 201, response.text
    guest: dict[str, Any] = response.json()
    return guest


async def _table(service: Running, rid: str = RID, name: str = "T1", capacity: int = 4) -> dict[str, Any]:
    response = await service.http.post(
        f"/restaurants/{rid}/tables", json={"name": name, "capacity": capacity}
    )
    assert response.status_code == 201, response.text
    table: dict[str, Any] = response.json()
    return table


# -- guests and tables ----------------------------------------------------------------------------------


async def test_guest_crud_and_its_broadcasts(service: Running) -> None:
    http = service.http
    table = await _table(service)
    async with await connect(service.ws_url(RID)) as ws:
        start = (await welcome(ws))["seq"]
        response = await http.post(
            f"/restaurants/{RID}/guests",
            json={"guestName": "  Ann Lee ", "partySize": 2, "phone": "+15550100", "notes": "window"},
        )
        assert response.status_code == 201
        guest = response.json()
        gid = guest["id"]
        assert guest["guestName"] == "Ann Lee"
        assert guest["partySize"] == 2
        assert guest["status"] == "waiting"
        assert guest["table_id"] is None
        assert guest["phone"] == "+15550100"
        assert guest["notes"] == "window"
        assert (await http.get(f"/restaurants/{RID}/guests/{gid}")).json() == guest

        changes: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
            ({"partySize": 3, "notes": None}, "details_change", {"partySize": 3, "notes": None}),
            ({"table_id": table["id"]}, "table_assigned", {}),
            ({"table_id": None}, "table_unassigned", {}),
            ({"status": "notified", "guestName": "Ann L."}, "status_change", {"guestName": "Ann L."}),
        ]
        for body, _, _ in changes:
            response = await http.put(f"/restaurants/{RID}/guests/{gid}", json=body)
            assert response.status_code == 200, response.text
        # Changing nothing writes and broadcasts nothing.
        same = await http.put(f"/restaurants/{RID}/guests/{gid}", json={"status": "notified", "partySize": 3})
        assert same.status_code == 200
        assert same.json()["status"] == "notified"
        assert (await http.delete(f"/restaurants/{RID}/guests/{gid}")).status_code == 204
        assert (await http.get(f"/restaurants/{RID}/guests/{gid}")).status_code == 404

        created, seq = strip_envelope(await recv_json(ws))
        assert seq == start + 1
        assert created["type"] == "guest_created"
        assert created["data"] == {"id": gid, "guestName": "Ann Lee", "partySize": 2, "status": "waiting"}
        state = {"status": "waiting", "table_id": None}
        for offset, (body, action, extra) in enumerate(changes, start=2):
            event, seq = strip_envelope(await recv_json(ws))
            assert seq == start + offset
            state.update({k: v for k, v in body.items() if k in state})
            assert event == {
                "type": "guest_updated",
                "restaurant_id": RID,
                "guest_id": gid,
                "action": action,
                "data": {"id": gid, **state, **extra},
            }
        deleted, seq = strip_envelope(await recv_json(ws))
        assert seq == start + 2 + len(changes)
        assert deleted == {
            "type": "guest_deleted",
            "restaurant_id": RID,
            "guest_id": gid,
            "data": {"id": gid},
        }
        await assert_nothing_queued(ws)


async def test_deleting_a_seated_guest_frees_its_table(service: Running) -> None:
    table, guest = await _table(service), await _guest(service)
    tid, gid = table["id"], guest["id"]
    await service.http.put(f"/restaurants/{RID}/tables/{tid}", json={"status": "occupied", "guest_id": gid})
    async with await connect(service.ws_url(RID)) as ws:
        await welcome(ws)
        assert (await service.http.delete(f"/restaurants/{RID}/guests/{gid}")).status_code == 204
        deleted, _ = strip_envelope(await recv_json(ws))
        updated, _ = strip_envelope(await recv_json(ws))
    assert deleted["type"] == "guest_deleted"
    assert updated == {
        "type": "table_updated",
        "restaurant_id": RID,
        "table_id": tid,
        "data": {"id": tid, "status": "occupied", "guest_id": None},
    }
    assert (await service.http.get(f"/restaurants/{RID}/tables/{tid}")).json()["guest_id"] is None


async def test_tables_and_their_broadcasts(service: Running) -> None:
    async with await connect(service.ws_url(RID)) as ws:
        start = (await welcome(ws))["seq"]
        table = await _table(service, name="Patio 1", capacity=6)
        tid = table["id"]
        assert table["status"] == "available"
        assert table["guest_id"] is None
        response = await service.http.put(
            f"/restaurants/{RID}/tables/{tid}", json={"status": "cleaning", "capacity": 8}
        )
        assert response.status_code == 200
        assert response.json()["capacity"] == 8
        created, seq1 = strip_envelope(await recv_json(ws))
        updated, seq2 = strip_envelope(await recv_json(ws))
    assert (seq1, seq2) == (start + 1, start + 2)
    assert created == {
        "type": "table_created",
        "restaurant_id": RID,
        "table_id": tid,
        "data": {"id": tid, "name": "Patio 1", "capacity": 6, "status": "available", "guest_id": None},
    }
    assert updated == {
        "type": "table_updated",
        "restaurant_id": RID,
        "table_id": tid,
        "data": {"id": tid, "status": "cleaning", "guest_id": None, "capacity": 8},
    }
    listed = (await service.http.get(f"/restaurants/{RID}/tables")).json()["tables"]
    assert [t["id"] for t in listed] == [tid]
    assert listed[0]["status"] == "cleaning"


async def test_list_filters_by_status_and_unknown_restaurants_are_empty(service: Running) -> None:
    first, second = await _guest(service, name="A"), await _guest(service, name="B")
    await service.http.put(f"/restaurants/{RID}/guests/{second['id']}", json={"status": "seated"})
    everyone = (await service.http.get(f"/restaurants/{RID}/guests")).json()["guests"]
    assert [g["id"] for g in everyone] == [first["id"], second["id"]]
    waiting = (await service.http.get(f"/restaurants/{RID}/guests", params={"status": "waiting"})).json()
    assert [g["id"] for g in waiting["guests"]] == [first["id"]]
    nobody = await service.http.get("/restaurants/never-written/guests")
    assert nobody.status_code == 200
    assert nobody.json()["guests"] == []
    assert nobody.json()["seq"] == 0


async def test_concurrent_writes_are_all_broadcast_in_order(service: Running) -> None:
    async with await connect(service.ws_url(RID)) as ws:
        start = (await welcome(ws))["seq"]
        names = [f"guest {i}" for i in range(12)]
        await asyncio.gather(*(_guest(service, name=name) for name in names))
        await asyncio.gather(*(_guest(service, rid="r2", name=name) for name in names))
        received = [strip_envelope(await recv_json(ws)) for _ in names]
    assert [seq for _, seq in received] == list(range(start + 1, start + 1 + len(names)))
    assert sorted(event["data"]["guestName"] for event, _ in received) == sorted(names)
    listed = (await service.http.get(f"/restaurants/{RID}/guests")).json()
    assert len(listed["guests"]) == len(names)
    assert listed["seq"] == start + len(names)


# -- validation and unknown ids ---------------------------------------------------------------------------


_GUEST = {"guestName": "A", "partySize": 2}
_ATOMIC_OK = [{"op": "create_guest", "guest": _GUEST}]


@pytest.mark.parametrize(
    ("method", "path", "body", "loc", "error_type"),
    [
        ("POST", f"/restaurants/{RID}/guests", {**_GUEST, "vip": True}, ["body", "vip"], "extra_forbidden"),
        (
            "POST",
            f"/restaurants/{RID}/guests",
            {"guest_name": "A", "partySize": 2},
            ["body", "guest_name"],
            "extra_forbidden",
        ),
        (
            "POST",
            f"/restaurants/{RID}/guests",
            {**_GUEST, "partySize": 51},
            ["body", "partySize"],
            "less_than_equal",
        ),
        (
            "POST",
            f"/restaurants/{RID}/guests",
            {**_GUEST, "guestName": " "},
            ["body", "guestName"],
            "string_too_short",
        ),
        ("POST", "/restaurants/bad!id/guests", _GUEST, ["path", "restaurant_id"], "string_pattern_mismatch"),
        (
            "POST",
            f"/restaurants/{'x' * 65}/guests",
            _GUEST,
            ["path", "restaurant_id"],
            "string_pattern_mismatch",
        ),
        ("GET", f"/restaurants/{RID}/guests?status=eating", None, ["query", "status"], "enum"),
        ("PUT", f"/restaurants/{RID}/guests/g", {"status": None}, ["body", "status"], "null_not_allowed"),
        ("PUT", f"/restaurants/{RID}/guests/g", {"status": "eating"}, ["body", "status"], "enum"),
        ("PUT", f"/restaurants/{RID}/guests/g", {"seat": 3}, ["body", "seat"], "extra_forbidden"),
        (
            "POST",
            f"/restaurants/{RID}/tables",
            {"name": "T", "capacity": 4, "x": 4},
            ["body", "x"],
            "extra_forbidden",
        ),
        ("PUT", f"/restaurants/{RID}/tables/t", {"status": "broken"}, ["body", "status"], "enum"),
        (
            "POST",
            "/transactions/atomic",
            {"restaurant_id": RID, "operations": []},
            ["body", "operations"],
            "too_short",
        ),
        (
            "POST",
            "/transactions/atomic",
            {"restaurant_id": "a b", "operations": _ATOMIC_OK},
            ["body", "restaurant_id"],
            "string_pattern_mismatch",
        ),
        (
            "POST",
            "/transactions/atomic",
            {"restaurant_id": RID, "operations": [{"op": "drop_table", "table_id": "t"}]},
            ["body", "operations", 0],
            "union_tag_invalid",
        ),
        (
            "POST",
            "/transactions/atomic",
            {"restaurant_id": RID, "operations": _ATOMIC_OK, "dry_run": True},
            ["body", "dry_run"],
            "extra_forbidden",
        ),
    ],
)
async def test_invalid_requests_get_422_with_the_field(
    service: Running, method: str, path: str, body: Any, loc: list[Any], error_type: str
) -> None:
    response = await service.http.request(method, path, json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert {"loc": loc, "type": error_type} in [{"loc": e["loc"], "type": e["type"]} for e in errors], errors


async def test_unknown_ids_get_404(service: Running) -> None:
    http = service.http
    guest, table = await _guest(service), await _table(service)
    gid, tid = guest["id"], table["id"]
    cases: list[tuple[str, str, Any, str, str]] = [
        ("GET", f"/restaurants/{RID}/guests/guest-nope", None, "guest", "guest-nope"),
        ("PUT", f"/restaurants/{RID}/guests/guest-nope", {"status": "seated"}, "guest", "guest-nope"),
        ("DELETE", f"/restaurants/{RID}/guests/guest-nope", None, "guest", "guest-nope"),
        ("GET", f"/restaurants/{RID}/tables/table-nope", None, "table", "table-nope"),
        ("PUT", f"/restaurants/{RID}/tables/table-nope", {"status": "cleaning"}, "table", "table-nope"),
        ("PUT", f"/restaurants/{RID}/guests/{gid}", {"table_id": "table-nope"}, "table", "table-nope"),
        ("PUT", f"/restaurants/{RID}/tables/{tid}", {"guest_id": "guest-nope"}, "guest", "guest-nope"),
        # Another restaurant's ids are unknown here.
        ("GET", f"/restaurants/r2/guests/{gid}", None, "guest", gid),
        ("PUT", f"/restaurants/r2/tables/{tid}", {"status": "cleaning"}, "table", tid),
    ]
    for method, path, body, entity, entity_id in cases:
        response = await http.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["entity"] == entity
        assert response.json()["id"] == entity_id
    assert (await http.get(f"/restaurants/{RID}/guests/{gid}")).json() == guest


async def test_realtime_refuses_invalid_restaurant_ids(service: Running) -> None:
    for url in (service.ws_url("bad!id"), service.ws_url("x" * 65), service.ws_url(None)):
        async with await connect(url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await recv_json(ws)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4004


# -- snapshots: ETag and the stream position -----------------------------------------------------------


async def test_list_etag_changes_exactly_when_the_data_changes(service: Running) -> None:
    http = service.http
    guest = await _guest(service)
    guests_path, tables_path = f"/restaurants/{RID}/guests", f"/restaurants/{RID}/tables"
    first = await http.get(guests_path)
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "no-cache"

    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        cached = await http.get(guests_path, headers={"If-None-Match": header})
        assert cached.status_code == 304, header
        assert cached.content == b""
        assert cached.headers["etag"] == etag
        assert cached.headers["x-stream-seq"] == first.headers["x-stream-seq"]
    assert (await http.get(guests_path, headers={"If-None-Match": '"stale"'})).status_code == 200

    # An update that changes nothing leaves the ETag alone; one that changes something does not.
    await http.put(f"{guests_path}/{guest['id']}", json={"status": "waiting"})
    assert (await http.get(guests_path, headers={"If-None-Match": etag})).status_code == 304
    await http.put(f"{guests_path}/{guest['id']}", json={"status": "notified"})
    changed = await http.get(guests_path, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert changed.json()["guests"][0]["status"] == "notified"

    # The tables list shares the restaurant's version: a table write changes both ETags.
    tables_etag = (await http.get(tables_path)).headers["etag"]
    guests_etag = changed.headers["etag"]
    await _table(service)
    assert (await http.get(tables_path, headers={"If-None-Match": tables_etag})).status_code == 200
    assert (await http.get(guests_path, headers={"If-None-Match": guests_etag})).status_code == 200
    # Another restaurant's writes do not.
    tables_etag = (await http.get(tables_path)).headers["etag"]
    await _table(service, rid="r2")
    assert (await http.get(tables_path, headers={"If-None-Match": tables_etag})).status_code == 304


async def test_snapshot_seq_lines_up_with_the_stream(service: Running) -> None:
    http = service.http
    guest = await _guest(service)
    snapshot = await http.get(f"/restaurants/{RID}/guests")
    body = snapshot.json()
    epoch, seq = body["epoch"], body["seq"]
    assert (snapshot.headers["x-stream-epoch"], int(snapshot.headers["x-stream-seq"])) == (epoch, seq)
    single = await http.get(f"/restaurants/{RID}/guests/{guest['id']}")
    assert single.headers["x-stream-seq"] == str(seq)

    # A change made while the device was not connected yet is replayed after the snapshot's seq.
    await http.put(f"/restaurants/{RID}/guests/{guest['id']}", json={"status": "notified"})
    async with await connect(service.ws_url(RID, epoch=epoch, last_seq=seq)) as ws:
        hello = await welcome(ws)
        assert hello["resumed"] is True
        assert hello["seq"] == seq
        event, event_seq = strip_envelope(await recv_json(ws))
        assert event_seq == seq + 1
        assert event["type"] == "guest_updated"
        assert event["data"]["status"] == "notified"
        await assert_nothing_queued(ws)

    # A snapshot from another stream (say, before a restart) cannot be resumed: resync.
    async with await connect(service.ws_url(RID, epoch="0123456789abcdef", last_seq=seq)) as ws:
        hello = await welcome(ws)
        assert hello["resumed"] is False
        resync = await recv_json(ws)
        assert resync["type"] == "resync_required"
        assert resync["reason"] == "epoch_changed"


# -- broadcast failures ---------------------------------------------------------------------------------


class SwitchableBackend(MemoryBackend):
    """The memory backend, with a switch that makes it unreachable (a real outage, without Redis)."""

    down = False

    @property
    def available(self) -> bool:
        return not self.down

    async def publish(self, channel: str, payload: str, *, idempotency_key: str | None = None) -> Any:
        if self.down:
            raise BackendUnavailable("switched off by the test")
        return await super().publish(channel, payload, idempotency_key=idempotency_key)

    async def position(self, channel: str) -> StreamPosition:
        if self.down:
            raise BackendUnavailable("switched off by the test")
        return await super().position(channel)


async def test_a_failed_broadcast_is_deferred_and_the_write_stands(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="examples.restaurant_app")
    backend = SwitchableBackend()
    service = await start_service(broadcaster=Broadcaster(backend=backend))
    http = service.http
    async with await connect(service.ws_url(RID)) as ws:
        await welcome(ws)
        await _guest(service, name="Before")
        created, seq = strip_envelope(await recv_json(ws))
        assert created["data"]["guestName"] == "Before"
        assert f"broadcast guest_created restaurant={RID} recipients=1 seq={seq}" in caplog.messages
        etag = (await http.get(f"/restaurants/{RID}/guests")).headers["etag"]

        backend.down = True
        guest = await _guest(service, name="During")
        deferred = [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and "deferred to the outbox relay" in r.getMessage()
        ]
        assert len(deferred) == 1
        # The snapshot still serves (the polling fallback), without a stream position, with a new ETag.
        listed = await http.get(f"/restaurants/{RID}/guests", headers={"If-None-Match": etag})
        assert listed.status_code == 200
        assert listed.json()["seq"] is None
        assert "x-stream-seq" not in listed.headers
        assert [g["guestName"] for g in listed.json()["guests"]] == ["Before", "During"]
        health = (await http.get("/health")).json()
        assert health["status"] == "degraded"
        assert health["outbox"]["pending"] == 1

        backend.down = False
        # Nothing was lost: the outbox relays the deferred event first, then what follows, in order.
        during, during_seq = strip_envelope(await recv_json(ws, timeout=15_000 * MS))
        assert (during["type"], during["data"]["guestName"], during_seq) == (
            "guest_created",
            "During",
            seq + 1,
        )
        await http.put(f"/restaurants/{RID}/guests/{guest['id']}", json={"status": "notified"})
        updated, next_seq = strip_envelope(await recv_json(ws))
        assert updated["guest_id"] == guest["id"]
        assert next_seq == seq + 2
    assert (await http.get("/health")).json()["status"] == "ok"


# -- the command -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _read_banner(stream: asyncio.StreamReader) -> dict[str, str]:
    """Read the demo's banner up to its ``try`` line: ``{"realtime": url, "token": token, ...}``."""
    banner: dict[str, str] = {}
    while "try" not in banner:
        line = (await asyncio.wait_for(stream.readline(), 20_000 * MS)).decode()
        assert line, f"the service exited; banner so far: {banner}"
        name, _, value = line.strip().partition(" ")
        if line.startswith("  ") and name and value:
            banner.setdefault(name, value.strip())
    return banner


# The service runs in a subprocess (on uvloop there, as uvicorn picks it): this loop only runs the client.
@pytest.mark.slow
@pytest.mark.asyncio_only
async def test_main_command_starts_the_demo(tmp_path: Path) -> None:
    """``make run``: a generated secret, and the printed WebSocket URL and bearer token work as printed;
    the access log does not show the token."""
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}", "LOG_LEVEL": "INFO"}
    for name in ("RESTAURANT_TOKEN_SECRET", "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED"):
        env.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        *(
            sys.executable,
            "-m",
            "examples.restaurant_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--demo",
        ),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        banner = await _read_banner(process.stdout)
        token = banner["token"]
        assert banner["auth"] == "tokens"
        assert banner["realtime"] == (
            f"ws://127.0.0.1:{port}/realtime?restaurant_id=test-restaurant-1&token={token}"
        )
        assert f"Bearer {token}" in banner["try"]
        assert banner["secret"].startswith("RESTAURANT_TOKEN_SECRET=")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def answers() -> bool:
                assert process.returncode is None, "the service exited"
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/health")).status_code == 200
                return False

            await until(answers, 10_000 * MS)
            health = await http.get("/health")
            assert health.json()["status"] == "ok"
            assert health.json()["auth"] == "tokens"
            tables_url = "/restaurants/test-restaurant-1/tables"
            assert (await http.get(tables_url)).status_code == 401
            authorized = {"authorization": f"Bearer {token}"}
            tables = (await http.get(tables_url, headers=authorized)).json()["tables"]
            assert len(tables) == 6
        async with await connect(banner["realtime"]) as ws:
            assert (await welcome(ws))["channel"] == "restaurant:test-restaurant-1"
    finally:
        if process.returncode is None:
            process.terminate()
        stdout, _ = await asyncio.wait_for(process.communicate(), 10_000 * MS)
    log = [line for line in stdout.decode().splitlines() if not line.startswith(" ")]
    assert any("/realtime?restaurant_id=test-restaurant-1&token=***" in line for line in log), log
    assert not [line for line in log if token in line], "the token must not appear in the logs"
    assert banner["health"] == f"http://127.0.0.1:{port}/health"


@pytest.mark.asyncio_only
async def test_main_command_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    for name in ("RESTAURANT_TOKEN_SECRET", "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED"):
        env.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "examples.restaurant_app", "--port", str(_free_port())),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 20_000 * MS)
    assert process.returncode == 2
    assert "RESTAURANT_TOKEN_SECRET" in stdout.decode()
