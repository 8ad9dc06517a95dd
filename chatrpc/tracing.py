"""OpenTelemetry traces, for both processes: an optional extra (`pip install 'chatrpc[otel]'`),
on with `--otlp-endpoint URL` (an OTLP/gRPC collector, e.g. http://127.0.0.1:4317).

Off, nothing here is imported and a request costs nothing more. On, the REST adapter records a span
per HTTP request, continuing the client's W3C `traceparent`, and sends its context on to the
service as call metadata; the service records a span per chat call, a child of that context (or of
a gRPC client's own `traceparent`), with children for the request's queue wait, prefill and decode
(service/call_spans.py). The service builds its spans when the call ends, from times it records
anyway, so that the scheduler thread and the call's hot path do no tracing work at all.

Spans leave through the SDK's batch processor (its own thread); the standard OTEL_* variables tune
it (OTEL_BSP_SCHEDULE_DELAY, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, ...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from chatrpc.v1.wire import TRACE_CONTEXT_METADATA_KEYS

_tracer: Any = None  # an opentelemetry Tracer once configured; None: tracing is off


def configure(service_name: str, endpoint: str | None) -> None:
    """Sends this process's spans to the OTLP/gRPC collector at `endpoint` (None: tracing off)."""
    if endpoint is None:
        return
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise SystemExit("chatrpc: --otlp-endpoint needs OpenTelemetry: pip install 'chatrpc[otel]'") from None
    # OTEL_SERVICE_NAME, when set, names the process instead.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    use(provider)


def use(provider: Any) -> None:
    """Records spans with this TracerProvider (configure's, or a test's with an in-memory exporter)."""
    global _tracer
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("chatrpc")


def tracer() -> Any:
    """The process's Tracer, or None when tracing is off."""
    return _tracer


def trace_headers(pairs: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The W3C trace context among HTTP headers or call metadata (lower-case names), as a carrier."""
    return {
        key: value
        for key, value in pairs or ()
        if key in TRACE_CONTEXT_METADATA_KEYS and isinstance(value, str) and value.isascii() and value.isprintable()
    }


def extract(carrier: Mapping[str, str]) -> Any:
    """The OpenTelemetry context a carrier's `traceparent` continues (an empty one without it)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


def inject(context: Any = None) -> dict[str, str]:
    """A carrier with the context's (default: the current one's) `traceparent` and `tracestate`."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context)
    return carrier


class Clock:
    """Turns time.monotonic() readings into the wall-clock nanoseconds that spans carry."""

    def __init__(self) -> None:
        self._wall_ns, self._monotonic = time.time_ns(), time.monotonic()

    def ns(self, monotonic: float) -> int:
        return self._wall_ns + round((monotonic - self._monotonic) * 1e9)
