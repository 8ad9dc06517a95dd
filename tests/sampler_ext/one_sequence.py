"""One sequence in a BatchSampler of its own, sampled one row at a time, as the reference sampler
in ``reference.py`` samples it; and how closely a logprob from it matches an exact float64 one.
"""

from __future__ import annotations

import numpy as np

from sampler_ext import BatchSampler

# BatchSampler reports logprobs in float32 (2**-24 relative rounding) and sums their normaliser with
# a fast float32 pass that its documentation puts within about 1e-6 of the exact value: how far a
# logprob may be from the reference's float64 one.
LOGPROB_RTOL = 2.0**-24
LOGPROB_ATOL = 1e-6


def assert_logprobs_close(got, expected) -> None:
    np.testing.assert_allclose(got, expected, rtol=LOGPROB_RTOL, atol=LOGPROB_ATOL)


class OneSequence:
    """``BatchSampler(vocab_size)`` with one sequence (key 0) that reports logprobs."""

    KEY = 0

    def __init__(self, vocab_size: int, **params) -> None:
        self.batch = BatchSampler(vocab_size)
        self.batch.add(self.KEY, logprobs=True, **params)

    def sample(self, logits: np.ndarray) -> tuple[int, float, list[tuple[int, float]]]:
        """``(token, logprob, [(token, logprob), ...])`` for one row of logits, as the reference."""
        drawn = self.batch.sample(logits[None], [self.KEY])
        top = [(int(t), float(lp)) for t, lp in zip(drawn.top_ids[0], drawn.top_logprobs[0], strict=True) if t >= 0]
        return int(drawn.tokens[0]), float(drawn.logprobs[0]), top

    def record(self, token: int) -> None:
        self.batch.record(self.KEY, token)

    @property
    def generated(self) -> int:
        return self.batch.generated(self.KEY)
