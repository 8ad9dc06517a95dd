"""Does a sequence's next-token distribution depend on how many others share its decode step, and
what does chatrpc's `--deterministic` cost?

    .venv/bin/python benchmarks/determinism.py [--threads 2] [--context 300] [--repeats 15] [--rounds 3]

`--deterministic` pins llama.cpp's tiled K-quant matmul off (GGML_CPU_TILED_MM=0: it takes batches of
8 rows or more) and leaves flash attention off (its kernel takes a split-KV path for one sequence
alone with more than 256 tokens of context). llama.cpp reads the kernel switch once per process, so
each setting runs in a worker process of its own (`LoadedModel(deterministic=...)`), the two
alternated over `--rounds`.

Part 1, for each setting: 16 sequences each get their own prompt (prefilled alone), then one decode
step runs with k = 1..16 of them in the batch, the step is undone (`llama_memory_seq_rm`), and every
row's logits are compared with those of the same sequence decoded alone; the table shows the largest
difference over the k rows, for short prompts (< 100 tokens) and long ones (300-450 tokens).
Part 2: the median time of a decode step of k = 1, 4, 8, 16 rows at a context of `--context` tokens,
and of a 256-token prompt chunk; the table shows medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import llama_cpp
import numpy as np

from service.engine.batch import TokenBatch
from service.engine.model import LoadedModel
from service.models import embedded_model_path

SLOTS = 16
STEP_ROWS = (1, 4, 8, 16)


def decode(ctx, batch: TokenBatch) -> float:
    start = time.perf_counter()
    if llama_cpp.llama_decode(ctx, batch.finish()) != 0:
        raise RuntimeError("llama_decode failed")
    return time.perf_counter() - start


def prefill(ctx, batch: TokenBatch, prompts: list[list[int]], chunk: int = 256) -> list[float]:
    """Each prompt alone, in chunks; returns the times of the whole chunks."""
    times = []
    for seq, tokens in enumerate(prompts):
        for start in range(0, len(tokens), chunk):
            part = tokens[start : start + chunk]
            batch.clear()
            batch.add(seq, part, start, output_last=True)
            elapsed = decode(ctx, batch)
            if len(part) == chunk:
                times.append(elapsed)
    return times


def step(ctx, batch: TokenBatch, prompts: list[list[int]], next_tokens: list[int], rows: list[int], vocab: int):
    """One decode step of the given sequences, undone afterwards; (seconds, their logits)."""
    batch.clear()
    for seq in rows:
        batch.add(seq, [next_tokens[seq]], len(prompts[seq]), output_last=True)
    elapsed = decode(ctx, batch)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(rows), vocab)).copy()
    memory = llama_cpp.llama_get_memory(ctx)
    for seq in rows:
        llama_cpp.llama_memory_seq_rm(memory, seq, len(prompts[seq]), -1)
    return elapsed, logits


def worker(deterministic: bool, args: argparse.Namespace) -> dict:
    per_sequence = max(1024, args.context + 64)
    model = LoadedModel(
        "determinism",
        embedded_model_path(),
        context_per_sequence=per_sequence,
        max_sequences=SLOTS,
        threads=args.threads,
        deterministic=deterministic,
    )
    ctx, memory, vocab = model.context, model.memory, model.vocab_size
    batch = TokenBatch(512)
    result: dict = {"deltas": {}, "times": {}}

    for length, repeat in (("short", 1), ("long", 40)):
        prompts = [
            model.tokenize(
                f"Story number {i}: once upon a time there was a" + " very" * (3 * i + repeat * 7),
                add_special=True,
                parse_special=False,
            )
            for i in range(SLOTS)
        ]
        firsts = [int(p[-1]) for p in prompts]  # any next token will do: the same one in every run
        prefill(ctx, batch, prompts)
        alone = np.stack([step(ctx, batch, prompts, firsts, [seq], vocab)[1][0] for seq in range(SLOTS)])
        result["deltas"][length] = [
            float(np.abs(step(ctx, batch, prompts, firsts, list(range(k)), vocab)[1] - alone[:k]).max())
            for k in range(1, SLOTS + 1)
        ]
        llama_cpp.llama_memory_clear(memory, True)

    long_prompts = [[(7 + i * 13 + j * 31) % 200_000 + 100 for j in range(args.context)] for i in range(SLOTS)]
    result["times"]["chunk"] = statistics.median(prefill(ctx, batch, long_prompts))
    times: dict[int, list[float]] = {k: [] for k in STEP_ROWS}
    for _ in range(args.repeats):
        for k in STEP_ROWS:
            times[k].append(step(ctx, batch, long_prompts, [5] * SLOTS, list(range(k)), vocab)[0])
    result["times"].update({str(k): statistics.median(v) for k, v in times.items()})
    model.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=300, help="prompt tokens per sequence in part 2")
    parser.add_argument("--repeats", type=int, default=15, help="decode steps timed per row count and round")
    parser.add_argument("--rounds", type=int, default=3, help="worker processes per setting, alternated")
    parser.add_argument("--worker", choices=("deterministic", "fast"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "deterministic", args)))
        return

    runs: dict[str, list[dict]] = {"deterministic": [], "fast": []}
    for _ in range(args.rounds):
        for setting in runs:
            command = [
                sys.executable,
                __file__,
                "--worker",
                setting,
                "--threads",
                str(args.threads),
                "--context",
                str(args.context),
                "--repeats",
                str(args.repeats),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[setting].append(json.loads(output.strip().splitlines()[-1]))

    print("Part 1: max |logit difference|, k rows in one decode step against each row decoded alone\n")
    print("| rows | --deterministic, short prompts | long prompts | --no-deterministic, short | long |")
    print("|---:|---:|---:|---:|---:|")
    first = {setting: results[0]["deltas"] for setting, results in runs.items()}
    for k in range(1, SLOTS + 1):
        cells = [
            f"{first[setting][length][k - 1]:.3g}"
            for setting in ("deterministic", "fast")
            for length in ("short", "long")
        ]
        print(f"| {k} | " + " | ".join(cells) + " |")

    print(f"\nPart 2: median ms over {args.rounds} rounds, context {args.context} tokens, {args.threads} threads\n")
    print("| work | --deterministic | --no-deterministic | ratio |")
    print("|---|---:|---:|---:|")
    for key, label in [("chunk", "prompt chunk of 256 tokens")] + [
        (str(k), f"decode step, {k} rows") for k in STEP_ROWS
    ]:
        det = statistics.median(r["times"][key] for r in runs["deterministic"])
        fast = statistics.median(r["times"][key] for r in runs["fast"])
        print(f"| {label} | {det * 1e3:.1f} | {fast * 1e3:.1f} | {det / fast:.3f} |")


if __name__ == "__main__":
    main()
