"""POST /v1/completions (the legacy text completion) with the official ``openai`` SDK's
``completions.create``, unchanged, against the real server.

As in test_openai_sdk.py, the model is tiny and says odd things: the tests assert structure and
behaviour, and compare text exactly only where determinism makes that valid (temperature 0, or a
fixed seed). Completions are a few tokens long.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from adapters.rest.errors import APIError
from adapters.rest.routing import prompt_affinity
from adapters.rest.translate_completions import completion_request_from_json, text_completion_to_json
from chatrpc.v1 import chat_pb2
from tests.adapters.test_openai_sdk import NO_END, Vocabulary
from tests.conftest import MODEL_ID

PROMPT = "The three primary colours are red,"
BOS = 2  # Gemma's <bos>, which a text prompt gets first


def complete(client: openai.OpenAI, prompt=PROMPT, **params):
    params.setdefault("max_tokens", 8)
    return client.completions.create(model=MODEL_ID, prompt=prompt, **params)


def stream(client: openai.OpenAI, prompt=PROMPT, **params) -> list:
    params.setdefault("max_tokens", 8)
    with client.completions.create(model=MODEL_ID, prompt=prompt, stream=True, **params) as chunks:
        return list(chunks)


def greedy(client: openai.OpenAI, prompt=PROMPT, **params) -> str:
    """The temperature-0 text, which never ends early (the end tokens banned)."""
    return complete(client, prompt, temperature=0, logit_bias=NO_END, **params).choices[0].text


@pytest.fixture(scope="module")
def vocabulary():
    vocab = Vocabulary()
    yield vocab
    vocab.close()


# ---------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------


def test_text_prompt(openai_client):
    completion = complete(openai_client, temperature=0, logit_bias=NO_END)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-") and len(completion.id) > len("cmpl-")
    assert completion.model == MODEL_ID
    assert isinstance(completion.created, int) and completion.created > 1_600_000_000
    assert isinstance(completion.system_fingerprint, str) and completion.system_fingerprint
    (choice,) = completion.choices
    assert choice.index == 0
    assert isinstance(choice.text, str) and choice.text
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    usage = completion.usage
    assert usage.completion_tokens == 8 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_max_tokens_defaults_to_sixteen(openai_client):
    completion = openai_client.completions.create(model=MODEL_ID, prompt=PROMPT, temperature=0, logit_bias=NO_END)
    assert completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"


def test_token_id_prompt_is_the_text_prompt(openai_client, vocabulary):
    ids = [BOS, *vocabulary.tokenize(PROMPT)]
    text = greedy(openai_client)
    by_ids = complete(openai_client, ids, temperature=0, logit_bias=NO_END)
    assert by_ids.choices[0].text == text
    assert by_ids.usage.prompt_tokens == len(ids)
    # A list of one prompt is that prompt, in either spelling.
    assert greedy(openai_client, [ids]) == text
    assert greedy(openai_client, [PROMPT]) == text


def test_temperature_zero_is_deterministic(openai_client):
    assert greedy(openai_client) == greedy(openai_client)


def test_n_choices_with_a_seed_are_reproduced(openai_client):
    first = complete(openai_client, n=2, seed=7, temperature=1, logit_bias=NO_END)
    assert [choice.index for choice in first.choices] == [0, 1]
    assert first.usage.completion_tokens == 16
    again = complete(openai_client, n=2, seed=7, temperature=1, logit_bias=NO_END)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    # Choice 0 of n is the n = 1 answer (the engine's seeding of choices).
    single = complete(openai_client, seed=7, temperature=1, logit_bias=NO_END)
    assert single.choices[0].text == first.choices[0].text


def test_best_of_equal_to_n_is_accepted(openai_client):
    completion = complete(openai_client, n=2, best_of=2, max_tokens=2)
    assert len(completion.choices) == 2


def test_stop_string_ends_the_text_before_it(openai_client):
    text = greedy(openai_client, max_tokens=16)
    middle = len(text) // 2
    stop = text[middle : middle + 2]
    completion = complete(openai_client, temperature=0, logit_bias=NO_END, max_tokens=16, stop=[stop, "\x00never"])
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.find(stop)]
    assert stop not in choice.text


def test_echo_puts_the_prompt_first(openai_client):
    completion = complete(openai_client, echo=True, temperature=0, logit_bias=NO_END)
    assert completion.choices[0].text == PROMPT + greedy(openai_client)


def test_echo_of_token_ids_is_their_text(openai_client, vocabulary):
    ids = [BOS, *vocabulary.tokenize(PROMPT)]
    completion = complete(openai_client, ids, echo=True, max_tokens=1)
    assert completion.choices[0].text.startswith(PROMPT)  # <bos> has no text


def test_logprobs_are_consistent(openai_client):
    completion = complete(openai_client, logprobs=2, temperature=0, logit_bias=NO_END)
    (choice,) = completion.choices
    logprobs = choice.logprobs
    count = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == count
    assert len(logprobs.text_offset) == count
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for token, logprob, top, offset in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset, strict=True
    ):
        assert logprob <= 0
        assert len(top) == 2
        # Greedy: the generated token is the most likely one.
        assert top[token] == logprob == max(top.values())
        if "\ufffd" not in token:
            assert choice.text[offset : offset + len(token)] == token


def test_stream_with_usage_is_the_greedy_answer(openai_client):
    unary = complete(openai_client, temperature=0, logit_bias=NO_END, max_tokens=10)
    chunks = stream(
        openai_client, temperature=0, logit_bias=NO_END, max_tokens=10, stream_options={"include_usage": True}
    )
    assert all(chunk.id == chunks[0].id and chunk.object == "text_completion" for chunk in chunks)
    assert chunks[0].id.startswith("cmpl-")
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == unary.choices[0].text
    finishing = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishing == ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == unary.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_stream_of_n_echoed_choices_with_logprobs(openai_client):
    chunks = stream(openai_client, n=2, seed=3, echo=False, logprobs=1, max_tokens=4, logit_bias=NO_END)
    for index in (0, 1):
        mine = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].index == index]
        offsets = [offset for choice in mine if choice.logprobs for offset in choice.logprobs.text_offset]
        assert len(offsets) == 4 and offsets[0] == 0 and offsets == sorted(offsets)
        assert mine[-1].finish_reason == "length"
    echoed = stream(openai_client, echo=True, max_tokens=2)
    assert echoed[0].choices[0].text.startswith(PROMPT)


# ---------------------------------------------------------------------------
# Refusals: a 400 in OpenAI's envelope naming the parameter
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"suffix": " and that is all."}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": ["one prompt", "another"]}, "prompt"),
        ({"prompt": [[BOS, 10], [BOS, 11]]}, "prompt"),
        ({"prompt": [BOS, 10**8]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [BOS, "x"]}, "prompt[1]"),
        ({"prompt": 7}, "prompt"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"prompt": "word " * 4000}, "prompt"),
        ({"n": 9}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"extra_body": {"messages": []}}, "messages"),
    ],
    ids=[
        "suffix", "best_of-over-n", "best_of-under-n", "echo-with-logprobs", "logprobs", "batch-of-strings",
        "batch-of-token-lists", "token-out-of-vocabulary", "empty-prompt-list", "token-of-wrong-type", "prompt-type",
        "over-the-context", "prompt-over-the-context", "n", "temperature", "stop", "unknown-field",
    ],
)  # fmt: skip
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_bad_request_names_the_parameter(openai_client, params, param, streaming):
    params = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1, **params}
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.completions.create(stream=streaming, **params)
    error = raised.value
    assert error.status_code == 400
    assert error.param == param
    assert error.body["param"] == param
    assert error.body["message"]
    assert error.type == "invalid_request_error"


def test_unknown_model_is_not_found(openai_client):
    for streaming in (False, True):
        with pytest.raises(openai.NotFoundError) as raised:
            openai_client.completions.create(model="davinci-002", prompt=PROMPT, max_tokens=1, stream=streaming)
        assert raised.value.status_code == 404
        assert raised.value.param == "model"
        assert raised.value.code == "model_not_found"


def test_missing_prompt_is_400(server):
    response = httpx.post(
        f"{server.rest_base_url}/completions",
        json={"model": MODEL_ID, "max_tokens": 1},
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert response.json()["error"]["code"] == "missing_required_parameter"


# ---------------------------------------------------------------------------
# The adapter's own parts, without a server
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [("Hi", "Hi", None), (["Hi"], "Hi", None), ([2, 7], None, [2, 7]), ([[2, 7]], None, [2, 7])],
)
def test_each_spelling_of_one_prompt(prompt, text, ids):
    message = completion_request_from_json({"model": "m", "prompt": prompt})
    if text is not None:
        assert message.WhichOneof("prompt") == "text" and message.text == text
    else:
        assert message.WhichOneof("prompt") == "tokens" and list(message.tokens.ids) == ids


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": None}, "prompt"),
        ({"prompt": "Hi"}, "model"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": [True]}, "prompt[0]"),
        ({"model": "m", "prompt": [[2, 2**31]]}, "prompt[0][1]"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": {"text": "a"}}, "prompt"),
        ({"model": "m", "prompt": "a", "logprobs": True}, "logprobs"),
        ({"model": "m", "prompt": "a", "echo": 1}, "echo"),
        ({"model": "m", "prompt": "a", "messages": []}, "messages"),
    ],
)
def test_shapes_refused_by_the_adapter(body, param):
    with pytest.raises(APIError) as raised:
        completion_request_from_json(body)
    assert raised.value.status == 400 and raised.value.param == param


def test_alternatives_of_the_same_text_keep_the_more_likely():
    top = chat_pb2.TopLogprobs(
        tokens=[
            chat_pb2.TopLogprob(token="\ufffd", logprob=-0.5),
            chat_pb2.TopLogprob(token="\ufffd", logprob=-1.0),
            chat_pb2.TopLogprob(token="a", logprob=float("-inf")),
        ]
    )
    logprobs = chat_pb2.CompletionLogprobs(
        tokens=["\ufffd"], token_logprobs=[-0.5], top_logprobs=[top], text_offset=[0]
    )
    completion = chat_pb2.Completion(choices=[chat_pb2.CompletionChoice(text="x", logprobs=logprobs)])
    (choice,) = text_completion_to_json(completion)["choices"]
    assert choice["logprobs"]["top_logprobs"] == [{"\ufffd": -0.5, "a": -9999.0}]
    assert choice["finish_reason"] is None


def test_prompt_affinity_follows_the_prompts_beginning():
    def affinity(**fields) -> str:
        return prompt_affinity(chat_pb2.CompletionRequest(**{"model": "m", **fields}))

    preamble = "x" * 1024
    assert affinity(text=preamble + "first question") == affinity(text=preamble + "second question")
    assert affinity(text="short, first") != affinity(text="short, second")
    assert affinity(text="a") != affinity(text="a", model="other")
    ids = list(range(256))
    assert affinity(tokens=chat_pb2.PromptTokens(ids=[*ids, 1])) == affinity(tokens=chat_pb2.PromptTokens(ids=ids))
    assert affinity(tokens=chat_pb2.PromptTokens(ids=[1])) != affinity(tokens=chat_pb2.PromptTokens(ids=[2]))
