"""A chat call's trace (chatrpc/tracing.py): a server span and, for a call that reached the engine,
one child span per phase: `queue` (waiting for a sequence slot), `prefill` (from the slot to the
first token) and `decode` (from the first token to the last).

Built when the call ends, from its record (service/access_log.py) and the engine's times for its
first choice (service/engine/sequence.py), so that the scheduler thread does no tracing work. The
span continues the `traceparent` the call's metadata carried: the REST adapter's span, or a gRPC
client's own.
"""

from __future__ import annotations

from typing import Any

from chatrpc import tracing
from chatrpc.v1 import chat_pb2
from service.access_log import CallRecord

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatCompletions"].full_name
# OpenTelemetry's GenAI names of the operations (gen_ai.operation.name): a text completion's, else a chat's.
_TEXT_COMPLETION_METHODS = ("CreateCompletion", "StreamCompletion")


def record_spans(tracer: Any, record: CallRecord) -> None:
    """The call's spans, ended at the times they ended; the SDK's processor sends them."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    clock = tracing.Clock()
    ended = record.ended if record.ended is not None else record.started
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": SERVICE_NAME,
        "rpc.method": record.method,
        "rpc.grpc.status_code": record.status,
        "chatrpc.request_id": record.request_id,
        "gen_ai.operation.name": "text_completion" if record.method in _TEXT_COMPLETION_METHODS else "chat",
    }
    if record.model is not None:
        attributes["gen_ai.request.model"] = record.model
    if record.finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = record.finish_reasons
    span = tracer.start_span(
        f"{SERVICE_NAME}/{record.method}",
        context=tracing.extract(record.trace_context or {}),
        kind=SpanKind.SERVER,
        start_time=clock.ns(record.started),
        attributes=attributes,
    )
    engine = record.engine
    if engine is not None:
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": record.prompt_tokens,
                "gen_ai.usage.output_tokens": record.completion_tokens,
                "chatrpc.cached_tokens": record.cached_tokens,
            }
        )
        inside = trace.set_span_in_context(span)
        admitted, first = engine.admitted_at, engine.first_token_at
        phases = [("queue", engine.queued_at, admitted if admitted is not None else ended, {})]
        if admitted is not None:
            prefill = {"chatrpc.prompt_tokens": record.prompt_tokens, "chatrpc.cached_tokens": record.cached_tokens}
            phases.append(("prefill", admitted, first if first is not None else ended, prefill))
        if first is not None:
            last = record.last_token if record.last_token is not None else ended
            phases.append(("decode", first, max(first, last), {"chatrpc.completion_tokens": record.completion_tokens}))
        for name, start, stop, phase_attributes in phases:
            child = tracer.start_span(name, context=inside, start_time=clock.ns(start), attributes=phase_attributes)
            child.end(end_time=clock.ns(stop))
    if record.status != "OK":
        span.set_status(Status(StatusCode.ERROR, record.status))
    span.end(end_time=clock.ns(ended))
