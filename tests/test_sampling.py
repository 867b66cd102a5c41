"""Sampling: greedy, penalties, top-k/top-p/min-p filtering, seeding."""
import numpy as np
import pytest

from zephyr.sampling import SamplingParams, candidates, new_rng, penalize_repetition, sample

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], dtype=np.float32))


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0, repetition_penalty=1.0)) == 0
    assert sample(LOGITS, SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1.0)) == 0


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = penalize_repetition(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]          # input untouched
    # the penalty can change the greedy choice
    assert sample(np.array([2.0, 1.5], np.float32), SamplingParams(temperature=0, repetition_penalty=2.0), [0]) == 1


def test_last_n_tokens_limits_the_penalty_window():
    logits = np.array([2.0, 1.9], dtype=np.float32)
    window = lambda n: SamplingParams(temperature=0, repetition_penalty=2.0, last_n_tokens=n)  # noqa: E731
    assert sample(logits, window(1), recent=[1, 0]) == 1    # only token 0 is penalised
    assert sample(logits, window(2), recent=[1, 0]) == 0    # both are
    assert sample(logits, window(0), recent=[1, 0]) == 0    # neither


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(top_k=2, top_p=1.0), [0, 1]),
    (SamplingParams(top_k=0, top_p=0.7), [0, 1]),          # 0.5 < 0.7 <= 0.75
    (SamplingParams(top_k=0, top_p=0.5), [0]),
    (SamplingParams(top_k=0, top_p=1.0, min_p=0.25), [0, 1, 2]),  # >= 0.125
    (SamplingParams(top_k=0, top_p=1.0), [0, 1, 2, 3, 4]),
])
def test_filters(params, expected):
    ids, _ = candidates(LOGITS, params)
    assert ids.tolist() == expected


def test_same_seed_same_tokens_and_distribution():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    draws = lambda seed: [sample(LOGITS, params, rng=r) for r in [new_rng(seed)] for _ in range(200)]  # noqa: E731
    assert draws(7) == draws(7)
    counts = np.bincount(draws(1) + draws(2) + draws(3) + draws(4) + draws(5), minlength=5) / 1000
    np.testing.assert_allclose(counts, [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.05)


def test_temperature_sharpens():
    cold = SamplingParams(temperature=0.05, top_k=0, top_p=1.0, repetition_penalty=1.0)
    rng = new_rng(0)
    assert all(sample(LOGITS, cold, rng=rng) == 0 for _ in range(50))


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", None])
def test_settings_must_be_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value})
    SamplingParams(**{field: np.float32(0.5)})


def test_extreme_settings_sample_without_nan():
    tiny = SamplingParams(temperature=1e-320, top_k=0, top_p=1.0, repetition_penalty=1.0)
    assert all(sample(LOGITS, tiny, rng=new_rng(i)) == 0 for i in range(20))   # the limit of T -> 0: greedy
    harsh = SamplingParams(temperature=1.0, repetition_penalty=1e300, last_n_tokens=-1)
    assert sample(LOGITS, harsh, recent=[0, 1, 2, 3], rng=new_rng(0)) in range(5)
    with pytest.raises(ValueError, match="repetition_penalty must be positive"):
        SamplingParams(repetition_penalty=0)
