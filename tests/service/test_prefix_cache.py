"""The prefix cache on the real engine: it reuses shared prompt prefixes and never changes the output.

Every test runs the same requests on two engines over the embedded model, one with the cache and
one without, and requires the same text, the same logprobs (bit for bit) and the same finish
reasons, while the cache's counters show that prefill was actually skipped. With the default
kernels a slot offers its answer's KV as it was decoded; test_idle_prefill.py covers the
`--fast-nondeterministic` kernels, where idle prefill computes it again.
"""

from __future__ import annotations

import pytest

from chatrpc.cli import build_parser
from tests.service.prefix_engines import TOPICS, Engine, common_prefix, question


@pytest.fixture
def engine_pair():
    """Makes (with the cache, without) of a size, and closes them after the test."""
    made: list[Engine] = []

    def make(
        *, slots: int = 3, chunk: int = 256, idle_prefill: bool = False, flash_attention: bool = True
    ) -> tuple[Engine, Engine]:
        # Idle prefill off unless asked for (it has nothing to do with the default kernels, whose
        # answers' KV is offered as decoded: test_idle_prefill.py).
        made.append(
            Engine(
                prefix_cache=True, slots=slots, chunk=chunk, idle_prefill=idle_prefill, flash_attention=flash_attention
            )
        )
        made.append(Engine(prefix_cache=False, slots=slots, chunk=chunk, flash_attention=flash_attention))
        return made[-2], made[-1]

    yield make
    for engine in made:
        engine.close()


def offered_reuse(engine: Engine, prompt: list[int]) -> int:
    """What the cache offers `prompt` now: the longest common prefix with what a free slot holds,
    leaving at least the prompt's last token to prefill, if it is worth a slot (64 tokens)."""
    held = [list(kept.tokens) for _, kept in engine.cache.entries()]
    best = max((min(common_prefix(h, prompt), len(prompt) - 1) for h in held), default=0)
    return best if best >= 64 else 0


@pytest.mark.parametrize(
    ("sampling", "chunk"),
    [({"temperature": 0.0}, 256), ({"temperature": 0.8, "seed": 1234}, 64)],
    ids=["greedy-chunk256", "seeded-chunk64"],
)
def test_multi_turn_chat_is_identical_with_the_cache_and_reuses_history_and_answers(sampling, chunk, engine_pair):
    cached, plain = engine_pair(chunk=chunk, idle_prefill=True)
    assert cached.model.rows_independent and cached.cache.offers_output
    assert not cached.scheduler.idle_prefill.enabled  # the answers' KV is offered as decoded
    messages: list[dict] = []
    previous: list[int] | None = None
    for turn in range(4):
        messages.append({"role": "user", "content": question(TOPICS[0], turn)})
        prompt = cached.prompt(messages)
        expected = plain.run(prompt, max_tokens=40, **sampling)
        offered = offered_reuse(cached, prompt)
        reused_before = cached.cache.stats.reused_tokens
        got = cached.run(prompt, max_tokens=40, **sampling)
        assert got == expected, f"turn {turn + 1} differs with the prefix cache"
        reused = cached.cache.stats.reused_tokens - reused_before
        assert reused == offered, f"turn {turn + 1}"
        if previous is not None:
            # Past the previous prompt, into the answer it resends (as the template renders it).
            assert reused > common_prefix(previous, prompt), f"turn {turn + 1}"
        previous = prompt
        messages.append({"role": "assistant", "content": expected[0].text})
        # The slot offers the prompt and the answer, all but its last token (not decoded yet).
        held = [list(k.tokens) for _, k in cached.cache.entries()]
        assert any(len(h) == len(prompt) + 39 and h[: len(prompt)] == prompt for h in held), f"turn {turn + 1}"
    # Every prompt token was either prefilled or taken from the cache; without it, all prefilled.
    assert (
        cached.scheduler.timings.prefilled_tokens + cached.cache.stats.reused_tokens
        == plain.scheduler.timings.prefilled_tokens
    )
    assert plain.cache.stats.reused_tokens == 0


def test_a_prefix_shorter_than_a_piece_is_not_reused(engine_pair):
    """A prompt that shares fewer than 64 tokens with a slot (a chat template's start, a short prompt
    asked again) is not worth that slot, which could leave the running sequence ids out of order:
    the slot is chosen as without the cache."""
    cached, plain = engine_pair(slots=3, chunk=64)
    short = cached.prompt([{"role": "user", "content": "Why is the sky blue?"}])
    assert len(short) < 64
    assert cached.run(short, temperature=0.0) == plain.run(short, temperature=0.0)
    assert len(cached.cache.retained()) == 1
    hits = cached.cache.stats.hits
    assert cached.run(short, temperature=0.0) == plain.run(short, temperature=0.0)  # the same short prompt again
    assert cached.cache.stats.hits == hits and cached.cache.stats.reused_tokens == 0


def test_more_prefixes_than_slots_evicts_the_least_recently_used(engine_pair):
    cached, plain = engine_pair(slots=2, chunk=64)
    first = {topic: [{"role": "user", "content": question(topic, 0)}] for topic in TOPICS[:3]}
    follow = {
        topic: [*m, {"role": "assistant", "content": "Yes."}, {"role": "user", "content": question(topic, 1)}]
        for topic, m in first.items()
    }
    a, b, c = TOPICS[:3]

    def both(messages: list[dict]) -> int:
        prompt = cached.prompt(messages)
        reused_before = cached.cache.stats.reused_tokens
        assert cached.run(prompt, temperature=0.0) == plain.run(prompt, temperature=0.0)
        assert len(cached.cache.retained()) <= 2
        return cached.cache.stats.reused_tokens - reused_before

    assert both(first[a]) == 0
    assert both(first[b]) == 0
    assert cached.cache.stats.evictions == 0
    assert both(first[c]) == 0  # two slots, three prefixes: a's, the least recently used, goes
    assert cached.cache.stats.evictions == 1
    assert both(follow[b]) >= 64  # b's prefix is still there
    assert both(follow[a]) == 0  # a's is not; c's (now the oldest) is evicted for it
    assert cached.cache.stats.evictions == 2
    assert both(follow[c]) == 0
    assert cached.cache.stats.hits == 1


def test_n_choices_and_cancelled_requests_stay_identical(engine_pair):
    cached, plain = engine_pair(slots=4, chunk=64)
    seeded = {"temperature": 0.8, "seed": 99}
    history = [{"role": "user", "content": question(TOPICS[1], 0)}]
    prompt = cached.prompt(history)
    assert cached.run(prompt, temperature=0.0) == plain.run(prompt, temperature=0.0)

    # n = 3 on a longer prompt with the same start: choice 0 reuses the prefix, the others fork from it.
    history += [{"role": "assistant", "content": "Of course."}, {"role": "user", "content": question(TOPICS[1], 1)}]
    prompt = cached.prompt(history)
    reused_before = cached.cache.stats.reused_tokens
    expected = plain.run(prompt, n=3, **seeded)
    assert len({c.text for c in expected}) > 1  # the choices really are different draws
    assert cached.run(prompt, n=3, **seeded) == expected
    assert cached.cache.stats.reused_tokens > reused_before
    # Each choice's slot offers the prompt and its own answer.
    held = [list(k.tokens) for _, k in cached.cache.entries()]
    assert len(held) == 3 and all(h[: len(prompt)] == prompt and len(h) > len(prompt) for h in held)

    # A request cancelled while generating keeps its KV; the same prompt again reuses all but its last token.
    history += [{"role": "assistant", "content": expected[0].text}, {"role": "user", "content": question(TOPICS[1], 2)}]
    prompt = cached.prompt(history)
    cached.run(prompt, max_tokens=200, cancel_after=5, temperature=0.0)
    reused_before = cached.cache.stats.reused_tokens
    assert cached.run(prompt, max_tokens=24, temperature=0.0) == plain.run(prompt, max_tokens=24, temperature=0.0)
    assert cached.cache.stats.reused_tokens - reused_before == len(prompt) - 1

    # n = 2 cancelled right after its first token, then run in full: the same choices as without the cache.
    cached.run(prompt, n=2, max_tokens=200, cancel_after=1, **seeded)
    assert cached.run(prompt, n=2, **seeded) == plain.run(prompt, n=2, **seeded)


def test_without_flash_attention_the_cache_reuses_whole_chunks_only(engine_pair):
    """The unfused attention computes a sequence's rows with another kernel from 2 rows of it on, so
    a position's KV depends on its chunk: no idle prefill, no speculation, whole chunks only, and
    still the output of a cache-off engine."""
    cached, plain = engine_pair(idle_prefill=True, chunk=64, flash_attention=False)
    assert not cached.model.rows_independent
    assert cached.cache.min_rows is None and not cached.scheduler.idle_prefill.enabled
    assert not cached.scheduler.speculating
    messages = [{"role": "user", "content": question(TOPICS[1], 0)}]
    for turn in range(2):
        prompt = cached.prompt(messages)
        reused_before = cached.cache.stats.reused_tokens
        answer = plain.run(prompt, max_tokens=48, temperature=0.0)
        assert cached.run(prompt, max_tokens=48, temperature=0.0) == answer, f"turn {turn + 1} differs"
        assert (cached.cache.stats.reused_tokens - reused_before) % 64 == 0
        messages.append({"role": "assistant", "content": answer[0].text})
        messages.append({"role": "user", "content": question(TOPICS[1], 1)})
    assert cached.cache.stats.reused_tokens > 0


def test_prefix_cache_flag_defaults_on():
    parser = build_parser()
    assert parser.parse_args(["grpc"]).prefix_cache is True
    assert parser.parse_args(["grpc", "--no-prefix-cache"]).prefix_cache is False
    assert parser.parse_args(["serve", "--prefix-cache"]).prefix_cache is True
    assert parser.parse_args(["grpc"]).idle_prefill is True
    assert parser.parse_args(["grpc", "--no-idle-prefill"]).idle_prefill is False
    assert parser.parse_args(["grpc"]).flash_attention is True
    assert parser.parse_args(["serve", "--no-flash-attn"]).flash_attention is False
