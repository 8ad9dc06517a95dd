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
from sampler_ext import SequenceSampler

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
