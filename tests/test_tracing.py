"""rtbroadcast.tracing in one process: the spans of a publish and of its delivery, failures, and misuse.

The cross-process tests (the delivery span of another process links to the publish span, through Redis
and PostgreSQL) are in tests/test_tracing_processes.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Literal

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from rtbroadcast import Broadcaster, ConfigurationError, Connection, Envelope, Event
from rtbroadcast.backends import PUBLISHED_AT
from rtbroadcast.backends.memory import MemoryBackend
from rtbroadcast.metrics import PrometheusMetrics
from rtbroadcast.tracing import OpenTelemetryTracing

pytestmark = pytest.mark.asyncio_only


class Seated(Event):
    type: Literal["tracing_seated"] = "tracing_seated"
    table: int = 1


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def traced(broadcaster: Broadcaster, provider: TracerProvider, **options: object) -> OpenTelemetryTracing:
    # The W3C propagator, explicitly: the global one is the process's, which other tests may configure.
    return OpenTelemetryTracing(
        broadcaster,
        tracer_provider=provider,
        propagator=TraceContextTextMapPropagator(),
        **options,  # type: ignore[arg-type]
    )


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def attach(broadcaster: Broadcaster, channel: str) -> Connection:
    connection = Connection(channel, limits=broadcaster.queue_limits)
    await broadcaster.attach(connection)
    return connection


async def test_a_publish_is_a_producer_span_and_its_delivery_a_linked_consumer_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with Broadcaster() as broadcaster:
        traced(broadcaster, provider)
        for _ in range(3):
            await attach(broadcaster, "room:1")
        with provider.get_tracer("test").start_as_current_span("POST /guests") as request:
            seq = await broadcaster.publish("room:1", Seated())
            # The publish span ended and its context was detached: the request's span is current again.
            assert trace.get_current_span() is request
        stored = (await broadcaster.backend.history("room:1", 0, limit=10)).envelopes[0]
    spans = exporter.get_finished_spans()
    [publish] = by_name(spans, "publish room:1")
    [deliver] = by_name(spans, "deliver room:1")  # one span for three connections
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is not None and publish.parent.span_id == request.get_span_context().span_id
    assert publish.context is not None and deliver.context is not None
    assert dict(publish.attributes or {}) == {
        "messaging.system": "rtbroadcast",
        "messaging.operation.name": "publish",
        "messaging.operation.type": "publish",
        "messaging.destination.name": "room:1",
        "messaging.rtbroadcast.message.seq": seq,
        "messaging.rtbroadcast.message.epoch": stored.epoch,
    }
    assert publish.status.status_code is StatusCode.UNSET
    # The envelope carried the publish span's context, W3C-encoded, and nothing else.
    assert stored.headers is not None and set(stored.headers) == {"traceparent"}
    version, trace_id, span_id, flags = stored.headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{publish.context.trace_id:032x}",
        f"{publish.context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled
    assert deliver.kind is SpanKind.CONSUMER
    assert deliver.parent is None  # a trace of its own, linked: the messaging conventions' fan-out
    assert deliver.context.trace_id != publish.context.trace_id
    [link] = deliver.links
    assert (link.context.trace_id, link.context.span_id) == (
        publish.context.trace_id,
        publish.context.span_id,
    )
    assert dict(deliver.attributes or {}) == {
        "messaging.system": "rtbroadcast",
        "messaging.operation.name": "deliver",
        "messaging.operation.type": "process",
        "messaging.destination.name": "room:1",
        "messaging.rtbroadcast.message.seq": seq,
        "messaging.rtbroadcast.message.epoch": stored.epoch,
        "messaging.rtbroadcast.connections": 3,
    }
    assert deliver.start_time is not None and deliver.end_time is not None
    assert publish.start_time is not None and publish.start_time <= deliver.start_time <= deliver.end_time


async def test_a_failed_publish_ends_its_span_as_an_error(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    broadcaster = Broadcaster()
    async with broadcaster:
        traced(broadcaster, provider)
        # The memory backend, disconnected underneath a broadcaster that thinks it is connected, refuses.
        await broadcaster.backend.disconnect()
        before = trace.get_current_span()
        with pytest.raises(Exception, match="not connected"):
            await broadcaster.publish("room:1", Seated())
        assert trace.get_current_span() is before
    [publish] = exporter.get_finished_spans()
    assert publish.name == "publish room:1"
    assert publish.status.status_code is StatusCode.ERROR
    assert (publish.attributes or {})["error.type"] == "StateError"
    assert "messaging.rtbroadcast.message.seq" not in (publish.attributes or {})
    assert [e.name for e in publish.events] == ["exception"]


async def test_a_channel_template_names_the_spans(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with Broadcaster() as broadcaster:
        traced(broadcaster, provider, channel_template=lambda c: c.split(":")[0] + ":{id}")
        await attach(broadcaster, "room:42")
        await broadcaster.publish("room:42", Seated())
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["deliver room:{id}", "publish room:{id}"]
    for span in exporter.get_finished_spans():
        attributes = span.attributes or {}
        assert attributes["messaging.destination.name"] == "room:42"
        assert attributes["messaging.destination.template"] == "room:{id}"


async def test_without_tracing_nothing_is_traced_and_envelopes_carry_no_headers(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with Broadcaster() as broadcaster:
        tracing = traced(broadcaster, provider)
        assert broadcaster.tracing_hook is tracing
        tracing.close()
        assert broadcaster.tracing_hook is None
        await attach(broadcaster, "room:1")
        await broadcaster.publish("room:1", Seated())
        [stored] = (await broadcaster.backend.history("room:1", 0, limit=10)).envelopes
    assert stored.headers is None
    assert exporter.get_finished_spans() == ()


async def test_an_envelope_without_a_trace_context_gets_no_delivery_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with Broadcaster() as broadcaster:
        tracing = traced(broadcaster, provider)
        for headers in (None, {PUBLISHED_AT: f"{time.time()}"}, {"traceparent": "00-garbage"}):
            tracing.delivered(Envelope("room:1", 1, "e", '{"seq":1}', headers), 1, 0, 1)
    assert exporter.get_finished_spans() == ()


def test_spans_go_to_the_global_provider_and_propagator_by_default() -> None:
    # A fresh interpreter: the global tracer provider can be set once per process.
    code = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rtbroadcast import Broadcaster, Connection
from rtbroadcast.tracing import OpenTelemetryTracing

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

async def main():
    async with Broadcaster() as broadcaster:
        OpenTelemetryTracing(broadcaster)
        await broadcaster.attach(Connection("c", limits=broadcaster.queue_limits))
        await broadcaster.publish_json("c", '{"type":"x"}')
        [envelope] = (await broadcaster.backend.history("c", 0, limit=1)).envelopes
        print(sorted(envelope.headers))

asyncio.run(main())
print(sorted(s.name for s in exporter.get_finished_spans()))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.splitlines() == ["['traceparent']", "['deliver c', 'publish c']"]


def test_publishing_and_delivering_without_tracing_imports_no_opentelemetry() -> None:
    code = """
import asyncio, sys
from rtbroadcast import Broadcaster, Connection
from rtbroadcast.metrics import PrometheusMetrics

async def main():
    async with Broadcaster(stamp_publish_time=True) as broadcaster:
        PrometheusMetrics(broadcaster, registry=None)
        await broadcaster.attach(Connection("c", limits=broadcaster.queue_limits))
        await broadcaster.publish_json("c", '{"type":"x"}')

asyncio.run(main())
bad = sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry')
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)


class HeaderlessBackend(MemoryBackend):
    """A backend as written before headers existed: its publish takes no ``headers=``."""

    supports_headers = False

    async def publish(  # type: ignore[override]
        self, channel: str, payload: str, *, idempotency_key: str | None = None
    ) -> Envelope:
        return await super().publish(channel, payload, idempotency_key=idempotency_key)


async def test_a_backend_without_headers_gets_none_and_publishes_are_still_traced(
    provider: TracerProvider, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigurationError, match="stamp_publish_time=True needs a backend that carries"):
        Broadcaster(backend=HeaderlessBackend(), stamp_publish_time=True)
    async with Broadcaster(backend=HeaderlessBackend()) as broadcaster:
        traced(broadcaster, provider)
        assert "does not carry headers" in caplog.text
        await attach(broadcaster, "room:1")
        await broadcaster.publish("room:1", Seated())
        [stored] = (await broadcaster.backend.history("room:1", 0, limit=10)).envelopes
    assert stored.headers is None
    assert [s.name for s in exporter.get_finished_spans()] == ["publish room:1"]


def test_misuse_is_refused_naming_the_option() -> None:
    broadcaster = Broadcaster()
    with pytest.raises(ConfigurationError, match="channel_template must be a function"):
        OpenTelemetryTracing(broadcaster, channel_template="room:{id}")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="stamp_publish_time must be True or False"):
        Broadcaster(stamp_publish_time="yes")  # type: ignore[arg-type]


# -- the publish time and the publish-to-write histogram ----------------------------------------------


def sample(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


async def test_a_stamped_publish_is_timed_to_the_end_of_its_fan_out() -> None:
    registry = CollectorRegistry()
    async with Broadcaster(stamp_publish_time=True) as broadcaster:
        PrometheusMetrics(broadcaster, registry=registry)
        await attach(broadcaster, "room:1")
        before = time.time()
        await broadcaster.publish("room:1", Seated())
        after = time.time()
        [stored] = (await broadcaster.backend.history("room:1", 0, limit=10)).envelopes
    assert stored.headers is not None and set(stored.headers) == {PUBLISHED_AT}
    assert stored.published_at is not None and before <= stored.published_at <= after
    assert sample(registry, "rtbroadcast_publish_to_write_seconds_count") == 1
    elapsed = sample(registry, "rtbroadcast_publish_to_write_seconds_sum")
    assert elapsed is not None and 0 <= elapsed <= after - before
    assert sample(registry, "rtbroadcast_publish_to_write_skewed_total") == 0


async def test_an_unstamped_publish_is_not_timed_and_a_future_stamp_counts_as_skew() -> None:
    registry = CollectorRegistry()
    async with Broadcaster() as broadcaster:
        PrometheusMetrics(broadcaster, registry=registry)
        await attach(broadcaster, "room:1")
        await broadcaster.publish("room:1", Seated())
        assert sample(registry, "rtbroadcast_publish_to_write_seconds_count") == 0
        assert sample(registry, "rtbroadcast_fanout_seconds_count") == 1
        # As a backend hands over an envelope stamped by a host whose clock is a minute ahead of ours.
        ahead: Mapping[str, str] = {PUBLISHED_AT: f"{time.time() + 60:.6f}"}
        broadcaster.on_envelope(Envelope("room:1", 2, "e", '{"type":"x","seq":2}', ahead))
        broadcaster.on_envelope(Envelope("room:1", 3, "e", '{"type":"x","seq":3}', {PUBLISHED_AT: "nan"}))
    assert sample(registry, "rtbroadcast_publish_to_write_seconds_count") == 1
    assert sample(registry, "rtbroadcast_publish_to_write_seconds_sum") == 0
    assert sample(registry, "rtbroadcast_publish_to_write_skewed_total") == 1


def test_published_at_reads_only_a_finite_number() -> None:
    def stamped(value: str) -> float | None:
        return Envelope("c", 1, "e", "{}", {PUBLISHED_AT: value}).published_at

    assert stamped("1764600000.25") == 1764600000.25
    assert stamped("soon") is None and stamped("inf") is None and stamped("nan") is None
    assert Envelope("c", 1, "e", "{}").published_at is None
    assert Envelope("c", 1, "e", "{}", {"traceparent": "x"}).published_at is None
    # Headers take no part in equality: the same event in the same stream, read live or from history.
    assert Envelope("c", 1, "e", "{}", {"a": "b"}) == Envelope("c", 1, "e", "{}")
