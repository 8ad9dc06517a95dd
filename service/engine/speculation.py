"""Speculative decoding's guesses: prompt-lookup drafts, and how many of them each step checks.

A decode step costs a pass over the weights plus each row's arithmetic (step_cost.py). So the
scheduler guesses each decoding sequence's next tokens from its own history (prompt and output):
the tokens that followed the latest earlier occurrence of its last `max_n` (down to `min_n`)
tokens - prompt lookup decoding, vLLM's "ngram" method. speculative_step.py checks the guesses of
all sequences in one step; a sampled token is always drawn as a plain step would draw it.

Output is unchanged: with the default kernels (model.py, `rows_independent`) a row's logits are
bit-identical whether its token is checked as a guess in a step of several rows or decoded in a
step of its own. Where rows are not independent (flash attention off, or `--fast-nondeterministic`,
whose split-KV path serves a lone sequence past 512 cached positions) a speculative step could pick
another token at a near-tie; the scheduler turns speculation off in the first case and accepts it
in the second.

Which guesses a step checks (`plan`): a sequence whose guesses each held with probability p gains
p + p^2 + ... + p^k tokens from k of them, for k more rows and perhaps one more ubatch (llama.cpp
splits a step into ubatches with the same number of rows per sequence, batch.py). Each sequence
keeps a decayed count of its guesses that held; `plan` picks, among "these sequences check k
guesses each", the choice with the most expected tokens per second of step time, by the step
costs fitted on this machine. A sequence whose guesses fail is so left out; to notice when they
would hold again, speculative_step.py checks one guess of a left-out sequence now and then (a
probe), paid from a fixed share of the decode time: unhelpful guessing costs at most that share.
"""

from __future__ import annotations

from collections.abc import Sequence as TokenList
from dataclasses import dataclass, field

import numpy as np

from service.engine.batch import ubatch_rows
from service.engine.step_cost import StepCost

# A sequence's estimate starts from the rate at which guesses have lately held on this server (all
# sequences' checks, decayed), worth this many guesses of its own; the server starts hopeful, as if
# three of four had held, so that new sequences check their guesses wherever such a rate pays.
_PRIOR_WEIGHT = 2.0
_FIRST_RATE = 0.75
# Weight of the past counts at each check: about the last three steps' guesses count (a sequence),
# the last hundred checks (the server).
_DECAY = 0.7
_SERVER_DECAY = 0.99


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
    held: float = 0.0  # decayed count of guesses that held
    checked: float = 0.0  # decayed count of guesses checked (each step's up to its first miss)
    waited: int = 0  # steps since its guesses were last checked, while it had some

    def extend(self, new_tokens: TokenList[int]) -> None:
        end = self.length + len(new_tokens)
        if end > len(self.tokens):
            grown = np.empty(max(end, 2 * len(self.tokens)), dtype=np.int32)
            grown[: self.length] = self.tokens[: self.length]
            self.tokens = grown
        self.tokens[self.length : end] = new_tokens
        self.length = end

    def acceptance(self, prior: float) -> float:
        """Estimated probability that a guess holds, given that the ones before it held."""
        return (self.held + _PRIOR_WEIGHT * prior) / (self.checked + _PRIOR_WEIGHT)


@dataclass
class PromptLookup:
    """Proposes guesses for decoding sequences and learns from how many were accepted."""

    max_draft: int
    min_n: int = 2
    max_n: int = 4
    _states: dict[object, DraftState] = field(default_factory=dict)  # by sequence
    _held: float = _FIRST_RATE  # the server's decayed counts, over every sequence's checks
    _checked: float = 1.0

    def draft(self, key: object, prompt: TokenList[int], output: TokenList[int], limit: int) -> list[int]:
        """Guesses for the tokens after `prompt` + `output` (at most `limit`; none where the history
        has no match). `key` names the sequence until `forget`."""
        limit = min(limit, self.max_draft)
        if limit <= 0:
            return []
        state = self._states.get(key)
        if state is None:
            tokens = np.empty(len(prompt) + len(output) + 64, dtype=np.int32)
            state = self._states[key] = DraftState(tokens, 0)
            state.extend(prompt)
        state.extend(output[state.length - len(prompt) :])
        return lookup_draft(state.tokens[: state.length], limit, self.min_n, self.max_n).tolist()

    def acceptance(self, key: object) -> float:
        return self._states[key].acceptance(self._held / self._checked)

    def record(self, key: object, checked: int, held: int) -> None:
        """A step checked `checked` of the sequence's guesses (up to the first that failed, if one
        did) and `held` of them held."""
        state = self._states[key]
        state.held = _DECAY * state.held + held
        state.checked = _DECAY * state.checked + checked
        state.waited = 0
        self._held = _SERVER_DECAY * self._held + held
        self._checked = _SERVER_DECAY * self._checked + checked

    def left_out(self, key: object) -> None:
        """The sequence had guesses that the step did not check."""
        self._states[key].waited += 1

    def waited(self, key: object) -> int:
        return self._states[key].waited

    def forget(self, key: object) -> None:
        self._states.pop(key, None)


def plan(seq_ids: TokenList[int], drafts: TokenList[int], acceptance: TokenList[float], cost: StepCost) -> list[int]:
    """How many of its guesses each sequence (increasing ids; `drafts` guesses available, each held
    with probability `acceptance`) checks in this step: the choice of "the k sequences with the
    best expected gain check g guesses each" with the most expected tokens per second."""
    count = len(seq_ids)
    best = [0] * count
    best_rate = count / cost.seconds(ubatch_rows(seq_ids, [1] * count))
    previous_level = 0.0
    for guesses in range(1, max(drafts) + 1):
        gains = [
            (sum(p**j for j in range(1, guesses + 1)), index)
            for index, (available, p) in enumerate(zip(drafts, acceptance, strict=True))
            if available >= guesses
        ]
        gains.sort(reverse=True)
        rows = [1] * count
        tokens = float(count)
        level = 0.0  # the best rate with this many guesses per guessing sequence
        for gain, index in gains:
            rows[index] += guesses
            tokens += gain
            rate = tokens / cost.seconds(ubatch_rows(seq_ids, rows))
            level = max(level, rate)
            if rate > best_rate:
                best_rate = rate
                best = [r - 1 for r in rows]
        # Each further guess yields less (p^k) for the same row's price, while an extra pass costs
        # the same at any length: once the best rate falls from one length to the next, it goes on
        # falling.
        if level < previous_level:
            break
        previous_level = level
    return best
