"""Prometheus metrics of the service and of the REST adapter, exact to the request.

One `chatrpc serve` with an API key, the service's /metrics on a port of its own and its access lines
in JSON. A known workload runs (six unary calls, two streamed, one cancelled after its first chunk,
one refused for a bad argument, one refused for its key), and each counter must move by exactly what
the answers (and, for the cancelled call, its access line) say; each histogram gets one observation
per call that reached the engine. Then the adapter's own counters, through HTTP.
"""

from __future__ import annotations

import collections
import json
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatrpc.local_server import free_port
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from chatrpc.v1.wire import FINISH_REASON_NAMES
from tests.conftest import API_KEY, MODEL_ID, start_server, stop_server

SETTLE_WITHIN = 10.0  # seconds for a call's end to reach the metrics after its answer
REQUEST_HISTOGRAMS = (
    "chatrpc_time_to_first_token_seconds",
    "chatrpc_e2e_request_latency_seconds",
    "chatrpc_request_queue_time_seconds",
    "chatrpc_request_prefill_time_seconds",
)

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    port = free_port()
    server = start_server(
        tmp_path_factory.mktemp("metrics"),
        extra_args=("--metrics-port", str(port), "--log-format", "json", "--log-level", "info"),
    )
    yield server, f"http://127.0.0.1:{port}/metrics"
    stop_server(server)


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).raise_for_status().text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def chat(max_tokens: int = 16, **fields) -> chat_pb2.ChatCompletionRequest:
    fields.setdefault("temperature", 0)
    return chat_pb2.ChatCompletionRequest(
        model=MODEL_ID,
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Count from one to fifty in words.")],
        max_tokens=max_tokens,
        **fields,
    )


def auth(request_id: str | None = None, key: str = API_KEY) -> tuple[tuple[str, str], ...]:
    metadata = (("authorization", f"Bearer {key}"),)
    return metadata if request_id is None else (*metadata, ("x-request-id", request_id))


def access_line(server, request_id: str) -> dict:
    for line in server.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "chatrpc.access" and record.get("request_id") == request_id:
                return record
    raise AssertionError(f"no access line for {request_id}")


def settled(url: str, before: Samples, name: str, expected: float, **labels: str) -> Samples:
    """A scrape once `name` has moved by `expected` (calls end on the server a moment after their answer)."""
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        after = scrape(url)
        if moved(before, after, name, **labels) >= expected or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def test_the_service_counts_a_known_workload_exactly(metered):
    server, url = metered
    model = {"model": MODEL_ID}
    before = scrape(url)
    answers: list[chat_pb2.ChatCompletion | chat_pb2.ChatCompletionChunk] = []
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatCompletionsStub(channel)
        answers += [stub.CreateChatCompletion(chat(), metadata=auth()) for _ in range(6)]
        finish_reasons = [FINISH_REASON_NAMES[answer.choices[0].finish_reason] for answer in answers]
        for _ in range(2):
            chunks = list(
                stub.StreamChatCompletion(
                    chat(stream_options=chat_pb2.StreamOptions(include_usage=True)), metadata=auth()
                )
            )
            answers.append(chunks[-1])  # the usage chunk
            finish_reasons += [
                FINISH_REASON_NAMES[c.finish_reason] for chunk in chunks for c in chunk.choices if c.finish_reason
            ]
        cancelled = stub.StreamChatCompletion(chat(max_tokens=200), metadata=auth("metrics-cancelled"))
        next(cancelled)
        cancelled.cancel()
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateChatCompletion(chat(temperature=5), metadata=auth())
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unauthenticated:
            stub.CreateChatCompletion(chat(), metadata=auth(key="not-a-key"))
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED

    after = settled(url, before, "chatrpc_request_failures_total", 1, code="CANCELLED", **model)
    line = access_line(server, "metrics-cancelled")
    assert line["status"] == "CANCELLED"
    usages = [answer.usage for answer in answers]
    prompt = sum(u.prompt_tokens for u in usages) + line["prompt_tokens"]
    generated = sum(u.completion_tokens for u in usages) + line["completion_tokens"]
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages) + line["cached_tokens"]
    several = sum(u.completion_tokens > 1 for u in usages) + (line["completion_tokens"] > 1)

    assert moved(before, after, "chatrpc_prompt_tokens_total", **model) == prompt
    assert moved(before, after, "chatrpc_generation_tokens_total", **model) == generated
    assert moved(before, after, "chatrpc_prefix_cache_queried_tokens_total", **model) == prompt
    assert moved(before, after, "chatrpc_prefix_cache_hit_tokens_total", **model) == cached
    for reason, count in collections.Counter(finish_reasons).items():
        assert moved(before, after, "chatrpc_requests_finished_total", finish_reason=reason, **model) == count
    assert sum(collections.Counter(finish_reasons).values()) == 8
    assert moved(before, after, "chatrpc_request_failures_total", code="CANCELLED", **model) == 1
    assert moved(before, after, "chatrpc_request_failures_total", code="INVALID_ARGUMENT", **model) == 1
    # Refused for its key before anything of it was read: no model to label it with.
    assert moved(before, after, "chatrpc_request_failures_total", code="UNAUTHENTICATED", model="") == 1
    for histogram in REQUEST_HISTOGRAMS:
        assert moved(before, after, histogram + "_count", **model) == 9, histogram
        assert moved(before, after, histogram + "_sum", **model) > 0, histogram
    assert moved(before, after, "chatrpc_inter_token_latency_seconds_count", **model) == several
    assert moved(before, after, "chatrpc_decode_step_rows_count", **model) > 0
    # Idle again: nothing waits, runs or holds KV cells.
    assert value(after, "chatrpc_requests_waiting", **model) == 0
    assert value(after, "chatrpc_requests_running", **model) == 0
    assert value(after, "chatrpc_kv_cache_usage_ratio", **model) == 0
    assert value(after, "process_resident_memory_bytes") > 0


def test_a_text_completion_is_counted_and_logged(metered):
    server, url = metered
    model = {"model": MODEL_ID}
    before = scrape(url)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatCompletionsStub(channel)
        text = chat_pb2.CompletionRequest(model=MODEL_ID, text="One, two, three,", max_tokens=5, temperature=0)
        answer = stub.CreateCompletion(text, metadata=auth("metrics-text-completion"))
    reason = FINISH_REASON_NAMES[answer.choices[0].finish_reason]
    after = settled(url, before, "chatrpc_requests_finished_total", 1, finish_reason=reason, **model)
    assert moved(before, after, "chatrpc_requests_finished_total", finish_reason=reason, **model) == 1
    assert moved(before, after, "chatrpc_prompt_tokens_total", **model) == answer.usage.prompt_tokens
    assert moved(before, after, "chatrpc_generation_tokens_total", **model) == answer.usage.completion_tokens
    line = access_line(server, "metrics-text-completion")
    assert line["method"] == "CreateCompletion" and line["status"] == "OK" and line["model"] == MODEL_ID
    assert line["completion_tokens"] == answer.usage.completion_tokens
    assert line["finish_reasons"] == [reason]


def test_engine_gauges_show_a_running_request(metered):
    server, url = metered
    model = {"model": MODEL_ID}
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatCompletionsStub(channel)
        stream = stub.StreamChatCompletion(chat(max_tokens=300), metadata=auth())
        next(stream)
        during = scrape(url)
        stream.cancel()
    assert value(during, "chatrpc_requests_running", **model) == 1
    assert value(during, "chatrpc_requests_waiting", **model) == 0
    assert 0 < value(during, "chatrpc_kv_cache_usage_ratio", **model) < 1


def test_the_adapter_counts_requests_streams_and_upstream_errors(metered):
    server, _ = metered
    rest = server.rest_base_url.removesuffix("/v1")
    url = rest + "/metrics"
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    route = "/v1/chat/completions"
    with httpx.Client(base_url=rest, headers=headers, timeout=60) as client:
        before = scrape(url)
        assert client.post(route, json=body).status_code == 200
        with client.stream("POST", route, json={**body, "stream": True, "max_tokens": 40}) as events:
            assert events.status_code == 200
            lines = events.iter_lines()
            next(lines)
            during = scrape(url)
            rest_of_stream = list(lines)
        assert "data: [DONE]" in rest_of_stream
        assert client.post(route, json={**body, "model": "no-such-model"}).status_code == 404
        assert client.get("/v1/no-such-route").status_code == 404
        assert client.get("/v1/models/" + MODEL_ID).status_code == 200
        after = scrape(url)

    assert value(during, "chatrpc_http_sse_streams_open") == 1
    assert value(after, "chatrpc_http_sse_streams_open") == 0
    post = {"route": route, "method": "POST"}
    assert moved(before, after, "chatrpc_http_requests_total", status="200", **post) == 2
    assert moved(before, after, "chatrpc_http_requests_total", status="404", **post) == 1
    # Labelled by route template, and "other" for a path no route has: never the client's path.
    assert moved(before, after, "chatrpc_http_requests_total", route="other", method="GET", status="404") == 1
    model_route = {"route": "/v1/models/{model:path}", "method": "GET", "status": "200"}
    assert moved(before, after, "chatrpc_http_requests_total", **model_route) == 1
    assert moved(before, after, "chatrpc_http_request_duration_seconds_count", route=route) == 3
    assert moved(before, after, "chatrpc_upstream_errors_total", code="NOT_FOUND") == 1
    # The scrape taken before counts itself only in the next one.
    assert moved(before, after, "chatrpc_http_requests_total", route="/metrics", method="GET", status="200") == 2
