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
    PresenceChange,
    Refused,
    ResyncInfo,
    Subscription,
    SubscriptionDenied,
    TokenRequest,
)
from rtbroadcast.protocol import ServerFrame, Subscribed, WelcomeV2

from .redis_support import redis_server_binary
from .support import MS, until

HERE = Path(__file__).parent / "conformance"
SUITE = json.loads((HERE / "scenarios.json").read_text())
SCENARIOS = {scenario["name"]: scenario for scenario in SUITE["scenarios"]}
CLIENT_OPTIONS = {"token", "tokens", "backoff", "heartbeat_interval_ms", "heartbeat_timeout_ms"}
SCENARIO_KEYS = {"name", "description", "server", "client", "steps", "protocols"}
#: The protocols this client speaks: every scenario runs on each that it lists (default: both).
PROTOCOLS = (1, 2)
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
    changed: asyncio.Event
    items: list[int] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    resyncs: list[str] = field(default_factory=list)
    welcomes: list[bool] = field(default_factory=list)
    #: The error code of the server's refusal of this subscription (protocol 2), once it came.
    refusal: str | None = None
    #: Whether the subscription's iteration ended without an error.
    ended: bool = False
    presence: int | None = None
    subscription: Subscription[dict[str, Any]] | None = None

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

    def presence_changed(self, change: PresenceChange) -> None:
        self.presence = change.presence.count
        self.changed.set()


@dataclass
class Run:
    """One scenario's client: its rooms' applications (in subscription order), and its connection's life."""

    protocol: int
    apps: dict[str, App] = field(default_factory=dict)
    disconnects: list[tuple[float, int]] = field(default_factory=list)
    token_requests: list[str] = field(default_factory=list)
    stopped: ClientErrorInfo | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self, step: dict[str, Any], where: str) -> App:
        """The room a step names, or the scenario's first."""
        room = step.get("room", next(iter(self.apps), None))
        assert room in self.apps, f"{where}: room {room!r} was not subscribed"
        return self.apps[room]

    def violations(self) -> list[str]:
        return [violation for app in self.apps.values() for violation in app.violations]

    def connected(self, welcome: Welcome | WelcomeV2) -> None:
        if isinstance(welcome, Welcome):  # protocol 2: each subscribed frame counts (see frame())
            next(iter(self.apps.values())).welcomes.append(welcome.resumed)
        self.changed.set()

    def frame(self, frame: ServerFrame) -> None:
        if isinstance(frame, Subscribed) and frame.channel.startswith("room:"):
            app = self.apps.get(frame.channel.removeprefix("room:"))
            if app is not None:
                app.welcomes.append(frame.resumed)
                self.changed.set()

    def disconnected(self, info: DisconnectInfo) -> None:
        self.disconnects.append((time.monotonic(), info.code))
        self.changed.set()


@dataclass(frozen=True)
class ClientErrorInfo:
    kind: str
    code: int | None


def make_client(url: str, options: dict[str, Any], run: Run) -> Client:
    unknown = set(options) - CLIENT_OPTIONS
    assert not unknown, f"unknown client options {sorted(unknown)}"
    backoff = options.get("backoff", {"initial_ms": 50, "max_ms": 200})
    tokens = list(options.get("tokens", []))

    def get_token(request: TokenRequest) -> str | None:
        run.token_requests.append(request.reason)
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
        on_connect=run.connected,
        on_frame=run.frame,
        protocol=run.protocol,
        on_disconnect=run.disconnected,
        **extra,
    )


def subscribe(client: Client, run: Run, app: App, step: dict[str, Any]) -> Subscription[dict[str, Any]]:
    presence = bool(step.get("presence", False))
    if run.protocol == 1:
        assert not presence, "presence needs protocol 2"
        subscription = client.subscribe(resync=app.load_snapshot)
    else:
        subscription = client.subscribe(
            f"room:{app.room}",
            resync=app.load_snapshot,
            presence=presence,
            on_presence=app.presence_changed if presence else None,
        )
    app.subscription = subscription
    return subscription


async def consume(subscription: Subscription[dict[str, Any]], run: Run, app: App) -> None:
    try:
        async for received in subscription:
            app.apply(received.event)
        app.ended = True
    except SubscriptionDenied as exc:  # one subscription refused (protocol 2): the client goes on
        app.refusal = exc.error_code
    except Refused as exc:
        run.stopped = ClientErrorInfo("refused", exc.code)
    except Exception as exc:  # reported to the step that expects something else
        run.stopped = ClientErrorInfo(type(exc).__name__, getattr(exc, "code", None))
    finally:
        run.changed.set()


async def wait_for(run: Run, condition: Any, what: str, timeout: float = WAIT) -> None:
    try:
        await until(lambda: bool(run.violations()) or condition(), timeout, changed=run.changed)
    except AssertionError:
        raise AssertionError(f"{what}: still not so after {timeout:.1f} s") from None


def expect_no_violation(run: Run) -> None:
    violations = run.violations()
    assert not violations, f"the application's state went wrong: {violations}"


def matches(actual: list[Any], expected: list[Any]) -> bool:
    return len(actual) == len(expected) and all(
        a in e if isinstance(e, list) else a == e for a, e in zip(actual, expected, strict=True)
    )


async def play(scenario: dict[str, Any], protocol: int) -> None:
    unknown = set(scenario) - SCENARIO_KEYS
    assert not unknown, f"unknown scenario keys {sorted(unknown)}"
    async with harness(scenario["server"]) as server:
        run = Run(protocol)
        client: Client | None = None
        consumers: list[asyncio.Task[None]] = []
        last_cut = 0.0
        try:
            for number, step in enumerate(scenario["steps"], start=1):
                op = step["op"]
                where = f"step {number} ({op})"
                if op == "subscribe":
                    assert step["room"] not in run.apps, f"{where}: room {step['room']!r} subscribed already"
                    app = App(server.http, step["room"], run.changed)
                    run.apps[app.room] = app
                    if client is None:
                        url = f"{server.ws}?room={step['room']}" if protocol == 1 else server.ws
                        client = make_client(url, scenario["client"], run)
                    else:
                        assert protocol == 2, f'{where}: a second room needs protocol 2 ("protocols": [2])'
                    subscription = subscribe(client, run, app, step)
                    loop = asyncio.get_running_loop()
                    consumers.append(loop.create_task(consume(subscription, run, app)))
                    if step.get("wait", True):
                        await wait_for(
                            run,
                            lambda: app.welcomes or run.stopped or app.refusal,  # noqa: B023
                            where,
                        )
                        assert run.stopped is None, f"{where}: stopped: {run.stopped}"
                        assert app.refusal is None, f"{where}: refused: {app.refusal}"
                    continue
                if op == "unsubscribe":
                    assert protocol == 2, f"{where}: unsubscribe needs protocol 2"
                    leaving = run.app(step, where).subscription
                    assert leaving is not None
                    await leaving.close()
                elif op == "publish":
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
                elif op in ("join", "leave"):
                    await server.post(f"/{op}", room=step["room"])
                elif op == "arm_snapshot":
                    await server.post("/arm_snapshot", room=step["room"], n=step["n"])
                elif op == "sleep":
                    await asyncio.sleep(step["ms"] / 1000)
                elif op == "expect_attempts":
                    await asyncio.sleep(step.get("after_ms", 0) / 1000)
                    attempts = (await server.stats())["attempts"].get(step["token"], 0)
                    assert attempts == step["count"], f"{where}: {attempts} attempts with {step['token']!r}"
                elif op == "expect_subscribers":
                    await expect_subscribers(server, step, where)
                else:
                    assert client is not None, f"{where} before subscribe"
                    await expect(run, step, where, last_cut)
        finally:
            if client is not None:
                await client.close()
            for consumer in consumers:
                await consumer


async def expect_subscribers(server: Harness, step: dict[str, Any], where: str) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        response = await server.control.get("/subscribers", params={"room": step["room"]})
        count = response.raise_for_status().json()["count"]
        if count == step["count"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(20 * MS)
    assert count == step["count"], f"{where}: {count} connections subscribed to room {step['room']!r}"


async def expect(run: Run, step: dict[str, Any], where: str, last_cut: float) -> None:
    op = step["op"]
    if op == "expect_items":
        app = run.app(step, where)
        wanted = list(range(1, step["count"] + 1))
        await wait_for(
            run, lambda: app.items == wanted, f"{where}: items 1..{step['count']}, have {app.items}"
        )
    elif op == "expect_resyncs":
        app = run.app(step, where)
        assert matches(app.resyncs, step["reasons"]), f"{where}: resyncs {app.resyncs}"
    elif op == "expect_welcomes":
        app = run.app(step, where)
        assert app.welcomes == step["resumed"], f"{where}: welcomes (resumed) {app.welcomes}"
    elif op == "expect_disconnects":
        codes = step["codes"]
        within = step.get("within_ms")
        await wait_for(
            run, lambda: len(run.disconnects) >= len(codes), f"{where}: disconnects {run.disconnects}"
        )
        assert [code for _, code in run.disconnects] == codes, f"{where}: disconnects {run.disconnects}"
        if within is not None and codes:
            took = (run.disconnects[-1][0] - last_cut) * 1000
            assert took <= within, f"{where}: the disconnect came {took:.0f} ms after the cut"
    elif op == "expect_duplicates":
        subscription = run.app(step, where).subscription
        assert subscription is not None
        assert subscription.stats.duplicates == step["count"], f"{where}: {subscription.stats}"
    elif op == "expect_stopped":
        await wait_for(run, lambda: run.stopped is not None, where)
        assert run.stopped == ClientErrorInfo("refused", step["code"]), f"{where}: {run.stopped}"
    elif op == "expect_token_requests":
        assert run.token_requests == step["reasons"], f"{where}: token requests {run.token_requests}"
    elif op == "expect_refused":
        app = run.app(step, where)
        await wait_for(run, lambda: app.refusal is not None, f"{where}: a refusal of room {app.room!r}")
        assert app.refusal == step["error"], f"{where}: refused with {app.refusal!r}"
    elif op == "expect_ended":
        app = run.app(step, where)
        await wait_for(run, lambda: app.ended, f"{where}: the subscription of room {app.room!r} ended")
    elif op == "expect_presence":
        app = run.app(step, where)
        await wait_for(run, lambda: app.presence == step["count"], f"{where}: presence count {app.presence}")
    else:
        raise AssertionError(f"{where}: unknown step {op!r}")
    expect_no_violation(run)


def _marks(scenario: dict[str, Any]) -> list[pytest.MarkDecorator]:
    if scenario["server"].get("backend") == "redis" and redis_server_binary() is None:
        return [pytest.mark.skip(reason="needs redis-server")]
    return []


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        pytest.param(name, protocol, marks=_marks(scenario), id=f"{name}-{protocol}")
        for name, scenario in SCENARIOS.items()
        for protocol in scenario.get("protocols", PROTOCOLS)
    ],
)
async def test_scenario(name: str, protocol: int) -> None:
    """Every scenario on each protocol it lists (default both; protocol 2: rooms subscribed by name)."""
    await play(SCENARIOS[name], protocol)


def test_every_step_of_the_suite_is_known() -> None:
    """A runner fails on what it does not know: check the whole file at once, without servers."""
    known = {
        "subscribe", "publish", "close", "stop", "start", "restart", "restart_redis", "cut", "gate",
        "revoke", "arm_snapshot", "sleep", "expect_attempts", "expect_items", "expect_resyncs",
        "expect_welcomes", "expect_disconnects", "expect_duplicates", "expect_stopped",
        "expect_token_requests", "unsubscribe", "join", "leave", "expect_subscribers",
        "expect_refused", "expect_ended", "expect_presence",
    }  # fmt: skip
    readme = (HERE / "README.md").read_text()
    for scenario in SUITE["scenarios"]:
        assert set(scenario) <= SCENARIO_KEYS, scenario["name"]
        assert set(scenario.get("protocols", PROTOCOLS)) <= set(PROTOCOLS), scenario["name"]
        assert set(scenario["client"]) <= CLIENT_OPTIONS, scenario["name"]
        assert scenario["steps"][0]["op"] in ("subscribe", "revoke"), scenario["name"]
        for step in scenario["steps"]:
            assert step["op"] in known, (scenario["name"], step)
    for op in known:
        assert f"`{op}" in readme, f"{op} is not described in tests/conformance/README.md"
