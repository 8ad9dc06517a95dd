"""The OpenAPI document the adapter serves at GET /openapi.json, held to the real server.

adapters/rest/openapi.py builds the document from the proto and the adapter's own tables, and
`make openapi-check` keeps the committed file current. Here the server must keep to it:

- schemathesis generates requests from the document, valid and invalid, for every operation: no
  5xx; status, content type, headers and body (each event of a stream too) as documented; every
  request the document calls invalid refused; and the official `openai` SDK's types accept every
  completion, chunk and model (openapi_conformance.py);
- chosen requests reach what generated ones rarely do (n choices, logprobs, tool calls, the usage
  chunk, error statuses), and their answers conform too;
- each value bound the document states is the service's: the edge is accepted, past it refused.

Completions are held to a few tokens (the model runs on the CPU), and schemathesis to a bounded
number of cases, so that the file takes a couple of minutes on two cores.
"""

from __future__ import annotations

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from adapters.rest import translate_completions
from adapters.rest.openapi import DOCUMENT_PATH
from adapters.rest.translate import _FIELDS
from tests.adapters.openapi_conformance import CHAT, COMPLETIONS, assert_conforms, document
from tests.conftest import MODEL_ID

# The most tokens a completion generated from the document may take: a stream still has a role
# chunk, a content chunk and a finish.
GENERATED_MAX_TOKENS = 2
# Per operation and phase; with the coverage phase's own cases, several hundred requests in all.
CASES_PER_OPERATION = 50
SAY_HI = [{"role": "user", "content": "Say hi."}]
# A tool whose only call is `{}`, so that a forced call completes in a few tokens.
PING = {
    "type": "function",
    "function": {"name": "ping", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}


def root_url(server) -> str:
    return server.rest_base_url.removesuffix("/v1")


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=root_url(server), headers=headers, timeout=120) as client:
        yield client


def checked(method: str, path: str, response: httpx.Response) -> httpx.Response:
    assert_conforms(method, path, response.status_code, response.headers, response.read())
    return response


def chat(**fields) -> dict:
    return {"model": MODEL_ID, "messages": SAY_HI, "max_tokens": 3, **fields}


def text(**fields) -> dict:
    return {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 3, **fields}


# ---------------------------------------------------------------------------
# The document itself
# ---------------------------------------------------------------------------


def test_served_document_is_the_committed_file(http):
    response = checked("GET", "/openapi.json", http.get("/openapi.json"))
    assert response.headers["content-type"] == "application/json"
    assert response.content == DOCUMENT_PATH.read_bytes()


def test_schemas_are_valid_json_schema():
    for schema in document()["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_request_body_has_exactly_the_adapters_fields():
    """translate.py refuses a field it does not know; the document lists exactly those it knows."""
    body = document()["components"]["schemas"]["ChatCompletionRequest"]
    assert body["additionalProperties"] is False
    assert list(body["properties"]) == list(_FIELDS)
    assert body["required"] == ["messages", "model"]
    body = document()["components"]["schemas"]["CompletionRequest"]
    assert body["additionalProperties"] is False
    assert list(body["properties"]) == list(translate_completions._FIELDS)
    assert body["required"] == ["model", "prompt"]


# ---------------------------------------------------------------------------
# Generated requests (schemathesis)
# ---------------------------------------------------------------------------


def keep_cheap(body: object, path: str) -> None:
    """Points a generated request at the served model and caps the tokens it may generate. Only
    values the document accepts are replaced, and only by others it accepts, so that an invalid
    case stays invalid where it was."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL_ID
    request = "CompletionRequest" if path == COMPLETIONS else "ChatCompletionRequest"
    properties = document()["components"]["schemas"][request]["properties"]
    names = [name for name in ("max_tokens", "max_completion_tokens") if name in properties]
    for name in names:
        value, schema = body.get(name), properties[name]
        if type(value) is int and schema["minimum"] <= value <= schema["maximum"]:
            body[name] = min(value, GENERATED_MAX_TOKENS)
    if all(body.get(name) is None for name in names):
        body[names[-1]] = GENERATED_MAX_TOKENS


# The committed file, which the server serves (test_served_document_is_the_committed_file): the
# schema is loaded when the tests are collected, before the server starts.
generated = schemathesis.openapi.from_path(DOCUMENT_PATH)


@generated.parametrize()
@settings(max_examples=CASES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests(case, server):
    keep_cheap(case.body, case.path)
    # Every check but positive_data_acceptance: a request can satisfy the document and still get a
    # documented 400 for what its schemas leave to the descriptions (a prompt longer than the
    # context, `n` over --max-n, tool_choice naming a function that is not in tools).
    response = case.call_and_validate(
        base_url=root_url(server),
        headers={"Authorization": f"Bearer {server.api_key}"},
        excluded_checks=[positive_data_acceptance],
        timeout=120,
    )
    if case.method.lower() not in document()["paths"][case.path]:
        return  # schemathesis also tries the methods the document leaves out, and its checks want a 405
    headers = {name: values[0] for name, values in response.headers.items()}
    assert_conforms(case.method, case.path, response.status_code, headers, response.content)


# ---------------------------------------------------------------------------
# Chosen requests: what generated ones rarely reach
# ---------------------------------------------------------------------------

CHOSEN = [
    ("plain", chat()),
    ("n-logprobs", chat(n=2, seed=3, logprobs=True, top_logprobs=2)),
    ("stream-n-logprobs-usage", chat(stream=True, n=2, logprobs=True, stream_options={"include_usage": True})),
    ("stream-without-usage", chat(stream=True)),
    ("json-schema", chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {}}})),
    ("history-with-tool-call", chat(messages=[
        *SAY_HI,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "pong"},
    ], tools=[PING], tool_choice="none")),
    ("bad-type-400", chat(temperature="hot")),
    ("unknown-field-400", chat(temperatures=1)),
    ("range-400", chat(top_p=0)),
    ("unknown-model-404", chat(model="no-such-model")),
    ("stream-refused-before-it-starts-400", chat(stream=True, n=0)),
]  # fmt: skip


@pytest.mark.parametrize("body", [body for _, body in CHOSEN], ids=[name for name, _ in CHOSEN])
def test_chosen_chat_requests_conform(http, body):
    checked("POST", CHAT, http.post(CHAT, json=body))


CHOSEN_TEXT = [
    ("plain", text()),
    ("token-ids", text(prompt=[2, 651, 1000])),
    ("one-of-a-batch", text(prompt=[[2, 651, 1000]])),
    ("n-logprobs", text(n=2, seed=3, logprobs=2)),
    ("echo", text(echo=True)),
    ("stream-n-logprobs-usage", text(stream=True, n=2, logprobs=1, stream_options={"include_usage": True})),
    ("stream-echo-without-usage", text(stream=True, echo=True)),
    ("bad-type-400", text(logprobs=True)),
    ("unknown-field-400", text(messages=SAY_HI)),
    ("batch-400", text(prompt=["one", "two"])),
    ("suffix-400", text(suffix="the end")),
    ("echo-logprobs-400", text(echo=True, logprobs=1)),
    ("token-out-of-vocabulary-400", text(prompt=[2, 2**30])),
    ("unknown-model-404", text(model="no-such-model")),
    ("stream-refused-before-it-starts-400", text(stream=True, best_of=2)),
]


@pytest.mark.parametrize("body", [body for _, body in CHOSEN_TEXT], ids=[name for name, _ in CHOSEN_TEXT])
def test_chosen_text_completion_requests_conform(http, body):
    checked("POST", COMPLETIONS, http.post(COMPLETIONS, json=body))


def test_tool_calls_conform(http):
    forced = chat(max_tokens=40, tools=[PING], tool_choice="required", temperature=0)
    unary = checked("POST", CHAT, http.post(CHAT, json=forced)).json()
    assert unary["choices"][0]["message"]["tool_calls"]  # so their schema was checked
    streamed = checked("POST", CHAT, http.post(CHAT, json={**forced, "stream": True}))
    assert b'"tool_calls":[{"index":0' in streamed.content


def test_models_health_and_errors_conform(server, http):
    checked("GET", "/v1/models", http.get("/v1/models"))
    checked("GET", "/v1/models/{model}", http.get(f"/v1/models/{MODEL_ID}"))
    assert checked("GET", "/v1/models/{model}", http.get("/v1/models/no/such/model")).status_code == 404
    for path in ("/health", "/health/ready", "/health/live"):
        checked("GET", path, http.get(path))
    unauthorized = httpx.post(f"{root_url(server)}{CHAT}", json=chat(), headers={"Authorization": "Bearer wrong"})
    assert checked("POST", CHAT, unauthorized).status_code == 401


# ---------------------------------------------------------------------------
# The bounds the document states are the service's
# ---------------------------------------------------------------------------


def bounded_fields(request: str = "ChatCompletionRequest") -> list[tuple[str, dict]]:
    """(name, schema) of each top-level request field with a numeric bound."""
    properties = document()["components"]["schemas"][request]["properties"]
    return [(name, schema) for name, schema in properties.items() if {"minimum", "exclusiveMinimum"} & set(schema)]


def edges(schema: dict) -> tuple[list, list]:
    """(values at the edges the document accepts, values just past them)."""
    integer = "integer" in schema["type"]
    step = 1 if integer else 0.5
    inside, outside = [], []
    if "minimum" in schema:
        inside.append(schema["minimum"])
        outside.append(schema["minimum"] - step)
    if "exclusiveMinimum" in schema:
        inside.append(schema["exclusiveMinimum"] + (1 if integer else 1e-9))
        outside.append(schema["exclusiveMinimum"])
    if "maximum" in schema:
        # The top of an int32 field's range gets past the adapter but not past the context
        # (max_tokens) or --max-n (n): only the step past it is tried.
        if schema["maximum"] < 2**31 - 1:
            inside.append(schema["maximum"])
        outside.append(schema["maximum"] + step)
    return inside, outside


def test_the_bounds_are_found():
    names = {name for name, _ in bounded_fields()}
    assert {"temperature", "top_p", "frequency_penalty", "presence_penalty", "top_logprobs", "n", "seed"} <= names
    names = {name for name, _ in bounded_fields("CompletionRequest")}
    assert {"temperature", "top_p", "frequency_penalty", "presence_penalty", "logprobs", "n", "best_of"} <= names


@pytest.mark.parametrize("name", [name for name, _ in bounded_fields()])
def test_documented_bounds_are_the_services(http, name):
    inside, outside = edges(dict(bounded_fields())[name])
    for value in inside:
        response = checked("POST", CHAT, http.post(CHAT, json=chat(logprobs=True, **{name: value})))
        assert response.status_code == 200, (value, response.text)
    for value in outside:
        response = checked("POST", CHAT, http.post(CHAT, json=chat(logprobs=True, **{name: value})))
        assert response.status_code == 400, (value, response.text)
        assert response.json()["error"]["param"] == name


@pytest.mark.parametrize("name", [name for name, _ in bounded_fields("CompletionRequest")])
def test_documented_text_completion_bounds_are_the_services(http, name):
    inside, outside = edges(dict(bounded_fields("CompletionRequest"))[name])
    for value in inside:
        response = checked("POST", COMPLETIONS, http.post(COMPLETIONS, json=text(**{name: value})))
        assert response.status_code == 200, (value, response.text)
    for value in outside:
        response = checked("POST", COMPLETIONS, http.post(COMPLETIONS, json=text(**{name: value})))
        assert response.status_code == 400, (value, response.text)
        assert response.json()["error"]["param"] == name


def test_documented_logit_bias_bounds_are_the_services(http):
    bias = document()["components"]["schemas"]["ChatCompletionRequest"]["properties"]["logit_bias"]
    value = bias["additionalProperties"]
    for edge in (value["minimum"], value["maximum"]):
        assert checked("POST", CHAT, http.post(CHAT, json=chat(logit_bias={"7": edge}))).status_code == 200
    for past in (value["minimum"] - 0.5, value["maximum"] + 0.5, 101):
        response = checked("POST", CHAT, http.post(CHAT, json=chat(logit_bias={"7": past})))
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("logit_bias")
    # A key is any integer to the document; the service takes those in the model's vocabulary.
    response = checked("POST", CHAT, http.post(CHAT, json=chat(logit_bias={"-7": 1})))
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"
