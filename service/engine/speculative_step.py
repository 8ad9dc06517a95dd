"""The decode step, which also checks guesses of the decoding sequences' next tokens (speculation.py).

Every decode step runs here, with guesses or without. It decodes each sequence's last token
followed by its guesses, every guessed row with logits, and samples each sequence's rows in order
exactly as plain steps sample them, one token per row, stopping after the first token that is not
the guess the next row was computed from. The rows are drawn in rounds, each read in place from
llama.cpp's logits: the first row of every sequence in one call to the sampler, then the second row
of those whose first guess held, and so on. Each emitted token is so drawn from the same
distribution, with the same random draw, as without speculation; the guesses that held are tokens
for free, and the KV of the others is removed.
"""

from __future__ import annotations

import logging
from itertools import accumulate

import llama_cpp
import numpy as np

from service.engine.batch import Decoder, ubatch_rows
from service.engine.model import LoadedModel
from service.engine.sampling import RowSampler
from service.engine.sequence import Sequence, SequenceUpdate, merged
from service.engine.speculation import PromptLookup, plan
from service.engine.step_cost import StepCost
from service.engine.timings import StepTimings
from service.errors import GenerationFailed

log = logging.getLogger(__name__)

# Share of the decode time that probes of left-out sequences' guesses may take (speculation.py):
# the most that guessing can cost where it never pays.
PROBE_SHARE = 0.02


class SpeculativeStep:
    """Guesses for the decoding sequences and the step that checks them."""

    def __init__(
        self,
        model: LoadedModel,
        lookup: PromptLookup,
        decoder: Decoder,
        sampler: RowSampler,
        timings: StepTimings,
    ) -> None:
        self._model = model
        self._lookup = lookup
        self._decoder = decoder
        self._sampler = sampler
        self._timings = timings
        self.cost = StepCost()
        self._probe_credit = 0.0  # seconds of decode time that probes may still take
        self.available = True  # off for good once the model's memory cannot drop rejected guesses

    def drafts(self, decoding: list[Sequence]) -> list[list[int]] | None:
        """The guesses worth checking in the next step, per sequence (increasing ids), or None when
        a plain step is best."""
        drafts = []
        for sequence in decoding:
            room = min(
                sequence.generation.max_new_tokens - sequence.generated,
                self._model.context_per_sequence - sequence.n_past,
            )
            drafts.append(
                self._lookup.draft(sequence, sequence.generation.prompt_tokens, sequence.output_tokens, room - 1)
            )
        if not any(drafts) or not self.cost.observed:
            return None
        seq_ids = [s.seq_id for s in decoding]
        counts = plan(
            seq_ids,
            [len(d) for d in drafts],
            [self._lookup.acceptance(s) if d else 0.0 for s, d in zip(decoding, drafts, strict=True)],
            self.cost,
        )
        left_out = [i for i, (d, c) in enumerate(zip(drafts, counts, strict=True)) if d and not c]
        for i in left_out:
            self._lookup.left_out(decoding[i])
        if left_out:
            self._probe(seq_ids, counts, max(left_out, key=lambda i: self._lookup.waited(decoding[i])))
        if not any(counts):
            return None
        return [draft[:count] for draft, count in zip(drafts, counts, strict=True)]

    def _probe(self, seq_ids: list[int], counts: list[int], index: int) -> None:
        """Check one guess of the left-out sequence at `index` too, if the probe credit pays for it."""
        before = self.cost.seconds(ubatch_rows(seq_ids, [1 + c for c in counts]))
        counts[index] = 1
        after = self.cost.seconds(ubatch_rows(seq_ids, [1 + c for c in counts]))
        if after - before <= self._probe_credit:
            self._probe_credit -= after - before
        else:
            counts[index] = 0

    def timed(self, seq_ids: list[int], rows: list[int], seconds: float) -> None:
        """A decode step of these rows per sequence took `seconds` (guessed or not)."""
        self.cost.observe(ubatch_rows(seq_ids, rows), seconds)
        # Unspent credit is capped at one step's time, so that probes never come in a burst.
        self._probe_credit = min(self._probe_credit + PROBE_SHARE * seconds, seconds)

    def run(self, decoding: list[Sequence], drafts: list[list[int]]) -> list[SequenceUpdate | GenerationFailed]:
        """Every sequence's last token and guesses (none: a plain step) in one step; each
        sequence's outcome."""
        batch = self._decoder.batch
        batch.clear()
        for sequence, draft in zip(decoding, drafts, strict=True):
            tokens = [sequence.last_token, *draft]
            batch.add(sequence.seq_id, tokens, sequence.n_past, output_last=True, output_all=True)
        self._decoder.run()
        if any(drafts):
            self._timings.speculative_steps += 1
        # Output rows come in batch order: each sequence's last token, then its guesses.
        first_rows = [0, *accumulate(1 + len(d) for d in drafts)]
        logits = self._decoder.logits(first_rows[-1])
        taken: list[list[SequenceUpdate]] = [[] for _ in decoding]
        failed: list[GenerationFailed | None] = [None] * len(decoding)
        drawing = list(range(len(decoding)))
        depth = 0
        while drawing:
            rows = [decoding[i] for i in drawing]
            indices = np.fromiter((first_rows[i] + depth for i in drawing), dtype=np.int64, count=len(drawing))
            following = []
            for i, outcome in zip(drawing, self._sampler.sample(rows, logits, indices), strict=True):
                if isinstance(outcome, GenerationFailed):
                    failed[i] = outcome
                    continue
                taken[i].append(outcome)
                sequence = decoding[i]
                if depth < len(drafts[i]) and not sequence.finished and sequence.last_token == drafts[i][depth]:
                    following.append(i)
            drawing = following
            depth += 1
        return [failed[i] or self._settle(sequence, drafts[i], taken[i]) for i, sequence in enumerate(decoding)]

    def _settle(
        self, sequence: Sequence, draft: list[int], taken: list[SequenceUpdate]
    ) -> SequenceUpdate | GenerationFailed:
        """Count the sequence's tokens into its KV position and drop the KV of guesses that failed."""
        sequence.n_past += len(taken)  # the last token and the guesses that held
        if not draft:
            return taken[0]
        held = len(taken) - 1
        missed = held < len(draft) and not sequence.finished
        self._timings.drafted_tokens += len(draft)
        self._timings.accepted_tokens += held
        self._lookup.record(sequence, held + missed, held)
        if missed and not llama_cpp.llama_memory_seq_rm(self._model.memory, sequence.seq_id, sequence.n_past, -1):
            self.available = False
            log.warning("this model's memory cannot drop rejected guesses; speculation is off")
            return GenerationFailed("internal error: rejected guesses could not be removed")
        return merged(taken)

    def forget(self, sequence: Sequence) -> None:
        self._lookup.forget(sequence)
