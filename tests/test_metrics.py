"""rtbroadcast.metrics on its own: what a scrape reads, timings, errors, and misuse."""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from rtbroadcast import Broadcaster, ConfigurationError, Connection, Event
from rtbroadcast.backends.redis import RECONNECTED
from rtbroadcast.metrics import PrometheusMetrics, close_reason

from .redis_support import RedisServer
from .support import MS, until

pytestmark = pytest.mark.asyncio_only


class Pinged(Event):
    type: Literal["metrics_pinged"] = "metrics_pinged"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_a_scrape_reads_the_broadcaster_and_the_timings_move() -> None:
    registry = CollectorRegistry()
    async with Broadcaster() as broadcaster:
        metrics = PrometheusMetrics(broadcaster, registry=registry)
        assert broadcaster.metrics_observer is metrics
        connection = Connection("room:1", limits=broadcaster.queue_limits)
        connection.transport = "sse"
        await broadcaster.attach(connection)
        await broadcaster.publish("room:1", Pinged())
        await broadcaster.publish("room:1", Pinged())
        assert sample(registry, "rtbroadcast_connections", transport="sse", protocol="1") == 1
        assert sample(registry, "rtbroadcast_publishes_total") == 2
        assert sample(registry, "rtbroadcast_backend_publish_seconds_count", outcome="ok") == 2
        assert sample(registry, "rtbroadcast_fanout_seconds_count") == 2
        assert sample(registry, "rtbroadcast_queued_frames") == 3  # welcome + 2 events, nobody writes
        assert sample(registry, "rtbroadcast_queue_depth_max") == 3
        connection.close(4008, "too many messages")
        assert (
            sample(
                registry,
                "rtbroadcast_connections_closed_total",
                transport="sse",
                protocol="1",
                reason="rate_limited",
            )
            == 1
        )
        text = generate_latest(registry).decode()
        assert "# HELP rtbroadcast_connections_closed_total" in text
        metrics.close()
        assert broadcaster.metrics_observer is None
        assert sample(registry, "rtbroadcast_publishes_total") is None  # unregistered
        await broadcaster.publish("room:1", Pinged())  # no observer: nothing is timed, nothing breaks


async def test_a_failed_publish_is_timed_and_counted_by_error_class() -> None:
    registry = CollectorRegistry()
    broadcaster = Broadcaster()
    async with broadcaster:
        PrometheusMetrics(broadcaster, registry=registry)
    # The memory backend, disconnected underneath a broadcaster that thinks it is connected, refuses.
    async with broadcaster:
        await broadcaster.backend.disconnect()
        with pytest.raises(Exception, match="not connected"):
            await broadcaster.publish("room:1", Pinged())
    assert sample(registry, "rtbroadcast_backend_publish_seconds_count", outcome="error") == 1
    assert sample(registry, "rtbroadcast_publish_errors_total", error="StateError") == 1


def test_close_reasons_are_a_short_fixed_list() -> None:
    assert close_reason(4001) == "slow_consumer"
    assert close_reason(4008) == "rate_limited"
    assert close_reason(1001) == "going_away"
    assert close_reason(None) == "unattached"
    assert close_reason(4321) == "other"


def test_bad_options_and_a_second_registration_fail_loudly() -> None:
    broadcaster = Broadcaster()
    with pytest.raises(ConfigurationError, match="namespace"):
        PrometheusMetrics(broadcaster, registry=None, namespace="my-app")
    with pytest.raises(ConfigurationError, match="publish_buckets"):
        PrometheusMetrics(broadcaster, registry=None, publish_buckets=(0.1, 0.05))
    with pytest.raises(ConfigurationError, match="fanout_buckets"):
        PrometheusMetrics(broadcaster, registry=None, fanout_buckets=("fast",))  # type: ignore[arg-type]
    registry = CollectorRegistry()
    PrometheusMetrics(broadcaster, registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusMetrics(Broadcaster(), registry=registry)
    PrometheusMetrics(Broadcaster(), registry=registry, namespace="second")  # its own names: fine


def test_the_grafana_dashboard_and_the_docs_name_exactly_the_metrics_exported() -> None:
    import json
    import re
    from pathlib import Path

    root = Path(__file__).parent.parent
    registry = CollectorRegistry()
    PrometheusMetrics(Broadcaster(), registry=registry)
    exported = {family.name.removeprefix("rtbroadcast_") for family in registry.collect()}
    dashboard = json.loads((root / "docs/grafana/rtbroadcast.json").read_text())
    used = {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"rtbroadcast_([a-z_]+)", target["expr"])
    }
    assert used <= exported, used - exported
    assert exported - used == {"connections_opened"}  # the opened/closed balance is the connections gauge
    page = (root / "docs/howto/metrics.md").read_text()
    documented = {
        name.removesuffix("_total") for name in re.findall(r"^\| `([a-z_]+)` \|", page, re.MULTILINE)
    }
    assert documented == exported


async def test_protocol_2_subscriptions_are_counted_by_protocol() -> None:
    from rtbroadcast.testing import connect, serve

    from .support import broadcast_app

    registry = CollectorRegistry()
    broadcaster = Broadcaster()
    PrometheusMetrics(broadcaster, registry=registry)
    app = broadcast_app(broadcaster)
    async with (
        serve(app, ws="rtbroadcast.uvicorn:WebSocketProtocol") as server,
        connect(server.ws_url("/ws"), protocol=2) as ws,
    ):
        await ws.subscribe("room:a")
        await ws.subscribe("room:b")
        kind = {"transport": "websocket", "protocol": "2"}
        assert sample(registry, "rtbroadcast_connections", **kind) == 1
        assert sample(registry, "rtbroadcast_subscriptions", **kind) == 2
        await broadcaster.publish("room:a", Pinged())
        await ws.event(channel="room:a")
        assert sample(registry, "rtbroadcast_fanout_seconds_count") == 1


async def test_a_backend_interruption_is_counted_and_the_availability_gauge_follows(
    redis_server: RedisServer,
) -> None:
    """Redis (a server of the test's own) killed and restarted under a subscribed channel."""
    registry = CollectorRegistry()
    async with Broadcaster(f"{redis_server.url}?key_prefix=rtbmetrics") as broadcaster:
        PrometheusMetrics(broadcaster, registry=registry)
        async with broadcaster.subscribe("room:1"):
            assert sample(registry, "rtbroadcast_backend_available") == 1
            assert sample(registry, "rtbroadcast_backend_interruptions_total", reason=RECONNECTED) is None
            await asyncio.to_thread(redis_server.kill)
            await until(lambda: sample(registry, "rtbroadcast_backend_available") == 0, 10_000 * MS)
            await asyncio.to_thread(redis_server.start)
            await until(lambda: sample(registry, "rtbroadcast_backend_available") == 1, 10_000 * MS)
            await until(
                lambda: sample(registry, "rtbroadcast_backend_interruptions_total", reason=RECONNECTED) == 1,
                5_000 * MS,
            )
