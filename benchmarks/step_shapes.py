"""What a decode step costs by its shape: sequences x rows per sequence, on each set of kernels.

    .venv/bin/python benchmarks/step_shapes.py [--repeats 9] [--context 160]

Speculation's gain is bounded by what a guess row costs next to a real one (step_cost.py,
speculation.py), and llama.cpp's server runs the same model on other kernels (repacked weights).
This times bare `llama_decode` steps of the embedded model, every row with logits as checked
guesses need, on chatrpc's context (model.py), each kernel set in a process of its own because
llama.cpp reads its kernel switches once per process:

  chatrpc           the default: deterministic kernels (dot-product matmul, BF16 V cache)
  fast              --fast-nondeterministic (tiled matmul, F16 V)
  fast + repacked   also with llama.cpp's extra buffer types (repacked Q4_K weights), as
                    llama-server loads the model by default (off on CPUs with AMX, which crash)

Each of 16 sequences first holds the same 40-token prompt (or `--context` positions: the prompt and
its tokens again, as a long answer would hold); a shape's rows go after it and are removed again.
Medians over `--repeats` rounds, the shapes interleaved within a round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from llama_cpp_amx import cpu_has_amx  # benchmarks/, the script's own folder

SHAPES = {  # name: rows per sequence (sequence ids 0, 1, ...)
    "1 x 1": [1],
    "1 x 2": [2],
    "1 x 4": [4],
    "4 x 1": [1] * 4,
    "8 x 1": [1] * 8,
    "8 x 2": [2] * 8,
    "8 x 4": [4] * 8,
    "16 x 1": [1] * 16,
    "16 x 2": [2] * 16,
    "16 x 4": [4] * 16,
    "7 x 1 + 1 x 4": [4] + [1] * 7,
}
KERNELS = ("chatrpc", "fast", "fast + repacked")


def measure(kernels: str, repeats: int, context: int) -> dict[str, float]:
    """In this process: the median seconds of each shape's step with these kernels, after `context`
    positions of each sequence (at least its prompt)."""
    import llama_cpp

    from service.engine.batch import Decoder
    from service.engine.model import LoadedModel
    from service.engine.timings import StepTimings
    from service.models import embedded_model_path

    if kernels == "fast + repacked":
        # model.py loads every model without extra buffer types; here they go back on, at the load.
        load = llama_cpp.llama_model_load_from_file

        def load_repacked(path, params):
            params.use_extra_bufts = True
            return load(path, params)

        llama_cpp.llama_model_load_from_file = load_repacked
    model = LoadedModel(
        "bench", embedded_model_path(), context_per_sequence=1024, max_sequences=16, deterministic=kernels == "chatrpc"
    )
    decoder = Decoder(model, StepTimings())
    start = hold_context(model, decoder, 16, context)
    for rows in SHAPES.values():  # warm-up
        time_pass(model, decoder, rows, start)
    times: dict[str, list[float]] = {name: [] for name in SHAPES}
    for _ in range(repeats):
        for name, rows in SHAPES.items():
            times[name].append(time_pass(model, decoder, rows, start))
    return {name: statistics.median(values) for name, values in times.items()}


def hold_context(model, decoder, sequences: int, context: int) -> int:
    """Prefills sequences 0 .. `sequences` - 1 with the same prompt, or `context` positions (the
    prompt and its tokens again, as a long answer would hold); returns where a step's rows go."""
    import llama_cpp  # the caller's process has loaded it with its kernels chosen

    prompt = model.render_prompt([{"role": "user", "content": "Explain how a lighthouse works, with its history."}])
    # Longer contexts repeat the prompt's tokens: what a step costs depends on how many positions
    # its rows attend to, not on which tokens those are.
    held = prompt + (prompt[1:] * (context // len(prompt) + 1))[: max(context - len(prompt), 0)]
    for seq_id in range(sequences):
        llama_cpp.llama_memory_seq_rm(model.memory, seq_id, -1, -1)
        decoder.batch.clear()
        decoder.batch.add(seq_id, held, 0, output_last=True)
        decoder.run()
    return len(held)


def time_pass(model, decoder, rows: list[int], start: int) -> float:
    """Seconds of one `llama_decode` with `rows[i]` rows of sequence i after `start` positions,
    every row with logits (as checked guesses need them); the rows are removed again."""
    import llama_cpp

    decoder.batch.clear()
    for seq_id, count in enumerate(rows):
        decoder.batch.add(seq_id, [236761] * count, start, output_last=True, output_all=True)
    started = time.perf_counter()
    decoder.run()
    elapsed = time.perf_counter() - started
    for seq_id in range(len(rows)):
        llama_cpp.llama_memory_seq_rm(model.memory, seq_id, start, -1)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--context",
        type=int,
        default=0,
        help="positions each sequence holds before a step's rows (default: its 40-token prompt alone)",
    )
    parser.add_argument("--kernels", choices=KERNELS, help=argparse.SUPPRESS)  # one child's share
    args = parser.parse_args()
    if args.kernels:
        print(json.dumps(measure(args.kernels, args.repeats, args.context)))
        return
    # On a CPU with AMX, llama.cpp's AMX buffer type crashes (llama_cpp_amx.py): no repacked run there.
    kernels_here = [k for k in KERNELS if not (k == "fast + repacked" and cpu_has_amx())]
    results = {}
    for kernels in kernels_here:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--kernels",
                kernels,
                "--repeats",
                str(args.repeats),
                "--context",
                str(args.context),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        results[kernels] = json.loads(child.stdout.strip().splitlines()[-1])
    print("| shape (sequences x rows) | rows | " + " | ".join(f"{k} ms" for k in kernels_here) + " |")
    print("|---|---:|" + "---:|" * len(kernels_here))
    for name, rows in SHAPES.items():
        cells = " | ".join(f"{results[k][name] * 1e3:.1f}" for k in kernels_here)
        print(f"| {name} | {sum(rows)} | {cells} |")


if __name__ == "__main__":
    main()
