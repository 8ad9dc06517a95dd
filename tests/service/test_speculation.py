"""Prompt-lookup speculation: the drafts, the step costs and plans that pick which guesses a step checks,
and on the real engine, that it never changes the output.

The engine tests run the same requests on two engines over the embedded model, one guessing and one
not, and require the same text and the same logprobs bit for bit, while the counters show that
guesses were checked and held: for one sequence, for several sequences checked in one step, and past
512 tokens of context, where llama.cpp's flash attention would serve a lone one-row step by another
path than a step of several rows if the default kernels did not keep every row on one
(service/engine/model.py).
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import numpy as np
import pytest

from service.engine.batch import ubatch_rows
from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.scheduler import Scheduler
from service.engine.speculation import PromptLookup, lookup_draft, plan
from service.engine.step_cost import StepCost
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


def test_acceptance_follows_the_guesses_that_held():
    lookup = PromptLookup(max_draft=3)
    history = [1, 2, 3, 1, 2]
    key = object()
    assert lookup.draft(key, history, [], 3) == [3, 1, 2]
    assert lookup.acceptance(key) == 0.75  # the hopeful prior
    for _ in range(8):
        lookup.record(key, 1, 0)  # the first guess failed: one checked, none held
    assert lookup.acceptance(key) < 0.4
    other = object()  # a new sequence starts from what guesses have done on this server lately
    lookup.draft(other, history, [], 3)
    assert lookup.acceptance(key) < lookup.acceptance(other) < 0.75
    lookup.left_out(key)
    lookup.left_out(key)
    assert lookup.waited(key) == 2
    for _ in range(4):
        lookup.record(key, 3, 3)
    assert lookup.acceptance(key) > 0.85 and lookup.waited(key) == 0
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


# ---- what a step costs, and which guesses a step checks ------------------------------------------


def test_ubatches_follow_llama_cpp_equal_split():
    assert ubatch_rows([0, 1, 2], [1, 1, 1]) == [3]
    assert ubatch_rows([0, 1, 2], [4, 4, 4]) == [12]  # the same rows per sequence: one pass
    assert ubatch_rows([0, 1, 2], [1, 4, 1]) == [3, 3]  # one row each, then sequence 1's other three
    assert ubatch_rows([0, 1, 2, 3], [1, 4, 3, 1]) == [4, 4, 1]
    assert ubatch_rows([0, 2, 3], [1, 1, 1]) == [1, 2]  # ids 0 and 2 do not run on
    assert ubatch_rows([0, 1, 2], [3, 0, 3]) == [3, 3]
    assert ubatch_rows([5], [4]) == [4]


def synthetic_seconds(ubatches: list[int]) -> float:
    return sum(0.010 + 0.002 * rows if rows > 1 else 0.009 for rows in ubatches)


def test_step_cost_learns_each_price():
    cost = StepCost()
    assert not cost.observed
    shapes = [[1], [4], [8], [8, 1], [16], [12, 6, 2], [2], [1, 3]] * 30
    for ubatches in shapes:
        cost.observe(ubatches, synthetic_seconds(ubatches))
    assert cost.per_ubatch == pytest.approx(0.010, rel=0.02)
    assert cost.per_row == pytest.approx(0.002, rel=0.02)
    assert cost.single_row == pytest.approx(0.009, rel=0.02)
    assert cost.seconds([10, 1]) == pytest.approx(synthetic_seconds([10, 1]), rel=0.02)


def test_step_cost_of_one_shape_keeps_prices_positive():
    cost = StepCost()
    for _ in range(300):
        cost.observe([8], 0.16)
    assert cost.per_ubatch >= 0 and cost.per_row > 0 and cost.single_row >= 0
    assert cost.seconds([8]) == pytest.approx(0.16, rel=0.05)


class FixedCost(StepCost):
    """A test double for the fitted step cost: given prices, not learnt, so that which guesses a plan
    (or the engine) checks does not depend on this machine's speed."""

    def __init__(self, per_ubatch: float, per_row: float) -> None:
        super().__init__()
        self.per_ubatch, self.per_row, self.single_row = per_ubatch, per_row, per_ubatch + per_row

    @property
    def observed(self) -> bool:
        return True

    def observe(self, ubatches: list[int], seconds: float) -> None:
        pass


def test_plan_checks_guesses_for_every_sequence_where_rows_are_cheap():
    # A pass over the weights dominates (a wide machine): every sequence guesses, all the same length.
    cheap = FixedCost(per_ubatch=0.030, per_row=0.001)
    assert plan([0, 1, 2, 3], [3, 3, 3, 3], [0.5, 0.6, 0.4, 0.9], cheap) == [3, 3, 3, 3]
    # A sequence with only 2 guesses: better to cut the others to 2 than to pay a second pass.
    assert plan([0, 1, 2, 3], [3, 2, 3, 3], [0.7, 0.7, 0.7, 0.7], cheap) == [2, 2, 2, 2]
    # Sequences without guesses cost no extra pass when the others stop after one row too: the
    # guessing ones take a second ubatch, worth it only for guesses that hold often enough.
    assert plan([0, 1], [0, 3], [0.0, 0.1], cheap) == [0, 0]
    assert plan([0, 1], [0, 3], [0.0, 0.95], cheap) == [0, 3]


def test_plan_checks_only_guesses_that_pay_where_rows_are_dear():
    # Arithmetic dominates (few slow cores): a guess row costs about what a real row does.
    dear = FixedCost(per_ubatch=0.011, per_row=0.018)
    assert plan([0], [3], [0.5], dear) == [0]
    assert plan([0], [3], [0.95], dear) == [3]
    # Among 8 decoding sequences, a guess must hold nearly always to beat a real row's share, and
    # one sequence guessing alone would cost a second pass too.
    assert plan(list(range(8)), [3] * 8, [0.6] * 8, dear) == [0] * 8
    assert plan(list(range(8)), [3] * 8, [0.6] * 7 + [0.999], dear) == [0] * 8
    assert plan(list(range(8)), [3] * 8, [0.999] * 8, dear) == [3] * 8


# ---- on the engine ----------------------------------------------------------------------------


class Engine:
    def __init__(self, *, speculative_tokens: int) -> None:
        self.model = LoadedModel("test", embedded_model_path(), context_per_sequence=1024, max_sequences=2)
        self.constraints = ConstraintCompiler(self.model.vocab, self.model.vocab_size)
        self.scheduler = Scheduler(
            self.model, self.constraints, speculative_tokens=speculative_tokens, prefix_cache=False
        )

    def run(self, content: str, **params):
        return asyncio.run(self._collect(self.generation(content, **params)))

    def run_together(self, contents: list[str], **params):
        """The requests at once, each one's choices."""

        async def all_of():
            return await asyncio.gather(*(self._collect(self.generation(c, **params)) for c in contents))

        return asyncio.run(all_of())

    def generation(self, content: str, *, n: int = 1, max_tokens: int = 96, stop=(), grammar=None, **sampling):
        prompt = self.model.render_prompt([{"role": "user", "content": content}])
        return Generation(
            prompt_tokens=prompt, max_new_tokens=max_tokens, stop=list(stop), n=n, grammar=grammar,
            sampling=SamplingParams(logprobs=True, **sampling),
        )  # fmt: skip

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
    guessing, plain = Engine(speculative_tokens=10), Engine(speculative_tokens=0)
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


def test_guesses_of_several_sequences_checked_in_one_step(engines):
    guessing, plain = engines
    speculation = guessing.scheduler._decode_step
    fitted = speculation.cost
    speculation.cost = FixedCost(per_ubatch=0.030, per_row=0.001)  # every guess worth checking
    timings = guessing.scheduler.timings
    steps, lone, accepted = timings.speculative_steps, timings.steps_by_rows[1], timings.accepted_tokens
    params = {"max_tokens": 48, "logit_bias": {1: -100.0, 106: -100.0}}
    try:
        choices = guessing.run(PROMPTS[3], n=2, temperature=0.8, seed=5, **params)
        together = guessing.run_together([PROMPTS[3], PROMPTS[1]], temperature=0.0, **params)
    finally:
        speculation.cost = fitted
    assert choices == plain.run(PROMPTS[3], n=2, temperature=0.8, seed=5, **params)
    assert together == [plain.run(content, temperature=0.0, **params) for content in (PROMPTS[3], PROMPTS[1])]
    # More speculative steps than steps of a lone sequence: some checked two sequences' guesses.
    assert timings.speculative_steps - steps > timings.steps_by_rows[1] - lone
    assert timings.accepted_tokens > accepted
