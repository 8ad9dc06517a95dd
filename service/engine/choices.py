"""The n choices of one request: a sequence each, their seeds, and one prefill of the prompt for all.

Choice 0 prefills the prompt; the other choices wait for it (`awaiting_fork`) and then get a copy
of its KV cache (`fork`) and sample their first token from the same logits row, so n choices cost
one prefill. Each choice has a random stream of its own: choice 0 uses the request's seed itself
(so a request with n > 1 gives the n = 1 answer as its first choice), the others a splitmix64
scramble of (seed, index), so `seed` with `n` reproduces every choice. How many choices a request
may ask for is checked with its other parameters (request.py), against `choice_limit`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection

import llama_cpp

from service.engine.sequence import Sequence
from service.request import Generation

_MASK64 = (1 << 64) - 1


def choice_limit(max_n: int, sequences: int) -> int:
    """The largest `n` a server accepts: its --max-n, and no more choices than sequences decode at once."""
    return min(max_n, sequences)


def choice_seed(seed: int, index: int) -> int:
    """The random stream's seed of choice `index` of a request seeded with `seed`."""
    if index == 0:
        return seed & _MASK64
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def new_choices(generation: Generation, make: Callable[[int, int], Sequence]) -> list[Sequence]:
    """The request's n sequences, made by `make(index, seed)`; choices after the first wait for its prefill."""
    seed = generation.sampling.seed if generation.sampling.seed is not None else secrets.randbits(64)
    sequences = [make(index, choice_seed(seed, index)) for index in range(generation.n)]
    sequences[0].siblings = sequences[1:]
    for sibling in sequences[1:]:
        sibling.awaiting_fork = True
    return sequences


def fork(memory: llama_cpp.llama_memory_t, parent: Sequence, active: Collection[Sequence]) -> list[Sequence]:
    """Give choice 0's freshly prefilled prompt to its waiting siblings (a KV copy, not a prefill);
    returns those that got it."""
    forked = []
    for sibling in parent.siblings:
        if sibling.finished or sibling not in active:
            continue
        llama_cpp.llama_memory_seq_cp(memory, parent.seq_id, sibling.seq_id, -1, -1)
        sibling.prefilled = sibling.n_past = parent.prefilled
        sibling.reusable = parent.reusable
        sibling.awaiting_fork = False
        forked.append(sibling)
    return forked


def orphans(sequence: Sequence) -> list[Sequence]:
    """The siblings that wait for a prefill `sequence` will no longer give them (it failed)."""
    return [sibling for sibling in sequence.siblings if sibling.awaiting_fork and not sibling.finished]
