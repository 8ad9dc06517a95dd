"""Request ids end to end and the access log, on a real server logging JSON at INFO.

One `chatrpc serve` with an API key and `--log-format json`: a gRPC client gets its own
`x-request-id` back in the initial metadata (or a new one), the REST adapter sends the HTTP
request's id to the service and echoes it, and the service writes one access line per call, with
that id, its counts and status, the key's fingerprint, and never the key or the prompt's text.
"""

from __future__ import annotations

import json
import re
import time

import grpc
import httpx
import pytest

from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from chatrpc.v1.wire import FINISH_REASON_NAMES
from service.auth import key_fingerprint
from tests.conftest import API_KEY, MODEL_ID, start_server, stop_server

# Text that must never reach a log line at INFO: it is in the prompts sent below.
SECRET_PROMPT = "zebra-quartz-7781 is my password"
NEW_ID = re.compile(r"req_[0-9a-f]{32}")
LOG_WITHIN = 10.0  # seconds for a call's access line to reach the log after its answer


@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("json-log"), extra_args=("--log-format", "json", "--log-level", "info")
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def stub(json_server):
    with grpc.insecure_channel(json_server.grpc_target) as channel:
        yield chat_pb2_grpc.ChatCompletionsStub(channel)


def request(max_tokens: int = 4, **fields) -> chat_pb2.ChatCompletionRequest:
    fields.setdefault("temperature", 0)
    return chat_pb2.ChatCompletionRequest(
        model=MODEL_ID,
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=f"{SECRET_PROMPT}. Say hi.")],
        max_tokens=max_tokens,
        **fields,
    )


def metadata(request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    auth = (("authorization", f"Bearer {API_KEY}"),)
    return auth if request_id is None else (*auth, ("x-request-id", request_id))


def log_records(server) -> list[dict]:
    """Every line of the server's log (both processes) as JSON; fails on a line that is not."""
    records = []
    for line in server.log().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def access_line(server, request_id: str, logger: str = "chatrpc.access") -> dict:
    deadline = time.monotonic() + LOG_WITHIN
    while time.monotonic() < deadline:
        for record in log_records(server):
            if record.get("logger") == logger and record.get("request_id") == request_id:
                return record
        time.sleep(0.1)
    tail = "\n".join(server.log().splitlines()[-20:])
    raise AssertionError(f"no access line for {request_id}:\n{tail}")


def returned_id(call) -> str:
    return dict(call.initial_metadata())["x-request-id"]


def test_grpc_client_gets_its_own_id_back_or_a_new_one(json_server, stub):
    _, call = stub.CreateChatCompletion.with_call(request(), metadata=metadata("client-id-42"), timeout=120)
    assert returned_id(call) == "client-id-42"

    _, call = stub.CreateChatCompletion.with_call(request(), metadata=metadata(), timeout=120)
    made = returned_id(call)
    assert NEW_ID.fullmatch(made)

    # One that is too long to be an id is replaced, not cut.
    _, call = stub.CreateChatCompletion.with_call(request(), metadata=metadata("x" * 129), timeout=120)
    assert NEW_ID.fullmatch(returned_id(call)) and returned_id(call) != made

    stream = stub.StreamChatCompletion(request(), metadata=metadata("stream-id-7"), timeout=120)
    assert returned_id(stream) == "stream-id-7"
    assert list(stream)


def test_access_line_has_the_counts_and_the_fingerprint_never_the_key_or_the_text(json_server, stub):
    completion = stub.CreateChatCompletion(
        request(max_tokens=6, n=2, seed=3, temperature=0.8), metadata=metadata("counted-1"), timeout=120
    )
    line = access_line(json_server, "counted-1")
    assert line["level"] == "INFO"
    assert line["method"] == "CreateChatCompletion" and line["model"] == MODEL_ID and line["status"] == "OK"
    assert line["api_key"] == key_fingerprint(API_KEY)
    assert line["prompt_tokens"] == completion.usage.prompt_tokens
    assert line["completion_tokens"] == completion.usage.completion_tokens
    assert line["finish_reasons"] == [FINISH_REASON_NAMES[choice.finish_reason] for choice in completion.choices]
    assert 0 < line["ttft_ms"] <= line["duration_ms"]

    log = json_server.log()
    assert API_KEY not in log
    assert SECRET_PROMPT not in log


def test_refused_and_cancelled_calls_have_their_status(json_server, stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateChatCompletion(request(temperature=5), metadata=metadata("refused-1"), timeout=120)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    line = access_line(json_server, "refused-1")
    assert line["status"] == "INVALID_ARGUMENT" and line["completion_tokens"] == 0 and line["ttft_ms"] is None

    never_end = {1: -100.0, 106: -100.0, 212: -100.0}  # Gemma's end-of-generation tokens
    stream = stub.StreamChatCompletion(request(max_tokens=1000, logit_bias=never_end), metadata=metadata("gone-1"))
    next(stream)
    stream.cancel()
    line = access_line(json_server, "gone-1")
    assert line["status"] == "CANCELLED" and 0 < line["completion_tokens"] < 1000


def test_rest_request_id_reaches_the_service_and_comes_back(json_server):
    root = json_server.rest_base_url
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=root, headers=headers, timeout=120) as http:
        answer = http.post("/chat/completions", json=body, headers={"X-Request-Id": "rest-id-9"})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "rest-id-9"
        line = access_line(json_server, "rest-id-9")
        assert line["completion_tokens"] == answer.json()["usage"]["completion_tokens"]

        # Without one, the adapter's new id is the service's too.
        answer = http.post("/chat/completions", json={**body, "stream": True})
        made = answer.headers["x-request-id"]
        assert NEW_ID.fullmatch(made)
        assert access_line(json_server, made)["method"] == "StreamChatCompletion"
    assert SECRET_PROMPT not in json_server.log()


def test_a_call_refused_for_its_key_has_an_access_line_without_the_key(json_server, stub):
    wrong = (("authorization", "Bearer not-the-key-5150"), ("x-request-id", "bad-key-1"))
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateChatCompletion(request(), metadata=wrong, timeout=120)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    line = access_line(json_server, "bad-key-1")
    assert line["status"] == "UNAUTHENTICATED" and line["method"] == "CreateChatCompletion"
    assert line["api_key"] is None and line["prompt_tokens"] == 0
    assert "not-the-key-5150" not in json_server.log()


def test_the_adapter_writes_an_access_line_per_http_request_with_its_id(json_server):
    root = json_server.rest_base_url
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "http-line-1"}
    with httpx.Client(base_url=root, timeout=120) as http:
        assert http.post("/chat/completions", json=body, headers=headers).status_code == 200
        missing = http.get("/no-such-route")
    line = access_line(json_server, "http-line-1", "chatrpc.rest.access")
    assert line["level"] == "INFO" and line["status"] == 200 and line["duration_ms"] > 0
    assert line["http_method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert line["client"].startswith("127.0.0.1:")
    # The same id on the service's line about the call.
    assert access_line(json_server, "http-line-1")["method"] == "CreateChatCompletion"
    # A request that reaches no route gets its id too, the one its answer carries.
    assert access_line(json_server, missing.headers["x-request-id"], "chatrpc.rest.access")["status"] == 404
    # uvicorn's own lines, which have no id, are off; the prompt and the key are in no line.
    records = log_records(json_server)
    assert not [record for record in records if record.get("logger") == "uvicorn.access"]
    assert SECRET_PROMPT not in json_server.log() and API_KEY not in json_server.log()


class _Context:
    """Stands in for grpc.aio's ServicerContext in this unit test of access_logged: the two calls it makes."""

    def invocation_metadata(self):
        return (("x-request-id", "unit-1"),)

    async def send_initial_metadata(self, metadata):
        pass


async def test_a_stream_closed_at_its_yield_finishes_its_handler_before_its_record_ends():
    """A call cancelled while its answer is being written (the wrapper waits at its `yield`): the
    handler's own `finally` (which cancels the engine's work and counts the tokens sent) runs before
    the record reaches `call_ended`, not whenever the handler's generator is collected."""
    from service.access_log import access_logged

    class Servicer:
        def __init__(self) -> None:
            self.ended: list[tuple[int, str]] = []

        def call_ended(self, record):
            self.ended.append((record.completion_tokens, record.status))

        @access_logged
        async def StreamChatCompletion(self, request, context, record):  # noqa: N802
            try:
                yield "first chunk"
                yield "second chunk"
            finally:
                record.completion_tokens = 7

    servicer = Servicer()
    chunks = servicer.StreamChatCompletion(None, _Context())
    assert await chunks.__anext__() == "first chunk"
    await chunks.aclose()  # what the server does to the call's generator once the client has gone
    assert servicer.ended == [(7, "CANCELLED")]
