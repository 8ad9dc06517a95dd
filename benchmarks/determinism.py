"""Does a sequence's next-token distribution depend on how many others share its decode step, on
whether its token is checked as a speculative guess, or on how its prompt was chunked; and what do
chatrpc's deterministic kernels cost against `--fast-nondeterministic`?

    .venv/bin/python benchmarks/determinism.py [--threads 2] [--context 300] [--repeats 15] [--rounds 3]

By default chatrpc pins llama.cpp's tiled K-quant matmul off (GGML_CPU_TILED_MM=0: it takes batches
of 8 rows or more) and caches V as BF16, which keeps flash attention on its per-row path (its
split-KV path serves one sequence decoding alone past 512 cached positions, its tiled path prompt
chunks of 64 rows or more). `--fast-nondeterministic` lets both switch. llama.cpp reads the kernel
switch once per process, so each setting runs in a worker process of its own
(`LoadedModel(deterministic=...)`), the two alternated over `--rounds`.

Part 1, for each setting: 16 sequences each get their own prompt (prefilled alone), then one decode
step runs with k = 1..16 of them in the batch, the step is undone (`llama_memory_seq_rm`), and every
row's logits are compared with those of the same sequence decoded alone; the table shows the largest
difference over the k rows, for short prompts (< 100 tokens) and long ones (520-600 tokens). Two
more rows: a step of 3 rows of one sequence (the last token and two guesses, as speculation checks
them) against the same tokens decoded one step at a time, and the last logits of a prompt prefilled
in chunks of 100, of 37, or with its last 8 tokens decoded one at a time, against chunks of 256.
Part 2: the median time of a decode step of k = 1, 4, 8, 16 rows at a context of `--context`
tokens, and of a 256-token prompt chunk; the table shows medians over rounds.
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


def guessed_rows(ctx, batch: TokenBatch, prompts: list[list[int]], firsts: list[int], vocab: int) -> float:
    """Max |difference| between the rows of a 3-row step of one sequence and the same tokens
    decoded one row per step, over 4 sequences."""
    memory = llama_cpp.llama_get_memory(ctx)
    worst = 0.0
    for seq in range(4):
        tokens, start = [firsts[seq], 1000 + seq, 2000 + seq], len(prompts[seq])
        batch.clear()
        batch.add(seq, tokens, start, output_last=True, output_all=True)
        decode(ctx, batch)
        together = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(3, vocab)).copy()
        llama_cpp.llama_memory_seq_rm(memory, seq, start, -1)
        for offset, token in enumerate(tokens):
            batch.clear()
            batch.add(seq, [token], start + offset, output_last=True)
            decode(ctx, batch)
            alone = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(1, vocab))[0]
            worst = max(worst, float(np.abs(alone - together[offset]).max()))
        llama_cpp.llama_memory_seq_rm(memory, seq, start, -1)
    return worst


def chunkings(ctx, batch: TokenBatch, prompt: list[int], vocab: int) -> float:
    """Max |difference| of a prompt's last logits, prefilled (on the spare last slot) in chunks of
    100, of 37, or with its last 8 tokens decoded one at a time, against chunks of 256."""
    memory, seq, n = llama_cpp.llama_get_memory(ctx), SLOTS - 1, len(prompt)

    def last_logits(sizes: list[int]) -> np.ndarray:
        llama_cpp.llama_memory_seq_rm(memory, seq, 0, -1)
        position = 0
        for size in sizes:
            batch.clear()
            batch.add(seq, prompt[position : position + size], position, output_last=True)
            decode(ctx, batch)
            position += size
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(1, vocab))[0].copy()

    def chunks_of(size: int, length: int) -> list[int]:
        return [size] * (length // size) + ([length % size] if length % size else [])

    whole = last_logits(chunks_of(256, n))
    others = [
        last_logits(chunks_of(100, n)),
        last_logits(chunks_of(37, n)),
        last_logits(chunks_of(256, n - 8) + [1] * 8),
    ]
    llama_cpp.llama_memory_seq_rm(memory, seq, 0, -1)
    return max(float(np.abs(other - whole).max()) for other in others)


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

    for length, repeat in (("short", 1), ("long", 75)):
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
        result["deltas"][f"{length} guesses"] = guessed_rows(ctx, batch, prompts, firsts, vocab)
        result["deltas"][f"{length} chunks"] = chunkings(ctx, batch, prompts[0], vocab)
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

    print("Part 1: max |logit difference| against each row decoded alone in a step of its own\n")
    print("| rows | default, short prompts | default, long | --fast-nondeterministic, short | long |")
    print("|---:|---:|---:|---:|---:|")
    first = {setting: results[0]["deltas"] for setting, results in runs.items()}
    settings, lengths = ("deterministic", "fast"), ("short", "long")
    for k in range(1, SLOTS + 1):
        cells = [f"{first[setting][length][k - 1]:.3g}" for setting in settings for length in lengths]
        print(f"| {k} of 16 sequences | " + " | ".join(cells) + " |")
    for key, label in (("guesses", "3 rows of one sequence"), ("chunks", "prompt chunked otherwise")):
        cells = [f"{first[setting][f'{length} {key}']:.3g}" for setting in settings for length in lengths]
        print(f"| {label} | " + " | ".join(cells) + " |")

    print(f"\nPart 2: median ms over {args.rounds} rounds, context {args.context} tokens, {args.threads} threads\n")
    print("| work | default | --fast-nondeterministic | ratio |")
    print("|---|---:|---:|---:|")
    for key, label in [("chunk", "prompt chunk of 256 tokens")] + [
        (str(k), f"decode step, {k} rows") for k in STEP_ROWS
    ]:
        det = statistics.median(r["times"][key] for r in runs["deterministic"])
        fast = statistics.median(r["times"][key] for r in runs["fast"])
        print(f"| {label} | {det * 1e3:.1f} | {fast * 1e3:.1f} | {det / fast:.3f} |")


if __name__ == "__main__":
    main()
