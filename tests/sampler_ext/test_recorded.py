"""Same seed, same logits, same tokens: the sampler replays what the first, straightforward sampler
chose (``data/recorded_samples.json``, made by ``record_samples.py`` before any speed work).

Tokens must agree exactly. Logprobs agree to float64 rounding; the top-logprob ids exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from record_samples import bias_for, digest, logits_for

from sampler_ext import BatchSampler, SequenceSampler

RECORDS = json.loads((Path(__file__).parent / "data" / "recorded_samples.json").read_text())


def _id(record: dict) -> str:
    return f"{record['case']}-V{record['vocab_size']}-{record['shape']}"


@pytest.mark.parametrize("record", RECORDS, ids=_id)
def test_sequence_sampler_replays_the_recording(record: dict) -> None:
    vocab_size, case = record["vocab_size"], record["case"]
    sampler = SequenceSampler(
        vocab_size,
        seed=record["seed"],
        logit_bias=bias_for(vocab_size, case, record["bias"]),
        **record["params"],
    )
    for step in range(record["steps"]):
        logits = logits_for(vocab_size, case, step - step % 3, record["shape"])
        assert digest(logits) == record["logits_sha256"][step], "numpy's random stream changed"
        token, logprob, top = sampler.sample(logits)
        assert token == record["tokens"][step], f"step {step}"
        np.testing.assert_allclose(logprob, record["logprobs"][step], rtol=0, atol=1e-9)
        assert [t for t, _ in top] == record["top_ids"][step]


@pytest.mark.parametrize("record", [r for r in RECORDS if r["vocab_size"] >= 1000], ids=_id)
def test_batch_sampler_replays_the_recording(record: dict) -> None:
    vocab_size, case = record["vocab_size"], record["case"]
    batch = BatchSampler(vocab_size)
    params = dict(record["params"], logit_bias=bias_for(vocab_size, case, record["bias"]))
    batch.add(case, seed=record["seed"], logprobs=True, **params)
    for step in range(record["steps"]):
        logits = logits_for(vocab_size, case, step - step % 3, record["shape"])
        tokens, _, top_ids, _ = batch.sample(logits[None], [case])
        assert tokens[0] == record["tokens"][step], f"step {step}"
        assert list(top_ids[0, : len(record["top_ids"][step])]) == record["top_ids"][step]
