"""The reference sampler: sampler_ext's algorithm in plain Python and numpy.

It is written to be obviously right, not fast; the tests hold the Rust extension to it. It does
what the numbered stages at the top of ``sampler_ext/src/step.rs`` do, without their shortcuts:

- logprobs are the log-softmax of the raw logits, in float64;
- logit bias is added, and the penalties over the sequence's own history are subtracted;
- temperature below 1e-5 is greedy (argmax, lowest id on ties, no random draw); otherwise
  weights are ``exp(value / T - max)``;
- top-p keeps the fewest heaviest tokens (ties: lower id) whose mass reaches ``top_p * total``;
- one uniform from a ChaCha20 stream picks a token by inverse transform over the kept tokens in id
  order, and the token goes into the history.

Sums are sequential (``np.cumsum``) in the order the Rust code uses, so results agree exactly
except where numpy's ``exp`` and Rust's differ in the last bit.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

GREEDY_BELOW_TEMPERATURE = 1e-5
_MASK32 = 0xFFFFFFFF


def _rotate_left(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _MASK32


def _quarter_round(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _MASK32
    s[d] = _rotate_left(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _MASK32
    s[b] = _rotate_left(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & _MASK32
    s[d] = _rotate_left(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _MASK32
    s[b] = _rotate_left(s[b] ^ s[c], 7)


def chacha20_block(key: bytes, counter: int) -> list[int]:
    """One 64-byte ChaCha20 block (Bernstein's variant: 64-bit counter, 64-bit nonce = 0)."""
    constants = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    key_words = [int.from_bytes(key[i : i + 4], "little") for i in range(0, 32, 4)]
    state = constants + key_words + [counter & _MASK32, counter >> 32, 0, 0]
    working = list(state)
    for _ in range(10):
        _quarter_round(working, 0, 4, 8, 12)
        _quarter_round(working, 1, 5, 9, 13)
        _quarter_round(working, 2, 6, 10, 14)
        _quarter_round(working, 3, 7, 11, 15)
        _quarter_round(working, 0, 5, 10, 15)
        _quarter_round(working, 1, 6, 11, 12)
        _quarter_round(working, 2, 7, 8, 13)
        _quarter_round(working, 3, 4, 9, 14)
    return [(w + s) & _MASK32 for w, s in zip(working, state, strict=True)]


class ChaCha20Stream:
    """The sampler's random stream: key = seed as 8 little-endian bytes + 24 zero bytes."""

    def __init__(self, seed: int) -> None:
        self._key = (seed % 2**64).to_bytes(8, "little") + bytes(24)
        self._counter = 0
        self._words: list[int] = []

    def next_u32(self) -> int:
        if not self._words:
            self._words = chacha20_block(self._key, self._counter)
            self._counter += 1
        return self._words.pop(0)

    def next_u64(self) -> int:
        low = self.next_u32()
        return low | (self.next_u32() << 32)

    def next_uniform(self) -> float:
        return (self.next_u64() >> 11) * 2.0**-53


def raw_logprobs(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.cumsum(np.exp(x - m))[-1]))


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k highest raw logits, highest first, ties by lower id, with their raw logprobs."""
    logprobs = raw_logprobs(logits)
    ids = np.arange(len(logits))
    order = np.lexsort((ids, -logits.astype(np.float64)))[:k]
    return [(int(i), float(logprobs[i])) for i in order]


class ReferenceSampler:
    def __init__(
        self,
        vocab_size: int,
        *,
        seed: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        top_logprobs: int = 0,
    ) -> None:
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.top_p = top_p
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty
        self.logit_bias = dict(logit_bias or {})
        self.top_logprobs = top_logprobs
        self.counts: Counter[int] = Counter()
        self.rng = ChaCha20Stream(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """Logit bias and penalties: the values the temperature divides."""
        values = logits.astype(np.float64)
        for token, bias in self.logit_bias.items():
            values[token] += bias
        for token, count in self.counts.items():
            values[token] -= self.frequency_penalty * count + self.presence_penalty
        return values

    def weights(self, logits: np.ndarray) -> np.ndarray:
        """The weights at a temperature that is not greedy."""
        z = self.adjusted(logits) / self.temperature
        return np.exp(z - z.max())

    def kept(self, weights: np.ndarray) -> np.ndarray:
        """The ids top-p keeps, increasing."""
        if self.top_p >= 1.0:
            return np.arange(len(weights))
        total = np.cumsum(weights)[-1]
        order = np.lexsort((np.arange(len(weights)), -weights))
        mass = np.cumsum(weights[order])
        reached = np.flatnonzero(mass >= self.top_p * total)
        positive = int((weights > 0).sum())
        n = positive if len(reached) == 0 else min(int(reached[0]) + 1, positive)
        return np.sort(order[:n])

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a non-greedy draw follows (for statistical tests)."""
        weights = self.weights(logits)
        probabilities = np.zeros(len(weights))
        kept = self.kept(weights)
        probabilities[kept] = weights[kept] / weights[kept].sum()
        return probabilities

    def sample(self, logits: np.ndarray) -> tuple[int, float, list[tuple[int, float]]]:
        if self.greedy:
            token = int(np.argmax(self.adjusted(logits)))
        else:
            weights = self.weights(logits)
            kept = self.kept(weights)
            mass = np.cumsum(weights[kept])
            target = self.rng.next_uniform() * mass[-1]
            above = np.flatnonzero(mass > target)
            # Only empty when the target rounded up to the total: take the last possible token.
            index = int(above[0]) if len(above) else int(np.flatnonzero(weights[kept] > 0)[-1])
            token = int(kept[index])
        self.counts[token] += 1
        logprob = float(raw_logprobs(logits)[token])
        return token, logprob, top_logprobs(logits, self.top_logprobs)
