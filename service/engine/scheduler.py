"""The continuous-batching scheduler: one thread owns the llama context and runs every step.

Requests join between steps, as soon as enough sequence slots are free for all their choices
(slots.py), and leave between steps, when finished, failed or cancelled. Which waiting request
joins next is admission.py's: a queue per API key and the keys in turn, so that one key's flood
does not hold another key's request behind all of it; a request whose choices do not fit yet holds
its turn until they do. Each step decodes the next token of every decoding sequence in one batch
(one `llama_decode`) and samples them all in one call (sampling.py), after the prompt chunks of
newcomers, each chunk in a decode call of its own, at most one chunk per step while others decode,
so that a newcomer does not stall the sequences already decoding. Prompts are
prefilled in chunks of `prefill_chunk` tokens at fixed boundaries, whatever the prefix cache
supplied, so that reusing a prefix never changes the output (prefix_cache.py). The other parts of
a step have files of their own: n choices sharing one prefill (choices.py), the decoding
sequences' guesses and what checking them costs (speculation.py, speculative_step.py,
step_cost.py), the prefill of finished sequences' answers while idle (idle_prefill.py), and
letting llama.cpp's threads go when there is nothing to decode (openmp.py).

Decode runs on this thread, never on the asyncio loop; results go back to the loop with
`call_soon_threadsafe`, one update per sequence per step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from service.auth import SHARED_TENANT
from service.engine import choices
from service.engine.admission import FairQueue, Ticket
from service.engine.batch import Decoder
from service.engine.idle_prefill import IdlePrefill
from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.openmp import WorkerPool
from service.engine.prefix_cache import PrefixCache
from service.engine.sampling import RowSampler
from service.engine.sequence import Sequence, SequenceUpdate
from service.engine.slots import Slots
from service.engine.speculation import PromptLookup
from service.engine.speculative_step import SpeculativeStep
from service.engine.timings import StepTimings
from service.engine_settings import EngineSettings
from service.errors import GenerationFailed, QueueFull, ServiceError, ShuttingDown
from service.request import Generation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLoad:
    """What a scheduler holds at one moment (service/metrics.py exports it)."""

    waiting: int  # requests queued for a slot
    running: int  # requests admitted and not over
    kv_cells_used: int  # KV cells holding running sequences' tokens
    kv_cells: int  # KV cells of the context, every slot's together


class RequestStream:
    """The asyncio side of one request: the updates of its n choices, and a way to cancel it."""

    def __init__(self, scheduler: Scheduler, queue: asyncio.Queue, ticket: Ticket[list[Sequence]]) -> None:
        self._scheduler = scheduler
        self._queue = queue
        self._ticket = ticket
        self.sequences = ticket.request

    async def updates(self) -> AsyncIterator[SequenceUpdate]:
        """Every choice's updates, interleaved, until all n have finished (or one failed)."""
        open_choices = len(self.sequences)
        while open_choices:
            update = await self._queue.get()
            if update.finish_reason is not None:
                open_choices -= 1
            last = update.error is not None or not open_choices
            if last:
                # Before the client can see the end: its next request may come at once and must find
                # this one no longer counted against its key (--max-inflight-per-key).
                self._scheduler.end(self._ticket)
            yield update
            if last:
                return

    def cancel(self) -> None:
        """Stop generating; the scheduler frees the sequences at its next step."""
        self._scheduler.cancel(self._ticket)


_DEFAULTS = EngineSettings()  # the engine flags' defaults, defined once


class Scheduler:
    """Runs generation for one model; `submit` from the asyncio loop, everything else on its thread."""

    def __init__(
        self,
        model: LoadedModel,
        constraints: ConstraintCompiler,
        *,
        max_waiting: int = _DEFAULTS.max_waiting,
        max_inflight_per_key: int = _DEFAULTS.max_inflight_per_key,
        max_slots_per_key: int = _DEFAULTS.max_slots_per_key,
        prefill_chunk: int = _DEFAULTS.prefill_chunk,
        prefix_cache: bool = _DEFAULTS.prefix_cache,
        idle_prefill: bool = _DEFAULTS.idle_prefill,
        speculative_tokens: int = _DEFAULTS.speculative_tokens,
        speculative_ngram: tuple[int, int] = _DEFAULTS.speculative_ngram,
    ) -> None:
        self._model = model
        self._prefill_chunk = min(prefill_chunk, model.batch_size)
        self._condition = threading.Condition()
        # Requests, as their sequences, per key (either limit 0: none).
        self._waiting: FairQueue[list[Sequence]] = FairQueue(
            max_waiting=max_waiting,
            max_inflight_per_tenant=max_inflight_per_key,
            max_slots_per_tenant=max_slots_per_key,
        )
        self._active: list[Sequence] = []
        self._stopping = False
        self._arriving = 0  # requests being checked and tokenized for this model (arriving())
        self.timings = StepTimings()
        self.prefix_cache = PrefixCache(
            model.memory,
            self._prefill_chunk,
            enabled=prefix_cache,
            any_boundary=model.reuse_keeps_output,
            rows_independent=model.rows_independent,
        )
        self.slots = Slots(model.memory, model.max_sequences, self.prefix_cache)
        self._decoder = Decoder(model, self.timings)
        self._sampler = RowSampler(model, constraints, self.timings)
        self.idle_prefill = IdlePrefill(
            model, self._decoder.batch, self.prefix_cache, self.timings, enabled=idle_prefill
        )
        # Every decode step runs through it, guessed or not. Where rows are not independent,
        # checking guesses would change the logits of the rows that check them (speculation.py); a
        # memory that cannot drop a tail (recurrent models) cannot take rejected guesses back.
        lookup = PromptLookup(speculative_tokens, *speculative_ngram)
        self._decode_step = SpeculativeStep(model, lookup, self._decoder, self._sampler, self.timings)
        self.speculating = speculative_tokens > 0 and model.reuse_keeps_output and not model.is_recurrent
        self._workers = WorkerPool()
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{model.model_id}", daemon=True)
        self._thread.start()

    @property
    def thread_id(self) -> int:
        """The native id of the thread that decodes (service/cpu_priority.py keeps it first)."""
        return self._thread.native_id

    # ---- asyncio side -------------------------------------------------------------------------

    @contextlib.contextmanager
    def arriving(self, tenant: str = SHARED_TENANT) -> Iterator[None]:
        """A request of `tenant` on its way, from its arrival until it is queued (submit) or refused.

        What submit() would refuse now (the queue full, the key at its limit) is refused at once,
        before the request is checked, rendered and tokenized. Then no idle prefill piece runs
        meanwhile: the request's checks and tokenization run at a lower CPU priority than this
        thread (service/cpu_priority.py), so a piece would take the cores from them, and the request
        could reach submit(), which stops pieces, only after several."""
        with self._condition:
            self._check_open()
            self._waiting.check(tenant)
            self._arriving += 1
            self.idle_prefill.interrupt()
        try:
            yield
        finally:
            with self._condition:
                self._arriving -= 1
                self._condition.notify()

    def _check_open(self) -> None:
        """Refuses a new request once the server is stopping. Under the lock."""
        if self._stopping:
            raise QueueFull("The server is shutting down.")

    def submit(self, generation: Generation, tenant: str = SHARED_TENANT) -> RequestStream:
        """Queue the request under `tenant`, its API key's name (service/auth.py: Tenants)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SequenceUpdate] = asyncio.Queue()

        def deliver(update: SequenceUpdate) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, update)

        def make(index: int, seed: int) -> Sequence:
            return Sequence(
                generation,
                index=index,
                seed=seed,
                token_bytes=self._model.token_bytes,
                is_end_of_generation=self._model.is_end_of_generation,
                deliver=deliver,
                tenant=tenant,
            )

        sequences = choices.new_choices(generation, make)
        with self._condition:
            self._check_open()
            ticket = self._waiting.push(tenant, sequences, len(sequences))
            self.idle_prefill.interrupt()  # the request must not wait for an idle piece
            self._condition.notify()
        return RequestStream(self, queue, ticket)

    def cancel(self, ticket: Ticket[list[Sequence]]) -> None:
        """A waiting request leaves the queue at once; an active one at the scheduler's next step."""
        with self._condition:
            was_waiting = self._waiting.end(ticket)
            if all(s.finished for s in ticket.request):
                return
            for sequence in ticket.request:
                sequence.cancelled = True
            if not was_waiting:
                self._condition.notify()

    def end(self, ticket: Ticket[list[Sequence]]) -> None:
        """The request's last update has reached the asyncio side: it no longer counts against its key."""
        with self._condition:
            self._waiting.end(ticket)

    def load(self) -> EngineLoad:
        """Any thread. The sequences' positions are read as the scheduler thread last wrote them."""
        with self._condition:
            waiting, running = len(self._waiting), self._waiting.running
            used = sum(sequence.n_past for sequence in list(self._active))  # a copy: one C call, atomic
        cells = self._model.context_per_sequence * self._model.max_sequences
        return EngineLoad(waiting, running, used, cells)

    def close(self) -> None:
        with self._condition:
            self._stopping = True
            self.idle_prefill.interrupt()
            self._condition.notify()
        self._thread.join()

    # ---- scheduler thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            piece = None
            with self._condition:
                while not self._stopping and not self._waiting and not self._active:
                    piece = None if self._arriving else self.idle_prefill.start()
                    if piece is not None:
                        break
                    self._condition.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible()
            if piece is not None:
                self.idle_prefill.run(piece, self._condition)
                if not self._waiting and not self._stopping:
                    self._went_idle()
                continue
            # Set-up (sampler state, grammar matcher) happens outside the lock: submit() takes the
            # lock on the asyncio loop, which must never wait for a grammar to compile.
            for request in admitted:
                self._start(request)
            if self._active:
                try:
                    self._step()
                except Exception:  # one bad step must not end the server
                    log.exception("generation step failed; failing its sequences")
                    for sequence in list(self._active):
                        self._fail(sequence, GenerationFailed("internal error during generation"))
                    # A llama_decode that failed half-way may leave any stream in doubt.
                    self.slots.clear()
                if not self._active and not self._waiting:
                    self._went_idle()
        # What the engine still holds as it stops: after an idle period every count is zero.
        # benchmarks/soak.py reads this line to check that no slot was lost along the way.
        log.info(
            "scheduler %s stopping: %d sequences active, %d requests waiting, %d of %d slots in use",
            self._model.model_id, len(self._active), len(self._waiting),
            self._model.max_sequences - self.slots.free_count, self._model.max_sequences,
        )  # fmt: skip
        for sequence in list(self._active) + [s for request in self._waiting.drain() for s in request]:
            self._fail(sequence, ShuttingDown())

    def _went_idle(self) -> None:
        # llama.cpp's workers would spin a while (openmp.py), unless idle prefill keeps them busy.
        if not self.idle_prefill.pending():
            self._workers.release()

    def _take_admissible(self) -> list[list[Sequence]]:
        """Waiting requests, the keys in turn, while enough sequence slots are free for all their choices."""
        return self._waiting.take(self.slots.free_count, self._held_slots())

    def _held_slots(self) -> collections.Counter[str]:
        """The slots each key's running sequences hold."""
        return collections.Counter(sequence.tenant for sequence in self._active)

    def _start(self, request: list[Sequence]) -> None:
        admitted = time.monotonic()
        for sequence in request:
            sequence.admitted_at = admitted
            # Choice 0 prefills the prompt; the other choices get a copy of its KV, whatever they held.
            prompt = None if sequence.awaiting_fork else sequence.generation.prompt_tokens
            sequence.seq_id, reused = self.slots.acquire(prompt)
            sequence.prefilled = sequence.n_past = sequence.reusable = sequence.cached_tokens = reused
            self._active.append(sequence)
        try:
            for sequence in request:
                self._sampler.add(sequence)
        except GenerationFailed as error:
            for sequence in request:
                self._fail(sequence, error)

    def _release(self, sequence: Sequence, *, keep_prompt: bool) -> None:
        """Free the sequence's slot. `keep_prompt`: its KV may serve a later request (true after a
        finish or a cancel, both taken between steps, when every llama_decode it was part of has
        completed; false after a failure, when nothing in its KV is trusted)."""
        self._active.remove(sequence)
        prompt = sequence.generation.prompt_tokens
        offered = None
        if keep_prompt:
            offered = prompt[: sequence.reusable]
            if self.prefix_cache.offers_output and sequence.reusable == len(prompt):
                # The answer's KV as decoded: the last token generated is not in it yet.
                offered = [*prompt, *sequence.output_tokens][: sequence.n_past]
        followed = None
        if offered is not None and self.idle_prefill.enabled:
            # The last token generated is not in the KV yet: prefilled while idle, it may be (in room).
            tokens = [*prompt, *sequence.output_tokens][: self._model.context_per_sequence]
            followed = self.idle_prefill.leftover(len(offered), tokens)
        self.slots.release(sequence.seq_id, offered, followed)
        self._sampler.remove(sequence)
        self._decode_step.forget(sequence)
        sequence.finished = True

    def _fail(self, sequence: Sequence, error: ServiceError) -> None:
        if sequence in self._active:
            self._release(sequence, keep_prompt=False)
        elif sequence.finished:
            return  # already ended and reported
        sequence.fail(error)
        for orphan in choices.orphans(sequence):
            self._fail(orphan, error)  # they would wait for a prompt that never comes

    def _deliver(self, sequence: Sequence, outcome: SequenceUpdate | GenerationFailed) -> None:
        if isinstance(outcome, GenerationFailed):
            self._fail(sequence, outcome)
            return
        sequence.deliver(outcome)
        if sequence.finished:
            self._release(sequence, keep_prompt=True)

    def _step(self) -> None:
        for sequence in [s for s in self._active if s.cancelled]:
            self._release(sequence, keep_prompt=True)
        decoding = [s for s in self._active if not s.in_prefill]
        # Prompt chunks have fixed boundaries and each gets its own llama_decode, never shared with
        # other sequences' tokens: llama.cpp picks its matrix kernels by batch size, so a sequence's
        # logits would otherwise depend on what else was in its batch (docs/engine.md, "Determinism").
        # They run before the decoding rows' batch: a prompt that completes has its first token one
        # decode sooner, and the rows wait for both either way. The key holding the fewest slots goes
        # first, so that a newcomer is not kept a step behind a flood's prompts (admission.py).
        budget = self._prefill_chunk if decoding else self._decoder.batch.capacity
        prompts = [s for s in self._active if s.in_prefill and not s.awaiting_fork]
        if len(prompts) > 1:
            held = self._held_slots()
            prompts.sort(key=lambda s: held[s.tenant])  # stable: admission order within a key
        for sequence in prompts:
            if budget <= 0:
                break
            budget -= self._prefill(sequence)
        if decoding:
            self._decode(decoding)

    def _decode(self, decoding: list[Sequence]) -> None:
        """One token for every decoding sequence, in one batch, and the guesses that pay."""
        self.timings.steps_by_rows[len(decoding)] += 1
        # With a KV stream per sequence llama.cpp puts only consecutive, increasing sequence ids in
        # one ubatch and runs every other run of ids as a ubatch of its own, a whole pass over the
        # weights each: rows out of order (admission order) would split a step of 8 rows into up to
        # 8 passes. The slots are handed out so that the active ids stay in few runs.
        decoding.sort(key=attrgetter("seq_id"))
        step = self._decode_step
        guessing = self.speculating and step.available
        started = time.perf_counter()
        drafts = (step.drafts(decoding) if guessing else None) or [[] for _ in decoding]
        outcomes = step.run(decoding, drafts)
        if guessing:
            step.timed([s.seq_id for s in decoding], [1 + len(d) for d in drafts], time.perf_counter() - started)
        for sequence, outcome in zip(decoding, outcomes, strict=True):
            self._deliver(sequence, outcome)

    def _prefill(self, sequence: Sequence) -> int:
        """The next prompt chunk of one sequence; returns how many tokens it took."""
        start = sequence.prefilled
        # Chunks end at multiples of the chunk size, as in a cold prefill, also after a reused
        # prefix that ends elsewhere (the prefix cache makes that first piece long enough).
        count = min((start // self._prefill_chunk + 1) * self._prefill_chunk, sequence.prompt_length) - start
        completes = start + count == sequence.prompt_length
        batch = self._decoder.batch
        batch.clear()
        batch.add(
            sequence.seq_id, sequence.generation.prompt_tokens[start : start + count], start, output_last=completes
        )
        self._decoder.run()
        self.timings.prefilled_tokens += count
        sequence.prefilled = sequence.n_past = start + count
        if sequence.reusable == start and self.prefix_cache.reusable_chunk(count):
            sequence.reusable = start + count
        if completes:
            rows = [sequence, *choices.fork(self._model.memory, sequence, self._active)]
            logits = self._decoder.logits(1)
            if len(rows) > 1:
                logits = np.repeat(logits, len(rows), axis=0)  # the choices share this row: copied once per request
            self._sample(rows, logits)
        return count

    def _sample(self, rows: list[Sequence], logits: np.ndarray) -> None:
        for sequence, outcome in zip(rows, self._sampler.sample(rows, logits), strict=True):
            self._deliver(sequence, outcome)
