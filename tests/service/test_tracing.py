"""OpenTelemetry tracing (chatrpc/tracing.py): the spans of a chat call, and the trace carried from
an HTTP client through the REST adapter into the service.

The span building is checked in this process with the SDK's in-memory exporter. End to end, the
servers run with `--otlp-endpoint` pointed at an OTLP/gRPC receiver that this test runs on a
loopback port (the protocol's own generated service, from opentelemetry-proto), since no collector
is reachable here.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatrpc.local_server import LOOPBACK, LocalServer, free_port, grpc_command, rest_command
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from service.access_log import CallRecord
from service.call_spans import SERVICE_NAME, record_spans
from tests.conftest import API_KEY, CTX_SIZE, MODEL_ID, REPO, start_server, stop_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
EXPORTED_WITHIN = 20.0  # seconds for the servers' batch processors to send a call's spans
CHAT_SPAN = f"{SERVICE_NAME}/CreateChatCompletion"


def traceparent(trace_id: str = TRACE_ID, span_id: str = CLIENT_SPAN_ID) -> str:
    return f"00-{trace_id}-{span_id}-01"


# ---- the spans of one call, in this process ----------------------------------------------------


@dataclass
class EngineTimes:
    """Stands in for a Sequence's times (service/access_log.py: EngineTimes) in this unit test."""

    queued_at: float
    admitted_at: float | None
    first_token_at: float | None


def spans_of(record: CallRecord) -> dict:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    record_spans(provider.get_tracer("test"), record)
    return {span.name: span for span in exporter.get_finished_spans()}


def test_a_call_has_a_server_span_with_queue_prefill_and_decode_children():
    start = time.monotonic()
    record = CallRecord("req-1", "CreateChatCompletion", model=MODEL_ID, started=start)
    record.trace_context = {"traceparent": traceparent()}
    record.engine = EngineTimes(queued_at=start + 0.01, admitted_at=start + 0.03, first_token_at=start + 0.10)
    record.prompt_tokens, record.cached_tokens, record.completion_tokens = 40, 16, 8
    record.first_token, record.last_token, record.ended = start + 0.11, start + 0.30, start + 0.31
    record.finish_reasons = ["length"]
    spans = spans_of(record)

    assert set(spans) == {CHAT_SPAN, "queue", "prefill", "decode"}
    call = spans[CHAT_SPAN]
    assert format(call.context.trace_id, "032x") == TRACE_ID
    assert format(call.parent.span_id, "016x") == CLIENT_SPAN_ID
    assert call.attributes["chatrpc.request_id"] == "req-1"
    assert call.attributes["gen_ai.request.model"] == MODEL_ID
    assert call.attributes["gen_ai.usage.input_tokens"] == 40
    assert call.attributes["gen_ai.usage.output_tokens"] == 8
    assert call.attributes["chatrpc.cached_tokens"] == 16
    assert tuple(call.attributes["gen_ai.response.finish_reasons"]) == ("length",)
    assert call.end_time - call.start_time == pytest.approx(0.31e9, abs=1e6)
    for name in ("queue", "prefill", "decode"):
        assert spans[name].parent.span_id == call.context.span_id
        assert call.start_time <= spans[name].start_time <= spans[name].end_time <= call.end_time
    assert spans["queue"].end_time == spans["prefill"].start_time
    assert spans["prefill"].end_time == spans["decode"].start_time
    assert spans["prefill"].end_time - spans["prefill"].start_time == pytest.approx(0.07e9, abs=1e6)
    assert spans["decode"].attributes["chatrpc.completion_tokens"] == 8


def test_a_call_refused_before_the_engine_has_only_its_failed_server_span():
    record = CallRecord("req-2", "CreateChatCompletion", model=MODEL_ID)
    record.status = "INVALID_ARGUMENT"
    record.end()
    spans = spans_of(record)
    assert set(spans) == {CHAT_SPAN}
    assert spans[CHAT_SPAN].status.description == "INVALID_ARGUMENT"
    assert not spans[CHAT_SPAN].status.is_ok
    assert spans[CHAT_SPAN].parent is None  # no traceparent: a trace of its own


def test_a_call_cancelled_while_queued_has_a_queue_span_to_its_end():
    start = time.monotonic()
    record = CallRecord("req-3", "StreamChatCompletion", model=MODEL_ID, started=start)
    record.engine = EngineTimes(queued_at=start + 0.01, admitted_at=None, first_token_at=None)
    record.status, record.ended = "CANCELLED", start + 0.5
    spans = spans_of(record)
    assert set(spans) == {f"{SERVICE_NAME}/StreamChatCompletion", "queue"}
    assert spans["queue"].end_time == spans[f"{SERVICE_NAME}/StreamChatCompletion"].end_time


# ---- end to end, through an OTLP receiver on loopback -------------------------------------------


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent: (service.name, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the protocol's method name
        with self._lock:
            for resource_spans in request.resource_spans:
                names = [a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"]
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((names[0] if names else "", span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str, count: int) -> list[tuple[str, object]]:
        """The spans of one trace, once `count` have come (or what came within the wait)."""
        deadline = time.monotonic() + EXPORTED_WITHIN
        while True:
            with self._lock:
                found = [(service, span) for service, span in self.spans if span.trace_id.hex() == trace_id]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sink = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    yield sink, f"http://{LOOPBACK}:{port}"
    server.stop(grace=None)


@pytest.fixture(autouse=True, scope="module")
def prompt_export():
    """The servers' batch processors send every 100 ms instead of every 5 s (they inherit this)."""
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    yield
    if saved is None:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    else:
        os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved


@pytest.fixture(scope="module")
def traced(receiver, prompt_export, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("traced"), extra_args=("--otlp-endpoint", receiver[1]))
    yield server
    stop_server(server)


def attributes(span) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def by_name(spans: list[tuple[str, object]]) -> dict[str, tuple[str, object]]:
    return {span.name: (service, span) for service, span in spans}


def post_chat(base_url: str, trace_id: str, **fields) -> httpx.Response:
    """A chat completion over REST, sent as part of the trace `trace_id`."""
    return httpx.post(
        base_url + "/chat/completions",
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields},
        headers={"authorization": f"Bearer {API_KEY}", "traceparent": traceparent(trace_id)},
        timeout=120,
    )


def test_a_rest_clients_trace_continues_through_the_adapter_into_the_service(receiver, traced):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    answer = post_chat(traced.rest_base_url, trace_id, temperature=0).raise_for_status()
    request_id = answer.headers["x-request-id"]
    spans = by_name(receiver[0].of_trace(trace_id, 5))

    assert set(spans) == {"POST /v1/chat/completions", CHAT_SPAN, "queue", "prefill", "decode"}
    adapter_service, adapter = spans["POST /v1/chat/completions"]
    service_name, call = spans[CHAT_SPAN]
    assert (adapter_service, service_name) == ("chatrpc-rest", "chatrpc")
    assert adapter.parent_span_id.hex() == CLIENT_SPAN_ID
    assert call.parent_span_id == adapter.span_id
    assert attributes(adapter)["chatrpc.request_id"] == attributes(call)["chatrpc.request_id"] == request_id
    assert attributes(adapter)["http.response.status_code"] == 200
    assert attributes(call)["gen_ai.usage.output_tokens"] == answer.json()["usage"]["completion_tokens"]
    for phase in ("queue", "prefill", "decode"):
        span = spans[phase][1]
        assert span.parent_span_id == call.span_id
        assert call.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= call.end_time_unix_nano
    assert adapter.start_time_unix_nano <= call.start_time_unix_nano
    assert call.end_time_unix_nano <= adapter.end_time_unix_nano


def test_a_grpc_clients_traceparent_is_the_parent_of_the_service_span(receiver, traced):
    trace_id = "11112222333344445555666677778888"
    request = chat_pb2.ChatCompletionRequest(
        model=MODEL_ID, messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Hi")], max_tokens=2
    )
    metadata = (("authorization", f"Bearer {API_KEY}"), ("traceparent", traceparent(trace_id)))
    with grpc.insecure_channel(traced.grpc_target) as channel:
        chat_pb2_grpc.ChatCompletionsStub(channel).CreateChatCompletion(request, metadata=metadata, timeout=120)
    spans = by_name(receiver[0].of_trace(trace_id, 4))
    assert spans[CHAT_SPAN][1].parent_span_id.hex() == CLIENT_SPAN_ID


def test_a_refused_call_is_traced_with_its_status(receiver, traced):
    trace_id = "99998888777766665555444433332222"
    answer = post_chat(traced.rest_base_url, trace_id, temperature=7)
    assert answer.status_code == 400
    spans = by_name(receiver[0].of_trace(trace_id, 2))
    assert set(spans) == {"POST /v1/chat/completions", CHAT_SPAN}
    assert spans[CHAT_SPAN][1].status.message == "INVALID_ARGUMENT"
    assert attributes(spans["POST /v1/chat/completions"][1])["http.response.status_code"] == 400


def test_an_adapter_without_tracing_passes_the_clients_traceparent_on(receiver, prompt_export, tmp_path):
    """Only the service traces: its span's parent is the client's span, carried by the adapter as is."""
    env = {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}
    grpc_port, rest_port = free_port(), free_port()
    service_command = grpc_command(grpc_port, "--parallel", "1", "--ctx-size", str(CTX_SIZE))
    service = LocalServer(
        "service",
        [*service_command, "--otlp-endpoint", receiver[1]],
        f"grpc://{LOOPBACK}:{grpc_port}",
        tmp_path / "service.log",
        env=env,
        cwd=REPO,
    )
    adapter = None
    try:
        service.wait_ready()
        adapter = LocalServer(
            "adapter", rest_command(rest_port, grpc_port), f"http://{LOOPBACK}:{rest_port}/health/live",
            tmp_path / "adapter.log", env=env, cwd=REPO,
        )  # fmt: skip
        adapter.wait_ready()
        trace_id = "abcdefabcdefabcdefabcdefabcdef12"
        post_chat(f"http://{LOOPBACK}:{rest_port}/v1", trace_id, max_tokens=2).raise_for_status()
        spans = by_name(receiver[0].of_trace(trace_id, 4))
    finally:
        for server in (adapter, service):
            if server is not None:
                server.stop()
    assert "POST /v1/chat/completions" not in spans
    assert spans[CHAT_SPAN][1].parent_span_id.hex() == CLIENT_SPAN_ID
