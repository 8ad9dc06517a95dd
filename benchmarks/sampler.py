"""Sampler benchmark: chatrpc's BatchSampler, the numpy reference and llama.cpp's sampler chain, side
by side in one process, on the same logits and parameters.

    .venv/bin/python benchmarks/sampler.py [--quick]

Logits: at V = 262,144 the real ones of the default model (Gemma 3), captured by
``benchmarks/capture_logits.py`` into ``benchmarks/data/`` (captured on first run if missing);
at V = 32,000 and 128,256 synthetic rows drawn from the values of those real rows, so that they
have the same shape (a few tokens far above a long tail).

Cases, each the median time per token:
  greedy             temperature 0
  greedy+top20       temperature 0, top 20 logprobs
  full               bias on 300 tokens, frequency and presence penalties 0.5 over 500 generated
                     tokens, temperature 0.8, top_p 0.9, seeded draw
  full+top20         the same and top 20 logprobs
  batch8             eight rows of "full" in one call (time per row)
llama.cpp's chain is logit_bias -> penalties -> top_p -> temp -> dist (greedy for temperature 0),
with the token data array filled from the logits each time as ``llama_sampler_sample`` does; it
computes no logprobs, so its "+top20" cases are the same as without.

Also measured: the cost of a token mask (30 % and 1 % of tokens allowed) on one row, and one decode
step of the default model for one sequence, to put the sampler's share of a step in numbers.
Results, with the machine and the commit they were measured on, are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

from sampler_ext import BatchSampler

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests" / "sampler_ext"))
from llama_cpp_amx import avoid_amx_extra_buffers  # noqa: E402 - benchmarks/, the script's own folder
from reference import ReferenceSampler  # noqa: E402

REAL_LOGITS = HERE / "data" / "gemma3_logits.npy"
VOCAB_SIZES = [32_000, 128_256, 262_144]
N_BIAS, N_HISTORY = 300, 500
CASES = ["greedy", "greedy+top20", "full", "full+top20", "batch8"]


def load_logits(vocab_size: int, rows: int = 16) -> np.ndarray:
    if not REAL_LOGITS.exists():
        subprocess.run([sys.executable, str(HERE / "capture_logits.py")], check=True)
    real = np.load(REAL_LOGITS)
    if vocab_size == real.shape[1]:
        return np.ascontiguousarray(real[:rows])
    rng = np.random.default_rng(vocab_size)
    return np.stack([rng.choice(real[i % len(real)], vocab_size) for i in range(rows)]).astype(np.float32)


def params_for(case: str, vocab_size: int) -> dict:
    if case.startswith("greedy"):
        params: dict = dict(temperature=0.0)
    else:
        rng = np.random.default_rng(1)
        bias = {int(t): float(rng.uniform(-5, 5)) for t in rng.choice(vocab_size, N_BIAS, replace=False)}
        params = dict(temperature=0.8, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.5, logit_bias=bias)
    if case.endswith("top20"):
        params["top_logprobs"] = 20
    return params


def history(vocab_size: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(2).choice(vocab_size, N_HISTORY)]


def median_seconds(step, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- (a) chatrpc -----------------------------------------------------------------------------


def time_chatrpc(logits: np.ndarray, case: str, repeats: int, masks: np.ndarray | None = None) -> float:
    """Median seconds per row."""
    vocab_size = logits.shape[1]
    rows = 8 if case == "batch8" else 1
    params = params_for("full" if case == "batch8" else case, vocab_size)
    sampler = BatchSampler(vocab_size)
    keys = np.arange(rows, dtype=np.int64)
    for key in keys:
        sampler.add(int(key), seed=int(key), logprobs="top_logprobs" in params, **params)
        for token in history(vocab_size):
            sampler.record(int(key), token)
    batches = [np.ascontiguousarray(np.roll(logits, -i, axis=0)[:rows]) for i in range(len(logits))]
    mask_rows = None if masks is None else np.ascontiguousarray(masks[:rows])
    return median_seconds(lambda i: sampler.sample(batches[i % len(batches)], keys, mask_rows), repeats) / rows


# --- (b) the numpy reference -----------------------------------------------------------------


def time_reference(logits: np.ndarray, case: str, repeats: int) -> float:
    vocab_size = logits.shape[1]
    params = params_for("full" if case == "batch8" else case, vocab_size)
    sampler = ReferenceSampler(vocab_size, seed=0, **params)
    for token in history(vocab_size):
        sampler.counts[token] += 1
    return median_seconds(lambda i: sampler.sample(logits[i % len(logits)]), repeats)


# --- (c) llama.cpp's sampler chain -----------------------------------------------------------

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class LlamaChain:
    def __init__(self, vocab_size: int, case: str) -> None:
        params = params_for("full" if case == "batch8" else case, vocab_size)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if params["temperature"] == 0.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            bias = params["logit_bias"]
            array = (llama_cpp.llama_logit_bias * len(bias))(
                *[llama_cpp.llama_logit_bias(t, b) for t, b in bias.items()]
            )
            self._bias = array
            for sampler in (
                llama_cpp.llama_sampler_init_logit_bias(vocab_size, len(bias), array),
                llama_cpp.llama_sampler_init_penalties(
                    vocab_size, 1024, 1.0, params["frequency_penalty"], params["presence_penalty"]
                ),
                llama_cpp.llama_sampler_init_top_p(params["top_p"], 1),
                llama_cpp.llama_sampler_init_temp(params["temperature"]),
                llama_cpp.llama_sampler_init_dist(1234),
            ):
                llama_cpp.llama_sampler_chain_add(chain, sampler)
            for token in history(vocab_size):
                llama_cpp.llama_sampler_accept(chain, token)
        self.chain = chain
        self.data = np.zeros(vocab_size, dtype=TOKEN_DATA)
        self.ids = np.arange(vocab_size, dtype=np.int32)
        self.array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self.data.ctypes.data, llama_cpp.llama_token_data_p),
            size=vocab_size,
            selected=-1,
            sorted=False,
        )

    def sample(self, logits: np.ndarray) -> int:
        # What llama_sampler_sample does before applying the chain.
        self.data["id"] = self.ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.array.size, self.array.selected, self.array.sorted = len(logits), -1, False
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(self.array))
        token = int(self.data["id"][self.array.selected])
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.chain)


def time_llama(logits: np.ndarray, case: str, repeats: int) -> float:
    chain = LlamaChain(logits.shape[1], case)
    try:
        return median_seconds(lambda i: chain.sample(logits[i % len(logits)]), repeats)
    finally:
        chain.close()


# --- masks and a decode step -----------------------------------------------------------------


def random_mask(vocab_size: int, rows: int, allowed: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.random((rows, vocab_size)) < allowed
    padded = np.zeros((rows, ((vocab_size + 31) // 32) * 32), dtype=bool)
    padded[:, :vocab_size] = bits
    # Bit j % 32 of word j // 32 set = token j allowed.
    words = (padded.reshape(rows, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=-1)
    return words.astype(np.uint32)


def decode_step_seconds(repeats: int = 20) -> float:
    from service.models import embedded_model_path

    avoid_amx_extra_buffers()
    llm = llama_cpp.Llama(str(embedded_model_path()), n_ctx=1024, logits_all=False, verbose=False)
    tokens = llm.tokenize(b"Write a short story about a lighthouse keeper.", add_bos=True)
    llm.eval(tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.eval([tokens[-1]])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- report ----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.1 else f"{seconds * 1e3:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="chatrpc sampler vs numpy reference vs llama.cpp chain")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    ours_n, ref_n, llama_n = (30, 2, 5) if args.quick else (300, 7, 40)

    print(
        f"# {platform.processor() or platform.machine()}, {platform.python_version()}, numpy {np.__version__}, "
        f"llama-cpp-python {llama_cpp.__version__}\n"
    )
    print("| V | case | chatrpc ms | numpy reference ms | llama.cpp chain ms | vs reference | vs llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|")
    results = {}
    floors = {}
    for vocab_size in VOCAB_SIZES:
        logits = load_logits(vocab_size)
        # The floor: one read of each row, as numpy's max does it, over the same rows in turn.
        floors[vocab_size] = median_seconds(lambda i, rows=logits: rows[i % len(rows)].max(), ours_n)
        for case in CASES:
            ours = time_chatrpc(logits, case, ours_n)
            reference = time_reference(logits, case, ref_n)
            llama = time_llama(logits, case, llama_n)
            results[vocab_size, case] = ours
            print(
                f"| {vocab_size:,} | {case} | {ms(ours)} | {ms(reference)} | {ms(llama)} | "
                f"{reference / ours:.0f}x | {llama / ours:.1f}x |",
                flush=True,
            )

    print(
        "\nOne read of a row (numpy max over the same rows), the floor for greedy: "
        + ", ".join(f"V = {v:,}: {ms(t)} ms" for v, t in floors.items())
        + "."
    )

    vocab_size = VOCAB_SIZES[-1]
    logits = load_logits(vocab_size)
    print("\nMask cost, V = 262,144, one row (median ms per token):\n")
    print("| case | no mask | 30 % allowed | 1 % allowed |")
    print("|---|---:|---:|---:|")
    for case in ("greedy", "full"):
        row = [time_chatrpc(logits, case, ours_n)]
        for allowed in (0.3, 0.01):
            masks = random_mask(vocab_size, len(logits), allowed, seed=5)
            row.append(time_chatrpc(logits, case, ours_n, masks))
        print(f"| {case} | " + " | ".join(ms(t) for t in row) + " |")

    step = decode_step_seconds()
    print(
        f"\nOne decode step of the default model, one sequence: {ms(step)} ms (median). Sampling share: "
        f"greedy {100 * results[vocab_size, 'greedy'] / step:.2f} %, "
        f"full {100 * results[vocab_size, 'full'] / step:.2f} %, "
        f"full+top20 {100 * results[vocab_size, 'full+top20'] / step:.2f} %."
    )


if __name__ == "__main__":
    main()
