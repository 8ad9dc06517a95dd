"""What a decode step costs, learnt from the steps themselves: the price of a guess row.

llama.cpp runs a step as one or more ubatches, each a pass over the weights (batch.py,
`ubatch_rows`). A pass of several rows is modelled as `per_ubatch + per_row * rows`: the pass's
fixed work, then each row's arithmetic, for this model mostly the output layer, which every
checked guess needs in full. A pass of a single row is priced on its own (`single_row`), because
llama.cpp multiplies one row by another route, cheaper than the first row of a larger pass
(benchmarks/step_shapes.py measures the shapes). How these compare is a property of the machine:
where the fixed work dominates, a guess row is nearly free and guessing pays for many sequences
at once; where arithmetic dominates (few slow cores), a guess row costs almost what a real row
does and pays only at high acceptance (speculation.py). No constant could hold for both, so the
scheduler fits the prices online, by exponentially weighted least squares over the decode steps
it times, with a weak prior that fills in what the steps seen so far cannot separate.
"""

from __future__ import annotations

import numpy as np

# Weight of the past at each new step: about the last two hundred steps count.
_DECAY = 0.995
# Strength of the prior, in squared regressor units: under one step's worth, so the data overrules
# it as soon as steps of different shapes were seen, and it settles what they cannot separate.
_PRIOR_WEIGHT = 1.0


def _features(ubatches: list[int]) -> np.ndarray:
    """Passes of several rows, their rows, and single-row passes."""
    several = [rows for rows in ubatches if rows > 1]
    return np.array([len(several), sum(several), len(ubatches) - len(several)], dtype=np.float64)


class StepCost:
    """Online fit of a decode step's seconds against its ubatches' rows (scheduler thread only)."""

    def __init__(self) -> None:
        self._xx = np.zeros((3, 3))
        self._xy = np.zeros(3)
        self._prior: np.ndarray | None = None
        # Seconds, meaningful once a step was observed; plain floats, because the scheduler prices a
        # few dozen candidate steps per step (speculation.plan).
        self.per_ubatch = self.per_row = self.single_row = 1.0

    @property
    def observed(self) -> bool:
        return self._prior is not None

    def observe(self, ubatches: list[int], seconds: float) -> None:
        x = _features(ubatches)
        if self._prior is None:
            # Until the data says otherwise: a pass's fixed work and a row's arithmetic cost alike,
            # and a lone row costs both.
            unit = seconds / (x[0] * 2 + x[1] + x[2] * 2) if x[0] else seconds / (2 * x[2])
            self._prior = np.array([unit, unit, 2 * unit])
        self._xx = _DECAY * self._xx + np.outer(x, x)
        self._xy = _DECAY * self._xy + x * seconds
        fitted = np.linalg.solve(self._xx + _PRIOR_WEIGHT * np.eye(3), self._xy + _PRIOR_WEIGHT * self._prior)
        # No price is negative, and a row always costs something, or every guess would look free.
        prices = np.maximum(fitted, [0.0, 1e-3 * self._prior[1], 0.0])
        self.per_ubatch, self.per_row, self.single_row = prices.tolist()

    def seconds(self, ubatches: list[int]) -> float:
        total = 0.0
        for rows in ubatches:
            total += self.per_ubatch + self.per_row * rows if rows > 1 else self.single_row
        return total
