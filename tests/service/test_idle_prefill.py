"""Idle prefill on the real engine, with `--fast-nondeterministic` kernels: the only ones under which
it has work (with the default kernels a slot offers its answer's KV as decoded; test_prefix_cache.py).

llama.cpp picks its kernels once per process, so each test runs in a process of its own, on two
engines over the embedded model: one with the cache and idle prefill, one without either. Output
must be the same on both, bit for bit. Speculation is off on both: with these kernels a row
checked as a guess may get other logits than in a step of its own (docs/engine.md, "Speculative
decoding"), and these tests are about idle prefill.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import time
from collections.abc import Callable

from tests.service.prefix_engines import TOPICS, Engine, common_prefix, question


def in_fast_process(body: Callable[[Engine, Engine], None]) -> None:
    """Runs `body(cached, plain)` in a fresh process whose engines use the fast kernels; its
    assertion errors come back here."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        pool.submit(_with_engines, body).result(timeout=600)


def _with_engines(body: Callable[[Engine, Engine], None]) -> None:
    settings = {"deterministic": False, "speculative_tokens": 0}
    cached = Engine(prefix_cache=True, idle_prefill=True, **settings)
    plain = Engine(prefix_cache=False, **settings)
    try:
        body(cached, plain)
    finally:
        cached.close()
        plain.close()


def test_idle_prefill_lets_the_next_turn_reuse_the_answer():
    in_fast_process(_next_turn_reuses_the_answer)


def _next_turn_reuses_the_answer(cached: Engine, plain: Engine) -> None:
    assert not cached.model.rows_independent and not cached.cache.offers_output
    assert cached.scheduler.idle_prefill.enabled
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


def test_a_request_stops_idle_prefill_which_resumes_once_idle_again():
    in_fast_process(_a_request_stops_idle_prefill)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _a_request_stops_idle_prefill(cached: Engine, plain: Engine) -> None:
    records = _Records()
    logging.getLogger().addHandler(records)
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
    assert not [r.getMessage() for r in records.records if r.levelno >= logging.ERROR]
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


def test_a_request_on_its_way_stops_idle_prefill_and_none_starts_until_it_is_queued():
    in_fast_process(_a_request_on_its_way_stops_idle_prefill)


def _a_request_on_its_way_stops_idle_prefill(cached: Engine, plain: Engine) -> None:
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
