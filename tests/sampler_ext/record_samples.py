"""Records what the sampler chooses for fixed seeds and logits, so that any later change can be held
to it: ``test_recorded.py`` replays these cases and demands the same tokens.

The recordings in ``data/recorded_samples.json`` were made at commit 6048ae0, by a sampler that
summed everything in float64, one token at a time. Rerun only to add cases, never to paper over a
change:

    .venv/bin/python tests/sampler_ext/record_samples.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from one_sequence import OneSequence

OUTPUT = Path(__file__).parent / "data" / "recorded_samples.json"

PARAMS = [
    dict(temperature=0.0),
    dict(temperature=0.0, top_logprobs=5, frequency_penalty=0.7, presence_penalty=0.4, bias=30),
    dict(temperature=1.0),
    dict(temperature=1.0, top_logprobs=20),
    dict(temperature=0.8, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.5, bias=300),
    dict(temperature=0.7, top_p=0.95, top_logprobs=3, bias=20),
    dict(temperature=1.3, top_p=0.5, frequency_penalty=-0.5, presence_penalty=1.0),
    dict(temperature=2.0, top_p=0.05),
    dict(temperature=2.0, frequency_penalty=2.0, presence_penalty=-2.0, bias=100),
    dict(temperature=0.05, top_p=1.0, bias=10),
    dict(temperature=1e-6),
]
VOCAB_SIZES = [1, 2, 3, 50, 1000, 32_000, 262_144]


def logits_for(vocab_size: int, case: int, step: int, shape: str) -> np.ndarray:
    rng = np.random.default_rng([vocab_size, case, step])
    if shape == "normal":
        return (rng.standard_normal(vocab_size) * 3.0).astype(np.float32)
    # Peaked, like a language model: a long flat tail and a few tokens far above it.
    logits = rng.standard_normal(vocab_size) * 2.0 - 5.0
    spikes = rng.choice(vocab_size, size=min(8, vocab_size), replace=False)
    logits[spikes] += rng.uniform(8, 20, size=len(spikes))
    return logits.astype(np.float32)


def bias_for(vocab_size: int, case: int, n: int) -> dict[int, float]:
    rng = np.random.default_rng([vocab_size, case, 99])
    tokens = rng.choice(vocab_size, size=min(n, vocab_size), replace=False)
    return {int(t): float(rng.uniform(-100, 100) if i % 3 == 0 else rng.uniform(-5, 5)) for i, t in enumerate(tokens)}


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def cases():
    case = 0
    for vocab_size in VOCAB_SIZES:
        for params in PARAMS:
            for shape in ("normal", "peaked"):
                case += 1
                steps = 4 if vocab_size >= 100_000 else 12 if vocab_size >= 10_000 else 40
                yield case, vocab_size, dict(params), shape, steps


def run_case(case: int, vocab_size: int, params: dict, shape: str, steps: int) -> dict:
    n_bias = params.pop("bias", 0)
    record = dict(case=case, vocab_size=vocab_size, params=params, bias=n_bias, shape=shape, seed=case * 7919 + 1)
    return record | replay(record, steps)


def replay(record: dict, steps: int) -> dict:
    """What the sampler chooses for a recorded case: its tokens, logprobs, top ids and the digests
    of the logits it was given, step by step."""
    vocab_size, case = record["vocab_size"], record["case"]
    logit_bias = bias_for(vocab_size, case, record["bias"])
    sampler = OneSequence(vocab_size, seed=record["seed"], logit_bias=logit_bias, **record["params"])
    tokens, logprobs, tops, digests = [], [], [], []
    for step in range(steps):
        # The same logits every third step, so the penalties decide.
        logits = logits_for(vocab_size, case, step - step % 3, record["shape"])
        token, logprob, top = sampler.sample(logits)
        tokens.append(token)
        logprobs.append(logprob)
        tops.append([t for t, _ in top])
        digests.append(digest(logits))
    return dict(steps=steps, tokens=tokens, logprobs=logprobs, top_ids=tops, logits_sha256=digests)


def main() -> None:
    records = [run_case(*c) for c in cases()]
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(json.dumps(records, separators=(",", ":")) + "\n")
    print(f"{len(records)} cases, {sum(r['steps'] for r in records)} tokens -> {OUTPUT}")


if __name__ == "__main__":
    main()
