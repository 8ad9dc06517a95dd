"""Same seed, same logits, same tokens: the sampler replays ``data/recorded_samples.json``, made by
``record_samples.py`` at commit 6048ae0, for every vocabulary size recorded (1 to 262,144).

Tokens and top-logprob ids must agree exactly; logprobs to within float32 rounding and the fast
normaliser's error (``one_sequence.py``), as the recording holds float64 logprobs summed exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from one_sequence import assert_logprobs_close
from record_samples import replay

RECORDS = json.loads((Path(__file__).parent / "data" / "recorded_samples.json").read_text())


def _id(record: dict) -> str:
    return f"{record['case']}-V{record['vocab_size']}-{record['shape']}"


@pytest.mark.parametrize("record", RECORDS, ids=_id)
def test_batch_sampler_replays_the_recording(record: dict) -> None:
    got = replay(record, record["steps"])
    assert got["logits_sha256"] == record["logits_sha256"], "numpy's random stream changed"
    assert got["tokens"] == record["tokens"]
    assert got["top_ids"] == record["top_ids"]
    assert_logprobs_close(got["logprobs"], record["logprobs"])
