"""The sequence slots of one context, and the prompt prefixes their KV cache still holds when free.

A slot whose sequence has finished keeps its KV cache: a later request that begins with the same
tokens (a chat resending its history) takes that slot and prefills only what follows. The cache is
the free slots themselves, so it is bounded by `--parallel` and costs no memory beyond the KV cache
llama.cpp has already allocated; a slot is evicted (cleared) least-recently-used when a request
needs it for another prompt, among the slots that keep the ids in use in the fewest runs.

Exactness. Output with the cache must be bit-identical to output without it. llama.cpp's kernels
depend on the number of rows in a ubatch, so the KV of a position depends on the chunk that computed
it, not only on the tokens before it: a prompt's tail decoded token by token, or prefilled in a chunk
of 7 or 16 rows, gives other logits than the same tail inside a chunk of 256. Without the cache a
prompt is prefilled in chunks at fixed boundaries (multiples of `chunk` from position 0), and so
are the pieces after a reused prefix. Two rules, by what was measured:

- any boundary (the default kernels, `chunk` >= 64): a position gets the same KV from every chunk of
  64 rows or more, wherever the chunk starts (llama.cpp's flash attention takes its tiled path, one
  query row independent of the others, from 64 rows; [0, 256) = [0, 64) + [64, 256) = [0, 100) +
  [100, 256), bit for bit, where [0, 16) + [16, 256) is not; with `--no-flash-attn` the unfused
  attention treats rows alone too, and the tiled matmul starts at 8 rows: chunks of 8, 16, 32, 64,
  72 or 147 rows all gave the same logits, 2 rows did not). So a slot offers every prompt position
  computed in chunks of >= 64 rows, and a request reuses a prefix only if each piece it still
  prefills has >= 64 rows, or is exactly the cold prefill's short last chunk.
- whole chunks (`--deterministic`, whose unfused attention was not measured this way, or a smaller
  `chunk`): a slot offers only whole `chunk`-sized chunks of its prompt, at the cold boundaries.

Never the generated tokens as they were decoded (one row at a time). Instead, with any boundary,
a free slot also keeps what its sequence went on with (the rest of the prompt and the answer), and
while the server is idle the scheduler prefills those tokens again in pieces of >= 64 rows
(`next_idle_prefill`), after which the slot offers them like prompt tokens: the next turn of a chat
then reuses the answer it resends too. The positions after the reused prefix are removed with
llama_memory_seq_rm, which leaves the stream as a fresh prefill would (its cells are placed by
position from the cleared head on; measured identical logits).

Only the scheduler thread calls this.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as TokenList
from dataclasses import dataclass

import llama_cpp
import numpy as np

# GGML_FA_TILE_Q in llama.cpp's CPU backend: flash attention's tiled path takes chunks of this many
# rows or more (see "Exactness" above). Without flash attention fewer rows would do (8), but one
# rule for both keeps what a slot offers independent of the setting.
_ANY_BOUNDARY_ROWS = 64


@dataclass
class _Retained:
    tokens: np.ndarray  # the leading tokens whose KV the slot can offer (see "Exactness")
    last_used: int
    # The tokens the sequence went on with, prompt and output, that `tokens` begins: those after
    # `tokens` still have to be prefilled while idle (None: nothing left worth prefilling).
    followed: np.ndarray | None = None


@dataclass
class PrefixCacheStats:
    """Counters since start, for tests and benchmarks."""

    lookups: int = 0  # requests that asked for a slot with a prompt
    hits: int = 0  # of them, those that reused a prefix
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to the cache
    evictions: int = 0  # retained prefixes dropped to make room
    idle_prefilled_tokens: int = 0  # tokens a finished sequence went on with, prefilled while idle
    idle_prefills_interrupted: int = 0  # idle prefill pieces stopped because a request came


class PrefixCache:
    """Hands out free sequence slots, preferring one that already holds a prefix of the prompt."""

    def __init__(
        self,
        memory: llama_cpp.llama_memory_t,
        slots: int,
        chunk: int,
        *,
        enabled: bool = True,
        any_boundary: bool = False,
        idle_prefill: bool = False,
    ) -> None:
        self._memory = memory
        # Rows from which a chunk's KV does not depend on where the chunk starts (None: whole chunks only).
        self._min_rows = _ANY_BOUNDARY_ROWS if any_boundary and chunk >= _ANY_BOUNDARY_ROWS else None
        self._slots = slots
        self._chunk = chunk
        self.enabled = enabled
        self._idle_prefill = idle_prefill
        # Free slots; a slot maps to what it retains, or None when its KV is empty.
        self._free: dict[int, _Retained | None] = {slot: None for slot in range(slots)}
        self._clock = itertools.count(1)
        self.stats = PrefixCacheStats()

    @property
    def offers_idle_prefill(self) -> bool:
        """Whether free slots prefill what their sequences generated while idle (any boundary only)."""
        return self.enabled and self._idle_prefill and self._min_rows is not None

    @property
    def free_count(self) -> int:
        return len(self._free)

    def retained(self) -> dict[int, int]:
        """Free slot -> number of prompt tokens it can offer (for tests and logs)."""
        return {slot: len(kept.tokens) for slot, kept in self._free.items() if kept is not None}

    def acquire(self, prompt: TokenList[int] | None) -> tuple[int, int]:
        """A free slot for a sequence, and how many leading prompt tokens its KV already holds.

        `prompt` None: the slot's KV will be overwritten (a forked choice), so any slot will do and
        one that retains nothing is taken first."""
        if not self._free:
            raise RuntimeError("no free sequence slot")
        slot, reused = self._choose(prompt)
        kept = self._free.pop(slot)
        if reused:
            # The stream keeps [0, reused); what follows was the old request's own.
            if llama_cpp.llama_memory_seq_rm(self._memory, slot, reused, -1):
                self.stats.hits += 1
                self.stats.reused_tokens += reused
                return slot, reused
            reused = 0  # this memory cannot drop a tail: start from nothing
        if kept is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self.stats.evictions += 1
        return slot, 0

    def _choose(self, prompt: TokenList[int] | None) -> tuple[int, int]:
        if prompt is not None:
            self.stats.lookups += 1
        best_slot, best_reused, best_used = -1, 0, -1
        if prompt is not None and self.enabled and len(prompt) > 1:
            query = np.asarray(prompt, dtype=np.int32)
            for slot, kept in self._free.items():
                if kept is None:
                    continue
                reused = self._usable(_common_prefix(kept.tokens, query), len(query))
                if reused > best_reused or (reused == best_reused and reused and kept.last_used > best_used):
                    best_slot, best_reused, best_used = slot, reused, kept.last_used
        # A slot whose first positions were dropped (a sliding-window cache that is not full size)
        # does not hold the whole prefix, so it cannot be reused.
        if (
            best_reused
            and self._worth_taking(best_slot, best_reused, query)
            and llama_cpp.llama_memory_seq_pos_min(self._memory, best_slot) == 0
        ):
            return best_slot, best_reused
        # An empty slot before a retained one (no eviction), then the slot that adds the fewest runs
        # to the ids in use (a decode step makes one llama.cpp ubatch, one pass over the weights,
        # per run of consecutive ids), then the least recently used prefix.
        return min(self._free, key=self._eviction_order), 0

    def _worth_taking(self, slot: int, reused: int, query: np.ndarray) -> bool:
        """Whether to reuse `reused` tokens of a slot and drop what else it holds: not when that is
        less than a piece (the few tokens of a chat template that conversations share) and drops
        more than it reuses while an empty slot is free, which keeps the other conversation for its
        next turn."""
        if reused >= (self._min_rows or self._chunk) or all(other is not None for other in self._free.values()):
            return True
        kept = self._free[slot]
        held = kept.followed if kept.followed is not None else kept.tokens
        return len(held) - _common_prefix(held, query) <= reused

    def _eviction_order(self, slot: int) -> tuple[bool, int, int, int]:
        kept = self._free[slot]
        in_use = (0 <= neighbour < self._slots and neighbour not in self._free for neighbour in (slot - 1, slot + 1))
        added_runs = 1 - sum(in_use)
        return kept is not None, added_runs, kept.last_used if kept is not None else 0, slot

    def reusable_chunk(self, rows: int) -> bool:
        """Whether a prefill chunk of `rows` rows (ending at a cold boundary) leaves KV a later request may reuse."""
        return rows >= self._min_rows if self._min_rows is not None else rows == self._chunk

    def _usable(self, common: int, length: int) -> int:
        """How much of a `common`-token prefix a prompt of `length` tokens can reuse exactly."""
        chunk, min_rows = self._chunk, self._min_rows
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

    def release(self, slot: int, prompt_done: TokenList[int] | None, followed: TokenList[int] | None = None) -> None:
        """Give a slot back. `prompt_done`: the leading prompt tokens whose KV the slot holds, all
        computed by chunks that `reusable_chunk` accepts (None when its KV may not be trusted:
        cleared). `followed`: the prompt and the tokens generated after it, which the slot may
        prefill again while idle (see "Exactness")."""
        reusable = 0 if prompt_done is None or not self.enabled else len(prompt_done)
        tokens = np.asarray(prompt_done[:reusable] if reusable else (), dtype=np.int32)
        later = None
        if prompt_done is not None and followed is not None and self._worth_prefilling(reusable, len(followed)):
            later = np.asarray(followed, dtype=np.int32)
        if reusable == 0 and later is None:
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._free[slot] = None
            return
        for kept in self._free.values():
            if reusable and kept is not None and len(kept.tokens) == reusable and np.array_equal(kept.tokens, tokens):
                # The n choices of one request end with the same prompt: keep one copy, so that
                # the other slots stay free for other prefixes.
                kept.last_used = next(self._clock)
                if kept.followed is None:
                    kept.followed = later
                llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                self._free[slot] = None
                return
        self._free[slot] = _Retained(tokens, next(self._clock), later)

    def _worth_prefilling(self, offered: int, followed: int) -> bool:
        # Pieces need >= 64 rows; a shorter rest would gain the next turn nothing (it prefills >= 64).
        return self.offers_idle_prefill and followed - offered >= self._min_rows

    def idle_prefill_pending(self) -> bool:
        return any(kept is not None and kept.followed is not None for kept in self._free.values())

    def next_idle_prefill(self) -> tuple[int, int, np.ndarray] | None:
        """The next piece to prefill while idle, as (slot, first position, tokens), or None.

        The most recently freed slot first (the likeliest next turn). A piece starts where the
        slot's offered tokens end, has >= 64 rows and at most a chunk, and leaves no rest shorter
        than 64 rows when it can avoid it."""
        pending = [
            (kept.last_used, slot)
            for slot, kept in self._free.items()
            if kept is not None and kept.followed is not None
        ]
        if not pending:
            return None
        slot = max(pending)[1]
        kept = self._free[slot]
        start = len(kept.tokens)
        left = len(kept.followed) - start
        rows = min(left, self._chunk)
        if 0 < left - rows < self._min_rows and left - self._min_rows >= self._min_rows:
            rows = left - self._min_rows
        return slot, start, kept.followed[start : start + rows]

    def idle_prefilled(self, slot: int, end: int) -> None:
        """The slot's positions up to `end` were prefilled from `followed`: offer them."""
        kept = self._free[slot]
        self.stats.idle_prefilled_tokens += end - len(kept.tokens)
        kept.tokens = kept.followed[:end]
        if not self._worth_prefilling(end, len(kept.followed)):
            kept.followed = None

    def idle_prefill_stopped(self, slot: int, *, interrupted: bool) -> None:
        """A piece did not complete (its positions were removed): retry it later when interrupted,
        drop what is left when it failed."""
        if interrupted:
            self.stats.idle_prefills_interrupted += 1
        else:
            self._free[slot].followed = None

    def clear(self) -> None:
        """Drop every retained prefix (after a failed step, when no KV can be trusted)."""
        for slot, kept in self._free.items():
            if kept is not None:
                llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                self._free[slot] = None


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
