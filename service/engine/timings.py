"""Where the scheduler thread's time goes, summed since start: read by benchmarks/engine_steps.py
and by tests that compare an engine's work with and without a feature."""

from __future__ import annotations

import collections
from dataclasses import MISSING, dataclass, field, fields


@dataclass
class StepTimings:
    decode_seconds: float = 0.0  # inside llama_decode for requests (batch.py)
    decode_calls: int = 0
    sample_seconds: float = 0.0  # inside BatchSampler.sample (sampling.py)
    mask_seconds: float = 0.0  # filling JSON constraints' token masks (sampling.py)
    sampled_rows: int = 0
    prefilled_tokens: int = 0  # prompt tokens run through llama_decode (not those the prefix cache held)
    speculative_steps: int = 0  # decode steps that checked guesses (speculative_step.py)
    drafted_tokens: int = 0  # guesses checked
    accepted_tokens: int = 0  # of them, those that held (tokens gained over plain steps)
    idle_prefill_seconds: float = 0.0  # inside llama_decode for idle prefill (idle_prefill.py)
    # Decode steps by how many sequences each one decoded (one llama_decode, with or without
    # guesses): how well steps are batched.
    steps_by_rows: collections.Counter[int] = field(default_factory=collections.Counter)

    def reset(self) -> None:
        """Zero every counter in place (the decoder, sampler and the rest keep adding to this object)."""
        for each in fields(self):
            setattr(self, each.name, each.default_factory() if each.default is MISSING else each.default)
