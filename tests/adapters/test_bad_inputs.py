"""Bad requests over raw HTTP to the real server (REST adapter in front of the gRPC service).

Each row of the table is one bad body (a JSON value or raw bytes), the status it must get and the
``error.param`` that must name the offending field. Every answer must be the OpenAI envelope
``{"error": {"message", "type", "param", "code"}}`` with a non-empty message. Between the rows, and
after the whole table, a good request must still succeed: bad input never takes the server down.
"""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "gemma-3-270m"
MESSAGES = [{"role": "user", "content": "Say hi."}]


def body(**fields) -> dict:
    """A good request, with ``fields`` changed; a field set to ``...`` is left out."""
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3}
    request.update(fields)
    return {key: value for key, value in request.items() if value is not ...}


def message(**fields) -> dict:
    return body(messages=[fields])


def raw(request: dict) -> bytes:
    """JSON text with every non-ASCII character escaped: lone surrogates become "\\ud800", legal JSON."""
    return json.dumps(request, ensure_ascii=True).encode()


# A schema of about 300 KB: over the server's default --max-schema-bytes, within --max-request-bytes.
BIG_SCHEMA = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(12000)}}


PLAIN_MODEL = "gemma-3-270m-plain"  # served with tools and JSON modes off
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}},
}

# (id, request body: dict or raw bytes, expected HTTP status, expected error.param)
ROWS = [
    # The body itself
    ("not-json", b"this is not json", 400, None),
    ("truncated-json", b'{"model": "gemma-3-270m", "messages": [', 400, None),
    ("json-array", b'[{"model": "gemma-3-270m"}]', 400, None),
    (
        "json-nan",
        b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        None,
    ),
    # messages
    ("missing-messages", body(messages=...), 400, "messages"),
    ("empty-messages", body(messages=[]), 400, "messages"),
    ("messages-not-array", body(messages="hello"), 400, "messages"),
    ("message-not-object", body(messages=["hello"]), 400, "messages[0]"),
    ("message-without-role", message(content="hello"), 400, "messages[0].role"),
    ("bad-role", message(role="wizard", content="hello"), 400, "messages[0].role"),
    ("role-not-string", message(role=1, content="hello"), 400, "messages[0].role"),
    ("content-wrong-type", message(role="user", content=42), 400, "messages[0].content"),
    ("content-object", message(role="user", content={"text": "hi"}), 400, "messages[0].content"),
    ("user-without-content", message(role="user"), 400, "messages[0].content"),
    (
        "second-message-bad",
        body(messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": 3.5}]),
        400,
        "messages[1].content",
    ),
    (
        "image-url-part",
        message(
            role="user",
            content=[
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        ),
        400,
        "messages[0].content[1].image_url",
    ),
    (
        "part-unknown-type",
        message(role="user", content=[{"type": "video", "video": {}}]),
        400,
        "messages[0].content[0].type",
    ),
    # model
    ("missing-model", body(model=...), 400, "model"),
    ("model-not-string", body(model=7), 400, "model"),
    ("unknown-model", body(model="gpt-4o"), 404, "model"),
    # sampling
    ("temperature-negative", body(temperature=-1), 400, "temperature"),
    ("temperature-3", body(temperature=3), 400, "temperature"),
    ("temperature-string", body(temperature="hot"), 400, "temperature"),
    ("temperature-bool", body(temperature=True), 400, "temperature"),
    ("top-p-0", body(top_p=0), 400, "top_p"),
    ("top-p-1.5", body(top_p=1.5), 400, "top_p"),
    ("frequency-penalty-5", body(frequency_penalty=5), 400, "frequency_penalty"),
    ("presence-penalty-minus-3", body(presence_penalty=-3), 400, "presence_penalty"),
    ("logit-bias-key-abc", body(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit-bias-key-out-of-vocab", body(logit_bias={"999999999": 1}), 400, "logit_bias"),
    ("logit-bias-key-negative", body(logit_bias={"-1": 1}), 400, "logit_bias"),
    ("logit-bias-value-500", body(logit_bias={"50": 500}), 400, "logit_bias.50"),
    ("logit-bias-value-string", body(logit_bias={"50": "high"}), 400, "logit_bias"),
    ("logit-bias-array", body(logit_bias=[1, 2]), 400, "logit_bias"),
    ("seed-string", body(seed="x"), 400, "seed"),
    ("seed-float", body(seed=1.5), 400, "seed"),
    # logprobs
    ("logprobs-string", body(logprobs="yes"), 400, "logprobs"),
    ("top-logprobs-25", body(logprobs=True, top_logprobs=25), 400, "top_logprobs"),
    ("top-logprobs-negative", body(logprobs=True, top_logprobs=-1), 400, "top_logprobs"),
    ("top-logprobs-without-logprobs", body(top_logprobs=2), 400, "top_logprobs"),
    # length
    ("max-tokens-0", body(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", body(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-string", body(max_tokens="ten"), 400, "max_tokens"),
    ("max-tokens-float", body(max_tokens=10.5), 400, "max_tokens"),
    ("max-tokens-10e12", body(max_tokens=10**12), 400, "max_tokens"),
    ("max-tokens-over-context", body(max_tokens=100_000), 400, "max_tokens"),
    ("max-completion-tokens-0", body(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("prompt-over-context", body(messages=[{"role": "user", "content": "hello " * 3000}]), 400, "messages"),
    # Far over the context: refused by the bound on its length, before it is tokenized.
    ("prompt-far-over-context", body(messages=[{"role": "user", "content": "hello " * 150_000}]), 400, "messages"),
    # Sizes the server bounds (service/limits.py defaults)
    ("messages-2049", body(messages=[{"role": "user", "content": "hi"}] * 2049), 400, "messages"),
    ("stop-string-1025-chars", body(stop=["x" * 1025]), 400, "stop"),
    ("tools-129", body(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]), 400, "tools"),
    (
        "schema-over-limit",
        body(response_format={"type": "json_schema", "json_schema": {"name": "big", "schema": BIG_SCHEMA}}),
        400,
        "response_format.json_schema.schema",
    ),
    ("logit-bias-1025", body(logit_bias={str(i): 1 for i in range(1025)}), 400, "logit_bias"),
    # Text that JSON can spell and UTF-8 cannot carry: a lone surrogate
    ("surrogate-in-content", raw(message(role="user", content="a\ud800c")), 400, "messages[0].content"),
    (
        "surrogate-in-content-part",
        raw(message(role="user", content=[{"type": "text", "text": "\udfff"}])),
        400,
        "messages[0].content[0].text",
    ),
    ("surrogate-in-stop", raw(body(stop=["ok", "\ud83d"])), 400, "stop[1]"),
    ("surrogate-in-model", raw(body(model="gemma\ud800")), 400, "model"),
    ("surrogate-in-role", raw(message(role="us\ud800er", content="hi")), 400, "messages[0].role"),
    (
        "surrogate-in-schema",
        raw(body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"\ud800": 1}}}])),
        400,
        "tools[0].function.parameters",
    ),
    ("surrogate-in-unknown-field", raw(body(**{"x\ud800": 1})), 400, "x\ud800"),
    ("nul-and-surrogate-in-user", raw(body(user="\u0000\ud800")), 400, "user"),
    # n
    ("n-0", body(n=0), 400, "n"),
    ("n-9", body(n=9), 400, "n"),
    # stop
    ("stop-5-strings", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop-number", body(stop=5), 400, "stop"),
    ("stop-object", body(stop={"a": 1}), 400, "stop"),
    ("stop-list-with-number", body(stop=["a", 5]), 400, "stop[1]"),
    ("stop-empty-string", body(stop=[""]), 400, "stop"),
    # streaming
    ("stream-string", body(stream="yes"), 400, "stream"),
    ("stream-options-without-stream", body(stream_options={"include_usage": True}), 400, "stream_options"),
    ("stream-options-not-object", body(stream=True, stream_options=True), 400, "stream_options"),
    # Errors found before the first chunk of a stream are ordinary HTTP errors.
    ("stream-n-9", body(stream=True, n=9), 400, "n"),
    ("stream-unknown-model", body(stream=True, model="gpt-4o"), 404, "model"),
    ("stream-temperature-3", body(stream=True, temperature=3), 400, "temperature"),
    # unsupported features
    (
        "response-format-json-schema-on-plain-model",
        body(model=PLAIN_MODEL, response_format=JSON_SCHEMA),
        400,
        "response_format",
    ),
    (
        "response-format-json-object-on-plain-model",
        body(model=PLAIN_MODEL, response_format={"type": "json_object"}),
        400,
        "response_format",
    ),
    (
        "response-format-json-schema-without-name",
        body(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        400,
        "response_format.json_schema.name",
    ),
    (
        "response-format-unsupported-schema",
        body(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such-format"}},
            }
        ),
        400,
        "response_format",
    ),
    ("response-format-unknown-type", body(response_format={"type": "xml"}), 400, "response_format.type"),
    ("tools-on-plain-model", body(model=PLAIN_MODEL, tools=[TOOL]), 400, "tools"),
    (
        "tool-bad-name",
        body(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
        400,
        "tools[0].function.name",
    ),
    ("tool-choice-required-without-tools", body(tool_choice="required"), 400, "tool_choice"),
    (
        "tool-choice-unknown-function",
        body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}),
        400,
        "tool_choice",
    ),
    (
        "tool-message-without-call-id",
        body(messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages[0].tool_call_id",
    ),
    ("empty-content-list", body(messages=[{"role": "user", "content": []}]), 400, "messages[0].content"),
    ("tool-choice-bad-string", body(tool_choice="sometimes"), 400, "tool_choice"),
    ("parallel-tool-calls", body(parallel_tool_calls=True), 400, "parallel_tool_calls"),
    # other fields
    ("unknown-field-foo", body(foo=1), 400, "foo"),
    ("user-not-string", body(user=5), 400, "user"),
]

# After every this many rows, a good request must still succeed.
CHECK_EVERY = 8


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.rest_base_url,
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=60,
    ) as client:
        yield client


def assert_envelope(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["code"] is None or isinstance(error["code"], str), error
    assert error["param"] == param, error
    return error


def assert_good_request_succeeds(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json=body(temperature=0))
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["finish_reason"] in ("stop", "length")
    assert completion["usage"]["completion_tokens"] >= 1


def post(http: httpx.Client, request: dict | bytes) -> httpx.Response:
    if isinstance(request, bytes):
        return http.post("/chat/completions", content=request, headers={"Content-Type": "application/json"})
    return http.post("/chat/completions", json=request)


def test_good_request_before_the_table(http):
    assert_good_request_succeeds(http)


@pytest.mark.parametrize(
    ("index", "request_body", "status", "param"),
    [(index, row[1], row[2], row[3]) for index, row in enumerate(ROWS)],
    ids=[row[0] for row in ROWS],
)
def test_bad_input(http, index, request_body, status, param):
    error = assert_envelope(post(http, request_body), status, param)
    if status == 400:
        assert error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "model_not_found"
    if index % CHECK_EVERY == CHECK_EVERY - 1:
        assert_good_request_succeeds(http)


def test_row_ids_are_unique():
    names = [row[0] for row in ROWS]
    assert len(names) == len(set(names))


def test_good_request_after_the_table(http):
    assert_good_request_succeeds(http)
    # And streaming still works too.
    with http.stream("POST", "/chat/completions", json=body(stream=True, temperature=0)) as response:
        assert response.status_code == 200
        text = response.read().decode()
    assert text.rstrip().endswith("data: [DONE]")


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


def test_missing_authorization_is_401(server):
    response = httpx.post(f"{server.rest_base_url}/chat/completions", json=body(), timeout=60)
    error = assert_envelope(response, 401, None)
    assert error["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong-key", "Bearer", "Basic dXNlcjpwYXNz", "test-key-0123456789", "Bearer test-key-0123456789x"],
)
def test_wrong_key_is_401(server, authorization):
    response = httpx.post(
        f"{server.rest_base_url}/chat/completions", json=body(), headers={"Authorization": authorization}, timeout=60
    )
    error = assert_envelope(response, 401, None)
    assert error["code"] == "invalid_api_key"
    # The message must not echo the key back.
    assert "wrong-key" not in error["message"]


def test_wrong_key_is_401_for_models_and_streaming(server):
    headers = {"Authorization": "Bearer wrong-key"}
    base = server.rest_base_url
    assert_envelope(httpx.get(f"{base}/models", headers=headers, timeout=60), 401, None)
    assert_envelope(httpx.get(f"{base}/models/{MODEL}", headers=headers, timeout=60), 401, None)
    assert_envelope(
        httpx.post(f"{base}/chat/completions", json=body(stream=True), headers=headers, timeout=60), 401, None
    )


def test_unknown_model_retrieve_is_404(http):
    error = assert_envelope(http.get("/models/gpt-4o"), 404, "model")
    assert error["code"] == "model_not_found"
