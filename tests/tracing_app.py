"""A small traced service for the cross-process tracing tests: ``python -m uvicorn tests.tracing_app:app``.

Configured by the environment: ``RTB_TRACING_BACKEND``, a backend URL (Redis with ``key_prefix``,
PostgreSQL with ``schema``). Its broadcaster stamps its publishes and is traced into an in-memory exporter
of its own; ``GET /spans`` returns what it recorded, ``GET /latency`` its publish-to-write histogram.
It mounts the broadcast WebSocket at ``/ws?room=...`` and publishes with ``POST /publish {"room"}``.
"""

from __future__ import annotations

import os
from typing import Literal

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtbroadcast import Broadcaster, Event
from rtbroadcast.asgi import channel_from_query
from rtbroadcast.metrics import PrometheusMetrics
from rtbroadcast.starlette import lifespan, websocket_route
from rtbroadcast.tracing import OpenTelemetryTracing


class Traced(Event):
    type: Literal["traced"] = "traced"
    by: int


PROCESS = os.getpid()
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
registry = CollectorRegistry()

broadcaster = Broadcaster(os.environ["RTB_TRACING_BACKEND"], stamp_publish_time=True)
OpenTelemetryTracing(broadcaster, tracer_provider=provider, propagator=TraceContextTextMapPropagator())
PrometheusMetrics(broadcaster, registry=registry)


async def publish(request: Request) -> JSONResponse:
    body = await request.json()
    seq = await broadcaster.publish(f"room:{body['room']}", Traced(by=PROCESS))
    return JSONResponse({"seq": seq, "by": PROCESS})


async def spans(request: Request) -> JSONResponse:
    out = []
    for span in exporter.get_finished_spans():
        assert span.context is not None
        out.append(
            {
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": f"{span.context.trace_id:032x}",
                "span_id": f"{span.context.span_id:016x}",
                "parent": None if span.parent is None else f"{span.parent.span_id:016x}",
                "links": [[f"{k.context.trace_id:032x}", f"{k.context.span_id:016x}"] for k in span.links],
                "attributes": dict(span.attributes or {}),
            }
        )
    return JSONResponse(out)


async def latency(request: Request) -> JSONResponse:
    def sample(name: str) -> float | None:
        return registry.get_sample_value(f"rtbroadcast_publish_to_write_{name}")

    return JSONResponse({"count": sample("seconds_count"), "sum": sample("seconds_sum")})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": PROCESS, **broadcaster.stats().as_dict()})


app = Starlette(
    routes=[
        websocket_route("/ws", broadcaster, channel=channel_from_query("room", prefix="room:")),
        Route("/publish", publish, methods=["POST"]),
        Route("/spans", spans),
        Route("/latency", latency),
        Route("/health", health),
    ],
    lifespan=lifespan(broadcaster),
)
