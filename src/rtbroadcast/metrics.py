"""Prometheus metrics for a :class:`~rtbroadcast.Broadcaster` (``pip install 'rtbroadcast[metrics]'``).

Nothing else in rtbroadcast imports this module: without it, publishing and fan-out time nothing and no
``prometheus_client`` is loaded. With it::

    from rtbroadcast.metrics import PrometheusMetrics

    metrics = PrometheusMetrics(broadcaster)  # registers on prometheus_client.REGISTRY

Most figures are read from the broadcaster when Prometheus scrapes (its counters exist anyway, so they
cost the fan-out nothing); only the latency histograms are observed as events happen, once per publish
and once per fan-out, never once per connection. No metric has a per-channel label: a label's values are
a transport, a protocol version, a close reason, a resync reason or a backend's interruption reason, all
from short fixed lists, so the number of series does not grow with channels or connections. The metrics
page of the docs lists every metric and has a Grafana dashboard.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import ConfigurationError
from .protocol import CloseCode

if TYPE_CHECKING:
    from .backends.base import Envelope
    from .broadcaster import Broadcaster

__all__ = [
    "DEFAULT_FANOUT_BUCKETS",
    "DEFAULT_PUBLISH_BUCKETS",
    "DEFAULT_PUBLISH_TO_WRITE_BUCKETS",
    "PrometheusMetrics",
    "close_reason",
]

#: Buckets of ``rtbroadcast_backend_publish_seconds``: 100 µs (memory) to 2.5 s (a backend timing out).
DEFAULT_PUBLISH_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
#: Buckets of ``rtbroadcast_fanout_seconds``: 10 µs (a few subscribers) to 250 ms (a very large channel).
DEFAULT_FANOUT_BUCKETS: Final = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)

#: Buckets of ``rtbroadcast_publish_to_write_seconds``: 1 ms (one host) to 10 s (a backend that stalled).
DEFAULT_PUBLISH_TO_WRITE_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_CLOSE_REASONS: Final = {int(code): code.name.lower() for code in CloseCode}


def close_reason(code: int | None) -> str:
    """Return the ``reason`` label of a close code: its :class:`~rtbroadcast.CloseCode` name, lower-case.

    ``None`` (a connection unregistered before it closed, such as one refused while attaching) is
    ``"unattached"``; any other code (a service's own, through a custom disconnect) is ``"other"``, so
    that the label keeps a short fixed list of values.
    """
    if code is None:
        return "unattached"
    return _CLOSE_REASONS.get(code, "other")


class PrometheusMetrics(Collector):
    """Expose one broadcaster's figures as Prometheus metrics, and time its publishes and fan-outs.

    Args:
        broadcaster: the broadcaster to observe; this sets itself as its observer
            (:meth:`~rtbroadcast.Broadcaster.set_metrics_observer`).
        registry: where to register (default: ``prometheus_client.REGISTRY``, the one
            ``prometheus_client.make_asgi_app()`` serves); ``None`` registers nowhere (call
            :meth:`collect` yourself, or register it later).
        namespace: the prefix of every metric name.
        publish_buckets: histogram buckets of the backend's publish latency, in seconds.
        fanout_buckets: histogram buckets of a fan-out's duration, in seconds.
        publish_to_write_buckets: histogram buckets of the time from a stamped publish, in whichever
            process made it, to the end of its fan-out here, in seconds.

    Raises:
        ConfigurationError: ``namespace`` is not a valid metric-name prefix, or buckets are not an
            increasing sequence of positive numbers.
        ValueError: ``registry`` already has metrics of these names (prometheus_client's error): give
            each broadcaster its own ``namespace`` or registry.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        *,
        registry: CollectorRegistry | None = REGISTRY,
        namespace: str = "rtbroadcast",
        publish_buckets: Sequence[float] = DEFAULT_PUBLISH_BUCKETS,
        fanout_buckets: Sequence[float] = DEFAULT_FANOUT_BUCKETS,
        publish_to_write_buckets: Sequence[float] = DEFAULT_PUBLISH_TO_WRITE_BUCKETS,
    ) -> None:
        if (
            not isinstance(namespace, str)
            or not namespace.replace("_", "a").isalnum()
            or namespace[0].isdigit()
        ):
            raise ConfigurationError(
                f"namespace must be letters, digits and '_' (not first a digit): {namespace!r}"
            )
        self.broadcaster = broadcaster
        self.namespace = namespace
        self._publish_seconds = Histogram(
            "backend_publish_seconds",
            "Time from publish() to the backend's acknowledgement (the seq assigned), successful or not.",
            namespace=namespace,
            labelnames=("outcome",),
            buckets=_buckets("publish_buckets", publish_buckets),
            registry=None,
        )
        self._publish_ok = self._publish_seconds.labels(outcome="ok")
        self._publish_error = self._publish_seconds.labels(outcome="error")
        self._fanout_seconds = Histogram(
            "fanout_seconds",
            "Time to hand one envelope from the backend to every subscriber in this process (each frame "
            "written, or queued for its connection's writer).",
            namespace=namespace,
            buckets=_buckets("fanout_buckets", fanout_buckets),
            registry=None,
        )
        self._publish_to_write = Histogram(
            "publish_to_write_seconds",
            "Time from publish() in the publishing process (its wall clock, carried with the envelope) to "
            "the end of this process's fan-out; only envelopes stamped by a broadcaster with "
            "stamp_publish_time=True.",
            namespace=namespace,
            buckets=_buckets("publish_to_write_buckets", publish_to_write_buckets),
            registry=None,
        )
        self._skewed = 0
        self._publish_errors: Counter[str] = Counter()
        self._registry = registry
        if registry is not None:
            registry.register(self)
        broadcaster.set_metrics_observer(self)

    def close(self) -> None:
        """Stop observing the broadcaster and unregister from the registry (for tests and reloads)."""
        if self.broadcaster.metrics_observer is self:
            self.broadcaster.set_metrics_observer(None)
        if self._registry is not None:
            self._registry.unregister(self)
            self._registry = None

    # -- MetricsObserver ------------------------------------------------------------------------------

    def published(self, channel: str, seconds: float) -> None:
        """Observe a publish's backend latency (see :class:`~rtbroadcast.stats.MetricsObserver`)."""
        self._publish_ok.observe(seconds)

    def publish_failed(self, channel: str, seconds: float, error: Exception) -> None:
        """Observe a failed publish: its latency, and its error's class name."""
        self._publish_error.observe(seconds)
        self._publish_errors[type(error).__name__] += 1

    def fanned_out(self, envelope: Envelope, subscribers: int, seconds: float) -> None:
        """Observe one fan-out's duration, and its time since the publish when the envelope is stamped."""
        self._fanout_seconds.observe(seconds)
        if envelope.headers is None:
            return
        published = envelope.published_at
        if published is None:
            return
        elapsed = time.time() - published
        if elapsed < 0:
            # This host's clock is behind the publisher's: a latency cannot be negative, so count the
            # skew and observe the least latency there is.
            self._skewed += 1
            elapsed = 0.0
        self._publish_to_write.observe(elapsed)

    # -- Collector ------------------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """Name every metric (what a registry checks for duplicates when this registers)."""
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        """Read the broadcaster's figures now (what a scrape calls)."""
        ns = self.namespace
        broadcaster = self.broadcaster
        stats = broadcaster.stats()
        registry = broadcaster.registry

        connections: Counter[tuple[str, ...]] = Counter()
        subscriptions: Counter[tuple[str, ...]] = Counter()
        queued = deepest = 0
        for connection in registry:
            kind = (connection.transport, str(connection.protocol))
            connections[kind] += 1
            subscriptions[kind] += len(connection.cursors)
            depth = connection.queued
            queued += depth
            deepest = max(deepest, depth)
        yield _gauge(f"{ns}_connections", "Open connections.", ("transport", "protocol"), connections)
        yield _gauge(
            f"{ns}_subscriptions",
            "Open subscriptions (a connection's channels; one per protocol-1 connection).",
            ("transport", "protocol"),
            subscriptions,
        )
        opened: Counter[tuple[str, ...]] = Counter(
            {(t, str(p)): n for (t, p), n in registry.opened().items()}
        )
        yield _counter(
            f"{ns}_connections_opened", "Connections registered.", ("transport", "protocol"), opened
        )
        closed: Counter[tuple[str, ...]] = Counter()
        for (transport, protocol, code), n in registry.closed().items():
            closed[transport, str(protocol), close_reason(code)] += n
        yield _counter(
            f"{ns}_connections_closed",
            "Connections closed, by reason: the close code's name (slow_consumer 4001, rate_limited 4008, "
            "going_away 1001, ...).",
            ("transport", "protocol", "reason"),
            closed,
        )
        yield _single(
            CounterMetricFamily, f"{ns}_publishes", "Events published by this process.", stats.published
        )
        yield _counter(
            f"{ns}_publish_errors",
            "Publishes that raised, by error class (BackendUnavailable, ...).",
            ("error",),
            Counter({(name,): n for name, n in self._publish_errors.items()}),
        )
        yield _single(
            CounterMetricFamily, f"{ns}_deliveries", "Frames written to clients.", stats.messages_sent
        )
        yield _single(
            CounterMetricFamily,
            f"{ns}_dropped",
            "Frames dropped with the queue of a connection closed as a slow consumer.",
            stats.messages_dropped,
        )
        yield _single(
            CounterMetricFamily, f"{ns}_resumes", "Client resumes served from history.", stats.resumes
        )
        yield _counter(
            f"{ns}_resyncs",
            "resync_required frames sent, by reason.",
            ("reason",),
            Counter({(reason,): n for reason, n in stats.resyncs_by_reason.items()}),
        )
        yield _single(
            CounterMetricFamily,
            f"{ns}_repairs",
            "Connections brought up to date from history after a gap or an interruption.",
            stats.repairs,
        )
        yield _single(
            CounterMetricFamily,
            f"{ns}_lost_detected",
            "Connections found behind their channel's top by the periodic position check.",
            stats.lost_detected,
        )
        yield _counter(
            f"{ns}_backend_interruptions",
            "Times the backend reported that envelopes may have been lost, by reason.",
            ("reason",),
            Counter({(reason,): n for reason, n in stats.interruptions_by_reason.items()}),
        )
        yield _single(
            GaugeMetricFamily,
            f"{ns}_backend_available",
            "1 while the backend is reachable (as far as this process knows), else 0.",
            1 if stats.backend_available else 0,
        )
        yield _single(
            GaugeMetricFamily, f"{ns}_channels", "Channels with a subscriber here.", len(stats.channels)
        )
        yield _single(
            GaugeMetricFamily, f"{ns}_queued_frames", "Frames waiting in all outbound queues.", queued
        )
        yield _single(
            GaugeMetricFamily, f"{ns}_queue_depth_max", "The deepest outbound queue now, in frames.", deepest
        )
        yield _single(
            GaugeMetricFamily,
            f"{ns}_queue_high_water",
            "The deepest any outbound queue has been, in frames.",
            stats.queue_high_water,
        )
        yield _single(
            CounterMetricFamily,
            f"{ns}_publish_to_write_skewed",
            "Stamped envelopes that reached this process before their publish time by its clock (the "
            "hosts' clocks disagree); observed as 0 in publish_to_write_seconds.",
            self._skewed,
        )
        yield from self._publish_seconds.collect()
        yield from self._fanout_seconds.collect()
        yield from self._publish_to_write.collect()


def _buckets(name: str, buckets: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(b) for b in buckets)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{name} must be a sequence of numbers of seconds, not {buckets!r}"
        ) from None
    if not values or values[0] <= 0 or any(b <= a for a, b in itertools.pairwise(values)):
        raise ConfigurationError(f"{name} must be increasing positive numbers of seconds, not {buckets!r}")
    return values


def _single(
    family: type[CounterMetricFamily | GaugeMetricFamily], name: str, doc: str, value: float
) -> Metric:
    return family(name, doc, value=value)


def _gauge(name: str, doc: str, labels: Sequence[str], values: Mapping[tuple[str, ...], int]) -> Metric:
    metric = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        metric.add_metric(key, value)
    return metric


def _counter(name: str, doc: str, labels: Sequence[str], values: Mapping[tuple[str, ...], int]) -> Metric:
    metric = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        metric.add_metric(key, value)
    return metric
