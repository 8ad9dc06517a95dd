"""A step's llama_decode: the batch of tokens it takes and the logits it leaves.

`TokenBatch` is a llama_batch whose arrays are numpy arrays, so a step's batch is filled with slice
writes. llama_batch_init gives each token its own malloc'd seq_id array; here every seq_id[i] points
into one int32 array instead, so setting the sequence ids of a whole run of tokens is one vectorised
write. Each token belongs to exactly one sequence (n_seq_id = 1).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence as TokenList

import llama_cpp
import numpy as np

from service.engine.model import LoadedModel
from service.engine.timings import StepTimings


class TokenBatch:
    """Room for `capacity` tokens; `add` appends runs of tokens of one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.positions = np.zeros(capacity, dtype=np.int32)
        self.seq_ids = np.zeros(capacity, dtype=np.int32)
        self.outputs = np.zeros(capacity, dtype=np.int8)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        seq_id_base = self.seq_ids.ctypes.data
        item = self.seq_ids.itemsize
        self._seq_id_pointers = (ctypes.POINTER(llama_cpp.llama_seq_id) * capacity)(
            *(ctypes.cast(seq_id_base + i * item, ctypes.POINTER(llama_cpp.llama_seq_id)) for i in range(capacity))
        )
        self.struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self.positions.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_id_pointers,
            logits=self.outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.size = 0

    def clear(self) -> None:
        self.size = 0

    @property
    def room(self) -> int:
        return self.capacity - self.size

    def add(
        self,
        seq_id: int,
        tokens: TokenList[int] | np.ndarray,
        first_position: int,
        *,
        output_last: bool,
        output_all: bool = False,
    ) -> None:
        """Append a run of one sequence's tokens at consecutive positions; the last one (or every
        one) may output logits."""
        n = len(tokens)
        start, end = self.size, self.size + n
        self.tokens[start:end] = tokens
        self.positions[start:end] = np.arange(first_position, first_position + n, dtype=np.int32)
        self.seq_ids[start:end] = seq_id
        self.outputs[start:end] = 1 if output_all else 0
        if output_last:
            self.outputs[end - 1] = 1
        self.size = end

    def finish(self) -> llama_cpp.llama_batch:
        self.struct.n_tokens = self.size
        return self.struct


def ubatch_rows(seq_ids: TokenList[int], rows: TokenList[int]) -> list[int]:
    """The rows of each ubatch, each a pass over the weights, that llama.cpp splits a step into when
    the sequences (increasing ids) bring these many rows each, with a KV stream per sequence.

    Its split (llama_batch_allocr::split_equal, sequential) starts a ubatch at the first sequence
    with rows left, adds the following ones while their ids run on consecutively and they still
    have rows, and takes the same number of rows from each: as many as the shortest has left.
    """
    remaining = list(rows)
    ubatches = []
    start = 0
    while True:
        while start < len(remaining) and not remaining[start]:
            start += 1
        if start == len(remaining):
            return ubatches
        end = start + 1
        while end < len(remaining) and remaining[end] and seq_ids[end] == seq_ids[end - 1] + 1:
            end += 1
        taken = min(remaining[start:end])
        for index in range(start, end):
            remaining[index] -= taken
        ubatches.append(taken * (end - start))


class Decoder:
    """The llama_decode calls of requests' steps on one model's context (scheduler thread only)."""

    def __init__(self, model: LoadedModel, timings: StepTimings) -> None:
        self._model = model
        self._timings = timings
        self.batch = TokenBatch(model.batch_size)

    def run(self) -> None:
        """Decode the batch as filled; a failure leaves the KV of its sequences in doubt."""
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._model.context, self.batch.finish())
        self._timings.decode_seconds += time.perf_counter() - started
        self._timings.decode_calls += 1
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def logits(self, rows: int) -> np.ndarray:
        """A zero-copy view of the last decode's output rows."""
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits(self._model.context), shape=(rows, self._model.vocab_size)
        )
