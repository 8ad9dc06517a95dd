"""The prefix cache on the real engine: it reuses shared prompt prefixes and never changes the output.

Every test runs the same requests on two engines over the embedded model, one with the cache and
one without, and requires the same text, the same logprobs (bit for bit) and the same finish
reasons, while the cache's counters show that prefill was actually skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import pytest

from chatrpc.cli import build_parser
from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.scheduler import Scheduler
from service.models import embedded_model_path
from service.request import Generation, SamplingParams

TOPICS = ["a lighthouse keeper", "a beekeeper in the mountains", "a night train across the desert", "a baker at dawn"]


def question(topic: str, turn: int) -> str:
    # Long enough (~90 tokens) that a few turns cross several prefill chunks.
    return (
        f"Part {turn + 1}. Tell me more about {topic}: what the days are like in spring, summer, autumn and winter, "
        "which tools are used, which sounds and smells fill the place, who visits, what goes wrong when the weather "
        "turns, how the work has changed over the last hundred years, and what a newcomer should learn first. "
        "Describe it plainly, in full sentences, as a story told to a friend."
    )


@dataclass(frozen=True)
class Choice:
    text: str
    logprobs: tuple[float, ...]
    finish_reason: str | None


class Engine:
    """One model with its scheduler, as service.models builds them, with the cache on or off."""

    def __init__(
        self,
        *,
        prefix_cache: bool,
        slots: int = 3,
        chunk: int = 256,
        idle_prefill: bool = False,
        flash_attention: bool = True,
    ) -> None:
        self.model = LoadedModel(
            "test",
            embedded_model_path(),
            context_per_sequence=1024,
            max_sequences=slots,
            flash_attention=flash_attention,
        )
        self.scheduler = Scheduler(
            self.model,
            ConstraintCompiler(self.model.vocab, self.model.vocab_size),
            prefill_chunk=chunk,
            prefix_cache=prefix_cache,
            idle_prefill=idle_prefill,
        )
        self.slots = slots

    @property
    def cache(self):
        return self.scheduler.prefix_cache

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.model.render_prompt(messages)

    def run(
        self, prompt: list[int], *, n: int = 1, max_tokens: int = 32, cancel_after: int | None = None, **sampling
    ) -> list[Choice]:
        generation = Generation(
            prompt_tokens=prompt,
            max_new_tokens=max_tokens,
            stop=[],
            n=n,
            sampling=SamplingParams(logprobs=True, **sampling),
        )
        return asyncio.run(self._collect(generation, cancel_after))

    async def _collect(self, generation: Generation, cancel_after: int | None) -> list[Choice]:
        stream = self.scheduler.submit(generation)
        texts = [""] * generation.n
        logprobs: list[list[float]] = [[] for _ in range(generation.n)]
        finish: list[str | None] = [None] * generation.n
        seen = 0
        async for update in stream.updates():
            assert update.error is None, update.error
            texts[update.index] += update.text
            logprobs[update.index] += [entry.logprob for entry in update.logprobs or ()]
            finish[update.index] = update.finish_reason or finish[update.index]
            seen += 1
            if cancel_after is not None and seen >= cancel_after:
                stream.cancel()
                # Updates may still come until the scheduler's next step: keep their loop open.
                await self._until_idle(asyncio.sleep)
                break
        return [Choice(t, tuple(lp), f) for t, lp, f in zip(texts, logprobs, finish, strict=True)]

    async def _until_idle(self, sleep) -> None:
        """Until every slot is back (a cancelled request leaves at the scheduler's next step)."""
        deadline = time.monotonic() + 60
        while self.scheduler.slots.free_count < self.slots:
            assert time.monotonic() < deadline, "the scheduler did not free its slots"
            await sleep(0.01)

    def wait_idle_prefill(self) -> None:
        """Until the scheduler has prefilled, while idle, all that finished sequences generated."""
        deadline = time.monotonic() + 60
        while self.scheduler.idle_prefill.pending() or self.scheduler.idle_prefill.running:
            assert time.monotonic() < deadline, "idle prefill did not finish"
            time.sleep(0.01)

    def close(self) -> None:
        self.scheduler.close()
        self.model.close()


@pytest.fixture
def engine_pair():
    """Makes (with the cache, without) of a size, and closes them after the test."""
    made: list[Engine] = []

    def make(
        *, slots: int = 3, chunk: int = 256, idle_prefill: bool = False, flash_attention: bool = True
    ) -> tuple[Engine, Engine]:
        # Idle prefill off unless asked for: with it, how much a request reuses depends on how far
        # the idle pieces got before it came (the output never does).
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


def common_prefix(earlier: list[int], later: list[int]) -> int:
    common = 0
    while common < min(len(earlier), len(later)) and earlier[common] == later[common]:
        common += 1
    return common


def shared_chunks(earlier: list[int], later: list[int], chunk: int) -> int:
    """What the cache reuses at least: whole chunks of the earlier prompt that the later one starts
    with, leaving at least the later prompt's last token to prefill."""
    return min(common_prefix(earlier, later), len(later) - 1) // chunk * chunk


@pytest.mark.parametrize(
    ("sampling", "chunk"),
    [({"temperature": 0.0}, 256), ({"temperature": 0.8, "seed": 1234}, 64)],
    ids=["greedy-chunk256", "seeded-chunk64"],
)
def test_multi_turn_chat_is_identical_with_the_cache_and_reuses_the_history(sampling, chunk, engine_pair):
    cached, plain = engine_pair(chunk=chunk)
    messages: list[dict] = []
    previous: list[int] | None = None
    partial_reuse = False
    for turn in range(4):
        messages.append({"role": "user", "content": question(TOPICS[0], turn)})
        prompt = cached.prompt(messages)
        expected = plain.run(prompt, max_tokens=40, **sampling)
        reused_before = cached.cache.stats.reused_tokens
        got = cached.run(prompt, max_tokens=40, **sampling)
        assert got == expected, f"turn {turn + 1} differs with the prefix cache"
        reused = cached.cache.stats.reused_tokens - reused_before
        if previous is None:
            assert reused == 0
        else:
            # Whole chunks at least; with 256-token chunks also the previous prompt's last chunk
            # (prefilled with >= 64 rows), so reuse ends between chunk boundaries.
            assert shared_chunks(previous, prompt, chunk) <= reused <= common_prefix(previous, prompt), (
                f"turn {turn + 1}"
            )
            partial_reuse = partial_reuse or reused % chunk != 0
        previous = prompt
        messages.append({"role": "assistant", "content": expected[0].text})
    assert cached.cache.stats.reused_tokens >= chunk  # the chat did reach a reusable chunk
    assert partial_reuse == (chunk == 256)  # 64-token chunks are all whole or too short to reuse
    # Every prompt token was either prefilled or taken from the cache; without it, all prefilled.
    assert (
        cached.scheduler.timings.prefilled_tokens + cached.cache.stats.reused_tokens
        == plain.scheduler.timings.prefilled_tokens
    )
    assert plain.cache.stats.reused_tokens == 0


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
    assert len(cached.cache.retained()) == 1  # the three choices ended with one prompt: kept once

    # A request cancelled while generating keeps its prompt's chunks; the same prompt again reuses them.
    history += [{"role": "assistant", "content": expected[0].text}, {"role": "user", "content": question(TOPICS[1], 2)}]
    prompt = cached.prompt(history)
    cached.run(prompt, max_tokens=200, cancel_after=5, temperature=0.0)
    reused_before = cached.cache.stats.reused_tokens
    assert cached.run(prompt, max_tokens=24, temperature=0.0) == plain.run(prompt, max_tokens=24, temperature=0.0)
    assert cached.cache.stats.reused_tokens - reused_before == (len(prompt) - 1) // 64 * 64

    # n = 2 cancelled right after its first token, then run in full: the same choices as without the cache.
    cached.run(prompt, n=2, max_tokens=200, cancel_after=1, **seeded)
    assert cached.run(prompt, n=2, **seeded) == plain.run(prompt, n=2, **seeded)


def test_idle_prefill_lets_the_next_turn_reuse_the_answer(engine_pair):
    cached, plain = engine_pair(idle_prefill=True)
    assert cached.model.rows_independent
    messages: list[dict] = []
    previous: list[int] | None = None
    for turn in range(3):
        messages.append({"role": "user", "content": question(TOPICS[2], turn)})
        prompt = cached.prompt(messages)
        expected = plain.run(prompt, max_tokens=96, temperature=0.0)
        reused_before = cached.cache.stats.reused_tokens
        assert cached.run(prompt, max_tokens=96, temperature=0.0) == expected, f"turn {turn + 1} differs"
        reused = cached.cache.stats.reused_tokens - reused_before
        if previous is not None:
            # Past the previous prompt: at least one idle piece (>= 64 rows) of the answer it resends.
            assert reused >= common_prefix(previous, prompt) + 64, f"turn {turn + 1}"
            assert reused <= len(prompt) - 64  # what it prefills is still a piece of >= 64 rows
        cached.wait_idle_prefill()
        previous = prompt
        messages.append({"role": "assistant", "content": expected[0].text})
    assert cached.scheduler.idle_prefill.stats.prefilled_tokens >= 2 * 64
    assert cached.scheduler.idle_prefill.stats.interrupted == 0
    # Idle prefill is counted apart: every prompt token was still prefilled once or reused.
    assert (
        cached.scheduler.timings.prefilled_tokens + cached.cache.stats.reused_tokens
        == plain.scheduler.timings.prefilled_tokens
    )


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


def test_a_request_stops_idle_prefill_which_resumes_once_idle_again(engine_pair, caplog):
    cached, plain = engine_pair(idle_prefill=True)
    first = [{"role": "user", "content": question(TOPICS[3], 0)}]
    prompt = cached.prompt(first)
    answer = plain.run(prompt, max_tokens=200, temperature=0.0)
    other = cached.prompt([{"role": "user", "content": question(TOPICS[0], 0)}])
    other_expected = plain.run(other, max_tokens=8, temperature=0.0)
    assert cached.run(prompt, max_tokens=200, temperature=0.0) == answer
    deadline = time.monotonic() + 60
    while not cached.scheduler.idle_prefill.running:  # a piece of ~200 rows stays in llama_decode a while
        assert time.monotonic() < deadline, "idle prefill did not start"
        time.sleep(0.001)
    # Another conversation comes meanwhile: it stops the piece (and takes another slot).
    assert cached.run(other, max_tokens=8, temperature=0.0) == other_expected
    assert cached.scheduler.idle_prefill.stats.interrupted == 1
    # llama.cpp reports a stopped decode at ERROR level; a stop on purpose is no error of the server.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    cached.wait_idle_prefill()  # idle again: the stopped piece is done after all
    follow = [
        *first,
        {"role": "assistant", "content": answer[0].text},
        {"role": "user", "content": question(TOPICS[3], 1)},
    ]
    prompt_2 = cached.prompt(follow)
    reused_before = cached.cache.stats.reused_tokens
    assert cached.run(prompt_2, max_tokens=24, temperature=0.0) == plain.run(prompt_2, max_tokens=24, temperature=0.0)
    assert cached.cache.stats.reused_tokens - reused_before >= common_prefix(prompt, prompt_2) + 64


def test_a_request_on_its_way_stops_idle_prefill_and_none_starts_until_it_is_queued(engine_pair):
    cached, plain = engine_pair(idle_prefill=True)
    prompt = cached.prompt([{"role": "user", "content": question(TOPICS[2], 0)}])
    answer = plain.run(prompt, max_tokens=200, temperature=0.0)
    assert cached.run(prompt, max_tokens=200, temperature=0.0) == answer  # then its answer is prefilled while idle
    idle = cached.scheduler.idle_prefill
    deadline = time.monotonic() + 60
    while not idle.running:
        assert time.monotonic() < deadline, "idle prefill did not start"
        time.sleep(0.001)
    # The servicer holds arriving() while it checks and tokenizes a request, before submit().
    with cached.scheduler.arriving():
        while idle.running:
            assert time.monotonic() < deadline, "the piece was not stopped"
            time.sleep(0.001)
        assert idle.stats.interrupted == 1
        # Left alone, the scheduler would start the piece again at once; a piece stays in
        # llama_decode far longer than this.
        time.sleep(0.3)
        assert not idle.running and idle.pending()
    cached.wait_idle_prefill()  # once nothing is on its way, the piece is done after all
    assert idle.stats.interrupted == 1


def test_prefix_cache_flag_defaults_on():
    parser = build_parser()
    assert parser.parse_args(["grpc"]).prefix_cache is True
    assert parser.parse_args(["grpc", "--no-prefix-cache"]).prefix_cache is False
    assert parser.parse_args(["serve", "--prefix-cache"]).prefix_cache is True
    assert parser.parse_args(["grpc"]).idle_prefill is True
    assert parser.parse_args(["grpc", "--no-idle-prefill"]).idle_prefill is False
    assert parser.parse_args(["grpc"]).flash_attention is True
    assert parser.parse_args(["serve", "--no-flash-attn"]).flash_attention is False
