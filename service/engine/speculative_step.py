"""The decode step of a lone sequence that also checks guesses of its next tokens (speculation.py).

The step decodes the sequence's last token and the guesses together, every row with logits, and
samples the rows in order exactly as plain steps sample them, one token per row, stopping after the
first token that is not the guess the next row was computed from. Each emitted token is so drawn
from the same distribution, with the same random draw, as without speculation; the guesses that
held are tokens for free, and the KV of the others is removed.
"""

from __future__ import annotations

import logging

import llama_cpp

from service.engine.batch import Decoder
from service.engine.model import LoadedModel
from service.engine.sampling import RowSampler
from service.engine.sequence import Sequence, SequenceUpdate, merged
from service.engine.speculation import PromptLookup
from service.engine.timings import StepTimings
from service.errors import GenerationFailed

log = logging.getLogger(__name__)


class SpeculativeStep:
    """Guesses for a lone sequence and the step that checks them."""

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
        self.available = True  # off for good once the model's memory cannot drop rejected guesses

    def draft(self, sequence: Sequence) -> list[int]:
        """The guesses worth checking in the sequence's next step (none: a plain step)."""
        room = min(
            sequence.generation.max_new_tokens - sequence.generated,
            self._model.context_per_sequence - sequence.n_past,
        )
        return self._lookup.draft(sequence, sequence.generation.prompt_tokens, sequence.output_tokens, room - 1)

    def run(self, sequence: Sequence, draft: list[int]) -> SequenceUpdate:
        """The last token and the guesses in one step; the tokens it yields, as one update."""
        batch = self._decoder.batch
        batch.clear()
        batch.add(sequence.seq_id, [sequence.last_token, *draft], sequence.n_past, output_last=True, output_all=True)
        self._decoder.run()
        logits = self._decoder.logits(len(draft) + 1)
        updates = []
        for row in range(len(draft) + 1):
            try:
                drawn = self._sampler.draw([sequence], logits[row : row + 1])
            except ValueError as error:
                raise GenerationFailed(f"sampling failed: {error}") from error
            updates.append(self._sampler.take(sequence, drawn, 0))
            if sequence.finished or row == len(draft) or int(drawn.tokens[0]) != draft[row]:
                break
        accepted = len(updates) - 1
        sequence.n_past += len(updates)  # the last token and the guesses that held
        self._timings.speculative_steps += 1
        self._timings.drafted_tokens += len(draft)
        self._timings.accepted_tokens += accepted
        self._lookup.record(sequence, len(draft), accepted)
        # Positions after the last good guess hold rejected guesses: drop them.
        if (
            accepted < len(draft)
            and not sequence.finished
            and not llama_cpp.llama_memory_seq_rm(self._model.memory, sequence.seq_id, sequence.n_past, -1)
        ):
            self.available = False
            log.warning("this model's memory cannot drop rejected guesses; speculation is off")
            raise GenerationFailed("internal error: rejected guesses could not be removed")
        return merged(updates)

    def forget(self, sequence: Sequence) -> None:
        self._lookup.forget(sequence)
