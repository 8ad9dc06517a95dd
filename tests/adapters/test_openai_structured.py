"""n choices, JSON modes and tools through the official openai SDK, on the real model.

Constrained decoding guarantees the shape of the output whenever generation finishes on its own
(finish_reason "stop" or "tool_calls"). The schemas bound every string and array, but no JSON schema
bounds the digits of a number, and a tiny model sampling at temperature 0.7 to 1 sometimes loops on
one ("ratio": 1.0000...) or on a long string until max_tokens: which seeds do depends on the CPU's
kernels (seen on an AVX-512 machine, not on an AVX2 one). So each output must be valid when it
stopped, may only have run out by using its whole budget, and only a few may run out at all.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.service.test_structured_grpc import ORDERED, ORDERED_SCHEMA

MODEL = "gemma-3-270m"
PROMPT = [{"role": "user", "content": "Tell me about a person."}]


def create(client: openai.OpenAI, **params):
    params.setdefault("model", MODEL)
    params.setdefault("messages", PROMPT)
    params.setdefault("max_tokens", 200)
    return client.chat.completions.create(**params)


def streamed(client: openai.OpenAI, **params) -> list:
    with create(client, stream=True, **params) as chunks:
        return list(chunks)


# ---------------------------------------------------------------------------
# n choices
# ---------------------------------------------------------------------------


def test_n_choices_with_seed_reproduce(openai_client):
    first = create(openai_client, n=3, seed=42, temperature=1.0, max_tokens=24)
    second = create(openai_client, n=3, seed=42, temperature=1.0, max_tokens=24)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1  # each choice has its own random stream
    assert first.usage.completion_tokens > 24  # all three choices are counted
    single = create(openai_client, n=1, seed=42, temperature=1.0, max_tokens=24)
    assert single.usage.prompt_tokens == first.usage.prompt_tokens  # the prompt is counted once
    assert single.choices[0].message.content == texts[0]


def test_n_choices_stream_interleaved_by_index(openai_client):
    unary = create(openai_client, n=3, seed=7, temperature=1.0, max_tokens=16)
    chunks = streamed(
        openai_client, n=3, seed=7, temperature=1.0, max_tokens=16, stream_options={"include_usage": True}
    )
    texts = {0: "", 1: "", 2: ""}
    finished = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(3)] == [c.message.content for c in unary.choices]
    assert set(finished) == {0, 1, 2}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


# ---------------------------------------------------------------------------
# JSON modes
# ---------------------------------------------------------------------------

NAME = {"type": "string", "minLength": 1, "maxLength": 12}


def closed(schema):
    """The schema with every object closed (additionalProperties false), as OpenAI's strict mode requires."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [closed(item) for item in schema]
    return schema


SCHEMAS = [
    {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
    {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["score"]},
    {
        "type": "object",
        "properties": {
            "address": {
                "type": "object",
                "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            }
        },
        "required": ["address"],
    },
    {
        "type": "object",
        "properties": {
            "points": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "maxItems": 4}
        },
        "required": ["points"],
    },
    {
        "type": "object",
        "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["kind", "lives"],
    },
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"}]}},
        "required": ["value"],
    },
    {
        "type": "object",
        "properties": {"first": NAME, "last": NAME, "middle": NAME},
        "required": ["first", "last"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
    },
    {
        "type": "object",
        "properties": {
            "people": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["name", "age"],
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["people"],
    },
    {
        "type": "object",
        "properties": {
            "status": {"enum": ["active", "inactive"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
        "required": ["status", "count"],
    },
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]},
    {
        "type": "object",
        "properties": {"flag": {"type": "boolean"}, "note": {"type": "string", "maxLength": 8}},
        "required": ["flag", "note"],
    },
    {
        "type": "object",
        "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1}, "unit": {"enum": ["m", "s", "kg"]}},
        "required": ["ratio", "unit"],
    },
    {
        "type": "object",
        "properties": {
            "nested": {
                "type": "object",
                "properties": {
                    "deeper": {
                        "type": "object",
                        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 5}},
                        "required": ["x"],
                    }
                },
                "required": ["deeper"],
            }
        },
        "required": ["nested"],
    },
    {
        "type": "object",
        "properties": {
            "choice": {
                "oneOf": [{"type": "string", "enum": ["yes", "no"]}, {"type": "integer", "minimum": 0, "maximum": 3}]
            }
        },
        "required": ["choice"],
    },
]


SCHEMAS = [closed(schema) for schema in SCHEMAS]


SCHEMA_MAX_TOKENS = 200


@pytest.fixture(scope="module")
def schema_answers(openai_client) -> list:
    return [
        create(
            openai_client,
            temperature=0.7,
            seed=3,
            max_tokens=SCHEMA_MAX_TOKENS,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
        )
        for schema in SCHEMAS
    ]


def assert_valid_or_out_of_budget(completion, max_tokens: int, schema: dict) -> None:
    choice = completion.choices[0]
    if choice.finish_reason == "length":
        assert completion.usage.completion_tokens == max_tokens, "cut short without using the budget"
        return
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("index", range(len(SCHEMAS)), ids=[f"schema{i}" for i in range(len(SCHEMAS))])
def test_json_schema_output_validates(schema_answers, index):
    assert_valid_or_out_of_budget(schema_answers[index], SCHEMA_MAX_TOKENS, SCHEMAS[index])


def test_json_schema_outputs_mostly_finish(schema_answers):
    ran_out = [i for i, c in enumerate(schema_answers) if c.choices[0].finish_reason == "length"]
    assert len(ran_out) <= 2, f"schemas {ran_out} ran out of tokens"


def test_the_output_follows_the_order_of_the_schemas_properties(openai_client):
    """The client's order, kept end to end (a protobuf Struct would scramble it per process, and so
    the answer): every key in schema order, whatever the alphabet says."""
    for properties in (ORDERED, list(reversed(ORDERED))):
        reordered = {**ORDERED_SCHEMA, "properties": {name: {"type": "boolean"} for name in properties}}
        completion = create(
            openai_client,
            temperature=0,
            max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "ordered", "schema": reordered}},
        )
        assert completion.choices[0].finish_reason == "stop"
        assert list(json.loads(completion.choices[0].message.content)) == properties


def test_json_schema_streamed_output_validates(openai_client):
    schema = SCHEMAS[13]
    chunks = streamed(
        openai_client,
        temperature=0.7,
        seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "people", "schema": schema}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_always_parses(openai_client):
    stopped = 0
    for seed in range(6):
        completion = create(
            openai_client, temperature=1.0, seed=seed, max_tokens=400, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        )  # fmt: skip
        assert_valid_or_out_of_budget(completion, 400, {"type": "object"})
        stopped += completion.choices[0].finish_reason == "stop"
    assert stopped >= 4, f"only {stopped} of 6 seeds finished their JSON object"


def test_unsupported_schema_is_refused_before_generation(openai_client):
    with pytest.raises(openai.BadRequestError) as raised:
        create(
            openai_client,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such-format"}},
            },
        )
    assert raised.value.param == "response_format"


def test_length_cut_json_ends_with_length(openai_client):
    completion = create(
        openai_client,
        max_tokens=3,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[13]}},
    )
    assert completion.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 16}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(tool_calls, *, only: str | None = None) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in PARAMETERS and (only is None or call.function.name == only)
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("seed", range(3))
def test_tool_choice_required_yields_valid_calls(openai_client, seed):
    completion = create(openai_client, messages=ASK, tools=TOOLS, tool_choice="required", seed=seed, temperature=1.0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    check_calls(choice.message.tool_calls)


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_tool_choice_calls_that_function(openai_client, name):
    completion = create(
        openai_client,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": name}},
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls, only=name)
    assert len(choice.message.tool_calls) == 1


def test_tool_calls_stream_as_deltas(openai_client):
    chunks = streamed(
        openai_client, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, parallel_tool_calls=False
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id and deltas[0].function.name
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), PARAMETERS[deltas[0].function.name])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_tool_choice_none_and_auto_answer(openai_client):
    none = create(openai_client, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=20, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = create(openai_client, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=40, temperature=0)
    choice = auto.choices[0]
    if choice.message.tool_calls:  # the model chose to call
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_tool_round_trip(openai_client):
    first = create(
        openai_client,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
    )
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    answer = create(openai_client, messages=history, tools=TOOLS, max_tokens=30, temperature=0, tool_choice="none")
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    question_alone = create(openai_client, messages=ASK, max_tokens=1)
    assert (
        answer.usage.prompt_tokens > question_alone.usage.prompt_tokens + 20
    )  # the call and its result are in the prompt


def test_capability_refusals(openai_client):
    for params, param in (
        ({"tools": TOOLS}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            create(openai_client, model="gemma-3-270m-plain", **params)
        assert raised.value.param == param
    models = {m.id: m for m in openai_client.models.list()}
    assert models["gemma-3-270m-plain"].capabilities == {"tools": False, "json_object": False, "json_schema": False}
    assert models[MODEL].capabilities == {"tools": True, "json_object": True, "json_schema": True}
