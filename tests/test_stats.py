"""stats: bootstrap intervals, Spearman tests and the false-discovery-rate correction, against independent
computations (scipy, hand-worked cases)."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from course_utils.stats import (
    Interval, benjamini_hochberg, bootstrap, difference_interval, mean_interval, spearman_test,
)


def test_mean_interval_covers_the_true_mean_and_shrinks_with_more_images():
    rng = np.random.default_rng(0)
    small = mean_interval(rng.random(50) < 0.3)
    large = mean_interval(rng.random(2_000) < 0.3)
    assert large.contains(0.3) and small.contains(0.3)
    assert (large.high - large.low) < (small.high - small.low) / 3
    assert large.n == 2_000 and large.low <= large.value <= large.high


def test_difference_interval_is_paired_a_shared_image_effect_cancels():
    """Two methods that differ by a constant 0.05 on images whose own difficulty varies a lot: the paired
    interval is tight around 0.05; an unpaired resampling would be about as wide as the difficulty spread."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 1, 300)
    a, b = difficulty + 0.05, difficulty
    interval = difference_interval(a, b)
    assert interval.value == pytest.approx(0.05)
    assert interval.high - interval.low < 1e-9
    assert interval.above(0.0)


def test_bootstrap_percentiles_match_an_independent_loop():
    values = np.random.default_rng(2).normal(size=80)
    interval = bootstrap(np.median, values, n_boot=500, seed=3)
    rng = np.random.default_rng(3)
    reference = [np.median(values[rng.integers(0, 80, 80)]) for _ in range(500)]
    assert interval.low == pytest.approx(np.quantile(reference, 0.025))
    assert interval.high == pytest.approx(np.quantile(reference, 0.975))


def test_bootstrap_redraws_resamples_where_the_statistic_is_undefined():
    labels = np.array([True] + [False] * 9)

    def needs_both(y, s):
        if y.all() or not y.any():
            raise ValueError("one outcome")
        return float(s[y].mean() - s[~y].mean())

    interval = bootstrap(needs_both, labels, np.arange(10.0), n_boot=200)
    assert interval.low <= interval.value <= interval.high


def test_bootstrap_rejects_bad_input_with_a_clear_message():
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="one entry per item"):
        difference_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])


def test_interval_formats_value_ends_level_and_count():
    text = f"{Interval(0.5, 0.25, 0.75, 0.95, 40):.2f}"
    assert text == "0.50 [0.25, 0.75] (95 % CI, 40 images)"
    assert Interval(0.5, 0.25, 0.75).above(0.2) and not Interval(0.5, 0.25, 0.75).above(0.3)


def test_spearman_test_exact_p_value_equals_enumeration_and_rho_equals_scipy():
    x = [0.1, 0.4, 0.35, 0.8, 0.6, 0.7]
    y = [1.0, 2.5, 2.0, 3.9, 3.0, 3.1]
    result = spearman_test(x, y)
    assert result.rho == pytest.approx(spearmanr(x, y).statistic)
    ranks_y = np.argsort(np.argsort(y))
    count = sum(abs(spearmanr(x, [ranks_y[i] for i in order]).statistic) >= abs(result.rho) - 1e-12
                for order in itertools.permutations(range(6)))
    assert result.exact and result.p == pytest.approx(count / 720)


def test_spearman_test_permutation_p_value_is_large_for_noise_and_small_for_a_trend():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    assert spearman_test(x, x + 0.1 * rng.normal(size=12)).p < 0.01
    noise = spearman_test(x, rng.normal(size=12))
    assert not noise.exact and noise.p > 0.05
    assert "n = 12" in str(noise)


def test_spearman_test_rejects_constant_or_short_input():
    with pytest.raises(ValueError, match="constant"):
        spearman_test([1, 2, 3, 4], [5, 5, 5, 5])
    with pytest.raises(ValueError, match="at least 3"):
        spearman_test([1, 2], [3, 4])


def test_benjamini_hochberg_matches_the_step_up_rule_worked_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.20, 0.005])
    # sorted: 0.005 (≤ 0.01), 0.01 (≤ 0.02), 0.03 (≤ 0.03), 0.04 (> 0.04? 0.04 ≤ 0.04 yes), 0.20 (> 0.05)
    assert benjamini_hochberg(p, q=0.05).tolist() == [True, True, True, False, True]
    # step-up: a later p below its bar rescues earlier ones above theirs
    assert benjamini_hochberg([0.03, 0.031], q=0.05).tolist() == [True, True]
    assert benjamini_hochberg(torch.tensor([0.5, 0.9])).tolist() == [False, False]
