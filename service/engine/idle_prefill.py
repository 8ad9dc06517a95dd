"""Idle prefill: while no request runs, prefill again what finished sequences generated, so that a
chat's next turn reuses the KV of its last answer as well as of its history.

Only with `--fast-nondeterministic`: there what a sequence generated was decoded one row at a time,
so its KV is not what a prefill computes and a free slot does not offer it as it is (prefix_cache.py,
"Exactness"). A free slot keeps those tokens instead (`Retained.followed`), and when nothing is
waiting or running the scheduler thread prefills them in the free slot, piece by piece (each >= 64
rows and at most a prefill chunk, the most recently freed slot first), after which the slot offers
them like prompt tokens. With the default kernels the slot offers the answer's KV as it was
decoded, and idle prefill has nothing to do.

A request that arrives meanwhile must not wait for a piece: `interrupt` raises a flag that
llama.cpp's abort callback (`sampler_ext.DecodeInterrupt`, read in Rust without the GIL) checks
between graph nodes, so the piece stops within one node. A stopped piece's positions are removed
and the piece is done again at the next idle time.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Sequence as TokenList
from dataclasses import dataclass

import llama_cpp
import numpy as np

import sampler_ext
from service.engine.batch import TokenBatch
from service.engine.model import LoadedModel, llama_messages_at_debug
from service.engine.prefix_cache import PrefixCache
from service.engine.timings import StepTimings

log = logging.getLogger(__name__)

# llama_decode's status when the abort callback stopped it.
_DECODE_ABORTED = 2


@dataclass(frozen=True)
class Piece:
    """Tokens to prefill into a free slot from position `start`, where what it offers ends."""

    slot: int
    start: int
    tokens: np.ndarray


@dataclass
class IdlePrefillStats:
    """Counters since start, for tests and benchmarks."""

    prefilled_tokens: int = 0  # tokens finished sequences went on with, prefilled while idle
    interrupted: int = 0  # pieces stopped because a request came


class IdlePrefill:
    """Prefills free slots' generated tokens while the scheduler is idle (scheduler thread), and
    stops a piece when a request arrives (any thread, under the scheduler's lock)."""

    def __init__(
        self,
        model: LoadedModel,
        batch: TokenBatch,
        cache: PrefixCache,
        timings: StepTimings,
        *,
        enabled: bool,
    ) -> None:
        self._model = model
        self._batch = batch
        self._cache = cache
        self._timings = timings
        # Pieces need chunks of any boundary (prefix_cache.py): not with flash attention off. Where
        # the answers' KV is offered as it was decoded (the default kernels), nothing is left to do.
        self.enabled = enabled and cache.enabled and cache.min_rows is not None and not cache.offers_output
        self._min_rows = cache.min_rows or 0
        self.stats = IdlePrefillStats()
        self.running = False  # a piece is in llama_decode (read and written under the scheduler's lock)
        self._interrupt = sampler_ext.DecodeInterrupt()
        if self.enabled:
            # Kept referenced: llama.cpp holds the function pointer for the context's lifetime.
            self._abort_callback = llama_cpp.ggml_abort_callback(self._interrupt.callback)
            llama_cpp.llama_set_abort_callback(
                model.context, self._abort_callback, ctypes.c_void_p(self._interrupt.data)
            )

    def leftover(self, offered: int, followed: TokenList[int]) -> np.ndarray | None:
        """What a released slot should keep to prefill while idle: the prompt and the generated
        tokens (`followed`) when they reach a piece past the `offered` ones, else None."""
        # A shorter rest would gain the next turn nothing: it prefills >= 64 rows anyway.
        if not self.enabled or len(followed) - offered < self._min_rows:
            return None
        return np.asarray(followed, dtype=np.int32)

    def pending(self) -> bool:
        return any(kept.followed is not None for _, kept in self._cache.entries())

    def start(self) -> Piece | None:
        """The next piece, marked running; None when there is nothing to prefill. Under the lock."""
        if not self.enabled:
            return None
        piece = self._next_piece()
        if piece is not None:
            self._interrupt.clear()
            self.running = True
        return piece

    def _next_piece(self) -> Piece | None:
        """The most recently freed slot first (the likeliest next turn). A piece starts where the
        slot's offered tokens end, has >= 64 rows and at most a chunk, and leaves no rest shorter
        than 64 rows when it can avoid it."""
        pending = [(kept.last_used, slot) for slot, kept in self._cache.entries() if kept.followed is not None]
        if not pending:
            return None
        slot = max(pending)[1]
        kept = self._cache.holds(slot)
        start = len(kept.tokens)
        left = len(kept.followed) - start
        rows = min(left, self._cache.chunk)
        if 0 < left - rows < self._min_rows and left - self._min_rows >= self._min_rows:
            rows = left - self._min_rows
        return Piece(slot, start, kept.followed[start : start + rows])

    def interrupt(self) -> None:
        """Stop the running piece, if any, within one graph node. Under the scheduler's lock."""
        if self.running:
            self._interrupt.raise_()

    def run(self, piece: Piece, lock: threading.Condition) -> None:
        """Prefill one piece into its free slot (scheduler thread, without the lock)."""
        memory = self._model.memory
        status = -1
        if llama_cpp.llama_memory_seq_rm(memory, piece.slot, piece.start, -1):
            batch = self._batch
            batch.clear()
            batch.add(piece.slot, piece.tokens, piece.start, output_last=False)
            started = time.perf_counter()
            with llama_messages_at_debug():  # llama.cpp logs a stopped decode at ERROR level
                status = llama_cpp.llama_decode(self._model.context, batch.finish())
            self._timings.idle_prefill_seconds += time.perf_counter() - started
        with lock:
            self.running = False
            interrupted = self._interrupt.is_raised
            self._interrupt.clear()
        kept = self._cache.holds(piece.slot)
        if status == 0:
            end = piece.start + len(piece.tokens)
            self.stats.prefilled_tokens += end - len(kept.tokens)
            kept.tokens = kept.followed[:end]
            if self.leftover(end, kept.followed) is None:
                kept.followed = None
            return
        # Whatever part of the piece was written is dropped; the KV before `start` is untouched.
        llama_cpp.llama_memory_seq_rm(memory, piece.slot, piece.start, -1)
        if status == _DECODE_ABORTED and interrupted:
            self.stats.interrupted += 1  # done again at the next idle time
        else:
            log.warning("idle prefill of slot %d failed (llama_decode returned %d); dropping it", piece.slot, status)
            kept.followed = None
