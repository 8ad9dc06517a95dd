"""What an HTTP client sees when the service behind the adapter cannot answer: the service killed
mid-stream and started again, and the service's queue full; and the adapter's own exit on SIGTERM.

The killed-service test runs `chatrpc grpc` and `chatrpc rest` as two processes, so that the service
can be killed and started again on the same port while the adapter lives on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from chatrpc.local_server import LOOPBACK, LocalServer, free_port, grpc_command, rest_command
from tests.adapters.at_once import at_once
from tests.conftest import CTX_SIZE, REPO, start_server, stop_server

MODEL = "gemma-3-270m"
NO_END = {"1": -100, "106": -100, "212": -100}  # Gemma's end-of-generation tokens: banned, no early end
# The issue asks for the error event within 1 s of the kill; the bound leaves room for a loaded
# machine and is still a small fraction of the time the stream's remaining tokens would take.
ERROR_EVENT_WITHIN = 3.0
# Any answer while the service is away must be prompt: no call waits for the service to come back.
REFUSAL_WITHIN = 5.0
# How long the service stays away, answered 503 throughout: long enough that gRPC's default back-off
# between attempts to reconnect would have grown past RECOVERY_WITHIN by the time it is back.
OUTAGE = 10.0
# The adapter's channel tries to reconnect at most a second apart (adapters/rest/upstream.py).
RECOVERY_WITHIN = 5.0


def chat(prompt: str = "Count to a thousand.", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def data_lines(response: httpx.Response):
    """The payload of each SSE event, as it arrives."""
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            yield line[len("data: ") :]


def assert_retry_later(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert int(response.headers["retry-after"]) >= 1


def open_env() -> dict[str, str]:
    """The environment without API keys: both processes listen on loopback only."""
    return {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}


def start_service(port: int, log_path: Path) -> LocalServer:
    command = grpc_command(port, "--parallel", "2", "--ctx-size", str(CTX_SIZE))
    service = LocalServer("service", command, f"grpc://{LOOPBACK}:{port}", log_path, env=open_env(), cwd=REPO)
    service.wait_ready()
    return service


def test_killed_service_ends_the_stream_with_an_error_and_the_adapter_recovers(tmp_path):
    grpc_port, rest_port = free_port(), free_port()
    service = start_service(grpc_port, tmp_path / "service.log")
    adapter = LocalServer(
        "adapter",
        rest_command(rest_port, grpc_port),
        f"http://{LOOPBACK}:{rest_port}/health",
        tmp_path / "adapter.log",
        env=open_env(),
        cwd=REPO,
    )
    try:
        adapter.wait_ready()
        with httpx.Client(base_url=f"http://{LOOPBACK}:{rest_port}", timeout=60) as http:
            # A stream with well over a thousand tokens to go when the service dies.
            request = chat(max_tokens=1500, logit_bias=NO_END, stream=True)
            with http.stream("POST", "/v1/chat/completions", json=request) as response:
                assert response.status_code == 200
                events = data_lines(response)
                for _ in range(3):
                    assert "choices" in json.loads(next(events))
                service.process.kill()
                killed = time.monotonic()
                rest = list(events)
                ended = time.monotonic() - killed
            assert rest, "the stream ended without an event"
            last = json.loads(rest[-1])
            assert last["error"]["code"] == "service_unavailable", last
            assert all("choices" in json.loads(event) for event in rest[:-1])
            assert ended < ERROR_EVENT_WITHIN, f"the error event came {ended:.2f} s after the kill"
            service.process.wait(timeout=30)

            # While the service is away: prompt 503 envelopes, streaming or not, and an unhealthy adapter.
            while time.monotonic() - killed < OUTAGE:
                for body in (chat(max_tokens=5), chat(max_tokens=5, stream=True)):
                    start = time.monotonic()
                    assert_retry_later(http.post("/v1/chat/completions", json=body), 503, "service_unavailable")
                    assert time.monotonic() - start < REFUSAL_WITHIN
                assert http.get("/health").status_code == 503
                assert http.get("/health/ready").status_code == 503
                assert http.get("/health/live").status_code == 200
                time.sleep(0.5)

            # The same port again: the adapter serves again by itself, soon after the service does.
            service = start_service(grpc_port, tmp_path / "service-again.log")
            back = time.monotonic()
            while http.get("/health").status_code != 200:
                assert time.monotonic() - back < RECOVERY_WITHIN, "the adapter did not reconnect"
                time.sleep(0.1)
            assert adapter.process.poll() is None  # the same adapter process throughout
            answer = http.post("/v1/chat/completions", json=chat(max_tokens=5))
            assert answer.status_code == 200, answer.text
            with http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=5, stream=True)) as response:
                assert response.status_code == 200
                assert list(data_lines(response))[-1] == "[DONE]"
        # SIGTERM, as Kubernetes stops it: the adapter shuts down and exits with 0.
        adapter.process.terminate()
        assert adapter.process.wait(timeout=30) == 0
    finally:
        adapter.stop()
        service.stop()


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory):
    """One sequence slot and two places in the queue: a handful of requests at once overflow it."""
    running = start_server(tmp_path_factory.mktemp("busy"), extra_args=("--parallel", "1", "--max-waiting", "2"))
    yield running
    stop_server(running)


@pytest.mark.parametrize("stream", [False, True])
def test_full_queue_is_429_with_retry_after_never_500(busy_server, stream):
    headers = {"Authorization": f"Bearer {busy_server.api_key}"}
    body = chat("Write a short poem about the sea.", max_tokens=8, logit_bias=NO_END, stream=stream)

    def send() -> tuple[httpx.Response, list[str]]:
        with (
            httpx.Client(base_url=busy_server.rest_base_url, headers=headers, timeout=120) as client,
            client.stream("POST", "/chat/completions", json=body) as response,
        ):
            if stream and response.status_code == 200:
                return response, list(data_lines(response))
            response.read()
            return response, []

    # 1 running and 2 waiting are all the service takes: of 12 at once, most are refused.
    answers = at_once([send] * 12, timeout=300)
    statuses = sorted(response.status_code for response, _ in answers)
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses, statuses
    for response, events in answers:
        if response.status_code == 429:
            assert_retry_later(response, 429, "rate_limit_exceeded")
            assert response.json()["error"]["type"] == "rate_limit_error"
        elif stream:
            assert events[-1] == "[DONE]"
            assert all("error" not in json.loads(event) for event in events[:-1])
        else:
            assert response.json()["usage"]["completion_tokens"] == 8
    # The refusals left nothing behind: the next request is served.
    with httpx.Client(base_url=busy_server.rest_base_url, headers=headers, timeout=120) as client:
        assert client.post("/chat/completions", json=chat(max_tokens=3)).status_code == 200
