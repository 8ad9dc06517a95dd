"""A step's rows through the Rust sampler, and each sampled token taken by its sequence.

Every sequence's sampling parameters, history and random stream live in one
`sampler_ext.BatchSampler`, under the sequence's slot id, from admission to release; a step hands
it the logits of all its rows at once. A row whose output is constrained (json_constraints.py)
also gets the bitmask of the tokens its grammar allows, filled just before the draw. All of it
runs on the scheduler thread, right after the step's llama_decode (benchmarks/engine_steps.py
measures sampling's share of a step).
"""

from __future__ import annotations

import time

import numpy as np

import sampler_ext
from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.sequence import Sequence, SequenceUpdate
from service.engine.timings import StepTimings
from service.errors import GenerationFailed

_ALL_ALLOWED = 0xFFFFFFFF


class RowSampler:
    """Samples the rows of one model's steps (scheduler thread only)."""

    def __init__(self, model: LoadedModel, constraints: ConstraintCompiler, timings: StepTimings) -> None:
        self._constraints = constraints
        self._timings = timings
        self._sampler = sampler_ext.BatchSampler(model.vocab_size)
        # One mask row per possible output row; an unconstrained row is all ones.
        self._masks = np.full((model.max_sequences, constraints.words), _ALL_ALLOWED, dtype=np.uint32)

    def add(self, sequence: Sequence) -> None:
        """Register an admitted sequence under its slot id (and start its constraint's matcher)."""
        sampling = sequence.generation.sampling
        try:
            self._sampler.add(
                sequence.seq_id,
                seed=sequence.seed,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                frequency_penalty=sampling.frequency_penalty,
                presence_penalty=sampling.presence_penalty,
                logit_bias=sampling.logit_bias,
                top_logprobs=sampling.top_logprobs,
                logprobs=sampling.logprobs,
            )
            if sequence.generation.grammar is not None:
                sequence.constraint = self._constraints.matcher(sequence.generation.grammar)
        except (ValueError, GenerationFailed) as error:
            raise GenerationFailed(f"could not start generation: {error}") from error

    def remove(self, sequence: Sequence) -> None:
        self._sampler.remove(sequence.seq_id)

    def sample(
        self, rows: list[Sequence], logits: np.ndarray, logits_rows: np.ndarray | None = None
    ) -> list[SequenceUpdate | GenerationFailed]:
        """Each row's outcome: the update its new token makes, or why the row failed. Row r reads
        logits row `logits_rows[r]` (default r). One bad row does not fail the others: when the
        batch draw is refused, the rows are drawn one by one."""
        if logits_rows is None:
            logits_rows = np.arange(len(rows), dtype=np.int64)
        try:
            drawn = self.draw(rows, logits, logits_rows)
        except ValueError:
            outcomes: list[SequenceUpdate | GenerationFailed] = []
            for row, sequence in enumerate(rows):
                try:
                    outcomes.append(self.take(sequence, self.draw([sequence], logits, logits_rows[row : row + 1]), 0))
                except ValueError as error:
                    outcomes.append(GenerationFailed(f"sampling failed: {error}"))
                except GenerationFailed as error:
                    outcomes.append(error)
            return outcomes
        outcomes = []
        for row, sequence in enumerate(rows):
            try:
                outcomes.append(self.take(sequence, drawn, row))
            except GenerationFailed as error:
                outcomes.append(error)
        return outcomes

    def draw(self, rows: list[Sequence], logits: np.ndarray, logits_rows: np.ndarray) -> sampler_ext.Sampled:
        """A token for each row, from logits row `logits_rows[r]` (ValueError when the sampler
        refuses a row); the sequences' samplers move on, the sequences themselves not yet (`take`).
        The rows are read where llama.cpp left them, not copied out: each holds the whole vocabulary."""
        keys = np.fromiter((s.seq_id for s in rows), dtype=np.int64, count=len(rows))
        masks = None
        if any(s.constraint is not None for s in rows):
            started = time.perf_counter()
            masks = self._masks[: len(rows)]
            masks.fill(_ALL_ALLOWED)
            for row, sequence in enumerate(rows):
                if sequence.constraint is not None:
                    sequence.constraint.fill_mask(masks[row])
            self._timings.mask_seconds += time.perf_counter() - started
        started = time.perf_counter()
        drawn = self._sampler.sample(logits, keys, masks, logits_rows)
        self._timings.sample_seconds += time.perf_counter() - started
        self._timings.sampled_rows += len(rows)
        return drawn

    def take(self, sequence: Sequence, drawn: sampler_ext.Sampled, row: int) -> SequenceUpdate:
        """The sequence accepts its sampled token (GenerationFailed when its grammar refuses it)."""
        token = int(drawn.tokens[row])
        if sequence.constraint is not None:
            sequence.constraint.advance(token)
        top = []
        count = sequence.generation.sampling.top_logprobs
        if count:
            top = list(zip(drawn.top_ids[row, :count].tolist(), drawn.top_logprobs[row, :count].tolist(), strict=True))
        return sequence.accept(token, float(drawn.logprobs[row]), top)
