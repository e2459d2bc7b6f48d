"""OpenTelemetry tracing for a :class:`~rtbroadcast.Broadcaster` (``pip install 'rtbroadcast[otel]'``).

Nothing else in rtbroadcast imports this module: without it, no ``opentelemetry`` is loaded, publishing
and fan-out trace nothing, and envelopes travel without headers. With it::

    from rtbroadcast.tracing import OpenTelemetryTracing

    OpenTelemetryTracing(broadcaster)  # the global tracer provider and propagator

every publish is a ``PRODUCER`` span, ``publish <channel>``, a child of the span current in the
publishing code (the request that wrote, say). Its context travels with the envelope through the backend
(W3C ``traceparent`` / ``tracestate`` in :attr:`Envelope.headers <rtbroadcast.Envelope.headers>`), and
every process that receives the envelope from its backend records one ``CONSUMER`` span,
``deliver <channel>``, for the fan-out to its local connections: once per envelope per process, never
once per connection. As the OpenTelemetry messaging conventions ask of a message delivered to several
consumers, a delivery span *links* to the publish span and starts a trace of its own, rather than being
its child. Attributes follow the conventions (``messaging.system`` is ``rtbroadcast``, the destination
is the channel); rtbroadcast's own are ``messaging.rtbroadcast.message.seq``,
``messaging.rtbroadcast.message.epoch`` and, on a delivery, ``messaging.rtbroadcast.connections``.
The tracing how-to has the details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Link, Span, SpanKind, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue

from ._version import __version__
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .backends.base import Envelope
    from .broadcaster import Broadcaster

__all__ = ["SYSTEM", "OpenTelemetryTracing"]

logger = logging.getLogger("rtbroadcast.tracing")

#: The value of ``messaging.system`` on every span.
SYSTEM: Final = "rtbroadcast"
SEQ: Final = "messaging.rtbroadcast.message.seq"
EPOCH: Final = "messaging.rtbroadcast.message.epoch"
CONNECTIONS: Final = "messaging.rtbroadcast.connections"


class OpenTelemetryTracing:
    """Trace one broadcaster's publishes and deliveries with OpenTelemetry.

    Args:
        broadcaster: the broadcaster to trace; this sets itself as its tracing hook
            (:meth:`~rtbroadcast.Broadcaster.set_tracing_hook`). Do the same in every process that
            shares its backend, so that deliveries are traced where they happen.
        tracer_provider: where spans go (default: the global one, ``opentelemetry.trace``'s).
        propagator: how a span's context is written into an envelope's headers and read back (default:
            the global one at each call, W3C trace context and baggage unless configured otherwise).
        channel_template: a function giving a channel's low-cardinality form (``"room:{id}"`` for
            ``"room:42"``), or ``None`` to keep the channel. When given, span names use it and spans carry
            it as ``messaging.destination.template``, so that span names do not grow with channels.

    Raises:
        ConfigurationError: ``channel_template`` is neither ``None`` nor callable.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        *,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        channel_template: Callable[[str], str | None] | None = None,
    ) -> None:
        if channel_template is not None and not callable(channel_template):
            raise ConfigurationError(
                f"channel_template must be a function of the channel or None, not {channel_template!r}"
            )
        self.broadcaster = broadcaster
        self._tracer = trace.get_tracer("rtbroadcast", __version__, tracer_provider=tracer_provider)
        self._propagator = propagator
        self._template = channel_template
        if not broadcaster.backend.supports_headers:
            logger.warning(
                "the %s backend does not carry headers: publishes are traced, but deliveries in other "
                "processes cannot link to them",
                broadcaster.backend.name,
            )
        broadcaster.set_tracing_hook(self)

    def close(self) -> None:
        """Stop tracing the broadcaster (for tests and reloads)."""
        if self.broadcaster.tracing_hook is self:
            self.broadcaster.set_tracing_hook(None)

    # -- TracingHook ----------------------------------------------------------------------------------

    def start_publish(self, channel: str, headers: dict[str, str]) -> _PublishSpan:
        """Start a publish's ``PRODUCER`` span and write its context into ``headers``.

        The span is the current one until it ends, so that spans of the backend's client library (an
        instrumented asyncpg or redis) are its children.
        """
        destination, attributes = self._destination(channel, "publish", "publish")
        span = self._tracer.start_span(
            f"publish {destination}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        context = trace.set_span_in_context(span)
        if self._propagator is None:
            propagate.inject(headers, context=context)
        else:
            self._propagator.inject(headers, context=context)
        return _PublishSpan(span, otel_context.attach(context))

    def delivered(self, envelope: Envelope, subscribers: int, start_ns: int, end_ns: int) -> None:
        """Record the ``CONSUMER`` span of one envelope's fan-out here, linked to its publish span.

        An envelope whose headers hold no valid span context (published by a process without tracing)
        gets no span: there is nothing to link it to.
        """
        headers = envelope.headers
        if headers is None:
            return
        empty = otel_context.Context()  # not the listener task's context: a delivery is a trace of its own
        if self._propagator is None:
            extracted = propagate.extract(headers, context=empty)
        else:
            extracted = self._propagator.extract(headers, context=empty)
        published = trace.get_current_span(extracted).get_span_context()
        if not published.is_valid:
            return
        destination, attributes = self._destination(envelope.channel, "deliver", "process")
        attributes[SEQ] = envelope.seq
        attributes[EPOCH] = envelope.epoch
        attributes[CONNECTIONS] = subscribers
        span = self._tracer.start_span(
            f"deliver {destination}",
            context=empty,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=(Link(published),),
            start_time=start_ns,
        )
        span.end(end_time=end_ns)

    def _destination(
        self, channel: str, operation: str, operation_type: str
    ) -> tuple[str, dict[str, AttributeValue]]:
        attributes: dict[str, AttributeValue] = {
            "messaging.system": SYSTEM,
            "messaging.operation.name": operation,
            "messaging.operation.type": operation_type,
            "messaging.destination.name": channel,
        }
        template = self._template(channel) if self._template is not None else None
        if template is None:
            return channel, attributes
        attributes["messaging.destination.template"] = template
        return template, attributes


class _PublishSpan:
    """A publish's span while the backend works, and the context token that made it current."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span, token: Token[otel_context.Context]) -> None:
        self._span = span
        self._token = token

    def end(self, envelope: Envelope | None, error: BaseException | None) -> None:
        """Detach the span's context, add the envelope's place or the error, and end the span."""
        otel_context.detach(self._token)
        span = self._span
        if envelope is not None:
            span.set_attributes(_placed(envelope))
        if error is not None:
            span.record_exception(error)
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        span.end()


def _placed(envelope: Envelope) -> Mapping[str, AttributeValue]:
    return {SEQ: envelope.seq, EPOCH: envelope.epoch}
