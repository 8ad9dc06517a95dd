"""Where an end-to-end generation spends its time: llama_decode vs sampling vs grammar masks vs the rest.

Runs the real engine in-process (the embedded model, the scheduler thread, the Rust BatchSampler)
on a few workloads and reports the scheduler's own timings. Usage:

    .venv/bin/python benchmarks/engine_steps.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from service.engine_settings import EngineSettings
from service.models import DEFAULT_MODEL_ID, ModelRegistry, ModelSpec
from service.request import Generation, SamplingParams

FULL = SamplingParams(
    temperature=0.8,
    top_p=0.9,
    frequency_penalty=0.5,
    presence_penalty=0.5,
    logit_bias={i: (-1.0) ** i * 2.0 for i in range(1000, 1300)},
    seed=1,
)
NEVER_END = {1: -100.0, 106: -100.0, 212: -100.0}


def workloads(tokens: int, constraints):
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 8}}}}
    json_grammar = constraints.from_json_schema(schema, param="bench")
    return {
        "greedy, 1 stream": (1, SamplingParams(temperature=0.0, logit_bias=NEVER_END), None),
        "greedy, 8 streams": (8, SamplingParams(temperature=0.0, logit_bias=NEVER_END), None),
        "full parameters, 1 stream": (
            1,
            SamplingParams(**{**FULL.__dict__, "logit_bias": {**FULL.logit_bias, **NEVER_END}}),
            None,
        ),
        "full parameters + top-20 logprobs, 4 streams": (
            4,
            SamplingParams(
                **{
                    **FULL.__dict__,
                    "logit_bias": {**FULL.logit_bias, **NEVER_END},
                    "logprobs": True,
                    "top_logprobs": 20,
                }
            ),
            None,
        ),
        "json_schema, 1 stream": (1, SamplingParams(temperature=0.8, seed=2), json_grammar),
    }


async def run(
    scheduler, prompt: list[int], streams: int, sampling: SamplingParams, grammar: str | None, tokens: int
) -> None:
    generation = Generation(prompt_tokens=prompt, max_new_tokens=tokens, stop=[], sampling=sampling, grammar=grammar)

    async def one() -> None:
        async for _ in scheduler.submit(generation).updates():
            pass

    await asyncio.gather(*(one() for _ in range(streams)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    registry = ModelRegistry([ModelSpec(DEFAULT_MODEL_ID)], EngineSettings(max_sequences=8, context_per_sequence=1024))
    served = registry.get(DEFAULT_MODEL_ID)
    prompt = served.model.render_prompt([{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    print(
        "| workload | llama_decode ms/call | sampling ms/call | masks ms/call "
        "| sampling + masks share | llama_decode share of the wall | generated tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (streams, sampling, grammar) in workloads(args.tokens, served.constraints).items():
        shares, decode_ms, sample_ms, mask_ms, rates, in_decode = [], [], [], [], [], []
        for _ in range(args.repeats):
            served.scheduler.timings.reset()
            started = time.perf_counter()
            asyncio.run(run(served.scheduler, prompt, streams, sampling, grammar, args.tokens))
            wall = time.perf_counter() - started
            t = served.scheduler.timings
            calls = t.decode_calls  # prefill chunks and decode steps; sampling follows each decode step
            decode_ms.append(1e3 * t.decode_seconds / calls)
            sample_ms.append(1e3 * t.sample_seconds / calls)
            mask_ms.append(1e3 * t.mask_seconds / calls)
            shares.append((t.sample_seconds + t.mask_seconds) / (t.decode_seconds + t.sample_seconds + t.mask_seconds))
            rates.append(t.sampled_rows / wall)
            in_decode.append(t.decode_seconds / wall)
        med = statistics.median
        print(
            f"| {name} | {med(decode_ms):.2f} | {med(sample_ms):.3f} | {med(mask_ms):.3f} "
            f"| {100 * med(shares):.2f} % | {100 * med(in_decode):.1f} % | {med(rates):.1f} |"
        )
    registry.close()


if __name__ == "__main__":
    main()
