"""Flash attention on and off in llama.cpp: the time of prompt chunks and decode steps, same process.

What `--flash-attn` / `--no-flash-attn` trade (docs/benchmarks.md, "Flash attention"). Both
contexts are loaded as chatrpc loads them (service/engine/model.py), each with its own KV cache,
and measured in alternation, `--rounds` times, medians:

  cold N              a prompt of N tokens prefilled from position 0 in chunks of 256, as a cold
                      request is (N = 747: turn 6 of benchmarks/serving.py's chat)
  R rows @P           one prompt chunk of R rows after P tokens already in the cache (147 @ 600:
                      what turn 6 prefills when turn 5's answer is not reused: flash attention off, or
                      --fast-nondeterministic back to back)
  decode S x K @L     a decode step of S sequences with K rows each, after L tokens of context
                      (1 x 4: a lone sequence checking 3 speculative guesses; 8 x 1: 8 streams)

The prompt tokens are random ids from the vocabulary; only the shapes matter to the kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import llama_cpp
import numpy as np
from determinism import decode as timed_decode  # benchmarks/, the script's own folder

from service.engine.batch import TokenBatch
from service.engine.model import LoadedModel
from service.models import embedded_model_path

CHUNK = 256
SEQUENCES = 8


class Bench:
    def __init__(self, flash_attention: bool, tokens: np.ndarray) -> None:
        self.model = LoadedModel(
            f"fa-{flash_attention}", embedded_model_path(), max_sequences=SEQUENCES, flash_attention=flash_attention
        )
        self.batch = TokenBatch(self.model.batch_size)
        self.tokens = tokens

    def _decode(self, rows: list[tuple[int, int, int]]) -> float:
        """One llama_decode of runs (sequence, first position, count); its seconds."""
        self.batch.clear()
        for seq, start, count in rows:
            # A decode step's rows all give logits (speculation samples each); a prompt chunk's last only.
            self.batch.add(seq, self.tokens[start : start + count], start, output_last=True, output_all=count < 8)
        return timed_decode(self.model.context, self.batch)

    def _fill(self, seq: int, length: int) -> float:
        llama_cpp.llama_memory_seq_rm(self.model.memory, seq, -1, -1)
        return sum(self._decode([(seq, start, min(CHUNK, length - start))]) for start in range(0, length, CHUNK))

    def cold(self, length: int) -> float:
        return self._fill(0, length)

    def chunk(self, rows: int, after: int) -> float:
        self._fill(0, after)
        return self._decode([(0, after, rows)])

    def decode(self, sequences: int, rows: int, context: int, steps: int = 8) -> float:
        for seq in range(sequences):
            self._fill(seq, context)
        times = []
        for _ in range(steps):
            times.append(self._decode([(seq, context, rows) for seq in range(sequences)]))
            for seq in range(sequences):
                llama_cpp.llama_memory_seq_rm(self.model.memory, seq, context, -1)
        return statistics.median(times)

    def close(self) -> None:
        self.model.close()


CASES = [
    ("cold 747", lambda b: b.cold(747)),
    ("147 rows @0", lambda b: b.chunk(147, 0)),
    ("147 rows @600", lambda b: b.chunk(147, 600)),
    ("64 rows @683", lambda b: b.chunk(64, 683)),
    ("decode 1 x 1 @100", lambda b: b.decode(1, 1, 100)),
    ("decode 1 x 4 @700", lambda b: b.decode(1, 4, 700)),
    ("decode 1 x 4 @1500", lambda b: b.decode(1, 4, 1500)),
    ("decode 8 x 1 @100", lambda b: b.decode(8, 1, 100)),
    ("decode 8 x 1 @700", lambda b: b.decode(8, 1, 700)),
    ("decode 8 x 1 @1500", lambda b: b.decode(8, 1, 1500)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two settings (default: 3)")
    args = parser.parse_args()
    tokens = np.random.default_rng(0).integers(1000, 200_000, size=1600).astype(np.int32)
    benches = {"on": Bench(True, tokens), "off": Bench(False, tokens)}
    results: dict[str, dict[str, list[float]]] = {name: {case: [] for case, _ in CASES} for name in benches}
    for round_index in range(args.rounds):
        for case, run in CASES:
            for name, bench in benches.items():
                results[name][case].append(run(bench))
        print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    for bench in benches.values():
        bench.close()
    print(f"\nmedian ms over {args.rounds} rounds, 2 threads; off / on < 1: faster without flash attention\n")
    print("| work | flash attention on | off | off / on |")
    print("|---|---:|---:|---:|")
    for case, _ in CASES:
        on = statistics.median(results["on"][case]) * 1e3
        off = statistics.median(results["off"][case]) * 1e3
        print(f"| {case} | {on:.1f} | {off:.1f} | {off / on:.2f} |")


if __name__ == "__main__":
    main()
