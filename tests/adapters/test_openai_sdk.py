"""The official ``openai`` SDK against the real server (REST adapter in front of the gRPC service).

The model is Gemma 3 270M: tiny, and it says odd things. The tests assert structure and behaviour,
and compare exact text only where determinism makes that valid (temperature 0, or a fixed seed).
Requests are short (tens of tokens) so the file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import ctypes
from collections import Counter

import openai
import pytest

MODEL = "gemma-3-270m"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
# Gemma's end-of-generation tokens: <eos> and <end_of_turn>. Banned, the model cannot stop early.
EOS, END_OF_TURN = 1, 106
NO_END = {str(EOS): -100, str(END_OF_TURN): -100}


def chat(client: openai.OpenAI, messages=QUESTION, **params):
    params.setdefault("max_tokens", 20)
    return client.chat.completions.create(model=MODEL, messages=messages, **params)


def stream(client: openai.OpenAI, messages=QUESTION, **params) -> list:
    params.setdefault("max_tokens", 20)
    with client.chat.completions.create(model=MODEL, messages=messages, stream=True, **params) as chunks:
        return list(chunks)


def streamed_text(chunks) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def finish_reasons(chunks) -> list:
    return [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]


# ---------------------------------------------------------------------------
# The model's vocabulary, to find token ids for logit_bias (the API reports tokens, not ids)
# ---------------------------------------------------------------------------


class Vocabulary:
    """The embedded model's tokenizer, loaded vocabulary-only through llama.cpp (no weights)."""

    def __init__(self) -> None:
        import llama_cpp

        from service.models import embedded_model_path

        self._llama = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(embedded_model_path()).encode(), params)
        assert self._model, "could not load the embedded model's vocabulary"
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        data = text.encode()
        buffer = (self._llama.llama_token * (len(data) + 8))()
        count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, len(buffer), False, special)
        assert count >= 0
        return list(buffer[:count])

    def piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(256)
        length = self._llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        assert length >= 0
        return buffer.raw[:length]

    def token_id(self, token_bytes: bytes) -> int:
        """The id of the one token whose text is ``token_bytes``."""
        ids = self.tokenize(token_bytes.decode())
        assert len(ids) == 1 and self.piece(ids[0]) == token_bytes, (token_bytes, ids)
        return ids[0]

    def close(self) -> None:
        self._llama.llama_model_free(self._model)


@pytest.fixture(scope="module")
def vocabulary():
    vocab = Vocabulary()
    yield vocab
    vocab.close()


# ---------------------------------------------------------------------------
# Non-streaming
# ---------------------------------------------------------------------------


def test_completion_object_shape(openai_client):
    completion = chat(openai_client, temperature=0)
    assert completion.id.startswith("chatcmpl-") and len(completion.id) > len("chatcmpl-")
    assert completion.object == "chat.completion"
    assert isinstance(completion.created, int) and completion.created > 1_600_000_000
    assert completion.model == MODEL
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.tool_calls is None
    assert choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens <= 20
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 20
    assert isinstance(completion.system_fingerprint, str) and completion.system_fingerprint


def test_ids_differ_between_requests(openai_client):
    first = chat(openai_client, max_tokens=2, temperature=0)
    second = chat(openai_client, max_tokens=2, temperature=0)
    assert first.id != second.id
    assert first.system_fingerprint == second.system_fingerprint


def test_prompt_tokens_grow_with_the_prompt(openai_client):
    short = chat(openai_client, max_tokens=1)
    longer = chat(
        openai_client,
        messages=[{"role": "system", "content": "You are a helpful geography teacher."}, *QUESTION],
        max_tokens=1,
    )
    assert longer.usage.prompt_tokens > short.usage.prompt_tokens


def test_multi_turn_conversation_and_echoed_message(openai_client):
    first = chat(openai_client, temperature=0, max_tokens=10)
    # The SDK's response message, echoed back into the history as clients do.
    history = [*QUESTION, first.choices[0].message.model_dump(), {"role": "user", "content": "And of Italy?"}]
    second = chat(openai_client, messages=history, temperature=0, max_tokens=10)
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens - 1


def test_cached_tokens_count_the_prompt_prefix_served_from_the_cache(openai_client):
    # A system prompt of several prefill chunks that no other test sends: its first request
    # prefills it all; the next turn finds its KV in the slot the first one freed.
    system = {"role": "system", "content": "Cached-tokens check. " + "The sea is calm and blue today. " * 120}
    first = chat(openai_client, messages=[system, *QUESTION], temperature=0, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history = [system, *QUESTION, first.choices[0].message.model_dump(), {"role": "user", "content": "And Italy?"}]
    chunks = stream(openai_client, messages=history, max_tokens=4, stream_options={"include_usage": True})
    usage = chunks[-1].usage
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    # Served from the cache: at least the system prompt's whole chunks.
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 256 * 256 - 256


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------


def test_stream_matches_non_streaming_at_temperature_0(openai_client):
    unary = chat(openai_client, temperature=0, max_tokens=25)
    chunks = stream(openai_client, temperature=0, max_tokens=25)
    assert chunks
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.id == chunks[0].id and chunk.id.startswith("chatcmpl-")
        assert chunk.model == MODEL
        assert chunk.created == chunks[0].created
        assert chunk.usage is None
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:])
    assert streamed_text(chunks) == unary.choices[0].message.content
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert with_choices[-1].choices[0].finish_reason == unary.choices[0].finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in with_choices[:-1])


def test_stream_include_usage(openai_client):
    chunks = stream(openai_client, temperature=0, max_tokens=12, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert all(chunk.choices for chunk in chunks[:-1])
    unary = chat(openai_client, temperature=0, max_tokens=12)
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens
    assert last.usage.completion_tokens == unary.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_stream_without_include_usage_has_no_usage_chunk(openai_client):
    chunks = stream(openai_client, temperature=0, max_tokens=5, stream_options={"include_usage": False})
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)


# ---------------------------------------------------------------------------
# max_tokens and stop
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 7, 30])
def test_max_tokens_gives_length(openai_client, max_tokens):
    completion = chat(openai_client, max_tokens=max_tokens, temperature=0, logit_bias=NO_END)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == max_tokens


def test_max_completion_tokens_gives_length(openai_client):
    completion = client_create = openai_client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_completion_tokens=9, temperature=0, logit_bias=NO_END
    )
    assert client_create.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 9


def test_max_tokens_in_streaming(openai_client):
    chunks = stream(
        openai_client, max_tokens=11, temperature=0, logit_bias=NO_END, stream_options={"include_usage": True}
    )
    assert finish_reasons(chunks) == ["length"]
    assert chunks[-1].usage.completion_tokens == 11


def _stop_string(text: str) -> str:
    """A short substring from the middle of ``text`` holding a letter or digit."""
    middle = len(text) // 2
    for start in list(range(middle, len(text) - 3)) + list(range(1, middle)):
        candidate = text[start : start + 3]
        if any(c.isalnum() for c in candidate) and text.index(candidate) > 0:
            return candidate
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string(openai_client):
    full = chat(openai_client, messages=POEM, temperature=0, max_tokens=30, logit_bias=NO_END)
    text = full.choices[0].message.content
    stop = _stop_string(text)
    expected = text[: text.index(stop)]

    stopped = chat(openai_client, messages=POEM, temperature=0, max_tokens=30, logit_bias=NO_END, stop=[stop])
    content = stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in content
    assert content == expected
    assert stopped.usage.completion_tokens < full.usage.completion_tokens

    # A single string (not a list) works the same, and so does an unmatched stop beside it.
    single = chat(openai_client, messages=POEM, temperature=0, max_tokens=30, logit_bias=NO_END, stop=stop)
    assert single.choices[0].message.content == expected
    several = chat(
        openai_client, messages=POEM, temperature=0, max_tokens=30, logit_bias=NO_END, stop=["\u2603\u2603", stop]
    )
    assert several.choices[0].message.content == expected

    chunks = stream(openai_client, messages=POEM, temperature=0, max_tokens=30, logit_bias=NO_END, stop=[stop])
    streamed = streamed_text(chunks)
    assert streamed == expected
    assert stop not in streamed
    assert finish_reasons(chunks) == ["stop"]


def test_stop_string_that_never_occurs_changes_nothing(openai_client):
    plain = chat(openai_client, temperature=0, max_tokens=15)
    stopped = chat(openai_client, temperature=0, max_tokens=15, stop=["\u2603\u2603\u2603"])
    assert stopped.choices[0].message.content == plain.choices[0].message.content
    assert stopped.choices[0].finish_reason == plain.choices[0].finish_reason


# ---------------------------------------------------------------------------
# Determinism: temperature 0 and seed
# ---------------------------------------------------------------------------


def test_temperature_0_is_deterministic(openai_client):
    first = chat(openai_client, messages=POEM, temperature=0, max_tokens=25)
    second = chat(openai_client, messages=POEM, temperature=0, max_tokens=25)
    assert first.choices[0].message.content == second.choices[0].message.content


def test_same_seed_same_text(openai_client):
    first = chat(openai_client, messages=POEM, temperature=1.0, seed=1234, max_tokens=25)
    second = chat(openai_client, messages=POEM, temperature=1.0, seed=1234, max_tokens=25)
    assert first.choices[0].message.content == second.choices[0].message.content
    chunks = stream(openai_client, messages=POEM, temperature=1.0, seed=1234, max_tokens=25)
    assert streamed_text(chunks) == first.choices[0].message.content


def test_different_seeds_differ(openai_client):
    texts = [
        chat(openai_client, messages=POEM, temperature=1.0, seed=seed, max_tokens=25).choices[0].message.content
        for seed in (1, 2, 3)
    ]
    assert len(set(texts)) > 1, texts


def test_unseeded_sampling_differs(openai_client):
    texts = [
        chat(openai_client, messages=POEM, temperature=1.0, max_tokens=25).choices[0].message.content for _ in range(3)
    ]
    assert len(set(texts)) > 1, texts


# ---------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------


def _check_logprob_entries(entries, *, greedy: bool, top: int) -> None:
    for entry in entries:
        assert entry.logprob <= 0.0
        assert entry.bytes is not None and bytes(entry.bytes)
        assert len(entry.top_logprobs) == top
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(value <= 0.0 for value in values)
        assert len({alternative.token for alternative in entry.top_logprobs}) == top
        if greedy:
            assert entry.top_logprobs[0].token == entry.token
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        # Each token's logprob is at most the best alternative's.
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-9


def _check_logprob_text(entries, content: str) -> None:
    assert b"".join(bytes(entry.bytes) for entry in entries).decode() == content
    for entry in entries:
        try:
            text = bytes(entry.bytes).decode()
        except UnicodeDecodeError:
            continue  # part of a multi-byte character
        assert entry.token == text


def test_logprobs(openai_client):
    completion = chat(openai_client, temperature=0, max_tokens=20, logprobs=True, top_logprobs=3, logit_bias=NO_END)
    content = completion.choices[0].message.content
    entries = completion.choices[0].logprobs.content
    assert len(entries) == completion.usage.completion_tokens == 20
    _check_logprob_entries(entries, greedy=True, top=3)
    _check_logprob_text(entries, content)


def test_logprobs_without_top_logprobs(openai_client):
    completion = chat(openai_client, temperature=0, max_tokens=5, logprobs=True, logit_bias=NO_END)
    entries = completion.choices[0].logprobs.content
    assert len(entries) == 5
    assert all(entry.top_logprobs == [] for entry in entries)


def test_logprobs_when_sampling(openai_client):
    completion = chat(
        openai_client,
        messages=POEM,
        temperature=1.0,
        seed=7,
        max_tokens=20,
        logprobs=True,
        top_logprobs=5,
        logit_bias=NO_END,
    )
    entries = completion.choices[0].logprobs.content
    assert len(entries) == 20
    _check_logprob_entries(entries, greedy=False, top=5)
    _check_logprob_text(entries, completion.choices[0].message.content)


def test_logprobs_in_streaming(openai_client):
    unary = chat(openai_client, temperature=0, max_tokens=15, logprobs=True, top_logprobs=3, logit_bias=NO_END)
    chunks = stream(openai_client, temperature=0, max_tokens=15, logprobs=True, top_logprobs=3, logit_bias=NO_END)
    entries = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert len(entries) == 15
    _check_logprob_entries(entries, greedy=True, top=3)
    _check_logprob_text(entries, streamed_text(chunks))
    expected = unary.choices[0].logprobs.content
    assert [entry.token for entry in entries] == [entry.token for entry in expected]
    assert [entry.logprob for entry in entries] == pytest.approx([entry.logprob for entry in expected], abs=1e-6)


# ---------------------------------------------------------------------------
# logit_bias
# ---------------------------------------------------------------------------


def test_logit_bias_plus_100_forces_a_token(openai_client, vocabulary):
    paris = vocabulary.token_id(b" Paris")
    for messages in (QUESTION, POEM):
        completion = chat(
            openai_client, messages=messages, temperature=0, max_tokens=3, logprobs=True, logit_bias={str(paris): 100}
        )
        entries = completion.choices[0].logprobs.content
        assert [bytes(entry.bytes) for entry in entries] == [b" Paris"] * 3
        assert completion.choices[0].message.content == " Paris" * 3


def test_logit_bias_plus_100_when_sampling(openai_client, vocabulary):
    banana = vocabulary.token_id(b" banana")
    completion = chat(openai_client, temperature=1.0, max_tokens=4, logit_bias={str(banana): 100})
    assert completion.choices[0].message.content.startswith(" banana")


def test_logit_bias_minus_100_bans_the_greedy_token(openai_client, vocabulary):
    plain = chat(openai_client, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2)
    first = plain.choices[0].logprobs.content[0]
    first_id = vocabulary.token_id(bytes(first.bytes))
    banned = chat(
        openai_client, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2, logit_bias={str(first_id): -100}
    )
    new_first = banned.choices[0].logprobs.content[0]
    assert new_first.token != first.token
    # Greedy without the best token picks the second best.
    assert new_first.token == first.top_logprobs[1].token
    assert not banned.choices[0].message.content.startswith(plain.choices[0].message.content)


def test_logit_bias_end_tokens_plus_100_ends_at_once(openai_client):
    completion = chat(openai_client, temperature=0, max_tokens=10, logit_bias={str(END_OF_TURN): 100})
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == ""
    assert completion.usage.completion_tokens <= 1


# ---------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------


def _repeats(entries) -> int:
    """How many generated tokens repeat an earlier generated token."""
    counts = Counter(bytes(entry.bytes) for entry in entries)
    return sum(count - 1 for count in counts.values())


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalty_reduces_repetition(openai_client, penalty):
    params = dict(messages=POEM, temperature=0, max_tokens=40, logprobs=True, logit_bias=NO_END)
    plain = chat(openai_client, **params)
    penalized = chat(openai_client, **params, **{penalty: 2.0})
    plain_entries = plain.choices[0].logprobs.content
    penalized_entries = penalized.choices[0].logprobs.content
    assert penalized.choices[0].message.content != plain.choices[0].message.content
    assert _repeats(penalized_entries) < _repeats(plain_entries)


def test_negative_penalty_increases_repetition(openai_client):
    params = dict(messages=POEM, temperature=0, max_tokens=40, logprobs=True, logit_bias=NO_END)
    plain = chat(openai_client, **params)
    encouraged = chat(openai_client, **params, frequency_penalty=-2.0)
    assert _repeats(encouraged.choices[0].logprobs.content) >= _repeats(plain.choices[0].logprobs.content)


# ---------------------------------------------------------------------------
# Other accepted parameters
# ---------------------------------------------------------------------------


def test_top_p_tiny_is_greedy(openai_client):
    greedy = chat(openai_client, messages=POEM, temperature=0, max_tokens=15)
    nucleus = chat(openai_client, messages=POEM, temperature=1.0, top_p=1e-6, max_tokens=15)
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content


def test_accepted_no_op_parameters(openai_client):
    completion = chat(
        openai_client,
        max_tokens=3,
        n=1,
        user="user-1234",
        response_format={"type": "text"},
        tool_choice="none",
        temperature=None,
    )
    assert completion.choices[0].message.content is not None


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def test_models_list(openai_client):
    models = list(openai_client.models.list())
    assert MODEL in [model.id for model in models]
    for model in models:
        assert model.object == "model"
        assert isinstance(model.created, int)
        assert isinstance(model.owned_by, str)


def test_models_retrieve(openai_client):
    model = openai_client.models.retrieve(MODEL)
    assert model.id == MODEL
    assert model.object == "model"


def test_models_retrieve_unknown_is_not_found(openai_client):
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.models.retrieve("gpt-4o")
    assert raised.value.status_code == 404


# ---------------------------------------------------------------------------
# Errors through the SDK's exception types
# ---------------------------------------------------------------------------


def test_wrong_key_is_authentication_error(server):
    client = openai.OpenAI(base_url=server.rest_base_url, api_key="wrong-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as raised:
        chat(client, max_tokens=1)
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):
        stream(client, max_tokens=1)


def test_unknown_model_is_not_found(openai_client):
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=1)
    assert raised.value.status_code == 404
    assert raised.value.param == "model"
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=1, stream=True)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"n": 9}, "n"),
        ({"model": "gemma-3-270m-plain", "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": "gemma-3-270m-plain", "tools": TOOLS}, "tools"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 100_000}, "max_tokens"),
    ],
    ids=["n", "response_format", "tools", "temperature", "top_logprobs", "stop", "max_tokens"],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_bad_request_names_the_parameter(openai_client, params, param, streaming):
    params = {"model": MODEL, "max_tokens": 1, **params}
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(messages=QUESTION, stream=streaming, **params)
    error = raised.value
    assert error.status_code == 400
    assert error.param == param
    assert error.body["param"] == param
    assert error.body["message"]
    assert error.type == "invalid_request_error"


def test_server_still_serves_after_errors(openai_client):
    completion = chat(openai_client, temperature=0, max_tokens=3)
    assert completion.choices[0].message.content
