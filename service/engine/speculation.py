"""Speculative decoding's guesses: prompt-lookup drafts for a sequence that decodes alone.

One row leaves most of a decode step idle: a step of a few rows of the same sequence takes little
longer than a step of one (docs/engine.md, "Speculative decoding", gives the step times). So while
a single sequence decodes, the scheduler guesses its next tokens from its own history (prompt and
output): the tokens that followed the latest earlier occurrence of its last `max_n` (down to
`min_n`) tokens - prompt lookup decoding, vLLM's "ngram" method. speculative_step.py checks the
guesses; a sampled token is always drawn as a plain step would draw it.

Output is unchanged: with the default kernels (model.py, `rows_independent`) a row's logits are
bit-identical whether its token is checked as a guess in a step of several rows or decoded alone.
Where rows are not independent (flash attention off, or `--fast-nondeterministic`, whose split-KV
path serves a lone sequence past 512 cached positions) a speculative step could pick another token
at a near-tie; the scheduler turns speculation off in the first case and accepts it in the second.

When guesses keep failing, a step of k + 1 rows costs more than the tokens it yields; each
sequence keeps a moving average of the share of its guesses that held and, while that is under the
break-even, checks only one guess every `PROBE_EVERY` steps (a cheap probe), going back to full
drafts once the share recovers.
"""

from __future__ import annotations

from collections.abc import Sequence as TokenList
from dataclasses import dataclass, field

import numpy as np

# Share of guesses that hold under which a sequence stops making full drafts: k guesses that each
# hold with probability r yield r + r^2 + ... + r^k tokens, which must pay for the longer step
# (docs/engine.md, "Speculative decoding", derives this value from the step times measured there).
BREAK_EVEN = 0.5
# Weight of the latest step in the moving average.
_EMA_WEIGHT = 0.3
# While under the break-even, one guess is checked every this many steps.
PROBE_EVERY = 16


def lookup_draft(history: np.ndarray, max_tokens: int, min_n: int, max_n: int) -> np.ndarray:
    """The tokens that followed the latest earlier occurrence of the history's last n tokens, for the
    largest n in [min_n, max_n] that occurs; at most `max_tokens` of them, empty when none occurs."""
    length = len(history)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = history[length - n :]
        # Starts j of earlier occurrences: j + n <= length - 1, so at least one token follows.
        starts = np.flatnonzero(history[: length - n] == suffix[0])
        for offset in range(1, n):
            starts = starts[history[starts + offset] == suffix[offset]]
        if starts.size:
            follow = int(starts[-1]) + n
            return history[follow : min(follow + max_tokens, length)]
    return history[:0]


@dataclass
class DraftState:
    """One sequence's token history and how well its guesses have done."""

    tokens: np.ndarray
    length: int
    held: float = 1.0  # moving average of the share of guesses that held
    waited: int = 0  # steps since the last probe, while under the break-even

    def extend(self, new_tokens: TokenList[int]) -> None:
        end = self.length + len(new_tokens)
        if end > len(self.tokens):
            grown = np.empty(max(end, 2 * len(self.tokens)), dtype=np.int32)
            grown[: self.length] = self.tokens[: self.length]
            self.tokens = grown
        self.tokens[self.length : end] = new_tokens
        self.length = end


@dataclass
class PromptLookup:
    """Proposes guesses for lone sequences and learns from how many were accepted."""

    max_draft: int
    min_n: int = 2
    max_n: int = 4
    _states: dict[object, DraftState] = field(default_factory=dict)  # by sequence

    def draft(self, key: object, prompt: TokenList[int], output: TokenList[int], limit: int) -> list[int]:
        """Guesses for the tokens after `prompt` + `output` (at most `limit`), or none when guessing
        does not pay for this sequence now. `key` names the sequence until `forget`."""
        limit = min(limit, self.max_draft)
        if limit <= 0:
            return []
        state = self._states.get(key)
        if state is None:
            tokens = np.empty(len(prompt) + len(output) + 64, dtype=np.int32)
            state = self._states[key] = DraftState(tokens, 0)
            state.extend(prompt)
        state.extend(output[state.length - len(prompt) :])
        if state.held < BREAK_EVEN:
            state.waited += 1
            if state.waited < PROBE_EVERY:
                return []
            state.waited = 0
            limit = 1
        return lookup_draft(state.tokens[: state.length], limit, self.min_n, self.max_n).tolist()

    def record(self, key: object, drafted: int, accepted: int) -> None:
        state = self._states[key]
        state.held += _EMA_WEIGHT * (accepted / drafted - state.held)

    def forget(self, key: object) -> None:
        self._states.pop(key, None)
