"""llama.cpp's OpenMP workers exist while the scheduler decodes and are gone once it is idle; and
each runs on a CPU of its own.

Left alone, libgomp's workers spin a while after every decode, a core taken from the network
stacks that deliver the answer; and a new worker may start on the CPU of the thread it works with
(service/engine/openmp.py). The real engine on the embedded model.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.openmp import WorkerPool
from service.engine.scheduler import Scheduler
from service.models import embedded_model_path
from service.request import Generation, SamplingParams

REPO = Path(__file__).resolve().parents[2]


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


# In a child interpreter: libgomp reads its placement once, when llama.cpp is loaded, and this
# process loaded it long ago. The child decodes twice (a new pool each time) and reports each
# thread's CPUs while it decodes.
BINDING_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, threading, time
    from service.engine.openmp import WorkerPool, bind_decode_threads, usable_cpus

    def cpus(tid):
        status = open(f"/proc/self/task/{tid}/status").read()
        return status.split("Cpus_allowed_list:")[1].split()[0]

    everything = cpus(threading.get_native_id())
    bound = bind_decode_threads(None)
    from service.engine.json_constraints import ConstraintCompiler
    from service.engine.model import LoadedModel
    from service.engine.scheduler import Scheduler
    from service.models import embedded_model_path
    from service.request import Generation, SamplingParams

    model = LoadedModel("test", embedded_model_path(), context_per_sequence=512, max_sequences=2)
    scheduler = Scheduler(model, ConstraintCompiler(model.vocab, model.vocab_size))
    prompt = model.render_prompt([{"role": "user", "content": "Count from one to twenty."}])
    generation = Generation(prompt_tokens=prompt, max_new_tokens=4, stop=[], sampling=SamplingParams(temperature=0.0))
    teams = []

    async def generate():
        async for update in scheduler.submit(generation).updates():
            assert update.error is None, update.error
        # The pool is not released until the scheduler finds nothing left; read it before that.

    async def during():
        seen = {}
        task = asyncio.create_task(generate())
        while not task.done():
            for tid in os.listdir("/proc/self/task"):
                try:
                    seen[tid] = cpus(tid)
                except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
                    pass
            await asyncio.sleep(0)
        await task
        return seen

    for _ in range(2):
        idle = set(os.listdir("/proc/self/task"))
        teams.append(asyncio.run(during()))
        deadline = time.monotonic() + 10
        while set(os.listdir("/proc/self/task")) != idle and time.monotonic() < deadline:
            time.sleep(0.01)  # this pool's workers leave before the next one starts
    later = []
    thread = threading.Thread(target=lambda: later.append(cpus(threading.get_native_id())))
    thread.start()
    thread.join()
    scheduler_cpus = [team[str(scheduler.thread_id)] for team in teams]
    others = [sorted(c for t, c in team.items() if c != everything and t != str(scheduler.thread_id)) for team in teams]
    print(json.dumps(dict(
        libgomp=WorkerPool().active, bound=bound, usable=usable_cpus(), everything=everything,
        main=cpus(threading.get_native_id()), later=later[0], scheduler=scheduler_cpus, workers=others,
    )))
    scheduler.close()
    model.close()
    """
)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no thread affinity here")
def test_each_decode_thread_runs_on_a_cpu_of_its_own_and_the_others_run_anywhere():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: a decode has no workers")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    result = subprocess.run(
        [sys.executable, "-c", BINDING_CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    if not seen["libgomp"]:
        pytest.skip("llama.cpp does not run on libgomp in this build")
    assert seen["bound"]
    # The thread that loaded llama.cpp, and what it starts later, may run on every CPU.
    assert seen["main"] == seen["everything"] and seen["later"] == seen["everything"]
    for scheduler, workers in zip(seen["scheduler"], seen["workers"], strict=True):
        # One CPU each, none shared: the scheduler's thread and its pool's workers, in both pools.
        team = [scheduler, *workers]
        assert len(team) == seen["usable"], team
        assert all(cpus.isdigit() for cpus in team), team
        assert len(set(team)) == len(team), team
