"""A stalled process stalls nobody else: two example-service processes on PostgreSQL and Redis, one frozen.

Both processes take a steady write load on the same restaurant (the hardest case for ordering: one channel,
writers in both processes). Process A is frozen with SIGSTOP for 10 s at a moment when it holds a lock
another process could need (the relay's advisory lock, or its restaurant's row lock inside a write
transaction), as seen in ``pg_locks`` and ``pg_stat_activity``. Meanwhile process B's writes and the events
its WebSocket client receives must each take less than a second. After A thaws, every client (resuming
where it was) has every committed write's event exactly once, in commit order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from examples.restaurant_app.db import create_engine
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.exceptions import ConnectionClosed

from .support import connect, recv_json, server_process

logger = logging.getLogger(__name__)

# The servers are subprocesses (they pick uvloop themselves): this loop only runs their clients.
pytestmark = [pytest.mark.asyncio_only, pytest.mark.redis, pytest.mark.postgresql, pytest.mark.slow]

POSTGRES_CANDIDATES = (
    "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "postgresql+asyncpg://root@127.0.0.1:5432/test",
)
RID = "stall-restaurant"
#: How long process A stays frozen.
FREEZE = 10.0
#: The longest a write of process B, or the event of one, may take while A is frozen.
BOUND = 1.0
#: Pause between two writes of one writer, and the most writes one writer sends.
PAUSE = 0.02
MAX_WRITES = 600


@pytest.fixture
async def postgres_schema() -> AsyncIterator[tuple[str, str]]:
    """A PostgreSQL URL and a fresh schema of the test's own, dropped afterwards."""
    configured = os.environ.get("RTB_TEST_POSTGRES_URL")
    errors = []
    for url in (configured,) if configured else POSTGRES_CANDIDATES:
        admin = create_engine(url, connect_args={"timeout": 3})
        try:
            async with admin.begin() as connection:
                schema = f"rtb_stall_{uuid.uuid4().hex[:12]}"
                await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        except Exception as exc:  # whatever the driver raises, this candidate is not usable
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
            await admin.dispose()
            continue
        try:
            yield url, schema
        finally:
            async with admin.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            await admin.dispose()
        return
    message = f"PostgreSQL is not reachable ({'; '.join(errors)})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true requires it")
    pytest.skip(message)


@dataclass
class Write:
    """One POST of a writer: when it was sent and answered, and what came back."""

    writer: str
    name: str
    sent: float
    answered: float = 0.0
    status: int | None = None
    guest_id: str | None = None


@dataclass
class Device:
    """A WebSocket client of one process that reconnects, resuming, whenever it is dropped."""

    host: str
    epoch: str = ""
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    reconnects: int = 0

    @property
    def last_seq(self) -> int:
        return self.events[-1][1]["seq"] if self.events else 0

    async def run(self, ready: asyncio.Event) -> None:
        while True:
            query = f"restaurant_id={RID}" + (
                f"&epoch={self.epoch}&last_seq={self.last_seq}" if self.epoch else ""
            )
            try:
                ws = await connect(f"ws://{self.host}/realtime?{query}")
                welcome = await recv_json(ws, timeout=30)
                assert welcome["type"] == "welcome", welcome
                assert not self.epoch or welcome["resumed"] is True, welcome
                self.epoch = welcome["epoch"]
                ready.set()
                while True:
                    frame = await recv_json(ws, timeout=60)
                    if frame.get("type") == "guest_created":
                        self.events.append((time.monotonic(), frame))
            except (ConnectionClosed, OSError, TimeoutError):
                self.reconnects += 1
                if self.reconnects > 5:
                    raise
                await asyncio.sleep(0.2)


async def write_load(http: httpx.AsyncClient, host: str, writer: str, stop: asyncio.Event) -> list[Write]:
    """Create guests one after the other until ``stop`` (at most ``MAX_WRITES``)."""
    writes: list[Write] = []
    for n in range(MAX_WRITES):
        if stop.is_set():
            break
        write = Write(writer, f"{writer}-{n}", time.monotonic())
        writes.append(write)
        try:
            reply = await http.post(
                f"http://{host}/restaurants/{RID}/guests", json={"guestName": write.name, "partySize": 2}
            )
        except httpx.TransportError:
            write.answered = time.monotonic()
            continue
        write.answered = time.monotonic()
        write.status = reply.status_code
        if reply.status_code == 201:
            write.guest_id = reply.json()["id"]
        await asyncio.sleep(PAUSE)
    return writes


_LOCK_STATE = text(
    """
    SELECT a.pid, a.state, a.backend_xid IS NOT NULL AS wrote, a.wait_event_type,
           left(a.query, 60) AS query,
           coalesce((SELECT string_agg(l.locktype || ':' || l.mode, ',' ORDER BY l.locktype)
                     FROM pg_locks l WHERE l.pid = a.pid AND l.granted
                       AND l.locktype IN ('advisory', 'transactionid', 'tuple')), '') AS locks
    FROM pg_stat_activity a WHERE a.application_name = :name ORDER BY a.pid
    """
)


async def lock_state(admin: AsyncEngine, name: str) -> list[dict[str, Any]]:
    """The PostgreSQL sessions of the process whose connections carry ``application_name=name``."""
    async with admin.connect() as connection:
        rows = (await connection.execute(_LOCK_STATE, {"name": name})).mappings().all()
    return [dict(row) for row in rows]


def holds_a_lock(sessions: list[dict[str, Any]]) -> bool:
    """Does one of the sessions hold a lock another process may need: an advisory lock, or a write's row
    lock (an open transaction that has written and is waiting for its client)?"""
    return any(
        "advisory" in s["locks"] or (s["wrote"] and s["state"] == "idle in transaction") for s in sessions
    )


async def freeze_while_holding_a_lock(
    admin: AsyncEngine, process: asyncio.subprocess.Process, name: str
) -> list[dict[str, Any]]:
    """Stop ``process`` at a moment when its sessions hold a lock; return their state, as frozen."""
    async with asyncio.timeout(20):
        while True:
            if holds_a_lock(await lock_state(admin, name)):
                process.send_signal(signal.SIGSTOP)
                await asyncio.sleep(0.05)  # let the server finish a statement the process had sent
                frozen = await lock_state(admin, name)
                if holds_a_lock(frozen):
                    return frozen
                process.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.001)


async def test_a_frozen_process_delays_neither_the_writes_nor_the_events_of_another(
    redis_url: str, redis_prefix: str, postgres_schema: tuple[str, str]
) -> None:
    url, schema = postgres_schema
    separator = "&" if "?" in redis_url else "?"
    common = {
        "BROADCAST_URL": f"{redis_url}{separator}key_prefix={redis_prefix}&history_size=5000",
        "LOG_LEVEL": "WARNING",
        "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED": "1",
    }
    names = {label: f"rtb-stall-{schema}-{label}" for label in "ab"}

    def env(label: str) -> dict[str, str]:
        return {**common, "DATABASE_URL": f"{url}?search_path={schema}&application_name={names[label]}"}

    admin = create_engine(url)
    stop = asyncio.Event()
    report: list[str] = []
    try:
        async with (
            server_process("-m", "examples.restaurant_app", env=env("a")) as server_a,
            server_process("-m", "examples.restaurant_app", env=env("b")) as server_b,
            httpx.AsyncClient(timeout=60) as http,
            asyncio.TaskGroup() as tasks,
        ):
            a, b, process_a = server_a.host, server_b.host, server_a.process
            devices = {"a": Device(a), "b": Device(b)}
            device_tasks = []
            for device in devices.values():
                ready = asyncio.Event()
                device_tasks.append(tasks.create_task(device.run(ready)))
                await asyncio.wait_for(ready.wait(), 10)
            loads = {
                label: tasks.create_task(write_load(http, host, label, stop))
                for label, host in (("a", a), ("b", b))
            }
            try:
                await asyncio.sleep(1.0)  # both processes under load
                frozen = await freeze_while_holding_a_lock(admin, process_a, names["a"])
                frozen_at = time.monotonic()
                report.append(f"A frozen holding: {frozen}")
                try:
                    await asyncio.sleep(FREEZE / 2)
                    report.append(f"A after {FREEZE / 2:.0f} s: {await lock_state(admin, names['a'])}")
                    report.append(f"B after {FREEZE / 2:.0f} s: {await lock_state(admin, names['b'])}")
                    await asyncio.sleep(FREEZE / 2)
                finally:
                    process_a.send_signal(signal.SIGCONT)
                thawed_at = time.monotonic()
                await asyncio.sleep(2.0)  # both under load again
            finally:
                stop.set()
            writes = {label: await load for label, load in loads.items()}
            # Everything committed is relayed, and each device has caught up with it.
            async with asyncio.timeout(30):
                while (await http.get(f"http://{b}/health")).json()["outbox"]["pending"]:
                    await asyncio.sleep(0.1)
                async with admin.connect() as connection:
                    committed = (
                        await connection.execute(text(f'SELECT count(*) FROM "{schema}".guests'))
                    ).scalar_one()
                while any(len(d.events) < committed for d in devices.values()):
                    await asyncio.sleep(0.1)
            for task in device_tasks:
                task.cancel()
            # A device of either process resuming from the start gets the same events from the history.
            replayed = {}
            for label, host in (("a", a), ("b", b)):
                ws = await connect(
                    f"ws://{host}/realtime?restaurant_id={RID}&epoch={devices[label].epoch}&last_seq=0"
                )
                assert (await recv_json(ws))["resumed"] is True
                replayed[label] = [(await recv_json(ws))["data"]["id"] for _ in range(committed)]
                await ws.close()
            report.append(
                f"A's writes not answered 201: {[(w.name, w.status) for w in writes['a'] if w.status != 201]}; "
                f"device reconnects: a={devices['a'].reconnects}, b={devices['b'].reconnects}"
            )

        async with admin.connect() as connection:
            rows = await connection.execute(text(f'SELECT id, guest_name FROM "{schema}".guests'))
            guests: dict[str, str] = {guest_id: name for guest_id, name in rows}
            outbox = (
                await connection.execute(text(f'SELECT id, published_seq FROM "{schema}".outbox ORDER BY id'))
            ).all()
    finally:
        stop.set()
        await admin.dispose()
        logger.info("lock states:\n%s", "\n".join(report))

    # B kept writing and broadcasting while A was frozen.
    # Writes in flight at some moment of the freeze (sent before the thaw's last second, answered after
    # the freeze began).
    during = [w for w in writes["b"] if w.sent <= thawed_at - BOUND and w.answered >= frozen_at]
    received = {frame["data"]["id"]: at for at, frame in devices["b"].events}
    write_latency = max(w.answered - w.sent for w in during)
    event_latency = max(received.get(w.guest_id or "", thawed_at + 60) - w.sent for w in during)
    logger.info(
        f"B while A was frozen: {len(during)} writes, the slowest answered in {write_latency:.3f} s, "
        f"its slowest event received in {event_latency:.3f} s"
    )
    assert write_latency < BOUND
    assert event_latency < BOUND
    assert len(during) >= 20, f"only {len(during)} writes of B while A was frozen"
    assert all(w.status == 201 for w in during), [(w.name, w.status) for w in during if w.status != 201]

    # An event exists exactly when its write committed: one guest_created per guest row, and every write
    # answered 201 is one of them (A's write caught inside its transaction may fail: then nothing commits).
    assert {w.guest_id for load in writes.values() for w in load if w.status == 201} <= guests.keys()
    assert [seq for _, seq in outbox] == list(range(1, len(guests) + 1)), "published out of commit order"
    for label, device in devices.items():
        seqs = [frame["seq"] for _, frame in device.events]
        ids = [frame["data"]["id"] for _, frame in device.events]
        assert seqs == list(range(1, len(guests) + 1)), f"device of {label}: gaps or repeats"
        assert sorted(ids) == sorted(guests), f"device of {label}: not one event per committed write"
        assert replayed[label] == ids, f"resuming on {label} from the start: not the same events"
        # Each writer's writes, made one after the other, reach every device in the order they were made.
        seen = [frame["data"]["guestName"] for _, frame in device.events]
        for writer, load in writes.items():
            made = [w.name for w in load if w.name in guests.values()]
            assert [name for name in seen if name.startswith(f"{writer}-")] == made
