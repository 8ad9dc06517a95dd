"""One request's sequence in the engine: its prompt, its sampler and the text it has produced.

The scheduler thread owns every Sequence; the asyncio side only reads the updates it is sent and
may set `cancelled`, which the scheduler honours at its next step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from service.detokenizer import IncrementalDetokenizer
from service.errors import ServiceError
from service.request import Generation
from service.stop_strings import StopStringMatcher


@dataclass(frozen=True)
class TopToken:
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    token_bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    """The logprob of a generated token, with the alternatives when asked for."""

    token: str
    logprob: float
    token_bytes: bytes
    top: list[TopToken]


@dataclass
class SequenceUpdate:
    """What one step added to a sequence, sent to the request's handler."""

    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    completion_tokens: int
    error: ServiceError | None = None
    index: int = 0  # the choice this update belongs to
    # Prompt tokens whose KV came from the prefix cache instead of a prefill: choice 0's (the other
    # choices copy its KV, and report 0).
    cached_tokens: int = 0


def merged(updates: list[SequenceUpdate]) -> SequenceUpdate:
    """Consecutive updates of one sequence as one (a speculative step emits several tokens)."""
    if len(updates) == 1:
        return updates[0]
    logprobs = [entry for update in updates for entry in update.logprobs or ()]
    last = updates[-1]
    return SequenceUpdate(
        text="".join(update.text for update in updates),
        logprobs=logprobs if any(update.logprobs is not None for update in updates) else None,
        finish_reason=last.finish_reason,
        completion_tokens=last.completion_tokens,
        index=last.index,
        cached_tokens=last.cached_tokens,
    )


class Sequence:
    """A request being generated: prefilled in chunks, then decoded one token per step."""

    def __init__(
        self,
        generation: Generation,
        *,
        index: int,
        seed: int,
        token_bytes: Callable[[int], bytes],
        is_end_of_generation: Callable[[int], bool],
        deliver: Callable[[SequenceUpdate], None],
        tenant: str = "",
    ) -> None:
        self.generation = generation
        self.tenant = tenant  # whose request: its API key's name (admission.py counts slots per key)
        self.index = index  # which of the request's n choices this is
        self.seed = seed
        self.deliver = deliver
        self.siblings: list[Sequence] = []  # the request's other choices (choices.py)
        self.awaiting_fork = False  # a choice > 0 waits for choice 0's prefill instead of prefilling
        self.constraint = None  # ConstraintMatcher when the output is constrained (json_constraints.py)
        self.seq_id: int = -1
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.n_past = 0  # tokens of this sequence in the KV cache, prompt and generated
        self.reusable = 0  # leading prompt tokens whose KV a later request may reuse (PrefixCache)
        self.cached_tokens = 0  # leading prompt tokens whose KV was reused from an earlier request
        self.last_token: int | None = None
        self.generated = 0
        self.output_tokens: list[int] = []  # every token accepted, end token included
        self.cancelled = False
        self.finished = False
        # When it was queued, took a slot and had its first token (time.monotonic(); None: not yet):
        # a request's queue and prefill times (service/metrics.py).
        self.queued_at = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self._token_bytes = token_bytes
        self._is_end = is_end_of_generation
        self._detokenizer = IncrementalDetokenizer(token_bytes)
        self._stops = StopStringMatcher(generation.stop)
        self._want_logprobs = generation.sampling.logprobs

    @property
    def prompt_length(self) -> int:
        return len(self.generation.prompt_tokens)

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prompt_length

    def fail(self, error: ServiceError) -> None:
        self.finished = True
        self.deliver(SequenceUpdate("", None, None, self.generated, error=error, index=self.index))

    def _logprob_entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        raw = self._token_bytes(token)
        alternatives = []
        for alt, alt_logprob in top:
            alt_raw = self._token_bytes(alt)
            alternatives.append(TopToken(alt_raw.decode("utf-8", errors="replace"), alt_logprob, alt_raw))
        return TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, raw, alternatives)

    def accept(self, token: int, logprob: float, top: list[tuple[int, float]]) -> SequenceUpdate:
        """Take the token the sampler chose; return the text it makes ready and whether it ends the sequence."""
        self.generated += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.last_token = token
        self.output_tokens.append(token)
        finish = None
        logprobs = None
        if self._is_end(token):
            text = self._stops.feed(self._detokenizer.flush()) + self._stops.flush()
            finish = "stop"
        else:
            if self._want_logprobs:
                logprobs = [self._logprob_entry(token, logprob, top)]
            text = self._stops.feed(self._detokenizer.add(token))
            if self._stops.matched is not None:
                finish = "stop"
            elif self.generated >= self.generation.max_new_tokens:
                text += self._stops.feed(self._detokenizer.flush())
                if self._stops.matched is None:
                    text += self._stops.flush()
                finish = "length" if self._stops.matched is None else "stop"
        if finish is not None:
            self.finished = True
        return SequenceUpdate(
            text=text,
            logprobs=logprobs,
            finish_reason=finish,
            completion_tokens=self.generated,
            index=self.index,
            cached_tokens=self.cached_tokens,
        )
