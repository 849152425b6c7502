"""oodlens.stats: Wilson against the formula worked by hand, bootstrap determinism and coverage, perplexity
intervals, the Estimate record and the wording of differences."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from oodlens.errors import OodlensError
from oodlens.stats import (
    Estimate,
    bootstrap_interval,
    describe_difference,
    perplexity_interval,
    wilson_interval,
)

Z95 = 1.959963984540054  # the normal quantile at 0.975, from tables (not from scipy)


def wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), with p = k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize(
    ("k", "expected"),
    [(0, (0.0, 0.161125)), (20, (0.838875, 1.0)), (7, (0.181192, 0.567146))],
)
def test_wilson_matches_the_formula_by_hand(k, expected):
    low, high = wilson_interval(k, 20)
    assert (low, high) == pytest.approx(wilson_by_hand(k, 20), abs=1e-12)
    assert (low, high) == pytest.approx(expected, abs=1e-6)
    assert isinstance(low, float) and isinstance(high, float)


def test_wilson_at_the_ends_is_closed_form():
    # k = 0: low is 0 and high is (z²/n) / (1 + z²/n); k = n mirrors it.
    edge = (Z95**2 / 20) / (1 + Z95**2 / 20)
    assert wilson_interval(0, 20) == pytest.approx((0.0, edge), abs=1e-12)
    assert wilson_interval(20, 20) == pytest.approx((1 - edge, 1.0), abs=1e-12)


def test_wilson_is_vectorised_and_nan_without_trials():
    low, high = wilson_interval(np.array([0, 7, 20, 0]), np.array([20, 20, 20, 0]))
    assert low[:3] == pytest.approx([wilson_by_hand(k, 20)[0] for k in (0, 7, 20)], abs=1e-12)
    assert high[:3] == pytest.approx([wilson_by_hand(k, 20)[1] for k in (0, 7, 20)], abs=1e-12)
    assert math.isnan(low[3]) and math.isnan(high[3])
    assert all(math.isnan(end) for end in wilson_interval(0, 0))
    broadcast, _ = wilson_interval(np.arange(3), 10)
    assert broadcast.shape == (3,)


def test_wilson_widens_with_confidence():
    z99 = 2.5758293035489004
    assert wilson_interval(7, 20, confidence=0.99) == pytest.approx(wilson_by_hand(7, 20, z99), abs=1e-12)


@pytest.mark.parametrize(("k", "n"), [(21, 20), (-1, 20), (0.5, 20), (3, 2.5)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(OodlensError, match="whole counts") as caught:
        wilson_interval(k, n)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("confidence", [0, 1, 95, True, "0.95"])
def test_confidence_must_be_a_fraction(confidence):
    with pytest.raises(OodlensError, match="confidence"):
        wilson_interval(7, 20, confidence=confidence)
    with pytest.raises(OodlensError, match="confidence"):
        bootstrap_interval([1.0, 2.0], confidence=confidence)


NORMAL = np.random.default_rng(1).normal(10.0, 2.0, size=400)


def test_bootstrap_is_deterministic_for_a_seed():
    first = bootstrap_interval(NORMAL, seed=3)
    assert bootstrap_interval(NORMAL, seed=3) == first
    assert bootstrap_interval(NORMAL, seed=4) != first


def test_bootstrap_of_a_normal_sample_matches_the_textbook_interval():
    low, high = bootstrap_interval(NORMAL)
    mean, standard_error = NORMAL.mean(), NORMAL.std(ddof=1) / math.sqrt(NORMAL.size)
    assert low < mean < high and low < 10.0 < high
    assert (low, high) == pytest.approx((mean - Z95 * standard_error, mean + Z95 * standard_error), abs=0.03)


def test_bootstrap_covers_the_true_mean_about_as_often_as_it_says():
    rng = np.random.default_rng(7)
    trials = 200
    covered = 0
    for trial in range(trials):
        low, high = bootstrap_interval(rng.normal(0.0, 1.0, size=40), n_resamples=400, seed=trial)
        covered += low < 0.0 < high
    assert 0.88 <= covered / trials <= 0.99  # percentile bootstrap at n = 40 runs a little under 95 %


def test_bootstrap_takes_other_statistics_and_splits_large_samples_into_blocks():
    low, high = bootstrap_interval(NORMAL, np.median, n_resamples=500)
    assert low < np.median(NORMAL) < high
    large = np.random.default_rng(2).normal(size=50_000)  # 41 resamples a block: 3 blocks
    low, high = bootstrap_interval(large, n_resamples=100)
    assert low < large.mean() < high


def test_bootstrap_needs_two_samples():
    for values in ([], [3.0]):
        assert all(math.isnan(end) for end in bootstrap_interval(values))
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(OodlensError, match="1-D"):
        bootstrap_interval([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(OodlensError, match="n_resamples"):
        bootstrap_interval([1.0, 2.0], n_resamples=0)


WINDOW_NLL = np.array([2.1, 2.4, 1.9, 2.6, 2.2, 2.0, 2.5, 2.3])
WINDOW_TOKENS = np.array([100, 300, 200, 100, 400, 250, 150, 300])


def test_perplexity_is_exp_of_the_token_weighted_mean_nll_and_its_interval_brackets_it():
    ppl, low, high, n = perplexity_interval(WINDOW_NLL, WINDOW_TOKENS)
    by_hand = math.exp(
        sum(w * m for w, m in zip(WINDOW_TOKENS, WINDOW_NLL, strict=True)) / WINDOW_TOKENS.sum()
    )
    assert ppl == pytest.approx(by_hand, rel=1e-12)
    assert low < ppl < high and n == 8
    assert math.exp(WINDOW_NLL.min()) <= low and high <= math.exp(WINDOW_NLL.max())
    assert perplexity_interval(WINDOW_NLL, WINDOW_TOKENS) == (ppl, low, high, n)  # deterministic


def test_perplexity_weighs_windows_equally_by_default_and_skips_empty_ones():
    ppl, *_ = perplexity_interval(WINDOW_NLL)
    assert ppl == pytest.approx(math.exp(WINDOW_NLL.mean()))
    with_empty = perplexity_interval(np.append(WINDOW_NLL, np.nan), np.append(WINDOW_TOKENS, 0))
    assert with_empty == perplexity_interval(WINDOW_NLL, WINDOW_TOKENS)


def test_perplexity_edge_cases():
    ppl, low, high, n = perplexity_interval([2.0], [50])
    assert ppl == pytest.approx(math.exp(2.0)) and math.isnan(low) and math.isnan(high) and n == 1
    ppl, low, high, n = perplexity_interval([], [])
    assert math.isnan(ppl) and math.isnan(low) and math.isnan(high) and n == 0
    assert perplexity_interval([1.5, 1.5, 1.5]) == pytest.approx((math.exp(1.5),) * 3 + (3,))
    with pytest.raises(OodlensError, match="one per window"):
        perplexity_interval([1.0, 2.0], [10])
    with pytest.raises(OodlensError, match="token counts"):
        perplexity_interval([1.0, 2.0], [10, -1])


def test_a_mean_score_takes_the_wilson_interval_at_that_mean():
    partial = Estimate.score_mean([0.1, 0.1, 0.0, 0.0])  # a mean of 0.05 over 4 prompts
    assert (partial.low, partial.high) == pytest.approx(wilson_by_hand(0.2, 4), abs=1e-12)
    assert (partial.value, partial.n, partial.method) == (pytest.approx(0.05), 4, "wilson-bound")
    assert partial.low == pytest.approx(0.00237, abs=1e-5) and partial.high == pytest.approx(0.5385, abs=1e-4)
    assert Estimate.score_mean([1.0, 0.0, 1.0, 1.0]) == Estimate.proportion(3, 4)
    with pytest.raises(OodlensError, match=r"scores in \[0, 1\], got 0 to 2"):
        Estimate.score_mean([0.0, 2.0])


def test_a_mean_score_covers_where_a_bootstrap_over_four_prompts_does_not():
    # Four prompts, each finding a Binomial(10, 0.05) share of ten words (common words' scale): all four
    # score 0 about 13 % of the time, and a bootstrap over them is then [0, 0], missing the true 0.05.
    rng = np.random.default_rng(11)
    truth, trials = 0.05, 400
    scores = rng.binomial(10, truth, size=(trials, 4)) / 10
    bound = sum(e.low <= truth <= e.high for e in map(Estimate.score_mean, scores))
    bootstrap = sum(low <= truth <= high for low, high in (bootstrap_interval(row, seed=0) for row in scores))
    assert bound / trials >= 0.95
    assert bootstrap / trials <= 0.9


def test_estimates_carry_their_interval_into_json():
    estimate = Estimate.proportion(7, 20)
    assert (estimate.low, estimate.high) == pytest.approx(wilson_by_hand(7, 20), abs=1e-12)
    assert estimate.value == 0.35 and estimate.n == 20 and estimate.method == "wilson"
    single = Estimate.mean([4.0])
    assert single.to_dict() == {
        "value": 4.0,
        "low": None,
        "high": None,
        "n": 1,
        "method": "bootstrap",
        "confidence": 0.95,
    }
    json.dumps(single.to_dict(), allow_nan=False)
    assert math.isnan(Estimate.proportion(0, 0).value)
    perplexity = Estimate.perplexity(WINDOW_NLL, WINDOW_TOKENS)
    assert (perplexity.value, perplexity.low, perplexity.high, perplexity.n) == perplexity_interval(
        WINDOW_NLL, WINDOW_TOKENS
    )
    assert Estimate.mean(NORMAL).low == bootstrap_interval(NORMAL)[0]


def test_differences_are_worded_only_as_strongly_as_the_intervals_allow():
    low = Estimate(1.0, 0.9, 1.1, 10, "bootstrap")
    high = Estimate(2.0, 1.8, 2.2, 10, "bootstrap")
    near = Estimate(1.15, 1.05, 1.25, 10, "bootstrap")
    unknown = Estimate(5.0, math.nan, math.nan, 1, "bootstrap")
    assert describe_difference(high, low) == "higher"
    assert describe_difference(low, high) == "lower"
    assert describe_difference(low, near) == "indistinguishable"
    assert describe_difference(unknown, low) == "indistinguishable"
    assert describe_difference(low, unknown) == "indistinguishable"
    # 1 of 20 against 19 of 20 is clear; 7 of 20 against 10 of 20 is not.
    assert describe_difference(Estimate.proportion(1, 20), Estimate.proportion(19, 20)) == "lower"
    assert describe_difference(Estimate.proportion(7, 20), Estimate.proportion(10, 20)) == "indistinguishable"
