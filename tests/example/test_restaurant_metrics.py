"""The example service's /metrics, scraped while a test publishes, resumes, resyncs and drops a reader."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from rtbroadcast import Broadcaster, QueueLimits
from tests.example.conftest import Running, StartService
from tests.example.restaurant_support import welcome
from tests.support import StalledClient, connect, recv_json, until

RID = "metrics-restaurant"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(service: Running) -> Samples:
    response = await service.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_as_the_service_publishes_resumes_resyncs_and_drops(
    start_service: StartService,
) -> None:
    broadcaster = Broadcaster("memory://", queue_limits=QueueLimits(max_messages=64, max_size=2**16))
    service = await start_service(broadcaster=broadcaster)
    ws = {"transport": "websocket", "protocol": "1"}
    before = await scrape(service)
    assert value(before, "rtbroadcast_connections", **ws) == 0
    assert value(before, "rtbroadcast_backend_available") == 1

    async with await connect(service.ws_url(RID)) as device:
        first = await welcome(device)
        response = await service.http.post(f"/restaurants/{RID}/tables", json={"name": "T1", "capacity": 2})
        assert response.status_code == 201
        event = await recv_json(device)
        assert event["type"] == "table_created"
        during = await scrape(service)
        assert value(during, "rtbroadcast_connections", **ws) == 1
        assert value(during, "rtbroadcast_subscriptions", **ws) == 1
        assert value(during, "rtbroadcast_connections_opened_total", **ws) == 1
        assert (
            value(during, "rtbroadcast_publishes_total") == value(before, "rtbroadcast_publishes_total") + 1
        )
        assert value(during, "rtbroadcast_backend_publish_seconds_count", outcome="ok") >= 1
        assert value(during, "rtbroadcast_fanout_seconds_count") >= 1
        assert value(during, "rtbroadcast_deliveries_total") >= 2  # the welcome and the event
    await until(lambda: broadcaster.connection_count() == 0)

    # A resume that history serves, and one from another stream (a resync).
    async with await connect(service.ws_url(RID, epoch=first["epoch"], last_seq=0)) as device:
        assert (await welcome(device))["resumed"] is True
    async with await connect(service.ws_url(RID, epoch="0" * 16, last_seq=1)) as device:
        assert (await welcome(device))["resumed"] is False
        assert (await recv_json(device))["reason"] == "epoch_changed"
    await until(lambda: broadcaster.connection_count() == 0)
    after = await scrape(service)
    assert value(after, "rtbroadcast_resumes_total") == 1
    assert value(after, "rtbroadcast_resyncs_total", reason="epoch_changed") == 1
    assert value(after, "rtbroadcast_connections_closed_total", reason="normal", **ws) == 3

    # A reader that never reads is closed as a slow consumer; its queued frames are dropped.
    address = urlsplit(service.ws_url(RID))
    stalled = await StalledClient.open(service.address, f"{address.path}?{address.query}")
    try:
        await until(lambda: broadcaster.connection_count() == 1)
        blob = json.dumps({"type": "metrics_blob", "blob": "z" * 4000})
        async with asyncio.timeout(20):
            while broadcaster.stats().slow_consumers_closed == 0:
                await broadcaster.publish_json(f"restaurant:{RID}", blob)
                await asyncio.sleep(0)
    finally:
        stalled.close()
    dropped = await scrape(service)
    assert value(dropped, "rtbroadcast_connections_closed_total", reason="slow_consumer", **ws) == 1
    assert value(dropped, "rtbroadcast_dropped_total") > 0
    assert value(dropped, "rtbroadcast_queue_high_water") > 1


async def test_label_cardinality_does_not_grow_with_channels(start_service: StartService) -> None:
    broadcaster = Broadcaster("memory://")
    service = await start_service(broadcaster=broadcaster)
    async with await connect(service.ws_url(RID)) as device:
        await welcome(device)
        await service.http.post(f"/restaurants/{RID}/tables", json={"name": "T1", "capacity": 2})
        await recv_json(device)
        one_channel = await scrape(service)
        subscriptions = [broadcaster.subscribe(f"room:{n}") for n in range(1000)]
        for subscription in subscriptions:
            await subscription.__aenter__()
        try:
            for n in range(1000):
                await broadcaster.publish_json(f"room:{n}", '{"type":"metrics_tick"}')
            many = await scrape(service)
        finally:
            for subscription in subscriptions:
                await subscription.__aexit__(None, None, None)
    assert value(many, "rtbroadcast_channels") == 1001
    assert value(many, "rtbroadcast_connections", transport="in_process", protocol="1") == 1000
    # The same series, whatever the number of channels: no label carries a channel's name.
    series = {name for name, _ in many}
    added = {(name, labels) for name, labels in many} - set(one_channel)
    in_process = (("protocol", "1"), ("transport", "in_process"))
    assert added == {
        ("rtbroadcast_connections", in_process),
        ("rtbroadcast_subscriptions", in_process),
        ("rtbroadcast_connections_opened_total", in_process),
    }
    assert series == {name for name, _ in one_channel}
    assert not any("room:" in label for _, labels in many for _, label in labels)
