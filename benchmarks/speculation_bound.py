"""The most that checking prompt-lookup guesses can give on the serving benchmark's workload, at
this machine's step prices: an oracle that knows which guesses hold.

    .venv/bin/python benchmarks/speculation_bound.py [--streams 8] [--repeats 5]

The serving benchmark's level of N streams (serving.py) sends its first N prompts, each asking for
128 greedy tokens with the end tokens banned. This script, in one process with chatrpc's default
kernels:

1. decodes each prompt's answer greedily, one sequence alone (with these kernels the same tokens
   as any batch or speculation gives: docs/engine.md, "Determinism"), timing the prompts' prefill;
2. times bare `llama_decode` passes of R rows, every row with logits as checked guesses need,
   after 40 and after 160 positions per sequence (about where the answers start and end), and
   fits each context's prices as a + b * R for passes of 2 rows or more, a lone row apart;
3. replays the N answers in lockstep, one step at a time. At every step each sequence's guesses
   are the prompt-lookup draft of its history (speculation.lookup_draft, with the server's
   settings), and the oracle knows how many of them hold: it checks only those, and picks the
   step's shape with the most tokens per second among "every sequence checks min(k, held) of its
   guesses", for every k, and "up to three levels k1 > k2 > k3, each sequence at the highest that
   its guesses hold to, or none", for every such levels. A step costs the fitted prices of its
   passes (batch.ubatch_rows: a pass per run of sequences with as many rows), interpolated to the
   step's mean context. Plain decoding is the same replay with no guesses.

It prints tokens per second of plain and of oracle decoding, the prefill measured in step 1 added
to both, and what the oracle gains. No guess is wasted and sampling, the scheduler and the network
are left out: what checking these guesses could give on these kernels, with every step the best
of those shapes.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import llama_cpp
import numpy as np
from serving import END_TOKENS, PROMPTS  # benchmarks/, the script's own folder
from step_shapes import hold_context, time_pass

from service.engine.batch import Decoder, ubatch_rows
from service.engine.model import LoadedModel
from service.engine.speculation import lookup_draft
from service.engine.timings import StepTimings
from service.engine_settings import EngineSettings
from service.models import embedded_model_path

TOKENS = 128
CONTEXTS = (40, 160)
# Rows of the timed passes: one sequence for 1 and 2, then 4 or 8 sequences with the same rows each.
PASS_SHAPES = {1: [1], 2: [2], 4: [1] * 4, 8: [1] * 8, 16: [2] * 8, 24: [3] * 8, 32: [4] * 8, 48: [6] * 8, 64: [8] * 8}


def answers(model: LoadedModel, decoder: Decoder, prompts: list[list[int]]) -> tuple[list[list[int]], float]:
    """Each prompt's greedy answer (sequence 0, alone) and the seconds its prompts took to prefill."""
    prefill = 0.0
    outputs = []
    decoder.batch.clear()
    decoder.batch.add(0, prompts[0], 0, output_last=True)
    decoder.run()  # warm-up: a context's first decode also allocates
    for prompt in prompts:
        llama_cpp.llama_memory_seq_rm(model.memory, 0, -1, -1)
        decoder.batch.clear()
        decoder.batch.add(0, prompt, 0, output_last=True)
        started = time.perf_counter()
        decoder.run()
        prefill += time.perf_counter() - started
        output: list[int] = []
        while True:
            logits = decoder.logits(1)[0].copy()
            logits[list(END_TOKENS)] = -np.inf
            output.append(int(np.argmax(logits)))
            if len(output) == TOKENS:
                break
            decoder.batch.clear()
            decoder.batch.add(0, output[-1:], len(prompt) + len(output) - 1, output_last=True)
            decoder.run()
        outputs.append(output)
    llama_cpp.llama_memory_seq_rm(model.memory, 0, -1, -1)
    return outputs, prefill


def pass_prices(model: LoadedModel, decoder: Decoder, repeats: int) -> dict[int, dict[int, float]]:
    """Median seconds of a pass of R rows (PASS_SHAPES), by context, then by R."""
    prices = {}
    for context in CONTEXTS:
        start = hold_context(model, decoder, 8, context)
        for rows in PASS_SHAPES.values():  # warm-up
            time_pass(model, decoder, rows, start)
        times: dict[int, list[float]] = {total: [] for total in PASS_SHAPES}
        for _ in range(repeats):
            for total, rows in PASS_SHAPES.items():
                times[total].append(time_pass(model, decoder, rows, start))
        prices[context] = {total: statistics.median(values) for total, values in times.items()}
    return prices


class PassPrice:
    """A pass's seconds by its rows and context: a + b * R from 2 rows, a lone row apart, each
    fitted per measured context and interpolated linearly between them (and beyond)."""

    def __init__(self, prices: dict[int, dict[int, float]]) -> None:
        self._fits = {}
        for context, by_rows in prices.items():
            rows = [r for r in by_rows if r >= 2]
            slope, intercept = np.polyfit(rows, [by_rows[r] for r in rows], 1)
            self._fits[context] = (by_rows[1], intercept, slope)

    def __call__(self, rows: int, context: float) -> float:
        (c0, f0), (c1, f1) = sorted(self._fits.items())
        weight = (context - c0) / (c1 - c0)
        lone, intercept, slope = (a + weight * (b - a) for a, b in zip(f0, f1, strict=True))
        return lone if rows == 1 else intercept + slope * rows

    def describe(self) -> list[str]:
        return [
            f"after {context} positions: a lone row {1e3 * lone:.1f} ms; R rows {1e3 * a:.1f} + {1e3 * b:.2f} R ms"
            for context, (lone, a, b) in sorted(self._fits.items())
        ]


def replay(prompts: list[list[int]], outputs: list[list[int]], price: PassPrice, *, guess: bool) -> tuple[float, int]:
    """Seconds of decoding every answer in lockstep (after each prompt's first token), and steps taken."""
    settings = EngineSettings()
    min_n, max_n = settings.speculative_ngram
    count = len(prompts)
    histories = [np.asarray(p + o, dtype=np.int32) for p, o in zip(prompts, outputs, strict=True)]
    done = [1] * count  # tokens of each answer known: the first comes with the prompt's prefill
    seconds, steps = 0.0, 0
    while True:
        # Answer i decodes as sequence id i (consecutive slots, as chatrpc hands them out).
        running = [i for i in range(count) if done[i] < TOKENS]
        if not running:
            return seconds, steps
        held = []
        for i in running:
            known = len(prompts[i]) + done[i]
            room = TOKENS - done[i] - 1  # the step's own token comes first
            draft = lookup_draft(histories[i][:known], min(settings.speculative_tokens, room), min_n, max_n)
            truth = histories[i][known : known + len(draft)]
            matching = np.flatnonzero(draft != truth[: len(draft)])
            held.append(int(matching[0]) if matching.size else len(draft))
        context = statistics.fmean(len(prompts[i]) + done[i] for i in running)
        choices = [[0] * len(running)]
        if guess:
            most = max(held, default=0)
            for k in range(1, most + 1):
                choices.append([min(k, h) for h in held])
            # Up to three levels of guesses, each sequence at the highest its guesses hold to: a
            # step of fewer passes than min(k, held) makes, where sequences hold to different depths.
            for depth in (1, 2, 3):
                for levels in itertools.combinations(range(most, 0, -1), depth):
                    choices.append([next((k for k in levels if k <= h), 0) for h in held])
        costs = [sum(price(rows, context) for rows in ubatch_rows(running, [1 + g for g in c])) for c in choices]
        rates = [(len(running) + sum(c)) / seconds_of for c, seconds_of in zip(choices, costs, strict=True)]
        best = int(np.argmax(rates))
        seconds += costs[best]
        steps += 1
        for i, g in zip(running, choices[best], strict=True):
            done[i] += 1 + g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8, help="the serving level: its first N prompts (default: 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timings of each pass, medians (default: 5)")
    args = parser.parse_args()
    model = LoadedModel("bench", embedded_model_path(), context_per_sequence=1024, max_sequences=8)
    # The answers are decoded one at a time and the passes time 8 sequences at most: 8 slots do.
    decoder = Decoder(model, StepTimings())
    prompts = [
        model.render_prompt([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(args.streams)
    ]
    outputs, prefill = answers(model, decoder, prompts)
    price = PassPrice(pass_prices(model, decoder, args.repeats))
    tokens = args.streams * TOKENS
    plain, plain_steps = replay(prompts, outputs, price, guess=False)
    oracle, oracle_steps = replay(prompts, outputs, price, guess=True)
    print(f"{args.streams} streams x {TOKENS} tokens; prompts' prefill {1e3 * prefill:.0f} ms")
    for line in price.describe():
        print(f"  pass prices {line}")
    print(f"plain:  {plain_steps} steps, {plain:.2f} s; with prefill {tokens / (plain + prefill):.1f} tok/s")
    print(f"oracle: {oracle_steps} steps, {oracle:.2f} s; with prefill {tokens / (oracle + prefill):.1f} tok/s")
    print(f"oracle / plain: {(plain + prefill) / (oracle + prefill):.3f}x")
    model.close()


if __name__ == "__main__":
    main()
