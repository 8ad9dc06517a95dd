"""The continuous-batching scheduler: one thread owns the llama context and runs every step.

Each step decodes the next token of every decoding sequence in one batch (one `llama_decode`) and
samples them all in one call to the Rust `BatchSampler`; then it prefills prompt chunks of newcomers,
each chunk in a decode call of its own. Requests join between steps (as soon as enough sequence
slots are free) and leave between steps (when finished or cancelled). A slot given back keeps the
KV of the prompt positions it may offer again (`Sequence.reusable`: those prefilled in chunks that
`PrefixCache.reusable_chunk` accepts), so that a later request with the same prefix (the next turn
of a chat) starts from there; prefix_cache.py says why that never changes the output. Prompts are
prefilled in chunks of `prefill_chunk` tokens, at most one chunk per step while others decode, so
that a newcomer does not stall the sequences already decoding. A request for n choices prefills its
prompt once, as choice 0, then copies that KV cache to the other n - 1 sequences, which sample their
first token from the same logits. While a single sequence decodes, a step may also check guesses of
its next tokens (speculation.py), emitting several tokens at once. Decode runs on this thread, never
on the asyncio loop; results go back to the loop with `call_soon_threadsafe`, one update per
sequence per step.

When no request is waiting or running, the thread prefills again, piece by piece, what finished
sequences generated (`PrefixCache.next_idle_prefill`), so that a chat's next turn reuses its last
answer's KV as well as its history's; a request that arrives meanwhile raises a flag that llama.cpp
checks between graph nodes (`sampler_ext.DecodeInterrupt`), so it waits for a node, not a piece.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from operator import attrgetter

import llama_cpp
import numpy as np

import sampler_ext
from service.engine.batch import TokenBatch
from service.engine.grammar import GrammarCompiler
from service.engine.model import LoadedModel, llama_messages_at_debug
from service.engine.openmp import WorkerPool
from service.engine.prefix_cache import PrefixCache
from service.engine.sequence import Sequence, SequenceUpdate, merged
from service.engine.speculation import PromptLookup
from service.errors import InvalidArgument, QueueFull
from service.request import Generation

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def choice_seed(seed: int, index: int) -> int:
    """Choice 0 uses the request's seed itself (so n=1 and n>1 agree on it); the others a
    splitmix64 scramble of (seed, index), so `seed` with `n` reproduces every choice."""
    if index == 0:
        return seed & _MASK64
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass
class StepTimings:
    """Where the scheduler thread's time goes, summed since start (read by benchmarks/profiling)."""

    decode_seconds: float = 0.0  # inside llama_decode
    decode_calls: int = 0
    sample_seconds: float = 0.0  # inside BatchSampler.sample
    mask_seconds: float = 0.0  # grammar bitmasks
    sampled_rows: int = 0
    prefilled_tokens: int = 0  # prompt tokens run through llama_decode (not those the prefix cache held)
    speculative_steps: int = 0  # decode steps that checked guesses (speculation.py)
    drafted_tokens: int = 0  # guesses checked
    accepted_tokens: int = 0  # of them, those that held (tokens gained over plain steps)
    idle_prefill_seconds: float = 0.0  # inside llama_decode for idle prefill (not in decode_seconds)


class RequestStream:
    """The asyncio side of one request: the updates of its n choices, and a way to cancel it."""

    def __init__(self, scheduler: Scheduler, queue: asyncio.Queue, sequences: list[Sequence]) -> None:
        self._scheduler = scheduler
        self._queue = queue
        self.sequences = sequences

    async def updates(self) -> AsyncIterator[SequenceUpdate]:
        """Every choice's updates, interleaved, until all n have finished (or one failed)."""
        open_choices = len(self.sequences)
        while open_choices:
            update = await self._queue.get()
            yield update
            if update.error is not None:
                return
            if update.finish_reason is not None:
                open_choices -= 1

    def cancel(self) -> None:
        """Stop generating; the scheduler frees the sequences at its next step."""
        if not all(s.finished for s in self.sequences):
            self._scheduler.cancel(self.sequences)


class Scheduler:
    """Runs generation for one model; `submit` from the asyncio loop, everything else on its thread."""

    def __init__(
        self,
        model: LoadedModel,
        grammars: GrammarCompiler,
        *,
        max_waiting: int = 256,
        prefill_chunk: int = 256,
        prefix_cache: bool = True,
        idle_prefill: bool = True,
        speculative_tokens: int = 3,
        speculative_ngram: tuple[int, int] = (2, 4),
    ) -> None:
        self._model = model
        self._grammars = grammars
        self._max_waiting = max_waiting
        self._prefill_chunk = min(prefill_chunk, model.batch_size)
        self._condition = threading.Condition()
        self._waiting: collections.deque[list[Sequence]] = collections.deque()  # requests, as their sequences
        self._active: list[Sequence] = []
        self.prefix_cache = PrefixCache(
            model.memory,
            model.max_sequences,
            self._prefill_chunk,
            enabled=prefix_cache,
            any_boundary=not model.deterministic,
            idle_prefill=idle_prefill,
        )
        self._batch = TokenBatch(model.batch_size)
        # Sampling runs right after llama_decode, while llama.cpp's own threads still hold both
        # cores: a helper thread woken then cost more than it saved (benchmarks/engine_steps.py,
        # docs/benchmarks.md), so the scheduler thread samples alone.
        self._sampler = sampler_ext.BatchSampler(model.vocab_size, helper_thread=False)
        # One mask row per possible output row; an unconstrained row is all ones.
        self._masks = np.full((model.max_sequences, grammars.words), 0xFFFFFFFF, dtype=np.uint32)
        # Guesses change which kernels compute a row (speculation.py), and a memory that cannot drop
        # a tail (recurrent models) cannot take rejected guesses back.
        self._lookup = None
        if speculative_tokens > 0 and not model.deterministic and not model.is_recurrent:
            self._lookup = PromptLookup(speculative_tokens, *speculative_ngram)
        self._stopping = False
        self._workers = WorkerPool()
        self._idle_prefilling = False  # a piece is in llama_decode (read and written under the lock)
        self._interrupt = sampler_ext.DecodeInterrupt()
        if self.prefix_cache.offers_idle_prefill:
            # Kept referenced: llama.cpp holds the function pointer for the context's lifetime.
            self._abort_callback = llama_cpp.ggml_abort_callback(self._interrupt.callback)
            llama_cpp.llama_set_abort_callback(
                model.context, self._abort_callback, ctypes.c_void_p(self._interrupt.data)
            )
        self.timings = StepTimings()
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{model.model_id}", daemon=True)
        self._thread.start()

    @property
    def idle_prefilling(self) -> bool:
        """Whether an idle prefill piece is in llama_decode now (for tests)."""
        return self._idle_prefilling

    # ---- asyncio side -------------------------------------------------------------------------

    def submit(self, generation: Generation) -> RequestStream:
        if generation.n > self._model.max_sequences:
            raise InvalidArgument(
                "n", f"'n' may be at most {self._model.max_sequences} on this server (its --parallel)."
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SequenceUpdate] = asyncio.Queue()
        seed = generation.sampling.seed if generation.sampling.seed is not None else secrets.randbits(64)

        def deliver(update: SequenceUpdate) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, update)

        sequences = [
            Sequence(
                generation,
                index=index,
                seed=choice_seed(seed, index),
                token_bytes=self._model.token_bytes,
                is_end_of_generation=self._model.is_end_of_generation,
                deliver=deliver,
            )
            for index in range(generation.n)
        ]
        sequences[0].siblings = sequences[1:]
        for sibling in sequences[1:]:
            sibling.awaiting_fork = True
        with self._condition:
            if self._stopping:
                raise QueueFull("The server is shutting down.")
            if len(self._waiting) >= self._max_waiting:
                raise QueueFull(f"The server is busy: {len(self._waiting)} requests are waiting. Retry later.")
            self._waiting.append(sequences)
            if self._idle_prefilling:
                self._interrupt.raise_()  # the request must not wait for an idle piece
            self._condition.notify()
        return RequestStream(self, queue, sequences)

    def cancel(self, sequences: list[Sequence]) -> None:
        """A waiting request leaves the queue at once; an active one at the scheduler's next step."""
        with self._condition:
            for sequence in sequences:
                sequence.cancelled = True
            try:
                self._waiting.remove(sequences)
            except ValueError:
                self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._stopping = True
            if self._idle_prefilling:
                self._interrupt.raise_()
            self._condition.notify()
        self._thread.join()

    # ---- scheduler thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            piece = None
            with self._condition:
                while not self._stopping and not self._waiting and not self._active:
                    piece = self.prefix_cache.next_idle_prefill()
                    if piece is not None:
                        self._interrupt.clear()
                        self._idle_prefilling = True
                        break
                    self._condition.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible()
            if piece is not None:
                self._prefill_while_idle(*piece)
                continue
            # Set-up (sampler state, grammar matcher) happens outside the lock: submit() takes the
            # lock on the asyncio loop, which must never wait for a grammar to compile.
            for request in admitted:
                self._start(request)
            if self._active:
                try:
                    self._step()
                except Exception:
                    log.exception("generation step failed; failing its sequences")
                    for sequence in list(self._active):
                        self._fail(sequence, "internal error during generation")
                    # A llama_decode that failed half-way may leave any stream in doubt.
                    self.prefix_cache.clear()
                if not self._active and not self._waiting:
                    self._went_idle()
        for sequence in list(self._active) + [s for request in self._waiting for s in request]:
            self._fail(sequence, "the server is shutting down")

    def _went_idle(self) -> None:
        # llama.cpp's workers would spin for ~10 ms (openmp.py), unless idle prefill keeps them busy.
        if not self.prefix_cache.idle_prefill_pending():
            self._workers.release()

    def _prefill_while_idle(self, slot: int, start: int, tokens: np.ndarray) -> None:
        """One piece of what a finished sequence went on with, into its free slot (from `start`,
        where the KV the slot offers ends); stopped by the first request that comes."""
        memory = self._model.memory
        status = -1
        if llama_cpp.llama_memory_seq_rm(memory, slot, start, -1):
            batch = self._batch
            batch.clear()
            batch.add(slot, tokens, start, output_last=False)
            started = time.perf_counter()
            with llama_messages_at_debug():  # a stopped piece is logged at ERROR level by llama.cpp
                status = llama_cpp.llama_decode(self._model.context, batch.finish())
            self.timings.idle_prefill_seconds += time.perf_counter() - started
        with self._condition:
            self._idle_prefilling = False
            interrupted = self._interrupt.is_raised
            self._interrupt.clear()
        if status == 0:
            self.prefix_cache.idle_prefilled(slot, start + len(tokens))
        else:
            # Whatever part of the piece was written is dropped; the KV before `start` is untouched.
            llama_cpp.llama_memory_seq_rm(memory, slot, start, -1)
            aborted = status == 2 and interrupted
            if not aborted:
                log.warning("idle prefill of slot %d failed (llama_decode returned %d); dropping it", slot, status)
            self.prefix_cache.idle_prefill_stopped(slot, interrupted=aborted)
        if not self._waiting and not self._stopping:
            self._went_idle()

    def _take_admissible(self) -> list[list[Sequence]]:
        """Waiting requests, oldest first, while enough sequence slots are free for all their choices."""
        admitted = []
        free = self.prefix_cache.free_count
        while self._waiting and free >= len(self._waiting[0]):
            request = self._waiting.popleft()
            free -= len(request)
            admitted.append(request)
        return admitted

    def _start(self, request: list[Sequence]) -> None:
        for sequence in request:
            # Choice 0 prefills the prompt; the other choices get a copy of its KV, whatever they held.
            prompt = None if sequence.awaiting_fork else sequence.generation.prompt_tokens
            sequence.seq_id, reused = self.prefix_cache.acquire(prompt)
            sequence.prefilled = sequence.n_past = sequence.reusable = reused
            self._active.append(sequence)
        try:
            for sequence in request:
                sampling = sequence.generation.sampling
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
                    sequence.grammar = self._grammars.matcher(sequence.generation.grammar)
        except (ValueError, RuntimeError) as error:
            for sequence in request:
                self._fail(sequence, f"could not start generation: {error}")

    def _release(self, sequence: Sequence, *, keep_prompt: bool) -> None:
        """Free the sequence's slot. `keep_prompt`: its prompt chunks' KV may serve a later request
        (true after a finish or a cancel, both taken between steps, when every llama_decode it
        was part of has completed; false after a failure, when nothing in its KV is trusted)."""
        self._active.remove(sequence)
        prompt = sequence.generation.prompt_tokens
        done = prompt[: sequence.reusable] if keep_prompt else None
        # The last token generated is not in the KV yet: prefilled while idle, it may be (in room).
        followed = None
        if keep_prompt and self.prefix_cache.offers_idle_prefill:
            followed = [*prompt, *sequence.output_tokens][: self._model.context_per_sequence]
        self.prefix_cache.release(sequence.seq_id, done, followed)
        self._sampler.remove(sequence.seq_id)
        if self._lookup is not None:
            self._lookup.forget(sequence)
        sequence.finished = True

    def _fail(self, sequence: Sequence, message: str) -> None:
        if sequence in self._active:
            self._release(sequence, keep_prompt=False)
        elif sequence.finished:
            return  # already ended and reported
        sequence.fail(message)
        for sibling in sequence.siblings:
            if sibling.awaiting_fork and not sibling.finished:
                self._fail(sibling, message)  # they would wait for a prompt that never comes

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Give choice 0's freshly prefilled prompt to its siblings (a KV copy, not a prefill)."""
        forked = []
        for sibling in parent.siblings:
            if sibling.finished or sibling not in self._active:
                continue
            llama_cpp.llama_memory_seq_cp(self._model.memory, parent.seq_id, sibling.seq_id, -1, -1)
            sibling.prefilled = sibling.n_past = parent.prefilled
            sibling.reusable = parent.reusable
            sibling.awaiting_fork = False
            forked.append(sibling)
        return forked

    def _step(self) -> None:
        for sequence in [s for s in self._active if s.cancelled]:
            self._release(sequence, keep_prompt=True)
        decoding = [s for s in self._active if not s.in_prefill]
        if decoding:
            self._decode(decoding)
        # Prompt chunks have fixed boundaries and each gets its own llama_decode, never shared with
        # other sequences' tokens: llama.cpp picks its matrix kernels by batch size, so a sequence's
        # logits would otherwise depend on what else was in its batch (README, "Determinism").
        budget = self._prefill_chunk if decoding else self._batch.capacity
        for sequence in [s for s in self._active if s.in_prefill and not s.awaiting_fork]:
            if budget <= 0:
                break
            budget -= self._prefill(sequence)

    def _run_batch(self) -> None:
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._model.context, self._batch.finish())
        self.timings.decode_seconds += time.perf_counter() - started
        self.timings.decode_calls += 1
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _logits(self, rows: int) -> np.ndarray:
        """A zero-copy view of the last decode's output rows."""
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits(self._model.context), shape=(rows, self._model.vocab_size)
        )

    def _decode(self, decoding: list[Sequence]) -> None:
        """One token for every decoding sequence, in one batch (or a few for a lone sequence whose
        guesses pay)."""
        if len(decoding) == 1 and self._lookup is not None:
            sequence = decoding[0]
            room = min(
                sequence.generation.max_new_tokens - sequence.generated,
                self._model.context_per_sequence - sequence.n_past,
            )
            draft = self._lookup.draft(sequence, sequence.generation.prompt_tokens, sequence.output_tokens, room - 1)
            if draft:
                self._decode_speculative(sequence, draft)
                return
        # With a KV stream per sequence llama.cpp puts only consecutive, increasing sequence ids in
        # one ubatch and runs every other run of ids as a ubatch of its own, a whole pass over the
        # weights each: rows out of order (admission order) would split a step of 8 rows into up to
        # 8 passes. The prefix cache hands out slots so that the active ids stay in few runs.
        decoding.sort(key=attrgetter("seq_id"))
        batch = self._batch
        batch.clear()
        for sequence in decoding:
            batch.add(sequence.seq_id, (sequence.last_token,), sequence.n_past, output_last=True)
        self._run_batch()
        for sequence in decoding:
            sequence.n_past += 1
        self._sample(decoding, self._logits(len(decoding)))

    def _decode_speculative(self, sequence: Sequence, draft: list[int]) -> None:
        """The last token and the guesses in one step, every row with logits; then row by row: sample
        as a plain step would, stop after the first token that differs from the next row's guess."""
        batch = self._batch
        batch.clear()
        batch.add(sequence.seq_id, [sequence.last_token, *draft], sequence.n_past, output_last=True, output_all=True)
        self._run_batch()
        logits = self._logits(len(draft) + 1)
        updates = []
        for row in range(len(draft) + 1):
            try:
                drawn = self._draw([sequence], logits[row : row + 1])
            except ValueError as error:
                self._fail(sequence, f"sampling failed: {error}")
                return
            update = self._take(sequence, drawn, 0)
            if update is None:
                return  # failed (grammar)
            updates.append(update)
            if sequence.finished or row == len(draft) or int(drawn[0][0]) != draft[row]:
                break
        accepted = len(updates) - 1
        sequence.n_past += len(updates)  # the last token and the guesses that held
        self.timings.speculative_steps += 1
        self.timings.drafted_tokens += len(draft)
        self.timings.accepted_tokens += accepted
        self._lookup.record(sequence, len(draft), accepted)
        # Positions after the last good guess hold rejected guesses: drop them.
        if (
            accepted < len(draft)
            and not sequence.finished
            and not llama_cpp.llama_memory_seq_rm(self._model.memory, sequence.seq_id, sequence.n_past, -1)
        ):
            self._lookup = None
            log.warning("this model's memory cannot drop rejected guesses; speculation is off")
            self._fail(sequence, "internal error: rejected guesses could not be removed")
            return
        sequence.deliver(merged(updates))
        if sequence.finished:
            self._release(sequence, keep_prompt=True)

    def _prefill(self, sequence: Sequence) -> int:
        """The next prompt chunk of one sequence; returns how many tokens it took."""
        start = sequence.prefilled
        # Chunks end at multiples of the chunk size, as in a cold prefill, also after a reused
        # prefix that ends elsewhere (the prefix cache makes that first piece long enough).
        count = min((start // self._prefill_chunk + 1) * self._prefill_chunk, sequence.prompt_length) - start
        completes = start + count == sequence.prompt_length
        batch = self._batch
        batch.clear()
        batch.add(
            sequence.seq_id, sequence.generation.prompt_tokens[start : start + count], start, output_last=completes
        )
        self._run_batch()
        self.timings.prefilled_tokens += count
        sequence.prefilled = sequence.n_past = start + count
        if sequence.reusable == start and self.prefix_cache.reusable_chunk(count):
            sequence.reusable = start + count
        if completes:
            rows = [sequence, *self._fork(sequence)]
            logits = self._logits(1)
            if len(rows) > 1:
                logits = np.repeat(logits, len(rows), axis=0)  # forked choices share this row: a copy, once per request
            self._sample(rows, logits)
        return count

    def _sample(self, rows: list[Sequence], logits: np.ndarray) -> None:
        try:
            drawn = self._draw(rows, logits)
        except ValueError:
            # One bad row must not fail the others: sample them one by one to find it.
            for row, sequence in enumerate(rows):
                try:
                    self._emit([sequence], self._draw([sequence], logits[row : row + 1]))
                except ValueError as error:
                    self._fail(sequence, f"sampling failed: {error}")
            return
        self._emit(rows, drawn)

    def _draw(self, rows: list[Sequence], logits: np.ndarray):
        keys = np.fromiter((s.seq_id for s in rows), dtype=np.int64, count=len(rows))
        masks = None
        if any(s.grammar is not None for s in rows):
            started = time.perf_counter()
            masks = self._masks[: len(rows)]
            masks.fill(0xFFFFFFFF)
            for row, sequence in enumerate(rows):
                if sequence.grammar is not None:
                    sequence.grammar.fill_mask(masks[row])
            self.timings.mask_seconds += time.perf_counter() - started
        started = time.perf_counter()
        drawn = self._sampler.sample(logits, keys, masks)
        self.timings.sample_seconds += time.perf_counter() - started
        self.timings.sampled_rows += len(rows)
        return drawn

    def _emit(self, rows: list[Sequence], drawn) -> None:
        for row, sequence in enumerate(rows):
            update = self._take(sequence, drawn, row)
            if update is None:
                continue
            sequence.deliver(update)
            if sequence.finished:
                self._release(sequence, keep_prompt=True)

    def _take(self, sequence: Sequence, drawn, row: int) -> SequenceUpdate | None:
        """The sequence accepts its sampled token; None when the grammar refused it (sequence failed)."""
        tokens, logprobs, top_ids, top_logprobs = drawn
        token = int(tokens[row])
        try:
            if sequence.grammar is not None:
                sequence.grammar.advance(token)
        except RuntimeError as error:
            self._fail(sequence, str(error))
            return None
        top = []
        count = sequence.generation.sampling.top_logprobs
        if count:
            top = list(zip(top_ids[row, :count].tolist(), top_logprobs[row, :count].tolist(), strict=True))
        return sequence.accept(token, float(logprobs[row]), top)
