"""The gRPC service end to end on the real model: unary, streaming, health, reflection, errors."""

from __future__ import annotations

import concurrent.futures
import multiprocessing

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from chatrpc.v1 import chat_pb2, chat_pb2_grpc

MODEL = "gemma-3-270m"
QUESTION = "What is the capital of France? Answer in one word."


def request(**fields) -> chat_pb2.ChatCompletionRequest:
    fields.setdefault("model", MODEL)
    fields.setdefault("messages", [chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=QUESTION)])
    fields.setdefault("max_tokens", 24)
    return chat_pb2.ChatCompletionRequest(**fields)


@pytest.fixture(scope="module")
def stub(grpc_channel):
    return chat_pb2_grpc.ChatCompletionsStub(grpc_channel)


def test_unary_completion(stub, auth_metadata):
    response = stub.CreateChatCompletion(request(temperature=0), metadata=auth_metadata, timeout=60)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert response.system_fingerprint.startswith("fp_")
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
    assert not choice.HasField("logprobs")
    usage = response.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_matches_unary_and_reports_usage(stub, auth_metadata):
    unary = stub.CreateChatCompletion(request(temperature=0), metadata=auth_metadata, timeout=60)
    chunks = list(
        stub.StreamChatCompletion(
            request(temperature=0, stream_options=chat_pb2.StreamOptions(include_usage=True)),
            metadata=auth_metadata,
            timeout=60,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == unary.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
    assert not any(c.HasField("usage") for c in chunks[:-1])


def test_same_seed_same_text(stub, auth_metadata):
    texts = {
        stub.CreateChatCompletion(
            request(temperature=1.0, seed=1234, max_tokens=30), metadata=auth_metadata, timeout=60
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(texts) == 1


def llama_cpp_greedy(prompt_tokens: list[int], max_tokens: int) -> list[int]:
    """llama.cpp's own greedy decoding (its greedy sampler, its batch API) of the prompt tokens,
    with the model, context and kernels set up as the server sets them (in a process of its own:
    llama.cpp reads its kernel switch once per process)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_llama_cpp_greedy, prompt_tokens, max_tokens).result(timeout=300)


def _llama_cpp_greedy(prompt_tokens: list[int], max_tokens: int) -> list[int]:
    import os

    os.environ["GGML_CPU_TILED_MM"] = "0"
    import llama_cpp

    from service.engine.model import GGML_TYPE_BF16
    from service.models import embedded_model_path
    from tests.conftest import CTX_SIZE

    model_params = llama_cpp.llama_model_default_params()
    model_params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(embedded_model_path()).encode(), model_params)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = CTX_SIZE
    context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    context_params.type_v = GGML_TYPE_BF16
    context = llama_cpp.llama_init_from_model(model, context_params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    sampler = llama_cpp.llama_sampler_init_greedy()
    try:
        pending = (llama_cpp.llama_token * len(prompt_tokens))(*prompt_tokens)
        assert llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(pending, len(prompt_tokens))) == 0
        generated: list[int] = []
        while len(generated) < max_tokens:
            token = llama_cpp.llama_sampler_sample(sampler, context, -1)
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            generated.append(token)
            pending = (llama_cpp.llama_token * 1)(token)
            assert llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(pending, 1)) == 0
        return generated
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)


def test_temperature_zero_equals_llama_cpp_greedy(stub, auth_metadata):
    """The server's greedy tokens are llama.cpp's own greedy decoding of the same prompt tokens."""
    from service.chat_template import ChatTemplate
    from tests.adapters.test_openai_sdk import Vocabulary

    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    vocabulary = Vocabulary()
    try:
        prompt = ChatTemplate.for_model(None, "gemma3", bos_token="<bos>", eos_token="<eos>").render(messages)
        prompt_tokens = vocabulary.tokenize(prompt, special=True)
        expected = llama_cpp_greedy(prompt_tokens, 40)
        expected_text = b"".join(vocabulary.piece(t) for t in expected).decode(errors="replace")
    finally:
        vocabulary.close()

    response = stub.CreateChatCompletion(
        request(
            messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=messages[0]["content"])],
            temperature=0,
            max_tokens=40,
        ),
        metadata=auth_metadata,
        timeout=60,
    )
    assert response.usage.prompt_tokens == len(prompt_tokens)
    assert response.choices[0].message.content == expected_text


def test_logprobs_follow_tokens(stub, auth_metadata):
    response = stub.CreateChatCompletion(
        request(temperature=0, logprobs=True, top_logprobs=5), metadata=auth_metadata, timeout=60
    )
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) >= 1
    assert b"".join(e.bytes for e in entries).decode() == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_list_models(stub, auth_metadata):
    models = stub.ListModels(chat_pb2.ListModelsRequest(), metadata=auth_metadata, timeout=10)
    assert models.object == "list"
    assert [m.id for m in models.data] == [MODEL, "gemma-3-270m-plain"]
    capabilities = {m.id: m.capabilities for m in models.data}
    assert capabilities[MODEL] == chat_pb2.ModelCapabilities(tools=True, json_object=True, json_schema=True)
    assert capabilities["gemma-3-270m-plain"] == chat_pb2.ModelCapabilities()


def test_health_needs_no_key(grpc_channel):
    health = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", "chatrpc.v1.ChatCompletions"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(grpc_channel):
    database = ProtoReflectionDescriptorDatabase(grpc_channel)
    services = set(database.get_services())
    assert {"chatrpc.v1.ChatCompletions", "grpc.health.v1.Health"} <= services
    file_descriptor = database.FindFileContainingSymbol("chatrpc.v1.ChatCompletions")
    assert file_descriptor.package == "chatrpc.v1"


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong-key"),), (("authorization", "test-key-0123456789"),)]
)
def test_missing_or_wrong_key_is_unauthenticated(stub, metadata):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateChatCompletion(request(), metadata=metadata, timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        list(stub.StreamChatCompletion(request(), metadata=metadata, timeout=10))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_model_is_not_found(stub, auth_metadata):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateChatCompletion(request(model="no-such-model"), metadata=auth_metadata, timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in error.value.details()


def _param(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("error-param")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
        ({"stream": True}, "stream"),
        ({"messages": []}, "messages"),
        ({"max_tokens": 100000}, "max_tokens"),
        (
            {"tools": [chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="bad name"))]},
            "tools[0].function.name",
        ),
        ({"tool_choice": chat_pb2.ToolChoice(mode=chat_pb2.TOOL_CHOICE_MODE_REQUIRED)}, "tool_choice"),
        (
            {"response_format": chat_pb2.ResponseFormat(type=chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)},
            "response_format.json_schema.name",
        ),
    ],
)
def test_invalid_argument_names_the_parameter(stub, auth_metadata, fields, param):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateChatCompletion(request(**fields), metadata=auth_metadata, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _param(error.value) == param
    assert error.value.details()


def test_deadline_stops_generation_and_server_keeps_serving(stub, auth_metadata):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateChatCompletion(
            request(max_tokens=1500, logit_bias={1: -100.0, 106: -100.0}), metadata=auth_metadata, timeout=1.0
        )
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    response = stub.CreateChatCompletion(request(temperature=0, max_tokens=5), metadata=auth_metadata, timeout=60)
    assert response.choices[0].message.content


def _raw_call(grpc_channel, method: str):
    """A chat method that sends bytes as given, so a test can send what no proto library would write."""
    return grpc_channel.unary_unary(
        f"/chatrpc.v1.ChatCompletions/{method}",
        request_serializer=lambda data: data,
        response_deserializer=chat_pb2.ChatCompletion.FromString,
    )


@pytest.mark.parametrize(
    ("good", "bad", "param"),
    [
        (b"QUESTION", b"QUEST\xed\xa0\x80", "messages[0].content"),  # a UTF-8-encoded lone surrogate
        (b"QUESTION", b"QUESTIO\xff", "messages[0].content"),
        (b"STOP", b"ST\xc3P", "stop[1]"),  # a character cut short
        (b"gemma-3-270m", b"gemma-3-270\x80", "model"),
    ],
)
def test_text_that_is_not_utf8_is_invalid_argument_naming_the_field(
    grpc_channel, stub, auth_metadata, good, bad, param
):
    message = request(messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="QUESTION")], stop=["a", "STOP"])
    data = message.SerializeToString()
    assert data.count(good) == 1 and len(good) == len(bad)  # the lengths on the wire stay right
    with pytest.raises(grpc.RpcError) as error:
        _raw_call(grpc_channel, "CreateChatCompletion")(data.replace(good, bad), metadata=auth_metadata, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _param(error.value) == param
    assert param in error.value.details()
    assert stub.CreateChatCompletion(request(max_tokens=2), metadata=auth_metadata, timeout=60).choices


def test_bytes_that_are_not_a_request_are_invalid_argument(grpc_channel, auth_metadata):
    with pytest.raises(grpc.RpcError) as error:
        _raw_call(grpc_channel, "CreateChatCompletion")(b"\x0a\xff\xff\xff", metadata=auth_metadata, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ChatCompletionRequest" in error.value.details()


def test_message_over_max_request_bytes_is_refused_before_it_is_read(stub, auth_metadata):
    from service.limits import RequestLimits

    text = "a" * (RequestLimits().max_request_bytes + 1)  # the test server runs with the default
    huge = request(messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=text)])
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateChatCompletion(huge, metadata=auth_metadata, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.CreateChatCompletion(request(max_tokens=2), metadata=auth_metadata, timeout=60).choices


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="hi")] * 2049}, "messages"),
        ({"stop": ["x" * 1025]}, "stop"),
        ({"logit_bias": {token: 1.0 for token in range(1025)}}, "logit_bias"),
        ({"tools": [chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="f"))] * 129}, "tools"),
    ],
)
def test_sizes_over_their_limits_are_invalid_argument(stub, auth_metadata, fields, param):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateChatCompletion(request(**fields), metadata=auth_metadata, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _param(error.value) == param
