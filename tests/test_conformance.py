"""The client conformance suite, played by the Python client (``tests/conformance/README.md``).

Each scenario of ``tests/conformance/scenarios.json`` runs against its own ``harness.py`` process; the
JavaScript client's runner plays the same file against the same harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from rtbroadcast import Welcome
from rtbroadcast.client import (
    Backoff,
    Client,
    DisconnectInfo,
    Refused,
    ResyncInfo,
    Subscription,
    TokenRequest,
)
from rtbroadcast.protocol import ServerFrame, Subscribed, WelcomeV2

from .redis_support import redis_server_binary
from .support import MS, until

HERE = Path(__file__).parent / "conformance"
SUITE = json.loads((HERE / "scenarios.json").read_text())
SCENARIOS = {scenario["name"]: scenario for scenario in SUITE["scenarios"]}
CLIENT_OPTIONS = {"token", "tokens", "backoff", "heartbeat_interval_ms", "heartbeat_timeout_ms"}
#: The bound on every wait of a step (the README's 10 s).
WAIT = 10_000 * MS


@dataclass
class Harness:
    """A running ``harness.py``: its addresses, and its control API."""

    process: asyncio.subprocess.Process
    ws: str
    http: str
    control: httpx.AsyncClient

    async def post(self, path: str, **params: Any) -> Any:
        response = await self.control.post(path, params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    async def stats(self) -> dict[str, Any]:
        response = await self.control.get("/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


@contextlib.asynccontextmanager
async def harness(server: dict[str, Any]) -> AsyncIterator[Harness]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "harness.py"), json.dumps(server),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "RTB_REDIS_SERVER": redis_server_binary() or ""},
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    try:
        async with asyncio.timeout(20_000 * MS):
            line = (await process.stdout.readline()).decode()
        if not line.startswith("READY "):
            raise AssertionError(f"harness.py did not start: {line!r}")
        ready = json.loads(line.removeprefix("READY "))
        async with httpx.AsyncClient(base_url=ready["control"]) as control:
            yield Harness(process, ready["ws"], ready["http"], control)
    finally:
        process.stdin.close()  # the harness stops when its stdin closes
        try:
            async with asyncio.timeout(10_000 * MS):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError("harness.py did not stop when its stdin closed") from None


@dataclass
class App:
    """The application the README describes: a room's items, kept by snapshot + events."""

    http: str
    room: str
    items: list[int] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    resyncs: list[str] = field(default_factory=list)
    welcomes: list[bool] = field(default_factory=list)
    disconnects: list[tuple[float, int]] = field(default_factory=list)
    token_requests: list[str] = field(default_factory=list)
    stopped: ClientErrorInfo | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self, what: str) -> None:
        if self.items != list(range(1, len(self.items) + 1)):
            self.violations.append(f"after {what}: {self.items}")
        self.changed.set()

    async def load_snapshot(self, info: ResyncInfo) -> tuple[str, int]:
        self.resyncs.append(info.reason)
        async with httpx.AsyncClient(base_url=self.http) as http:
            response = (await http.get(f"/rooms/{self.room}/items")).raise_for_status()
        self.items = [item["n"] for item in response.json()["items"]]
        self.check(f"the snapshot ({info.reason})")
        return response.headers["X-Stream-Epoch"], int(response.headers["X-Stream-Seq"])

    def apply(self, event: dict[str, Any]) -> None:
        self.items.append(event["n"])
        self.check(f"event n={event['n']}")

    def connected(self, welcome: Welcome | WelcomeV2) -> None:
        if isinstance(welcome, Welcome):  # protocol 2: each subscribed frame counts (see frame())
            self.welcomes.append(welcome.resumed)
        self.changed.set()

    def frame(self, frame: ServerFrame) -> None:
        if isinstance(frame, Subscribed) and frame.channel == f"room:{self.room}":
            self.welcomes.append(frame.resumed)
            self.changed.set()

    def disconnected(self, info: DisconnectInfo) -> None:
        self.disconnects.append((time.monotonic(), info.code))
        self.changed.set()


@dataclass(frozen=True)
class ClientErrorInfo:
    kind: str
    code: int | None


def make_client(url: str, options: dict[str, Any], app: App, protocol: int) -> Client:
    unknown = set(options) - CLIENT_OPTIONS
    assert not unknown, f"unknown client options {sorted(unknown)}"
    backoff = options.get("backoff", {"initial_ms": 50, "max_ms": 200})
    tokens = list(options.get("tokens", []))

    def get_token(request: TokenRequest) -> str | None:
        app.token_requests.append(request.reason)
        return tokens.pop(0) if tokens else None

    interval = options.get("heartbeat_interval_ms")
    extra: dict[str, Any] = {}
    if "heartbeat_timeout_ms" in options:
        extra["heartbeat_timeout"] = options["heartbeat_timeout_ms"] / 1000
    return Client(
        url,
        token=options.get("token"),
        get_token=get_token if "tokens" in options else None,
        backoff=Backoff(initial_delay=backoff["initial_ms"] / 1000, max_delay=backoff["max_ms"] / 1000),
        heartbeat_interval=None if interval is None else interval / 1000,
        on_connect=app.connected,
        on_frame=app.frame,
        protocol=protocol,
        on_disconnect=app.disconnected,
        **extra,
    )


async def consume(subscription: Subscription[dict[str, Any]], app: App) -> None:
    try:
        async for received in subscription:
            app.apply(received.event)
    except Refused as exc:
        app.stopped = ClientErrorInfo("refused", exc.code)
    except Exception as exc:  # reported to the step that expects something else
        app.stopped = ClientErrorInfo(type(exc).__name__, getattr(exc, "code", None))
    finally:
        app.changed.set()


async def wait_for(app: App, condition: Any, what: str, timeout: float = WAIT) -> None:
    try:
        await until(lambda: bool(app.violations) or condition(), timeout, changed=app.changed)
    except AssertionError:
        raise AssertionError(f"{what}: still not so after {timeout:.1f} s") from None


def expect_no_violation(app: App) -> None:
    assert not app.violations, f"the application's state went wrong: {app.violations}"


def matches(actual: list[Any], expected: list[Any]) -> bool:
    return len(actual) == len(expected) and all(
        a in e if isinstance(e, list) else a == e for a, e in zip(actual, expected, strict=True)
    )


async def play(scenario: dict[str, Any], protocol: int) -> None:
    async with harness(scenario["server"]) as server:
        app: App | None = None
        client: Client | None = None
        consumer: asyncio.Task[None] | None = None
        last_cut = 0.0
        try:
            for number, step in enumerate(scenario["steps"], start=1):
                op = step["op"]
                where = f"step {number} ({op})"
                if op == "subscribe":
                    app = App(server.http, step["room"])
                    if protocol == 1:
                        client = make_client(f"{server.ws}?room={step['room']}", scenario["client"], app, 1)
                        subscription = client.subscribe(resync=app.load_snapshot)
                    else:
                        client = make_client(server.ws, scenario["client"], app, 2)
                        subscription = client.subscribe(f"room:{step['room']}", resync=app.load_snapshot)
                    consumer = asyncio.get_running_loop().create_task(consume(subscription, app))
                    if step.get("wait", True):
                        await wait_for(app, lambda: app.welcomes or app.stopped, where)  # noqa: B023
                        assert app.stopped is None, f"{where}: stopped: {app.stopped}"
                    continue
                if op == "publish":
                    await server.post("/publish", room=step["room"], n=step["n"])
                elif op == "close":
                    await server.post("/close", room=step["room"], code=step["code"])
                elif op in ("stop", "start", "restart", "restart_redis", "cut"):
                    await server.post(f"/{op}")
                    if op == "cut":
                        last_cut = time.monotonic()
                elif op == "gate":
                    await server.post("/gate", open=int(step["open"]))
                elif op == "revoke":
                    await server.post("/revoke", token=step["token"])
                elif op == "arm_snapshot":
                    await server.post("/arm_snapshot", room=step["room"], n=step["n"])
                elif op == "sleep":
                    await asyncio.sleep(step["ms"] / 1000)
                elif op == "expect_attempts":
                    await asyncio.sleep(step.get("after_ms", 0) / 1000)
                    attempts = (await server.stats())["attempts"].get(step["token"], 0)
                    assert attempts == step["count"], f"{where}: {attempts} attempts with {step['token']!r}"
                else:
                    assert app is not None and client is not None, f"{where} before subscribe"
                    await expect(app, client, step, where, last_cut)
        finally:
            if client is not None:
                await client.close()
            if consumer is not None:
                await consumer


async def expect(app: App, client: Client, step: dict[str, Any], where: str, last_cut: float) -> None:
    op = step["op"]
    if op == "expect_items":
        wanted = list(range(1, step["count"] + 1))
        await wait_for(
            app, lambda: app.items == wanted, f"{where}: items 1..{step['count']}, have {app.items}"
        )
    elif op == "expect_resyncs":
        assert matches(app.resyncs, step["reasons"]), f"{where}: resyncs {app.resyncs}"
    elif op == "expect_welcomes":
        assert app.welcomes == step["resumed"], f"{where}: welcomes (resumed) {app.welcomes}"
    elif op == "expect_disconnects":
        codes = step["codes"]
        within = step.get("within_ms")
        await wait_for(
            app, lambda: len(app.disconnects) >= len(codes), f"{where}: disconnects {app.disconnects}"
        )
        assert [code for _, code in app.disconnects] == codes, f"{where}: disconnects {app.disconnects}"
        if within is not None and codes:
            took = (app.disconnects[-1][0] - last_cut) * 1000
            assert took <= within, f"{where}: the disconnect came {took:.0f} ms after the cut"
    elif op == "expect_duplicates":
        subscription = next(iter(client.subscriptions.values()))
        assert subscription.stats.duplicates == step["count"], f"{where}: {subscription.stats}"
    elif op == "expect_stopped":
        await wait_for(app, lambda: app.stopped is not None, where)
        assert app.stopped == ClientErrorInfo("refused", step["code"]), f"{where}: {app.stopped}"
    elif op == "expect_token_requests":
        assert app.token_requests == step["reasons"], f"{where}: token requests {app.token_requests}"
    else:
        raise AssertionError(f"{where}: unknown step {op!r}")
    expect_no_violation(app)


def _marks(scenario: dict[str, Any]) -> list[pytest.MarkDecorator]:
    if scenario["server"].get("backend") == "redis" and redis_server_binary() is None:
        return [pytest.mark.skip(reason="needs redis-server")]
    return []


@pytest.mark.parametrize("protocol", [1, 2])
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=_marks(scenario)) for name, scenario in SCENARIOS.items()]
)
async def test_scenario(name: str, protocol: int) -> None:
    """Every scenario on each protocol the client speaks (protocol 2: the room is subscribed by name)."""
    await play(SCENARIOS[name], protocol)


def test_every_step_of_the_suite_is_known() -> None:
    """A runner fails on what it does not know: check the whole file at once, without servers."""
    known = {
        "subscribe", "publish", "close", "stop", "start", "restart", "restart_redis", "cut", "gate",
        "revoke", "arm_snapshot", "sleep", "expect_attempts", "expect_items", "expect_resyncs",
        "expect_welcomes", "expect_disconnects", "expect_duplicates", "expect_stopped",
        "expect_token_requests",
    }  # fmt: skip
    readme = (HERE / "README.md").read_text()
    for scenario in SUITE["scenarios"]:
        assert set(scenario["client"]) <= CLIENT_OPTIONS, scenario["name"]
        assert scenario["steps"][0]["op"] in ("subscribe", "revoke"), scenario["name"]
        for step in scenario["steps"]:
            assert step["op"] in known, (scenario["name"], step)
    for op in known:
        assert f"`{op}" in readme, f"{op} is not described in tests/conformance/README.md"
