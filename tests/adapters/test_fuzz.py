"""Arbitrary JSON at every request field, through the real adapter: never a 5xx (hypothesis).

Each case takes a good request and changes one place in it: a top-level field, a field of a
message, of a content part, of a tool call in the history, of a tool, of tool_choice, of
response_format or of stream_options, a key or a value of logit_bias; the change puts an arbitrary
JSON value there, adds a key, or removes the field. Now and then the whole body is arbitrary JSON.
The values are those JSON can carry and a careless reader trips on: lone surrogates (written as
\\u escapes, as JSON allows), NUL and other control characters, integers far past 64 bits, numbers
past a double's range (1e400), every type where another is expected, and nesting deep enough to
reach the parsers' limits. Whatever the value, the answer is a 4xx in OpenAI's error envelope, or a
200 with a completion (or stream) that the adapter's OpenAPI document and the `openai` SDK accept.

The good requests generate at most a token or two (their logit_bias makes the model end at once,
and max_tokens holds if that is what changed), so a case costs little more than its HTTP call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.adapters.openapi_conformance import CHAT, assert_conforms, stream_errors
from tests.conftest import MODEL_ID

CASES = 200
# Gemma's <eos> and <end_of_turn>, pushed up so that a good request ends at its first token.
END_AT_ONCE = {"1": 100, "106": 100}
PING = {
    "type": "function",
    "function": {
        "name": "ping",
        "description": "Checks the line.",
        "parameters": {"type": "object", "properties": {"echo": {"type": "string"}}},
        "strict": False,
    },
}

# Good requests, each reaching one part of the request's shape; every place in them is fuzzed.
GOOD_REQUESTS = {
    "sampling": {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "logit_bias": END_AT_ONCE,
        "temperature": 0.7,
        "top_p": 0.9,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.1,
        "seed": 7,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "stop": ["\n\n", "END"],
        "user": "fuzz",
    },
    "history": {
        "model": MODEL_ID,
        "messages": [
            {"role": "system", "content": "Be brief.", "name": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "Call ping."}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "pong"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}], "refusal": "No."},
        ],
        "max_tokens": 1,
        "logit_bias": END_AT_ONCE,
    },
    "tools": {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Call ping."}],
        "tools": [PING],
        "tool_choice": {"type": "function", "function": {"name": "ping"}},
        "parallel_tool_calls": False,
        "max_tokens": 1,
    },
    "format": {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "A JSON object."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "description": "The answer.",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                "strict": True,
            },
        },
        "max_tokens": 1,
    },
    "stream": {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Say hi."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 2,
        "logit_bias": END_AT_ONCE,
    },
}


def places(value: object, path: tuple = ()) -> list[tuple]:
    """The path of every value inside ``value`` (keys and list indexes), ``value`` itself first."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += places(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += places(item, (*path, index))
    return found


PLACES = [(name, path) for name, good in GOOD_REQUESTS.items() for path in places(good)[1:]]


# ---------------------------------------------------------------------------
# JSON values, written as raw JSON text
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RawNumber:
    """A number as JSON text that Python's json would not write (1e400 is a JSON number)."""

    text: str


@dataclass(frozen=True)
class Nested:
    """``inner`` inside ``depth`` arrays or objects, written without recursion."""

    depth: int
    in_objects: bool
    inner: object


def to_json(value: object) -> str:
    if isinstance(value, RawNumber):
        return value.text
    if isinstance(value, Nested):
        opening, closing = ('{"a":', "}") if value.in_objects else ("[", "]")
        return opening * value.depth + to_json(value.inner) + closing * value.depth
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{to_json(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(item) for item in value) + "]"
    # ensure_ascii (the default): a lone surrogate is written as its \u escape, the one way JSON
    # text can carry it.
    return json.dumps(value)


characters = st.one_of(
    st.characters(),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),  # lone surrogates
    st.sampled_from(["\x00", "\x1f", "\x7f", "\u2028", "\ufeff", "\uffff", '"', "\\"]),
)
strings = st.one_of(
    st.text(characters, max_size=12),
    st.sampled_from(["a\ud800c", "\udfff", "\ud83d\ude00", "\x00", "", "[DONE]", "null", "ping", "function"]),
)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**40, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([RawNumber(text) for text in ("1e400", "-1e400", "1e-400", "-0", "1.0", "2.5e1", "1E+2")]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
shallow_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(strings, children, max_size=3)),
    max_leaves=6,
)
json_values = st.one_of(
    shallow_values,
    shallow_values,
    shallow_values,
    # Past the protobuf's nesting limit inside a schema, then past the JSON parser's.
    st.builds(Nested, st.sampled_from([60, 2_000]), st.booleans(), shallow_values),
)


@st.composite
def fuzzed_bodies(draw) -> str:
    """A good request with one place changed, as JSON text; now and then arbitrary JSON instead."""
    if draw(st.integers(0, 19)) == 0:
        return to_json(draw(json_values))
    name, path = draw(st.sampled_from(PLACES))
    body = json.loads(json.dumps(GOOD_REQUESTS[name]))
    *parents, last = path
    container = body
    for key in parents:
        container = container[key]
    change = draw(st.sampled_from(["replace", "replace", "replace", "add a key", "remove"]))
    if change == "add a key" and isinstance(container[last], dict):
        container[last][draw(strings)] = draw(json_values)
    elif change == "remove":
        del container[last]
    else:
        container[last] = draw(json_values)
    return to_json(body)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.rest_base_url.removesuffix("/v1"), headers=headers, timeout=120) as client:
        yield client


def assert_answer_is_sound(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert_conforms("POST", CHAT, response.status_code, response.headers, response.content)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert stream_errors(response.content) == []  # a stream that started also ends well


@pytest.mark.parametrize("name", list(GOOD_REQUESTS))
def test_good_requests_succeed(http, name):
    """Otherwise every fuzzed case would be refused for the same reason and test little."""
    response = http.post(CHAT, content=to_json(GOOD_REQUESTS[name]))
    assert response.status_code == 200, response.text
    assert_answer_is_sound(response)


@given(body=fuzzed_bodies())
@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck))
def test_arbitrary_json_at_every_field(http, body):
    note(f"body: {body[:4000]}")  # hypothesis shows a failing case's body only this way
    assert_answer_is_sound(http.post(CHAT, content=body.encode()))


def with_field(field: str, value: str) -> str:
    """The "tools" good request with ``"field": value`` (raw JSON) in place of that field."""
    body = {key: item for key, item in GOOD_REQUESTS["tools"].items() if key != field}
    return to_json(body)[:-1] + f',"{field}":{value}}}'


TOOL_WITH = '[{"type": "function", "function": {"name": "ping", "parameters": %s}}]'
SCHEMA_WITH = '{"type": "json_schema", "json_schema": {"name": "a", "schema": %s}}'


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(with_field("messages", '[{"role": "user", "content": "a\\ud800c"}]'), "messages[0].content",
                     id="lone-surrogate"),
        pytest.param(with_field("model", '"\\udfff"'), "model", id="lone-surrogate-model"),
        pytest.param('{"\\ud800": 1}', "\ud800", id="lone-surrogate-key"),
        pytest.param(with_field("user", '"\\u0000"'), None, id="nul"),
        pytest.param(with_field("n", "1e400"), "n", id="number-past-a-double"),
        pytest.param(with_field("seed", "1" + "0" * 400), "seed", id="integer-past-64-bits"),
        pytest.param(with_field("tools", TOOL_WITH % '{"type": "object", "maximum": 1e400}'),
                     "tools[0].function.parameters", id="infinity-in-tool-parameters"),
        pytest.param(with_field("response_format", SCHEMA_WITH % '{"minimum": -1e400}'),
                     "response_format.json_schema.schema", id="infinity-in-schema"),
        pytest.param(with_field("messages", "[" * 100_000 + "]" * 100_000), None, id="deep-nesting"),
        # Python's `$` lets a trailing newline by; the document's pattern does not.
        pytest.param(with_field("tools", '[{"type": "function", "function": {"name": "ping\\n"}}]'),
                     "tools[0].function.name", id="newline-after-function-name"),
        pytest.param(with_field("response_format", '{"type": "json_schema", "json_schema": {"name": "a\\n"}}'),
                     "response_format.json_schema.name", id="newline-after-schema-name"),
    ],
)  # fmt: skip
def test_chosen_hostile_values(http, body, param):
    """The cases the issue names and those the fuzzing found, always tried: hypothesis draws each
    only now and then."""
    response = http.post(CHAT, content=body.encode())
    assert_answer_is_sound(response)
    if param is None:  # accepted, or refused where the parser gave up (no field to name)
        return
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
