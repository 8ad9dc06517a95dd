"""JSON <-> proto translation of the REST adapter, both ways, without any server."""

from __future__ import annotations

import json
import math

import pytest

from adapters.rest.errors import APIError
from adapters.rest.translate import (
    chat_completion_to_json,
    chat_request_from_json,
    chunk_to_json,
    encode,
    model_list_to_json,
    model_to_json,
    parse_body,
)
from chatrpc.v1 import chat_pb2 as pb

USER_HI = {"role": "user", "content": "hi"}


def translate(**fields) -> pb.ChatCompletionRequest:
    body = {"model": "m", "messages": [USER_HI]}
    body.update(fields)
    return chat_request_from_json(body)


def refused(body: dict) -> APIError:
    with pytest.raises(APIError) as caught:
        chat_request_from_json(body)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"
    return caught.value


def refused_field(**fields) -> APIError:
    body = {"model": "m", "messages": [USER_HI]}
    body.update(fields)
    return refused(body)


# ---------------------------------------------------------------------------
# Body
# ---------------------------------------------------------------------------


def test_parse_body_reads_a_json_object():
    assert parse_body(b'{"model": "m", "messages": []}') == {"model": "m", "messages": []}


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"{", b'{"a": 1,}', b"\xff\xfe", b'{"temperature": NaN}', b'{"x": Infinity}', b"[" * 100_000],
)
def test_parse_body_refuses_what_is_not_json(body):
    with pytest.raises(APIError) as caught:
        parse_body(body)
    assert caught.value.status == 400
    assert caught.value.param is None


@pytest.mark.parametrize("body", [b"[]", b"1", b'"text"', b"null", b"true"])
def test_parse_body_refuses_json_that_is_not_an_object(body):
    with pytest.raises(APIError) as caught:
        parse_body(body)
    assert caught.value.status == 400
    assert caught.value.param is None
    assert "expected an object" in caught.value.message


# ---------------------------------------------------------------------------
# Request: top-level fields
# ---------------------------------------------------------------------------


def test_minimal_request_leaves_every_optional_field_unset():
    request = translate()
    assert request.model == "m"
    assert len(request.messages) == 1
    for field in (
        "frequency_penalty",
        "logprobs",
        "top_logprobs",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "presence_penalty",
        "response_format",
        "seed",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "top_p",
        "user",
        "parallel_tool_calls",
    ):
        assert not request.HasField(field), field
    assert not request.stop and not request.tools and not request.logit_bias


def test_null_means_not_set_for_every_optional_field():
    nulls = dict.fromkeys(
        [
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "max_tokens",
            "max_completion_tokens",
            "n",
            "presence_penalty",
            "response_format",
            "seed",
            "stop",
            "stream",
            "stream_options",
            "temperature",
            "tool_choice",
            "tools",
            "top_p",
            "user",
            "parallel_tool_calls",
        ]
    )
    assert translate(**nulls) == translate()


def test_scalars_map_to_their_fields():
    request = translate(
        frequency_penalty=0.5,
        presence_penalty=-1,
        temperature=0,
        top_p=0.9,
        logprobs=True,
        top_logprobs=3,
        max_tokens=16,
        max_completion_tokens=32,
        n=1,
        seed=-(2**63),
        stream=False,
        user="u-1",
        parallel_tool_calls=False,
    )
    assert request.frequency_penalty == 0.5
    assert request.presence_penalty == -1.0
    assert request.HasField("temperature") and request.temperature == 0.0  # 0 is greedy, not "unset"
    assert request.top_p == pytest.approx(0.9)
    assert request.logprobs is True
    assert request.top_logprobs == 3
    assert request.max_tokens == 16
    assert request.max_completion_tokens == 32
    assert request.n == 1
    assert request.seed == -(2**63)
    assert request.HasField("stream") and request.stream is False
    assert request.user == "u-1"
    assert request.HasField("parallel_tool_calls") and request.parallel_tool_calls is False


def test_no_range_checks_in_the_adapter():
    # The gRPC service checks ranges, so that gRPC clients get the same answers.
    request = translate(temperature=7.5, n=5, top_logprobs=99, max_tokens=-1, top_p=0)
    assert (request.temperature, request.n, request.top_logprobs, request.max_tokens) == (7.5, 5, 99, -1)


def test_stop_as_string_or_array():
    assert list(translate(stop="END").stop) == ["END"]
    assert list(translate(stop=["a", "b"]).stop) == ["a", "b"]
    assert list(translate(stop=[]).stop) == []


def test_logit_bias_keys_are_token_ids():
    request = translate(logit_bias={"50256": -100, "7": 2.5, "-3": 1})
    assert dict(request.logit_bias) == {50256: -100.0, 7: 2.5, -3: 1.0}


def test_stream_options_include_usage():
    assert translate(stream=True, stream_options={"include_usage": True}).stream_options.include_usage
    request = translate(stream_options={})
    assert request.HasField("stream_options")
    assert not request.stream_options.HasField("include_usage")


@pytest.mark.parametrize(
    ("spelling", "mode"),
    [
        ("none", pb.TOOL_CHOICE_MODE_NONE),
        ("auto", pb.TOOL_CHOICE_MODE_AUTO),
        ("required", pb.TOOL_CHOICE_MODE_REQUIRED),
    ],
)
def test_tool_choice_modes(spelling, mode):
    choice = translate(tool_choice=spelling).tool_choice
    assert choice.WhichOneof("choice") == "mode" and choice.mode == mode


def test_tool_choice_named_function():
    choice = translate(tool_choice={"type": "function", "function": {"name": "get_weather"}}).tool_choice
    assert choice.WhichOneof("choice") == "function_name" and choice.function_name == "get_weather"


def test_tools_with_schema():
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "maximum": 7}},
        "required": ["city"],
        "additionalProperties": False,
    }
    request = translate(
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather.",
                    "parameters": parameters,
                    "strict": True,
                },
            },
            {"type": "function", "function": {"name": "now"}},
        ]
    )
    first, second = request.tools
    assert first.type == "function"
    assert first.function.name == "get_weather"
    assert first.function.description == "Weather."
    # As JSON text, in the client's order (a Struct would lose it).
    assert json.loads(first.function.parameters_json) == parameters
    assert first.function.parameters_json == json.dumps(parameters, separators=(",", ":"))
    assert first.function.strict is True
    assert second.function.name == "now"
    assert not second.function.HasField("parameters")
    assert not second.function.HasField("description")
    assert not second.function.HasField("strict")


@pytest.mark.parametrize(
    ("spelling", "kind"),
    [
        ("text", pb.RESPONSE_FORMAT_TYPE_TEXT),
        ("json_object", pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
    ],
)
def test_response_format_types(spelling, kind):
    response_format = translate(response_format={"type": spelling}).response_format
    assert response_format.type == kind
    assert not response_format.HasField("json_schema")


def test_response_format_json_schema():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    response_format = translate(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "description": "An answer.", "schema": schema, "strict": True},
        }
    ).response_format
    assert response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    target = response_format.json_schema
    assert (target.name, target.description, target.strict) == ("answer", "An answer.", True)
    assert json.loads(target.schema_json) == schema
    assert not target.HasField("schema")


# ---------------------------------------------------------------------------
# Request: messages
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "role"),
    [
        ("system", pb.ROLE_SYSTEM),
        ("developer", pb.ROLE_DEVELOPER),
        ("user", pb.ROLE_USER),
        ("assistant", pb.ROLE_ASSISTANT),
        ("tool", pb.ROLE_TOOL),
    ],
)
def test_roles(spelling, role):
    (message,) = translate(messages=[{"role": spelling, "content": "x"}]).messages
    assert message.role == role
    assert message.WhichOneof("content") == "text" and message.text == "x"


def test_content_as_parts():
    (message,) = translate(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                ],
            }
        ]
    ).messages
    assert message.WhichOneof("content") == "parts"
    text, image, inline_image, audio = message.parts.parts
    assert text.WhichOneof("part") == "text" and text.text == "look"
    assert image.image_url.url == "https://x/y.png" and image.image_url.detail == "low"
    assert inline_image.image_url.url.startswith("data:") and not inline_image.image_url.HasField("detail")
    assert (audio.input_audio.data, audio.input_audio.format) == ("UklGRg==", "wav")


def test_empty_parts_list_is_still_parts():
    (message,) = translate(messages=[{"role": "user", "content": []}]).messages
    assert message.WhichOneof("content") == "parts"
    assert len(message.parts.parts) == 0


def test_assistant_with_tool_calls_and_null_content_then_tool_answer():
    assistant, tool = translate(
        messages=[
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ]
    ).messages
    assert assistant.role == pb.ROLE_ASSISTANT
    assert assistant.WhichOneof("content") is None
    (call,) = assistant.tool_calls
    assert (call.id, call.type, call.function.name, call.function.arguments) == ("call_1", "function", "f", '{"a": 1}')
    assert tool.role == pb.ROLE_TOOL and tool.tool_call_id == "call_1" and tool.text == "42"


def test_name_refusal_and_refusal_part():
    first, second = translate(
        messages=[
            {"role": "user", "name": "alice", "content": "hi"},
            {"role": "assistant", "refusal": "no", "content": [{"type": "refusal", "refusal": "no"}]},
        ]
    ).messages
    assert first.name == "alice"
    assert second.refusal == "no"
    assert second.parts.parts[0].WhichOneof("part") == "refusal" and second.parts.parts[0].refusal == "no"


def test_message_keys_outside_the_spec_are_ignored():
    # What the openai SDK sends when a response message is appended back into the history.
    (message,) = translate(
        messages=[
            {
                "role": "assistant",
                "content": "hello",
                "refusal": None,
                "annotations": [],
                "audio": None,
                "function_call": None,
                "tool_calls": None,
            }
        ]
    ).messages
    assert message.text == "hello"
    assert not message.tool_calls and not message.HasField("refusal")


# ---------------------------------------------------------------------------
# Request: type and shape errors name the field
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),  # True is an int in Python, a boolean in JSON
        ({"top_p": [1]}, "top_p"),
        ({"frequency_penalty": {}}, "frequency_penalty"),
        ({"presence_penalty": False}, "presence_penalty"),
        ({"n": 1.0}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_completion_tokens": 2**31}, "max_completion_tokens"),
        ({"max_tokens": -(2**31) - 1}, "max_tokens"),
        ({"top_logprobs": 10**30}, "top_logprobs"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"logprobs": 1}, "logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"parallel_tool_calls": 0}, "parallel_tool_calls"),
        ({"user": 7}, "user"),
        ({"model": 7}, "model"),
        ({"stop": 3}, "stop"),
        ({"stop": ["a", 3]}, "stop[1]"),
        ({"logit_bias": []}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"1.5": 1}}, "logit_bias"),
        ({"logit_bias": {"": 1}}, "logit_bias"),
        ({"logit_bias": {"\u0661": 1}}, "logit_bias"),  # a non-ASCII digit
        ({"logit_bias": {str(2**63): 1}}, "logit_bias"),
        ({"logit_bias": {"5": "x"}}, "logit_bias"),
        ({"logit_bias": {"5": True}}, "logit_bias"),
        ({"temperature": 10**400}, "temperature"),
        ({"stream_options": True}, "stream_options"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": 1}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name"),
        ({"tool_choice": {"type": "function", "function": {"name": 5}}}, "tool_choice.function.name"),
        ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice.type"),
        ({"tools": {}}, "tools"),
        ({"tools": ["f"]}, "tools[0]"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"n": 10**400}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": "no"}}]}, "tools[0].function.strict"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": 1}}]},
            "tools[0].function.description",
        ),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {}}, "response_format.type"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": []}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": 1}}}, "response_format.json_schema.name"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"strict": 1}}},
            "response_format.json_schema.strict",
        ),
    ],
)
def test_type_errors_name_the_field(fields, param):
    assert refused_field(**fields).param == param


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ({"role": "user"}, "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([USER_HI, {"content": "x"}], "messages[1].role"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "function", "content": "x"}], "messages[0].role"),
        ([{"role": 1, "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": {"type": "text"}}], "messages[0].content"),
        ([{"role": "user", "content": ["x"]}], "messages[0].content[0]"),
        ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "video", "video": {}}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}],
            "messages[0].content[0].image_url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 1}}]}],
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u", "detail": 1}}]}],
            "messages[0].content[0].image_url.detail",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}],
            "messages[0].content[0].input_audio.format",
        ),
        ([{"role": "assistant", "content": [{"type": "refusal", "refusal": None}]}], "messages[0].content[0].refusal"),
        ([{"role": "user", "content": "x", "name": 1}], "messages[0].name"),
        ([{"role": "tool", "content": "x", "tool_call_id": 1}], "messages[0].tool_call_id"),
        ([{"role": "assistant", "refusal": 1}], "messages[0].refusal"),
        ([{"role": "assistant", "tool_calls": {}}], "messages[0].tool_calls"),
        ([{"role": "assistant", "tool_calls": [{"id": "c"}]}], "messages[0].tool_calls[0].function"),
        ([{"role": "assistant", "tool_calls": [{"id": 1, "function": {}}]}], "messages[0].tool_calls[0].id"),
        (
            [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}],
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            [USER_HI, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}],
            "messages[1].tool_calls[0].function.name",
        ),
    ],
)
def test_message_errors_name_the_field(messages, param):
    assert refused({"model": "m", "messages": messages}).param == param


def test_type_error_message_is_openai_style():
    error = refused_field(temperature="hot")
    assert error.message == "Invalid type for 'temperature': expected a number, but got a string instead."
    assert error.code == "invalid_type"


def test_integer_too_large_names_the_bound():
    error = refused_field(max_tokens=2**31)
    assert error.param == "max_tokens"
    assert "2147483647" in error.message


@pytest.mark.parametrize("field", ["functions", "function_call", "store", "metadata", "foo"])
def test_unknown_top_level_field(field):
    error = refused_field(**{field: None})
    assert error.param == field
    assert error.message == f"Unrecognized request argument supplied: {field}"


def test_missing_messages_and_model():
    assert refused({"model": "m"}).param == "messages"
    assert refused({"model": "m", "messages": None}).param == "messages"
    assert refused({"messages": [USER_HI]}).param == "model"
    assert refused({"messages": [USER_HI], "model": None}).param == "model"


# ---------------------------------------------------------------------------
# Response: proto -> JSON, in OpenAI's shapes
# ---------------------------------------------------------------------------


def _completion(**choice_fields) -> pb.ChatCompletion:
    return pb.ChatCompletion(
        id="chatcmpl-1",
        object="chat.completion",
        created=1_700_000_000,
        model="m",
        choices=[pb.Choice(index=0, **choice_fields)],
        usage=pb.Usage(
            prompt_tokens=5,
            completion_tokens=2,
            total_tokens=7,
            prompt_tokens_details=pb.PromptTokensDetails(cached_tokens=3),
        ),
        system_fingerprint="fp_1",
    )


def test_chat_completion_shape():
    completion = _completion(
        message=pb.ResponseMessage(role="assistant", content="Hello!"), finish_reason=pb.FINISH_REASON_STOP
    )
    assert chat_completion_to_json(completion) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 3},
        },
        "system_fingerprint": "fp_1",
        "service_tier": None,
    }


def test_int64_created_is_a_json_number():
    completion = _completion(message=pb.ResponseMessage(role="assistant", content=""))
    completion.created = 2**40
    assert json.loads(encode(chat_completion_to_json(completion)))["created"] == 2**40


@pytest.mark.parametrize(
    ("reason", "spelling"),
    [
        (pb.FINISH_REASON_UNSPECIFIED, None),
        (pb.FINISH_REASON_STOP, "stop"),
        (pb.FINISH_REASON_LENGTH, "length"),
        (pb.FINISH_REASON_TOOL_CALLS, "tool_calls"),
        (pb.FINISH_REASON_CONTENT_FILTER, "content_filter"),
    ],
)
def test_finish_reasons(reason, spelling):
    completion = _completion(message=pb.ResponseMessage(role="assistant", content="x"), finish_reason=reason)
    assert chat_completion_to_json(completion)["choices"][0]["finish_reason"] == spelling


def test_tool_call_message_has_null_content_and_tool_calls():
    completion = _completion(
        message=pb.ResponseMessage(
            role="assistant",
            tool_calls=[pb.ToolCall(id="call_1", type="function", function=pb.FunctionCall(name="f", arguments="{}"))],
        ),
        finish_reason=pb.FINISH_REASON_TOOL_CALLS,
    )
    message = chat_completion_to_json(completion)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }


def test_refusal_and_service_tier():
    completion = _completion(message=pb.ResponseMessage(role="assistant", refusal="I can't."))
    completion.service_tier = "default"
    result = chat_completion_to_json(completion)
    assert result["choices"][0]["message"] == {"role": "assistant", "content": None, "refusal": "I can't."}
    assert result["service_tier"] == "default"


def test_logprobs_shape():
    logprobs = pb.ChoiceLogprobs(
        content=[
            pb.TokenLogprob(
                token="Hi",
                logprob=-0.25,
                bytes=b"Hi",
                top_logprobs=[
                    pb.TopLogprob(token="Hi", logprob=-0.25, bytes=b"Hi"),
                    pb.TopLogprob(token="\ufffd", logprob=-math.inf),
                ],
            ),
            pb.TokenLogprob(token="!", logprob=float("nan")),
        ]
    )
    completion = _completion(message=pb.ResponseMessage(role="assistant", content="Hi!"), logprobs=logprobs)
    assert chat_completion_to_json(completion)["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.25,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                    {"token": "\ufffd", "logprob": -9999.0, "bytes": None},
                ],
            },
            {"token": "!", "logprob": -9999.0, "bytes": None, "top_logprobs": []},
        ],
        "refusal": None,
    }


def test_requested_logprobs_of_an_empty_completion_are_an_empty_list():
    completion = _completion(message=pb.ResponseMessage(role="assistant", content=""), logprobs=pb.ChoiceLogprobs())
    assert chat_completion_to_json(completion)["choices"][0]["logprobs"] == {"content": [], "refusal": None}


def _chunk(**fields) -> pb.ChatCompletionChunk:
    return pb.ChatCompletionChunk(id="chatcmpl-2", object="chat.completion.chunk", created=9, model="m", **fields)


def test_first_chunk_has_the_role():
    chunk = _chunk(choices=[pb.ChunkChoice(index=0, delta=pb.Delta(role="assistant", content=""))])
    assert chunk_to_json(chunk, include_usage=False) == {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 9,
        "model": "m",
        "system_fingerprint": None,
        "service_tier": None,
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ],
    }


def test_content_chunk_and_last_chunk():
    middle = chunk_to_json(_chunk(choices=[pb.ChunkChoice(index=0, delta=pb.Delta(content="lo"))]), False)
    assert middle["choices"][0]["delta"] == {"content": "lo"}
    last = chunk_to_json(
        _chunk(choices=[pb.ChunkChoice(index=0, delta=pb.Delta(), finish_reason=pb.FINISH_REASON_LENGTH)]), False
    )
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in middle and "usage" not in last


def test_usage_null_in_every_chunk_and_set_in_the_last_when_included():
    middle = chunk_to_json(_chunk(choices=[pb.ChunkChoice(index=0, delta=pb.Delta(content="x"))]), True)
    assert middle["usage"] is None
    usage_chunk = chunk_to_json(_chunk(usage=pb.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)), True)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_tool_call_deltas():
    chunk = _chunk(
        choices=[
            pb.ChunkChoice(
                index=0,
                delta=pb.Delta(
                    tool_calls=[
                        pb.ToolCallDelta(
                            index=0, id="call_1", type="function", function=pb.FunctionCallDelta(name="f", arguments="")
                        ),
                        pb.ToolCallDelta(index=1, function=pb.FunctionCallDelta(arguments='{"a"')),
                    ]
                ),
            )
        ]
    )
    assert chunk_to_json(chunk, False)["choices"][0]["delta"] == {
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
            {"index": 1, "function": {"arguments": '{"a"'}},
        ]
    }


def test_chunk_logprobs():
    chunk = _chunk(
        choices=[
            pb.ChunkChoice(
                index=0,
                delta=pb.Delta(content="a"),
                logprobs=pb.ChoiceLogprobs(content=[pb.TokenLogprob(token="a", logprob=-1.0, bytes=b"a")]),
            )
        ]
    )
    assert chunk_to_json(chunk, False)["choices"][0]["logprobs"] == {
        "content": [{"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []}],
        "refusal": None,
    }


def test_models():
    model = pb.Model(
        id="google/gemma-3-270m",
        object="model",
        created=2**33,
        owned_by="chatrpc",
        capabilities=pb.ModelCapabilities(tools=False, json_object=True, json_schema=True),
    )
    expected = {
        "id": "google/gemma-3-270m",
        "object": "model",
        "created": 2**33,
        "owned_by": "chatrpc",
        "capabilities": {"tools": False, "json_object": True, "json_schema": True},
    }
    assert model_to_json(model) == expected
    assert model_list_to_json(pb.ModelList(object="list", data=[model])) == {"object": "list", "data": [expected]}
    assert model_list_to_json(pb.ModelList()) == {"object": "list", "data": []}


def test_encode_is_compact_utf8():
    assert encode({"a": "é", "b": [1, None]}) == '{"a":"é","b":[1,null]}'.encode()
