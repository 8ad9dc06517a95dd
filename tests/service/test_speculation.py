"""Prompt-lookup speculation: the drafts themselves, and on the real engine, that it never changes the output.

The engine tests run the same requests on two engines over the embedded model, one guessing and one
not, and require the same text and the same logprobs bit for bit, while the counters show that
guesses were checked and held; also past 512 tokens of context, where llama.cpp's flash attention
would serve a lone one-row step by another path than a step of several rows if the default kernels
did not keep every row on one (service/engine/model.py).
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import numpy as np
import pytest

from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.scheduler import Scheduler
from service.engine.speculation import BREAK_EVEN, PROBE_EVERY, PromptLookup, lookup_draft
from service.models import embedded_model_path
from service.request import Generation, SamplingParams

# Short prompts on which the base model repeats itself, so that guesses are made and hold. Which
# guesses hold depends on the text, and so on the CPU's kernels (the logits' last bits): the last
# prompt repeats itself, so that its guesses hold under penalties too, on every machine.
PROMPTS = [
    "Why is the sky blue?",
    "Describe the life of a honeybee.",
    "List some ways to save energy at home.",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. "
    "The quick brown fox",
]


# ---- the drafts -------------------------------------------------------------------------------


def draft(history: list[int], max_tokens: int = 3, min_n: int = 2, max_n: int = 4) -> list[int]:
    return lookup_draft(np.asarray(history, dtype=np.int32), max_tokens, min_n, max_n).tolist()


def test_draft_follows_the_latest_earlier_occurrence():
    assert draft([5, 6, 1, 2, 7, 8, 1, 2, 9, 4, 1, 2]) == [9, 4, 1]


def test_draft_prefers_the_longest_ending():
    # [3, 1, 2] occurs once (followed by 7), [1, 2] last before the end is followed by 8.
    assert draft([3, 1, 2, 7, 0, 1, 2, 8, 3, 1, 2], max_n=3) == [7, 0, 1]
    assert draft([3, 1, 2, 7, 0, 1, 2, 8, 3, 1, 2], max_n=2) == [8, 3, 1]


def test_draft_is_cut_at_the_history_end_and_at_max_tokens():
    assert draft([1, 2, 1, 2], max_tokens=5) == [1, 2]
    assert draft([1, 2, 3, 4, 5, 6, 1, 2], max_tokens=2) == [3, 4]


def test_no_draft_without_a_match_of_min_n():
    assert draft([1, 2, 3, 4, 5, 1]) == []  # only a 1-token match
    assert draft([1, 2, 3, 4, 5, 1], min_n=1) == [2, 3, 4]
    assert draft([7]) == []


def test_guessing_stops_under_the_break_even_and_probes_with_one_guess():
    lookup = PromptLookup(max_draft=3)
    history = [1, 2, 3, 1, 2]
    key = object()
    assert lookup.draft(key, history, [], 3) == [3, 1, 2]
    failed = 0
    while lookup._states[key].held >= BREAK_EVEN:
        lookup.record(key, 3, 0)
        failed += 1
    assert failed == 2  # 1.0 -> 0.7 -> 0.49
    skipped = 0
    while not (probe := lookup.draft(key, history, [], 3)):
        skipped += 1
    assert skipped == PROBE_EVERY - 1 and probe == [3]
    for _ in range(2):  # probes that hold bring full drafts back
        lookup.record(key, 1, 1)
    assert lookup.draft(key, history, [], 3) == [3, 1, 2]
    lookup.forget(key)
    assert key not in lookup._states


def test_draft_sees_each_new_output_token_once():
    lookup = PromptLookup(max_draft=3)
    key = object()
    output: list[int] = []
    assert lookup.draft(key, [9, 8, 7], output, 3) == []
    output += [9, 8]
    assert lookup.draft(key, [9, 8, 7], output, 3) == [7, 9, 8]
    assert lookup._states[key].length == 5


# ---- on the engine ----------------------------------------------------------------------------


class Engine:
    def __init__(self, *, speculative_tokens: int) -> None:
        self.model = LoadedModel("test", embedded_model_path(), context_per_sequence=1024, max_sequences=2)
        self.constraints = ConstraintCompiler(self.model.vocab, self.model.vocab_size)
        self.scheduler = Scheduler(
            self.model, self.constraints, speculative_tokens=speculative_tokens, prefix_cache=False
        )

    def run(self, content: str, *, n: int = 1, max_tokens: int = 96, stop=(), grammar=None, **sampling):
        prompt = self.model.render_prompt([{"role": "user", "content": content}])
        generation = Generation(
            prompt_tokens=prompt, max_new_tokens=max_tokens, stop=list(stop), n=n, grammar=grammar,
            sampling=SamplingParams(logprobs=True, **sampling),
        )  # fmt: skip
        return asyncio.run(self._collect(generation))

    async def _collect(self, generation: Generation):
        texts = [""] * generation.n
        logprobs: list[list[float]] = [[] for _ in range(generation.n)]
        finish = [None] * generation.n
        tokens = [0] * generation.n
        async for update in self.scheduler.submit(generation).updates():
            assert update.error is None, update.error
            texts[update.index] += update.text
            logprobs[update.index] += [entry.logprob for entry in update.logprobs or ()]
            finish[update.index] = update.finish_reason or finish[update.index]
            tokens[update.index] = update.completion_tokens
        return list(zip(texts, logprobs, finish, tokens, strict=True))

    def close(self) -> None:
        self.scheduler.close()
        self.model.close()


@pytest.fixture(scope="module")
def engines():
    guessing, plain = Engine(speculative_tokens=3), Engine(speculative_tokens=0)
    yield guessing, plain
    guessing.close()
    plain.close()


def assert_same(guessing: Engine, plain: Engine, content: str, **params) -> tuple[list, int]:
    """Both engines' choices, required equal, and how many guesses held on the guessing one."""
    before = guessing.scheduler.timings.accepted_tokens
    got, expected = guessing.run(content, **params), plain.run(content, **params)
    assert got == expected
    assert plain.scheduler.timings.speculative_steps == 0
    return got, guessing.scheduler.timings.accepted_tokens - before


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.0},
        {"temperature": 0.8, "seed": 11},
        {
            "temperature": 1.0,
            "top_p": 0.9,
            "seed": 3,
            "frequency_penalty": 0.3,
            "presence_penalty": 0.2,
            "logit_bias": {1: -100.0, 106: -100.0},
        },
    ],
    ids=["greedy", "seeded", "penalties"],
)
def test_same_tokens_and_logprobs_with_and_without_guessing(engines, sampling):
    guessing, plain = engines
    accepted = 0
    for content in PROMPTS:
        _, gained = assert_same(guessing, plain, content, **sampling)
        accepted += gained
    assert accepted > 0  # guesses were checked and held


def test_same_tokens_and_logprobs_past_512_tokens_of_context(engines):
    guessing, plain = engines
    notes = "The keeper climbs the tower at dusk, trims the wick, winds the clock and writes the log. " * 30
    content = notes + "Repeat the first sentence of these notes three times."
    assert len(guessing.model.render_prompt([{"role": "user", "content": content}])) > 540
    _, accepted = assert_same(guessing, plain, content, temperature=0.0, max_tokens=64)
    assert accepted > 0


def test_max_tokens_and_stop_strings_inside_a_guess(engines):
    guessing, plain = engines
    for max_tokens in (1, 2, 5, 13):
        (choice,), _ = assert_same(
            guessing, plain, PROMPTS[0], max_tokens=max_tokens, temperature=0.0, logit_bias={1: -100.0, 106: -100.0}
        )
        assert choice[3] == max_tokens and choice[2] == "length"
    # A stop string from the middle of the plain engine's own answer, so that it surely occurs.
    ((text, *_),) = plain.run(PROMPTS[0], max_tokens=96, temperature=0.0, logit_bias={1: -100.0, 106: -100.0})
    stop = text[len(text) // 2 : len(text) // 2 + 5]
    (choice,), _ = assert_same(
        guessing, plain, PROMPTS[0], max_tokens=96, temperature=0.0, stop=[stop], logit_bias={1: -100.0, 106: -100.0}
    )
    assert choice[2] == "stop" and choice[0] == text[: text.index(stop)]


def test_json_schema_with_guessing(engines):
    guessing, plain = engines
    schema = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 6}},
        "required": ["items"],
        "additionalProperties": False,
    }
    grammar = guessing.constraints.from_json_schema(schema, param="response_format")
    (choice,), _ = assert_same(
        guessing, plain, "List some fruits as JSON.", grammar=grammar, temperature=0.7, seed=2, max_tokens=120
    )
    if choice[2] == "stop":
        jsonschema.validate(json.loads(choice[0]), schema)


def test_no_guessing_while_several_sequences_decode(engines):
    guessing, plain = engines
    steps = guessing.scheduler.timings.speculative_steps
    got = guessing.run(PROMPTS[1], n=2, temperature=0.0, max_tokens=40, logit_bias={1: -100.0, 106: -100.0})
    assert guessing.scheduler.timings.speculative_steps == steps
    assert got == plain.run(PROMPTS[1], n=2, temperature=0.0, max_tokens=40, logit_bias={1: -100.0, 106: -100.0})
