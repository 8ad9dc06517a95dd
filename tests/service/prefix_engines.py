"""Engines for the prefix cache's tests (test_prefix_cache.py, test_idle_prefill.py): a model with its
scheduler as service.models builds them, and a chat's questions to run on them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.scheduler import Scheduler
from service.engine_settings import EngineSettings
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
        deterministic: bool = True,
        speculative_tokens: int = EngineSettings.speculative_tokens,
    ) -> None:
        self.model = LoadedModel(
            "test",
            embedded_model_path(),
            context_per_sequence=1024,
            max_sequences=slots,
            flash_attention=flash_attention,
            deterministic=deterministic,
        )
        self.scheduler = Scheduler(
            self.model,
            ConstraintCompiler(self.model.vocab, self.model.vocab_size),
            prefill_chunk=chunk,
            prefix_cache=prefix_cache,
            idle_prefill=idle_prefill,
            speculative_tokens=speculative_tokens,
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
                break
        # The scheduler gives the slots back just after the last update: what they keep is then settled.
        await self._until_idle(asyncio.sleep)
        return [Choice(t, tuple(lp), f) for t, lp, f in zip(texts, logprobs, finish, strict=True)]

    async def _until_idle(self, sleep) -> None:
        """Until every slot is back (a cancelled request leaves at the scheduler's next step; updates
        may still come until then, so the stream's loop stays open)."""
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


def common_prefix(earlier: list[int], later: list[int]) -> int:
    common = 0
    while common < min(len(earlier), len(later)) and earlier[common] == later[common]:
        common += 1
    return common
