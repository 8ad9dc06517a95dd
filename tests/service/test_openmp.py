"""llama.cpp's OpenMP workers exist while the scheduler decodes and are gone once it is idle.

Left alone, libgomp's workers spin a while after every decode, a core taken from the network
stacks that deliver the answer (service/engine/openmp.py). The real engine on the embedded model.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.openmp import WorkerPool
from service.engine.scheduler import Scheduler
from service.models import embedded_model_path
from service.request import Generation, SamplingParams


def threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


async def generate(scheduler: Scheduler, prompt: list[int], tokens: int, during: list[set[str]]) -> int:
    generation = Generation(
        prompt_tokens=prompt, max_new_tokens=tokens, stop=[], sampling=SamplingParams(temperature=0.0)
    )
    seen = 0
    async for update in scheduler.submit(generation).updates():
        assert update.error is None, update.error
        seen += 1
        during.append(threads())
    return seen


def test_the_workers_are_released_when_the_scheduler_goes_idle():
    if not WorkerPool().active:
        pytest.skip("llama.cpp does not run on libgomp in this build")
    model = LoadedModel("test", embedded_model_path(), context_per_sequence=512, max_sequences=2, threads=2)
    scheduler = Scheduler(model, ConstraintCompiler(model.vocab, model.vocab_size))
    try:
        prompt = model.render_prompt([{"role": "user", "content": "Count from one to twenty."}])
        for _ in range(2):  # the second busy period starts a new pool
            idle = threads()
            during: list[set[str]] = []
            assert asyncio.run(generate(scheduler, prompt, 8, during)) == 8
            # While it decoded, llama.cpp ran on a worker thread beside the scheduler's.
            assert any(seen - idle for seen in during)
            deadline = time.monotonic() + 10
            while threads() != idle and time.monotonic() < deadline:
                time.sleep(0.01)
            assert threads() == idle, "llama.cpp's OpenMP workers outlived the busy period"
    finally:
        scheduler.close()
        model.close()
