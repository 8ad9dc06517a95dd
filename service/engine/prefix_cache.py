"""The prefix cache: the prompt prefixes whose KV free sequence slots still hold, and when a new
prompt may reuse one.

A slot whose sequence has finished keeps its KV cache: a later request that begins with the same
tokens (a chat resending its history) takes that slot (slots.py) and prefills only what follows.
The cache is the free slots themselves, so it is bounded by `--parallel` and costs no memory
beyond the KV cache llama.cpp has already allocated.

Exactness. Output with the cache must be bit-identical to output without it. Without the cache a
prompt is prefilled in chunks at fixed boundaries (multiples of `chunk` from position 0), and so
are the pieces after a reused prefix. Three rules, by the kernels (docs/engine.md, "Slots and the
prefix cache", says what was measured; tests/service/test_prefix_cache.py holds the output
bit-identical):

- independent rows (the default kernels; model.py, `rows_independent`): a position's KV does not
  depend on the step or chunk that computed it, a row decoded one at a time or checked as a guess
  included. A slot offers everything its sequence has in the KV, prompt and answer, and a request
  reuses any prefix of it, prefilling at least its last token again.
- any boundary (`--fast-nondeterministic` with `chunk` >= 64): a slot offers every prompt position
  computed in chunks of >= 64 rows, and a request reuses a prefix only if each piece it still
  prefills has >= 64 rows, or is exactly the cold prefill's short last chunk (flash attention's
  tiled path, one query row independent of the others, takes chunks from 64 rows; the unfused
  attention and the tiled matmul treat rows alone from fewer). Never the generated tokens as they
  were decoded: a free slot keeps what its sequence went on with (`Retained.followed`: the rest of
  the prompt and the answer), which idle_prefill.py prefills again, after which the slot offers it
  like prompt tokens.
- whole chunks (flash attention off, or a `chunk` under 64): a slot offers only whole
  `chunk`-sized chunks of its prompt, at the cold boundaries.

Worth a slot. With independent rows or any boundary a prefix shorter than a piece (64 tokens) is
not reused: it saves little prefill, and a slot chosen for it can leave the running sequence ids
out of order, which costs a pass over the weights in every decode step (slots.py). The positions
after a reused prefix are removed with llama_memory_seq_rm, which leaves the stream as a fresh
prefill would.

Only the scheduler thread calls this.
"""

from __future__ import annotations

from collections.abc import Sequence as TokenList
from dataclasses import dataclass

import llama_cpp
import numpy as np

# GGML_FA_TILE_Q in llama.cpp's CPU backend: flash attention's tiled path takes chunks of this many
# rows or more (see "Exactness" above). Other kernels would need fewer, but one rule for all keeps
# what a slot offers independent of the setting. Also the shortest prefix worth a slot ("Worth a slot").
ANY_BOUNDARY_ROWS = 64


@dataclass
class Retained:
    """What a free slot keeps for later requests."""

    tokens: np.ndarray  # the leading tokens, prompt and maybe answer, whose KV the slot can offer (see "Exactness")
    last_used: int
    # The tokens the sequence went on with, prompt and output, that `tokens` begins: those after
    # `tokens` are still to be prefilled while idle (None: nothing left worth prefilling).
    followed: np.ndarray | None = None


@dataclass
class PrefixCacheStats:
    """Counters since start, for tests and benchmarks."""

    lookups: int = 0  # requests that asked for a slot with a prompt
    queried_tokens: int = 0  # their prompts' tokens together (what reused_tokens is a part of)
    hits: int = 0  # of them, those that reused a prefix
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to the cache
    evictions: int = 0  # retained prefixes dropped to make room


class PrefixCache:
    """The retained prefixes of free slots, and the exactness rules for reusing them."""

    def __init__(
        self,
        memory: llama_cpp.llama_memory_t,
        chunk: int,
        *,
        enabled: bool,
        any_boundary: bool,
        rows_independent: bool = False,
    ) -> None:
        self._memory = memory
        self.enabled = enabled
        self.chunk = chunk
        # A position's KV is the same however it was computed: slots offer their answers too.
        self.offers_output = rows_independent
        # Rows from which a chunk's KV does not depend on where the chunk starts (None: whole
        # chunks only); with independent rows, any, and this is only the shortest prefix worth a slot.
        self.min_rows = ANY_BOUNDARY_ROWS if rows_independent or (any_boundary and chunk >= ANY_BOUNDARY_ROWS) else None
        self._kept: dict[int, Retained] = {}  # free slot -> what it retains
        self._clock = 0
        self.stats = PrefixCacheStats()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def retained(self) -> dict[int, int]:
        """Free slot -> number of prompt tokens it can offer (for tests and logs)."""
        return {slot: len(kept.tokens) for slot, kept in self._kept.items()}

    def entries(self) -> list[tuple[int, Retained]]:
        """The free slots that retain something, with what (idle_prefill.py reads and extends it)."""
        return list(self._kept.items())

    def holds(self, slot: int) -> Retained | None:
        return self._kept.get(slot)

    def take(self, slot: int) -> Retained | None:
        """The slot is handed out: it retains nothing from now on; what it held, if anything."""
        return self._kept.pop(slot, None)

    def drop_all(self) -> list[int]:
        """Forget every retained prefix (after a failed step, when no KV can be trusted); the slots."""
        slots = list(self._kept)
        self._kept.clear()
        return slots

    def reusable_chunk(self, rows: int) -> bool:
        """Whether a prefill chunk of `rows` rows (ending at a cold boundary) leaves KV a later request may reuse."""
        if self.offers_output:
            return True
        return rows >= self.min_rows if self.min_rows is not None else rows == self.chunk

    def match(self, prompt: TokenList[int]) -> tuple[int, int] | None:
        """The free slot whose retained prefix `prompt` should reuse, and how many tokens, if any."""
        self.stats.lookups += 1
        self.stats.queried_tokens += len(prompt)
        if not self.enabled or len(prompt) <= 1:
            return None
        query = np.asarray(prompt, dtype=np.int32)
        best_slot, best_reused, best_used = -1, 0, -1
        for slot, kept in self._kept.items():
            reused = self._usable(_common_prefix(kept.tokens, query), len(query))
            if reused > best_reused or (reused == best_reused and reused and kept.last_used > best_used):
                best_slot, best_reused, best_used = slot, reused, kept.last_used
        # A slot whose first positions were dropped (a sliding-window cache that is not full size)
        # does not hold the whole prefix, so it cannot be reused.
        if (
            best_reused >= (self.min_rows or self.chunk)  # "Worth a slot"
            and llama_cpp.llama_memory_seq_pos_min(self._memory, best_slot) == 0
        ):
            return best_slot, best_reused
        return None

    def _usable(self, common: int, length: int) -> int:
        """How much of a `common`-token prefix a prompt of `length` tokens can reuse exactly."""
        chunk, min_rows = self.chunk, self.min_rows
        if self.offers_output:
            return min(common, length - 1)  # at least the last token is prefilled again
        last_start = (length - 1) // chunk * chunk  # the cold prefill's last chunk: [last_start, length)
        if min_rows is None:
            return min(common, last_start) // chunk * chunk
        if length - last_start < min_rows:
            reused = min(common, last_start)  # that short last chunk must be prefilled as it is
            if reused == last_start:
                return reused
        else:
            reused = min(common, length - min_rows)  # at least the last token is prefilled again
        first_end = min((reused // chunk + 1) * chunk, length)
        if first_end - reused < min_rows:
            reused = first_end - min_rows  # the first piece prefilled gets its 64 rows
        return max(reused, 0)

    def keep(self, slot: int, offered: TokenList[int] | None, followed: np.ndarray | None) -> bool:
        """A slot is given back: whether its KV stays, to offer `offered` (the leading tokens it
        holds that a later request may reuse, see "Exactness"; None when its KV may not be trusted)
        and to prefill `followed` while idle. False: the caller clears the slot."""
        reusable = 0 if offered is None or not self.enabled else len(offered)
        later = followed if offered is not None else None
        if reusable == 0 and later is None:
            return False
        tokens = np.asarray(offered[:reusable] if reusable else (), dtype=np.int32)
        for kept in self._kept.values():
            if reusable and len(kept.tokens) == reusable and np.array_equal(kept.tokens, tokens):
                # The n choices of one request may end with the same tokens (the prompt, where
                # answers are not offered): keep one copy, so that the other slots stay free for
                # other prefixes.
                kept.last_used = self._tick()
                if kept.followed is None:
                    kept.followed = later
                return False
        self._kept[slot] = Retained(tokens, self._tick(), later)
        return True


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
