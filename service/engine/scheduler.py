"""The continuous-batching scheduler: one thread owns the llama context and runs every step.

Each step builds one batch holding the next token of every decoding sequence plus prompt chunks of
sequences still in prefill, runs one `llama_decode`, and samples every sequence whose logits came
out. Requests join between steps (as soon as a sequence slot is free) and leave between steps (when
finished or cancelled, their KV cache is removed at once). Long prompts are prefilled in chunks of
at most `prefill_chunk` tokens per step so that a newcomer does not stall the sequences already
decoding. Decode runs on this thread, never on the asyncio loop; results go back to the loop with
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import threading
from collections.abc import AsyncIterator

import llama_cpp
import numpy as np

import sampler_ext
from service.engine.batch import TokenBatch
from service.engine.model import LoadedModel
from service.engine.sequence import Sequence, SequenceUpdate
from service.errors import QueueFull
from service.request import Generation

log = logging.getLogger(__name__)


class SequenceStream:
    """The asyncio side of one sequence: its updates, and a way to cancel it."""

    def __init__(self, scheduler: "Scheduler", queue: asyncio.Queue) -> None:
        self._scheduler = scheduler
        self._queue = queue
        self.sequence: Sequence | None = None

    async def updates(self) -> AsyncIterator[SequenceUpdate]:
        while True:
            update = await self._queue.get()
            yield update
            if update.finish_reason is not None or update.error is not None:
                return

    def cancel(self) -> None:
        """Stop generating; the scheduler frees the sequence at its next step."""
        if self.sequence is not None and not self.sequence.finished:
            self._scheduler.cancel(self.sequence)


class Scheduler:
    """Runs generation for one model; `submit` from the asyncio loop, everything else on its thread."""

    def __init__(self, model: LoadedModel, *, max_waiting: int = 256, prefill_chunk: int = 256) -> None:
        self._model = model
        self._max_waiting = max_waiting
        self._prefill_chunk = prefill_chunk
        self._condition = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._free_slots = list(range(model.max_sequences - 1, -1, -1))
        self._batch = TokenBatch(model.batch_size)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{model.model_id}", daemon=True)
        self._thread.start()

    # ---- asyncio side -------------------------------------------------------------------------

    def submit(self, generation: Generation) -> SequenceStream:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SequenceUpdate] = asyncio.Queue()
        stream = SequenceStream(self, queue)
        sampling = generation.sampling
        sampler = sampler_ext.SequenceSampler(
            self._model.vocab_size,
            seed=sampling.seed if sampling.seed is not None else secrets.randbits(64),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            logit_bias=sampling.logit_bias,
            top_logprobs=sampling.top_logprobs,
        )
        sequence = Sequence(
            generation,
            sampler=sampler,
            token_bytes=self._model.token_bytes,
            is_end_of_generation=self._model.is_end_of_generation,
            deliver=lambda update: loop.call_soon_threadsafe(queue.put_nowait, update),
        )
        stream.sequence = sequence
        with self._condition:
            if self._stopping:
                raise QueueFull("The server is shutting down.")
            if len(self._waiting) >= self._max_waiting:
                raise QueueFull(f"The server is busy: {len(self._waiting)} requests are waiting. Retry later.")
            self._waiting.append(sequence)
            self._condition.notify()
        return stream

    def cancel(self, sequence: Sequence) -> None:
        """A waiting request leaves the queue at once; an active one at the scheduler's next step."""
        with self._condition:
            sequence.cancelled = True
            try:
                self._waiting.remove(sequence)
            except ValueError:
                self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join()

    @property
    def load(self) -> tuple[int, int]:
        """(active sequences, waiting requests), for logs and health."""
        return len(self._active), len(self._waiting)

    # ---- scheduler thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._waiting and not self._active:
                    self._condition.wait()
                if self._stopping:
                    break
                self._admit()
            if self._active:
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - one bad step must not end the server
                    log.exception("generation step failed; failing its sequences")
                    for sequence in list(self._active):
                        self._fail(sequence, "internal error during generation")
        for sequence in list(self._active) + list(self._waiting):
            self._fail(sequence, "the server is shutting down")

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            sequence = self._waiting.popleft()
            sequence.seq_id = self._free_slots.pop()
            self._active.append(sequence)

    def _release(self, sequence: Sequence) -> None:
        self._active.remove(sequence)
        llama_cpp.llama_memory_seq_rm(self._model.memory, sequence.seq_id, -1, -1)
        self._free_slots.append(sequence.seq_id)
        sequence.finished = True

    def _fail(self, sequence: Sequence, message: str) -> None:
        if sequence in self._active:
            self._release(sequence)
        sequence.finished = True
        sequence.deliver(SequenceUpdate(text="", logprobs=None, finish_reason=None, completion_tokens=sequence.generated, error=message))

    def _step(self) -> None:
        for sequence in [s for s in self._active if s.cancelled]:
            self._release(sequence)
        if not self._active:
            return

        batch = self._batch
        batch.clear()
        decoding = [s for s in self._active if not s.in_prefill]
        for sequence in decoding:
            batch.add(sequence.seq_id, (sequence.last_token,), sequence.n_past, output_last=True)
        sampled = list(decoding)  # every sequence whose logits come out, in the order of their rows
        prefill_budget = min(batch.room, self._prefill_chunk if sampled else batch.room)
        chunks: list[tuple[Sequence, int]] = []
        for sequence in self._active:
            if prefill_budget == 0:
                break
            if sequence.in_prefill:
                start = sequence.prefilled
                count = min(prefill_budget, sequence.prompt_length - start)
                completes = start + count == sequence.prompt_length
                batch.add(sequence.seq_id, sequence.generation.prompt_tokens[start : start + count], start, output_last=completes)
                chunks.append((sequence, count))
                prefill_budget -= count
                if completes:
                    sampled.append(sequence)

        status = llama_cpp.llama_decode(self._model.context, batch.finish())
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

        for sequence in decoding:
            sequence.n_past += 1
        for sequence, count in chunks:
            sequence.prefilled += count
            sequence.n_past = sequence.prefilled

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._model.context), shape=(len(sampled), self._model.vocab_size))
        for row, sequence in enumerate(sampled):
            try:
                token, logprob, top = sequence.sampler.sample(logits[row])
            except ValueError as error:
                self._fail(sequence, f"sampling failed: {error}")
                continue
            update = sequence.accept(token, logprob, top)
            sequence.deliver(update)
            if sequence.finished:
                self._release(sequence)
