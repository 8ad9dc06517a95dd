"""Text completions (CreateCompletion, StreamCompletion) over gRPC on the real model: the two calls
agree, and every refusal is INVALID_ARGUMENT naming the field in `error-param`."""

from __future__ import annotations

import grpc
import pytest

from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import MODEL_ID

PROMPT = "The three primary colours are"


def request(**fields) -> chat_pb2.CompletionRequest:
    fields.setdefault("model", MODEL_ID)
    if "tokens" not in fields:
        fields.setdefault("text", PROMPT)
    fields.setdefault("max_tokens", 12)
    return chat_pb2.CompletionRequest(**fields)


@pytest.fixture(scope="module")
def stub(grpc_channel):
    return chat_pb2_grpc.ChatCompletionsStub(grpc_channel)


def _param(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("error-param")


def test_unary_and_stream_give_the_same_greedy_text(stub, auth_metadata):
    unary = stub.CreateCompletion(request(temperature=0), metadata=auth_metadata, timeout=60)
    assert unary.id.startswith("cmpl-") and unary.object == "text_completion"
    assert unary.model == MODEL_ID and unary.system_fingerprint.startswith("fp_")
    (choice,) = unary.choices
    assert choice.text and not choice.HasField("logprobs")
    assert choice.finish_reason in (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
    usage = unary.usage
    assert usage.prompt_tokens > 3 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        stub.StreamCompletion(
            request(temperature=0, stream_options=chat_pb2.StreamOptions(include_usage=True)),
            metadata=auth_metadata,
            timeout=60,
        )
    )
    assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") and c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
    assert not any(c.HasField("usage") for c in chunks[:-1])


def test_echo_comes_first_in_the_stream(stub, auth_metadata):
    chunks = list(stub.StreamCompletion(request(temperature=0, echo=True, max_tokens=4), metadata=auth_metadata))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    unary = stub.CreateCompletion(request(temperature=0, max_tokens=4), metadata=auth_metadata)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT + unary.choices[0].text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": " and that is all."}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"n": 2, "best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"tokens": chat_pb2.PromptTokens(ids=[2, 10**9])}, "prompt"),
        ({"tokens": chat_pb2.PromptTokens(ids=[2, -1])}, "prompt"),
        ({"tokens": chat_pb2.PromptTokens()}, "prompt"),
        ({"tokens": chat_pb2.PromptTokens(ids=[2] * 5000)}, "prompt"),
        ({"text": "word " * 5000}, "prompt"),
        ({"n": 0}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"stop": ["x"] * 5}, "stop"),
        ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
        ({"stream": True}, "stream"),
        ({"stream_options": chat_pb2.StreamOptions(include_usage=True)}, "stream_options"),
    ],
)
def test_invalid_argument_names_the_parameter(stub, auth_metadata, fields, param):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateCompletion(request(**fields), metadata=auth_metadata, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _param(error.value) == param
    assert error.value.details()


def test_a_request_without_a_prompt_is_refused(stub, auth_metadata):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateCompletion(chat_pb2.CompletionRequest(model=MODEL_ID), metadata=auth_metadata, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _param(error.value) == "prompt"


def test_refused_before_the_stream_starts(stub, auth_metadata):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.StreamCompletion(request(suffix="tail"), metadata=auth_metadata, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _param(error.value) == "suffix"


def test_unknown_model_is_not_found(stub, auth_metadata):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateCompletion(request(model="no-such-model"), metadata=auth_metadata, timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert _param(error.value) == "model"


def test_prompt_that_is_not_utf8_is_invalid_argument_naming_it(grpc_channel, auth_metadata):
    data = request(text="PROMPT").SerializeToString().replace(b"PROMPT", b"PROMP\xff")
    call = grpc_channel.unary_unary(
        "/chatrpc.v1.ChatCompletions/CreateCompletion",
        request_serializer=lambda raw: raw,
        response_deserializer=chat_pb2.Completion.FromString,
    )
    with pytest.raises(grpc.RpcError) as error:
        call(data, metadata=auth_metadata, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _param(error.value) == "prompt"


def test_missing_key_is_unauthenticated(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateCompletion(request(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
