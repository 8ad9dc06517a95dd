"""Saves real next-token logits of the default model (Gemma 3, V = 262,144) for the sampler benchmark.

Runs a chat prompt through llama.cpp and keeps the logits of each of the next ``--steps`` decode
steps (greedy continuation) as one float32 array ``(steps, vocab)`` in ``benchmarks/data/``, which
git ignores (16 steps are 16 MiB).

    .venv/bin/python benchmarks/capture_logits.py [--steps 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp_amx import avoid_amx_extra_buffers

from service.models import embedded_model_path

OUTPUT = Path(__file__).parent / "data" / "gemma3_logits.npy"
PROMPT = (
    "<start_of_turn>user\nWrite a short story about a lighthouse keeper who finds a message "
    "in a bottle.<end_of_turn>\n<start_of_turn>model\n"
)


def capture(steps: int) -> np.ndarray:
    avoid_amx_extra_buffers()
    llm = llama_cpp.Llama(str(embedded_model_path()), n_ctx=1024, logits_all=False, verbose=False)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    llm.eval(tokens)
    rows = []
    for _ in range(steps):
        # With logits_all=False llama.cpp keeps only the last position's logits.
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()
        rows.append(logits)
        llm.eval([int(np.argmax(logits))])
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    logits = capture(args.steps)
    OUTPUT.parent.mkdir(exist_ok=True)
    np.save(OUTPUT, logits)
    print(f"saved {logits.shape} float32 logits to {OUTPUT}")


if __name__ == "__main__":
    main()
