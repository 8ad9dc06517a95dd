"""SIGTERM: the server stops taking work at once and lets the streams in flight finish within --grace.

`chatrpc serve` (the gRPC service, with the REST adapter as its child) gets SIGTERM while three
streams run: a short one over gRPC and one over REST, which finish well within the grace, and a REST
one that cannot. At once the health service says NOT_SERVING, and new calls are refused: UNAVAILABLE
over gRPC, a 503 envelope over REST. The short streams finish whole; the long one ends at the grace
with an error event; the server exits with 0 and takes its adapter with it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatrpc.local_server import grpc_serving
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import start_server, stop_server

MODEL = "gemma-3-270m"
NEVER_END = {1: -100.0, 106: -100.0, 212: -100.0}  # Gemma's end-of-generation tokens
GRACE = 30.0  # --grace: a short stream's few tokens take a small part of it, even on a slow, busy machine
CTX_SIZE = 8192
SHORT = 8  # tokens of the streams that finish
LONG = CTX_SIZE - 100  # tokens of the one that cannot finish within the grace, even on a fast machine
AT_ONCE = 2.0  # seconds in which the server must say it is going; the issue asks for "at once"
REFUSED_WITHIN = 5.0  # a new call's answer, on a busy machine: far sooner than the grace's end
EXIT_WITHIN = GRACE + 30  # the grace, then unloading the model and stopping the adapter


def grpc_request(max_tokens: int) -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(
        model=MODEL,
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Count to a thousand.")],
        max_tokens=max_tokens,
        logit_bias=NEVER_END,
        stream_options=chat_pb2.StreamOptions(include_usage=True),
    )


def rest_body(max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "logit_bias": {str(token): bias for token, bias in NEVER_END.items()},
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_sigterm_refuses_new_calls_lets_streams_finish_and_exits_0(tmp_path):
    server = start_server(tmp_path, extra_args=("--parallel", "3", "--ctx-size", str(CTX_SIZE), "--grace", str(GRACE)))
    metadata = (("authorization", f"Bearer {server.api_key}"),)
    headers = {"Authorization": f"Bearer {server.api_key}"}
    # The three streams have their first chunk, and the test goes on; a stream that fails first breaks it.
    running = threading.Barrier(4)

    def rest_stream(max_tokens: int) -> tuple[list[str], float]:
        """The stream's events and when it ended."""
        try:
            with (
                httpx.Client(base_url=server.rest_base_url, headers=headers, timeout=120) as http,
                http.stream("POST", "/chat/completions", json=rest_body(max_tokens)) as response,
            ):
                assert response.status_code == 200
                lines = (line.removeprefix("data: ") for line in response.iter_lines() if line)
                events = [next(lines)]
                running.wait(timeout=120)
                events += lines
        except BaseException:
            running.abort()
            raise
        return events, time.monotonic()

    def grpc_stream(stub: chat_pb2_grpc.ChatCompletionsStub) -> tuple[list[chat_pb2.ChatCompletionChunk], float]:
        try:
            call = stub.StreamChatCompletion(grpc_request(SHORT), metadata=metadata, timeout=120)
            chunks = [next(call)]
            running.wait(timeout=120)
            chunks += call
        except BaseException:
            running.abort()
            raise
        return chunks, time.monotonic()

    try:
        with grpc.insecure_channel(server.grpc_target) as channel, ThreadPoolExecutor(3) as pool:
            stub = chat_pb2_grpc.ChatCompletionsStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            short_grpc = pool.submit(grpc_stream, stub)
            short_rest = pool.submit(rest_stream, SHORT)
            long_rest = pool.submit(rest_stream, LONG)
            running.wait(timeout=120)

            server.process.process.send_signal(signal.SIGTERM)
            sent = time.monotonic()

            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - sent < AT_ONCE
            assert not grpc_serving(server.grpc_target)
            with pytest.raises(grpc.RpcError) as error:
                stub.CreateChatCompletion(grpc_request(1), metadata=metadata, timeout=REFUSED_WITHIN)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value
            with httpx.Client(base_url=server.rest_base_url, headers=headers, timeout=REFUSED_WITHIN) as http:
                root = server.rest_base_url.removesuffix("/v1")
                assert http.get(root + "/health").status_code == 503
                assert http.get(root + "/health/ready").status_code == 503  # draining: no new requests
                assert http.get(root + "/health/live").status_code == 200  # but the adapter is not dead
                for body in (rest_body(1), {**rest_body(1), "stream": False}):
                    refused = http.post("/chat/completions", json=body)
                    assert refused.status_code == 503, refused.text
                    assert refused.json()["error"]["code"] == "service_unavailable"
                    assert int(refused.headers["retry-after"]) >= 1

            chunks, ended = short_grpc.result(timeout=EXIT_WITHIN)
            assert chunks[-1].usage.completion_tokens == SHORT and ended - sent < GRACE
            events, ended = short_rest.result(timeout=EXIT_WITHIN)
            assert events[-1] == "[DONE]" and ended - sent < GRACE
            assert json.loads(events[-2])["usage"]["completion_tokens"] == SHORT
            events, ended = long_rest.result(timeout=EXIT_WITHIN)
            assert json.loads(events[-1])["error"]["code"] == "service_unavailable", events[-1]
            assert all("choices" in json.loads(event) for event in events[:-1])
            assert GRACE - 1 < ended - sent < EXIT_WITHIN  # it had the whole grace

        assert server.process.process.wait(timeout=EXIT_WITHIN) == 0, server.log()
        assert time.monotonic() - sent < EXIT_WITHIN
        with pytest.raises(httpx.ConnectError):  # the adapter has gone too
            httpx.get(server.rest_base_url + "/models", headers=headers, timeout=5)
    finally:
        stop_server(server)
