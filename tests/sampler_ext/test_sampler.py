"""sampler_ext.BatchSampler, one sequence at a time, held to the reference sampler in reference.py.

Greedy choices and draws must agree exactly, since the reference reproduces the ChaCha20 stream;
logprobs agree to within float32 rounding and the fast normaliser's error (one_sequence.py). The
distribution of draws is checked on its own with a chi-squared test.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from one_sequence import OneSequence, assert_logprobs_close
from reference import ChaCha20Stream, ReferenceSampler
from scipy.stats import chisquare

from sampler_ext import BatchSampler

VOCAB_SIZES = [1, 2, 1000, 262_144]


def random_logits(rng: np.random.Generator, vocab_size: int, scale: float = 3.0) -> np.ndarray:
    return (rng.standard_normal(vocab_size) * scale).astype(np.float32)


def random_bias(rng: np.random.Generator, vocab_size: int, n: int = 5) -> dict[int, float]:
    tokens = rng.choice(vocab_size, size=min(n, vocab_size), replace=False)
    return {int(t): float(rng.uniform(-5, 5)) for t in tokens}


def make_both(vocab_size: int, **params) -> tuple[OneSequence, ReferenceSampler]:
    return OneSequence(vocab_size, **params), ReferenceSampler(vocab_size, **params)


def assert_same_sample(got, expected) -> None:
    token, logprob, top = got
    expected_token, expected_logprob, expected_top = expected
    assert token == expected_token
    assert_logprobs_close(logprob, expected_logprob)
    assert [t for t, _ in top] == [t for t, _ in expected_top]
    assert_logprobs_close([lp for _, lp in top], [lp for _, lp in expected_top])


# --- agreement with the reference -----------------------------------------------------------


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_greedy_with_bias_and_penalties_matches_reference(vocab_size: int) -> None:
    rng = np.random.default_rng(vocab_size)
    params = dict(
        seed=1,
        temperature=0.0,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        logit_bias=random_bias(rng, vocab_size),
        top_logprobs=5,
    )
    sampler, reference = make_both(vocab_size, **params)
    for _ in range(6):
        logits = random_logits(rng, vocab_size)
        assert_same_sample(sampler.sample(logits), reference.sample(logits))
    # The same logits again and again: only the penalties move the choice.
    logits = random_logits(rng, vocab_size, scale=0.3)
    tokens = []
    for _ in range(12):
        got = sampler.sample(logits)
        assert_same_sample(got, reference.sample(logits))
        tokens.append(got[0])
    if vocab_size > 1:
        assert len(set(tokens)) > 1
    assert sampler.generated == 18


SAMPLING_PARAMS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9, top_logprobs=3),
    dict(temperature=1.5, top_p=0.5, frequency_penalty=0.4, presence_penalty=-0.2, top_logprobs=20),
    dict(temperature=2.0, top_p=0.05),
    dict(temperature=1e-6),  # below 1e-5: greedy
]


@pytest.mark.parametrize("params", SAMPLING_PARAMS, ids=str)
@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_sampling_matches_reference(vocab_size: int, params: dict) -> None:
    rng = np.random.default_rng(vocab_size + 17)
    sampler, reference = make_both(vocab_size, seed=12345, logit_bias=random_bias(rng, vocab_size), **params)
    steps = 5 if vocab_size > 10_000 else 60
    for _ in range(steps):
        logits = random_logits(rng, vocab_size)
        assert_same_sample(sampler.sample(logits), reference.sample(logits))


def test_reference_stream_is_standard_chacha20() -> None:
    # The published ChaCha20 keystream for an all-zero key and nonce starts 76 b8 e0 ad a0 f1 3d 90.
    assert ChaCha20Stream(0).next_u64() == int.from_bytes(bytes.fromhex("76b8e0ada0f13d90"), "little")


@settings(max_examples=300, deadline=None)
@given(
    logits=st.lists(
        st.sampled_from([-math.inf, -1.0, 0.0, 0.5, 2.0]) | st.floats(-30, 30, width=32, allow_subnormal=False),
        min_size=1,
        max_size=12,
    ),
    k=st.integers(0, 20),
    bias=st.floats(-100, 100),
    temperature=st.sampled_from([0.0, 0.5, 1.0]),
    top_p=st.sampled_from([1.0, 0.5, 0.01]),
    seed=st.integers(-(2**63), 2**64 - 1),
)
def test_small_vocabularies_with_ties_match_reference(
    logits: list[float], k: int, bias: float, temperature: float, top_p: float, seed: int
) -> None:
    array = np.array(logits, dtype=np.float32)
    if np.all(array == -np.inf):
        return
    sampler, reference = make_both(
        len(array),
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        presence_penalty=1.0,
        logit_bias={0: bias},
        top_logprobs=k,
    )
    for _ in range(3):
        got = sampler.sample(array)
        assert len(got[2]) == min(k, len(array))
        assert_same_sample(got, reference.sample(array))


# --- the distribution of draws --------------------------------------------------------------


def chi_squared_p_value(observed: np.ndarray, probabilities: np.ndarray) -> float:
    """Bins with an expected count under 5 are merged, as the test needs."""
    expected = probabilities * observed.sum()
    large = expected >= 5
    f_obs = np.append(observed[large], observed[~large].sum())
    f_exp = np.append(expected[large], expected[~large].sum())
    if f_exp[-1] == 0:
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    return float(chisquare(f_obs, f_exp).pvalue)


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, top_p=0.5, logit_bias={3: 1.0, 7: -1.0}),
        dict(temperature=2.0, top_p=0.95),
    ],
    ids=str,
)
def test_draws_follow_the_distribution(params: dict) -> None:
    vocab_size, draws = 30, 20_000
    logits = random_logits(np.random.default_rng(3), vocab_size, scale=1.0)
    probabilities = ReferenceSampler(vocab_size, seed=0, **params).probabilities(logits)
    assert (probabilities > 0).sum() >= 3, "too peaked to test anything"

    sampler = OneSequence(vocab_size, seed=2024, **params)
    tokens = [sampler.sample(logits)[0] for _ in range(draws)]
    observed = np.bincount(tokens, minlength=vocab_size)

    assert observed[probabilities == 0].sum() == 0, "a token outside the nucleus was drawn"
    if params.get("top_p", 1.0) < 1.0:
        assert (probabilities == 0).any()
    assert chi_squared_p_value(observed, probabilities) > 1e-3


# --- seeds ----------------------------------------------------------------------------------


def tokens_for(seed: int, steps: int = 40, vocab_size: int = 1000) -> list[int]:
    rng = np.random.default_rng(0)
    sampler = OneSequence(vocab_size, seed=seed, top_p=0.95)
    return [sampler.sample(random_logits(rng, vocab_size, scale=1.0))[0] for _ in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    assert tokens_for(7) == tokens_for(7)
    assert tokens_for(7) != tokens_for(8)
    assert tokens_for(0) != tokens_for(1)


@pytest.mark.parametrize("negative, positive", [(-1, 2**64 - 1), (-(2**63), 2**63)])
def test_negative_seeds_are_taken_modulo_2_64(negative: int, positive: int) -> None:
    assert tokens_for(negative) == tokens_for(positive)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**100])
def test_seed_out_of_range(seed: int) -> None:
    with pytest.raises(ValueError, match="seed"):
        BatchSampler(10).add(0, seed=seed)


@pytest.mark.parametrize("seed", ["1", 1.5, None])
def test_seed_of_wrong_type(seed) -> None:
    with pytest.raises(TypeError):
        BatchSampler(10).add(0, seed=seed)


def test_seed_is_required_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        BatchSampler(10).add(0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        BatchSampler(10).add(0, 1)  # type: ignore[misc]


# --- invalid input --------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [0, -1, 2**31, 2**70])
def test_bad_vocabulary_sizes_raise_value_error(vocab_size: int) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        BatchSampler(vocab_size)


BAD_PARAMS = [
    dict(temperature=-0.1),
    dict(temperature=2.01),
    dict(temperature=math.nan),
    dict(temperature=math.inf),
    dict(top_p=0.0),
    dict(top_p=-0.5),
    dict(top_p=1.0001),
    dict(top_p=math.nan),
    dict(frequency_penalty=2.01),
    dict(frequency_penalty=-2.01),
    dict(frequency_penalty=math.nan),
    dict(presence_penalty=2.01),
    dict(presence_penalty=-math.inf),
    dict(top_logprobs=-1),
    dict(top_logprobs=21),
    dict(top_logprobs=2**70),
    dict(logit_bias={10: 1.0}),
    dict(logit_bias={-1: 1.0}),
    dict(logit_bias={2**70: 1.0}),
    dict(logit_bias={0: 100.5}),
    dict(logit_bias={0: -101.0}),
    dict(logit_bias={0: math.nan}),
    dict(logit_bias={0: math.inf}),
]


@pytest.mark.parametrize("bad", BAD_PARAMS, ids=str)
def test_bad_parameters_raise_value_error(bad: dict) -> None:
    batch = BatchSampler(10)
    with pytest.raises(ValueError):
        batch.add(0, seed=0, **bad)
    assert 0 not in batch


@pytest.mark.parametrize(
    "bad",
    [dict(logit_bias=[(0, 1.0)]), dict(logit_bias={"0": 1.0}), dict(temperature="1"), dict(top_logprobs=1.5)],
    ids=str,
)
def test_parameters_of_wrong_type_raise_type_error(bad: dict) -> None:
    with pytest.raises(TypeError):
        BatchSampler(10).add(0, seed=0, **bad)


def test_boundary_parameters_are_accepted() -> None:
    BatchSampler(10).add(
        0,
        seed=0,
        temperature=2.0,
        top_p=1.0,
        frequency_penalty=-2.0,
        presence_penalty=2.0,
        logit_bias={0: -100.0, 9: 100.0},
        top_logprobs=20,
    )
    BatchSampler(1).add(0, seed=2**64 - 1, temperature=0.0, top_p=1e-9, logit_bias={})


def _with(index: int, value: float) -> np.ndarray:
    logits = np.zeros((1, 8), dtype=np.float32)
    logits[0, index] = value
    return logits


BAD_LOGITS = {
    "nan": (_with(3, np.nan), ValueError),
    "plus-inf": (_with(5, np.inf), ValueError),
    "all-minus-inf": (np.full((1, 8), -np.inf, dtype=np.float32), ValueError),
    "empty": (np.zeros((1, 0), dtype=np.float32), ValueError),
    "too-short": (np.zeros((1, 7), dtype=np.float32), ValueError),
    "too-long": (np.zeros((1, 9), dtype=np.float32), ValueError),
    "non-contiguous": (np.zeros((1, 16), dtype=np.float32)[:, ::2], ValueError),
    "float64": (np.zeros((1, 8), dtype=np.float64), (TypeError, ValueError)),
    "int32": (np.zeros((1, 8), dtype=np.int32), (TypeError, ValueError)),
    "one-dimensional": (np.zeros(8, dtype=np.float32), (TypeError, ValueError)),
    "list": ([[0.0] * 8], (TypeError, ValueError)),
}


@pytest.mark.parametrize("name", BAD_LOGITS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bad_logits_raise_and_leave_the_sampler_usable(name: str, temperature: float) -> None:
    logits, error = BAD_LOGITS[name]
    sampler = OneSequence(8, seed=99, temperature=temperature, top_p=0.9)
    untouched = OneSequence(8, seed=99, temperature=temperature, top_p=0.9)
    with pytest.raises(error):
        sampler.batch.sample(logits, [OneSequence.KEY])
    assert sampler.generated == 0
    good = random_logits(np.random.default_rng(1), 8)
    # Nothing changed: neither the history nor the random stream.
    for _ in range(5):
        assert sampler.sample(good) == untouched.sample(good)


# --- edge cases and the rest of the API -----------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [dict(temperature=0.0), dict(), dict(top_p=0.1), dict(logit_bias={0: 100.0, 5: 50.0})],
    ids=str,
)
def test_all_impossible_but_one_gives_that_one(params: dict) -> None:
    logits = np.full(1000, -np.inf, dtype=np.float32)
    logits[417] = -12.5
    sampler = OneSequence(1000, seed=5, top_logprobs=2, **params)
    for _ in range(20):
        token, logprob, top = sampler.sample(logits)
        assert (token, logprob) == (417, 0.0)
        assert top == [(417, 0.0), (0, -math.inf)]


def test_top_logprobs_never_exceed_the_vocabulary() -> None:
    logits = np.array([0.0, 1.0, 1.0], dtype=np.float32)
    _, _, top = OneSequence(3, seed=0, top_logprobs=5).sample(logits)
    assert [t for t, _ in top] == [1, 2, 0]
    assert OneSequence(3, seed=0).sample(logits)[2] == []


def test_logprobs_are_raw_whatever_the_parameters() -> None:
    logits = random_logits(np.random.default_rng(8), 100)
    plain = OneSequence(100, seed=0, temperature=0.0, top_logprobs=20).sample(logits)
    shaped = OneSequence(
        100,
        seed=0,
        temperature=0.0,
        frequency_penalty=2.0,
        logit_bias={plain[0]: -100.0},
        top_logprobs=20,
    ).sample(logits)
    assert shaped[0] != plain[0]
    assert shaped[2] == plain[2]


def test_record_feeds_the_penalties() -> None:
    logits = np.array([2.0, 1.0, 0.0], dtype=np.float32)
    sampler = OneSequence(3, seed=0, temperature=0.0, presence_penalty=2.0)
    sampler.record(0)
    assert sampler.generated == 1
    assert sampler.sample(logits)[0] == 1
    assert sampler.generated == 2
    assert sampler.sample(logits)[0] == 0  # 0 and 1 are both penalised now


@pytest.mark.parametrize(
    "token, error", [(3, ValueError), (-1, ValueError), (2**70, ValueError), ("1", TypeError), (1.0, TypeError)]
)
def test_record_refuses_bad_tokens(token, error) -> None:
    sampler = OneSequence(3, seed=0)
    with pytest.raises(error):
        sampler.record(token)
    assert sampler.generated == 0


def test_numpy_integers_are_accepted() -> None:
    batch = BatchSampler(np.int64(4))
    batch.add(np.int64(7), seed=np.uint64(2**64 - 1), top_logprobs=np.int32(2))
    batch.record(np.int64(7), np.int32(3))
    assert batch.vocab_size == 4 and batch.generated(np.int16(7)) == 1 and np.int8(7) in batch


def test_read_only_logits_are_read_and_left_unchanged() -> None:
    logits = random_logits(np.random.default_rng(4), 1000)
    before = logits.copy()
    logits.flags.writeable = False
    sampler = OneSequence(1000, seed=0, temperature=0.8, top_p=0.9, frequency_penalty=1.0, logit_bias={1: 3.0})
    for _ in range(10):
        sampler.sample(logits)
    np.testing.assert_array_equal(logits, before)


def test_samplers_in_threads_agree_with_sequential_runs() -> None:
    vocab_size, steps = 262_144, 4
    all_logits = [random_logits(np.random.default_rng(i), vocab_size) for i in range(steps)]

    def run(seed: int) -> list:
        sampler = OneSequence(vocab_size, seed=seed, top_p=0.9, top_logprobs=3)
        return [sampler.sample(logits) for logits in all_logits]

    expected = {seed: run(seed) for seed in range(4)}
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda s=seed: results.__setitem__(s, run(s))) for seed in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


def test_repr_says_the_vocabulary_and_the_sequences() -> None:
    batch = BatchSampler(10)
    batch.add(3, seed=3, temperature=0.5, logit_bias={1: 1.0})
    assert repr(batch) == "BatchSampler(vocab_size=10, sequences=1)"
