"""Does a sequence's next-token distribution depend on how many others share its decode step, and
what does llama.cpp's flash attention (which chatrpc's --deterministic leaves off) change in that and
in speed?

    .venv/bin/python benchmarks/determinism.py [--threads 2] [--context 300] [--repeats 15]

Part 1, with flash attention on and off: 16 sequences each get their own prompt (prefilled alone),
then one decode step runs with k = 1..16 of them in the batch (sequence 0 always among them), the
step is undone (`llama_memory_seq_rm`), and sequence 0's logits are compared with those of k = 1.
Part 2: the median time of a decode step of k = 1, 4, 8, 16 rows at a context of `--context`
tokens, and of a 256-token prompt chunk, flash attention on and off alternated in the same loop
(two contexts on the same weights), so that load from other processes falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp
import numpy as np

from service.engine.batch import TokenBatch
from service.engine.model import LoadedModel
from service.models import embedded_model_path

SLOTS = 16


def context(model: LoadedModel, *, flash: bool, threads: int, per_sequence: int) -> llama_cpp.llama_context_p:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = per_sequence * SLOTS, 512, 512, SLOTS
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified, params.no_perf = False, True
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return llama_cpp.llama_init_from_model(model.model, params)


def decode(ctx, batch: TokenBatch) -> float:  # noqa: ANN001 - a llama_context pointer
    start = time.perf_counter()
    if llama_cpp.llama_decode(ctx, batch.finish()) != 0:
        raise RuntimeError("llama_decode failed")
    return time.perf_counter() - start


def prefill(ctx, batch: TokenBatch, prompts: list[list[int]], chunk: int = 256) -> list[float]:  # noqa: ANN001
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


def step(ctx, batch: TokenBatch, prompts: list[list[int]], next_tokens: list[int], k: int, vocab: int):  # noqa: ANN001, ANN201
    """One decode step of sequences 0..k-1, undone afterwards; (seconds, logits of sequence 0)."""
    batch.clear()
    for seq in range(k):
        batch.add(seq, [next_tokens[seq]], len(prompts[seq]), output_last=True)
    elapsed = decode(ctx, batch)
    first = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 0), shape=(vocab,)).copy()
    memory = llama_cpp.llama_get_memory(ctx)
    for seq in range(k):
        llama_cpp.llama_memory_seq_rm(memory, seq, len(prompts[seq]), -1)
    return elapsed, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=300, help="prompt tokens per sequence in part 2")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    model = LoadedModel("determinism", embedded_model_path(), context_per_sequence=64, max_sequences=1, threads=args.threads)
    vocab = model.vocab_size
    batch = TokenBatch(512)
    per_sequence = max(1024, args.context + 64)
    contexts = {flash: context(model, flash=flash, threads=args.threads, per_sequence=per_sequence) for flash in (True, False)}

    print("Part 1: max |logit difference| of sequence 0, k rows against 1 row\n")
    prompts = [model.tokenize(f"Story number {i}: once upon a time there was a" + " very" * (3 * i), add_special=True, parse_special=False) for i in range(SLOTS)]
    firsts = [int(p[-1]) for p in prompts]  # any next token will do: the same one in every run
    print("| rows | flash attention on | off |")
    print("|---:|---:|---:|")
    deltas = {}
    for flash, ctx in contexts.items():
        prefill(ctx, batch, prompts)
        base = step(ctx, batch, prompts, firsts, 1, vocab)[1]
        deltas[flash] = [float(np.abs(step(ctx, batch, prompts, firsts, k, vocab)[1] - base).max()) for k in range(1, SLOTS + 1)]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    for k in range(1, SLOTS + 1):
        print(f"| {k} | {deltas[True][k - 1]:.4g} | {deltas[False][k - 1]:.4g} |")

    print(f"\nPart 2: median ms, context {args.context} tokens per sequence, {args.threads} threads\n")
    long_prompts = [[(7 + i * 13 + j * 31) % 200_000 + 100 for j in range(args.context)] for i in range(SLOTS)]
    chunk_times = {flash: prefill(ctx, batch, long_prompts) for flash, ctx in contexts.items()}
    times: dict[tuple[int, bool], list[float]] = {}
    for _ in range(args.repeats):
        for k in (1, 4, 8, 16):
            for flash, ctx in contexts.items():
                times.setdefault((k, flash), []).append(step(ctx, batch, long_prompts, [5] * SLOTS, k, vocab)[0])
    print("| work | flash attention on | off | off / on |")
    print("|---|---:|---:|---:|")
    on, off = statistics.median(chunk_times[True]), statistics.median(chunk_times[False])
    print(f"| prompt chunk of 256 tokens | {on * 1e3:.1f} | {off * 1e3:.1f} | {off / on:.3f} |")
    for k in (1, 4, 8, 16):
        on, off = statistics.median(times[k, True]), statistics.median(times[k, False])
        print(f"| decode step, {k} rows | {on * 1e3:.1f} | {off * 1e3:.1f} | {off / on:.3f} |")
    for ctx in contexts.values():
        llama_cpp.llama_free(ctx)
    model.close()


if __name__ == "__main__":
    main()
