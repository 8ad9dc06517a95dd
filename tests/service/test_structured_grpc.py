"""n choices, JSON schema and forced tool calls over gRPC, unary and streaming."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest
from google.protobuf import struct_pb2

from chatrpc.v1 import chat_pb2, chat_pb2_grpc

MODEL = "gemma-3-270m"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def struct(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def request(**fields) -> chat_pb2.ChatCompletionRequest:
    fields.setdefault("model", MODEL)
    fields.setdefault("messages", [chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Tell me about someone.")])
    fields.setdefault("max_tokens", 120)
    return chat_pb2.ChatCompletionRequest(**fields)


@pytest.fixture(scope="module")
def stub(grpc_channel):
    return chat_pb2_grpc.ChatCompletionsStub(grpc_channel)


def test_n_choices_unary_and_stream_agree(stub, auth_metadata):
    unary = stub.CreateChatCompletion(
        request(n=3, seed=99, temperature=1.0, max_tokens=12), metadata=auth_metadata, timeout=120
    )
    assert [c.index for c in unary.choices] == [0, 1, 2]
    texts = {0: "", 1: "", 2: ""}
    for chunk in stub.StreamChatCompletion(
        request(n=3, seed=99, temperature=1.0, max_tokens=12), metadata=auth_metadata, timeout=120
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content
    assert [texts[i] for i in range(3)] == [c.message.content for c in unary.choices]


def test_json_schema_over_grpc(stub, auth_metadata):
    response_format = chat_pb2.ResponseFormat(
        type=chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema=chat_pb2.JsonSchema(name="person", schema=struct(SCHEMA)),
    )
    response = stub.CreateChatCompletion(
        request(response_format=response_format, seed=1), metadata=auth_metadata, timeout=120
    )
    assert response.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)


ORDERED = ["zeta", "alpha", "mid", "beta"]
ORDERED_SCHEMA = {
    "type": "object",
    "properties": {name: {"type": "boolean"} for name in ORDERED},
    "required": ORDERED,
    "additionalProperties": False,
}


def ordered_output(stub, auth_metadata, json_schema: chat_pb2.JsonSchema) -> list[str]:
    response_format = chat_pb2.ResponseFormat(type=chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json_schema)
    response = stub.CreateChatCompletion(
        request(response_format=response_format, temperature=0, max_tokens=60), metadata=auth_metadata, timeout=120
    )
    assert response.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    return list(json.loads(response.choices[0].message.content))


def test_a_struct_schemas_keys_are_sorted_and_json_text_keeps_its_order(stub, auth_metadata):
    """A Struct has no key order (its map iterates in a per-process order), so the service sorts it:
    the same output from every process. JSON text keeps the order it was written in."""
    as_struct = ordered_output(stub, auth_metadata, chat_pb2.JsonSchema(name="s", schema=struct(ORDERED_SCHEMA)))
    assert as_struct == sorted(ORDERED)
    as_text = ordered_output(stub, auth_metadata, chat_pb2.JsonSchema(name="t", schema_json=json.dumps(ORDERED_SCHEMA)))
    assert as_text == ORDERED


def test_a_schema_as_json_text_must_be_a_json_object(stub, auth_metadata):
    for text in ("[1, 2]", "{not json", '{"maximum": NaN}', '{"maximum": 1e400}'):
        response_format = chat_pb2.ResponseFormat(
            type=chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=chat_pb2.JsonSchema(name="x", schema_json=text)
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateChatCompletion(request(response_format=response_format), metadata=auth_metadata, timeout=120)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, text
        assert ("error-param", "response_format.json_schema.schema") in tuple(raised.value.trailing_metadata())


def test_forced_tool_call_over_grpc_stream(stub, auth_metadata):
    tool = chat_pb2.Tool(
        type="function", function=chat_pb2.FunctionDefinition(name="lookup", parameters=struct(SCHEMA))
    )
    chunks = list(
        stub.StreamChatCompletion(
            request(tools=[tool], tool_choice=chat_pb2.ToolChoice(function_name="lookup"), temperature=0),
            metadata=auth_metadata,
            timeout=120,
        )
    )
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls]
    assert calls and calls[0].function.name == "lookup" and calls[0].id
    jsonschema.validate(json.loads("".join(c.function.arguments for c in calls)), SCHEMA)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [chat_pb2.FINISH_REASON_TOOL_CALLS]


@pytest.mark.parametrize("number", [float("inf"), float("-inf"), float("nan")])
def test_a_schema_number_json_cannot_carry_is_an_invalid_argument_naming_it(stub, auth_metadata, number):
    # Struct stores doubles, so a gRPC client can send what no JSON schema can hold.
    response_format = chat_pb2.ResponseFormat(
        type=chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema=chat_pb2.JsonSchema(name="bad", schema=struct({"type": "number", "maximum": number})),
    )
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateChatCompletion(request(response_format=response_format), metadata=auth_metadata, timeout=120)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("error-param", "response_format.json_schema.schema") in tuple(raised.value.trailing_metadata())
