"""The sequence slots of one context: which are free, which one a new sequence gets, and what a
freed one keeps.

A model's context holds `--parallel` KV streams, one per slot; every admitted sequence decodes in a
slot of its own (its llama.cpp sequence id). A new sequence gets the free slot whose retained
prefix its prompt reuses (prefix_cache.py); otherwise an empty slot before a retained one (no
eviction), then the slot that adds the fewest runs to the ids in use, then the least recently used
prefix. Runs matter because a decode step makes one llama.cpp ubatch, one pass over the weights,
per run of consecutive sequence ids (scheduler.py, `_decode`).

Only the scheduler thread calls this.
"""

from __future__ import annotations

from collections.abc import Sequence as TokenList

import llama_cpp
import numpy as np

from service.engine.prefix_cache import PrefixCache


class Slots:
    """Hands out free sequence slots, preferring one that already holds a prefix of the prompt."""

    def __init__(self, memory: llama_cpp.llama_memory_t, count: int, cache: PrefixCache) -> None:
        self._memory = memory
        self._count = count
        self.cache = cache
        self._free: set[int] = set(range(count))

    @property
    def free_count(self) -> int:
        return len(self._free)

    def acquire(self, prompt: TokenList[int] | None) -> tuple[int, int]:
        """A free slot for a sequence, and how many leading prompt tokens its KV already holds.

        `prompt` None: the slot's KV will be overwritten (a forked choice), so any slot will do and
        one that retains nothing is taken first."""
        if not self._free:
            raise RuntimeError("no free sequence slot")
        match = self.cache.match(prompt) if prompt is not None else None
        slot, reused = match if match is not None else (min(self._free, key=self._eviction_order), 0)
        self._free.remove(slot)
        kept = self.cache.take(slot)
        # The stream keeps [0, reused); what follows was the old request's own. A memory that
        # cannot drop a tail starts from nothing.
        if reused and llama_cpp.llama_memory_seq_rm(self._memory, slot, reused, -1):
            self.cache.stats.hits += 1
            self.cache.stats.reused_tokens += reused
            return slot, reused
        if kept is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self.cache.stats.evictions += 1
        return slot, 0

    def _eviction_order(self, slot: int) -> tuple[bool, int, int, int]:
        kept = self.cache.holds(slot)
        in_use = (0 <= neighbour < self._count and neighbour not in self._free for neighbour in (slot - 1, slot + 1))
        added_runs = 1 - sum(in_use)
        return kept is not None, added_runs, kept.last_used if kept is not None else 0, slot

    def release(self, slot: int, offered: TokenList[int] | None, followed: np.ndarray | None = None) -> None:
        """Give a slot back; the prefix cache says whether its KV stays (PrefixCache.keep)."""
        if not self.cache.keep(slot, offered, followed):
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._free.add(slot)

    def clear(self) -> None:
        """Drop every retained prefix (after a failed step, when no KV can be trusted)."""
        for slot in self.cache.drop_all():
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
