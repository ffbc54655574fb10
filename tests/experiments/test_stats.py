"""The statistics equal scipy's own numbers, hand-computed cases, and behave at the edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from app.experiments.stats import (
    holm,
    mean_of,
    sample_ratio,
    two_proportions,
    variance,
    welch,
    wilson,
)
from app.storage.protocol import Moments


def moments(values: list[int] | list[float]) -> Moments:
    if not values:
        return Moments()
    if all(isinstance(v, int) for v in values):
        ints = [int(v) for v in values]
        return Moments(len(ints), sum(ints), sum(v * v for v in ints), min(ints), max(ints))
    floats = [float(v) for v in values]
    return Moments(
        len(floats), math.fsum(floats), math.fsum(v * v for v in floats), min(floats), max(floats)
    )


@pytest.mark.parametrize(("k", "n"), [(81, 263), (0, 10), (10, 10), (1, 1), (499, 1000)])
def test_the_wilson_interval_is_scipys(k: int, n: int) -> None:
    rate = wilson(k, n)

    reference = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert rate.rate == k / n
    assert rate.low == pytest.approx(reference.low, abs=1e-12)
    assert rate.high == pytest.approx(reference.high, abs=1e-12)


def test_the_wilson_interval_of_known_cases() -> None:
    # No success in 10: the upper bound is z² / (n + z²), the lower one exactly 0.
    z = stats.norm.ppf(0.975)
    none = wilson(0, 10)
    assert none.low == 0.0 and none.high == pytest.approx(z * z / (10 + z * z), abs=1e-12)
    assert none.high == pytest.approx(0.27753, abs=1e-5)
    # All 10 succeeded: the mirror image, and never past 1.
    every = wilson(10, 10)
    assert every.high == 1.0 and every.low == pytest.approx(1 - 0.27753, abs=1e-5)
    # 81 of 263 (Wilson 1927's textbook example): 0.2553 to 0.3662.
    textbook = wilson(81, 263)
    assert (round(textbook.low or 0, 4), round(textbook.high or 0, 4)) == (0.2553, 0.3662)
    assert wilson(0, 0).rate is None and wilson(0, 0).low is None


def test_welchs_t_and_its_interval_equal_scipys_on_generated_samples() -> None:
    rng = np.random.default_rng(21)
    a = [int(x) for x in rng.normal(500, 80, 400).round()]
    b = [int(x) for x in rng.normal(480, 120, 250).round()]

    test = welch(mean_of(moments(a)), mean_of(moments(b)))

    reference = stats.ttest_ind(a, b, equal_var=False)
    interval = reference.confidence_interval(0.95)
    assert test.statistic == pytest.approx(reference.statistic, rel=1e-9)
    assert test.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert test.df == pytest.approx(reference.df, rel=1e-9)
    assert test.difference == pytest.approx(np.mean(a) - np.mean(b), rel=1e-9)
    assert test.low == pytest.approx(interval.low, rel=1e-9)
    assert test.high == pytest.approx(interval.high, rel=1e-9)


def test_the_mean_interval_is_scipys_t_interval() -> None:
    values = [3, 7, 7, 19, 24, 30, 31]

    mean = mean_of(moments(values))

    low, high = stats.t.interval(0.95, len(values) - 1, np.mean(values), stats.sem(values))
    assert mean.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert mean.sd == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert mean.low == pytest.approx(low, rel=1e-12)
    assert mean.high == pytest.approx(high, rel=1e-12)
    assert (mean.least, mean.most) == (3, 31)


def test_integer_sums_give_the_exact_variance_where_floats_would_cancel() -> None:
    # Values near 1e9 with a spread of 1: in floats, n·Σx² and (Σx)² agree to 16 digits.
    values = [1_000_000_000 + d for d in (0, 1, 2, 1, 0, 2)]

    assert variance(moments(values)) == pytest.approx(np.var(np.array(values) - 10**9, ddof=1))


def test_the_two_proportion_z_test_by_hand() -> None:
    # 120 of 200 against 100 of 200: pooled p = 0.55, se = sqrt(0.55·0.45·(2/200)).
    test = two_proportions(wilson(120, 200), wilson(100, 200))

    se0 = math.sqrt(0.55 * 0.45 * (1 / 200 + 1 / 200))
    z = 0.1 / se0
    assert test.statistic == pytest.approx(z, rel=1e-12)
    assert test.statistic == pytest.approx(2.0100756, rel=1e-7)
    assert test.p_value == pytest.approx(2 * stats.norm.sf(z), rel=1e-12)
    assert test.p_value == pytest.approx(0.044424, abs=1e-6)
    se = math.sqrt(0.6 * 0.4 / 200 + 0.5 * 0.5 / 200)
    half = stats.norm.ppf(0.975) * se
    assert test.difference == pytest.approx(0.1)
    assert test.low == pytest.approx(0.1 - half) and test.high == pytest.approx(0.1 + half)


def test_holm_adjusts_by_hand() -> None:
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 → kept monotone.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []


def test_the_sample_ratio_test_is_scipys_chi_squared() -> None:
    ratio = sample_ratio([5100, 4900], [5000, 5000])

    reference = stats.chisquare([5100, 4900], [5000, 5000])
    assert ratio is not None
    assert ratio.chi2 == pytest.approx(reference.statistic, rel=1e-12) and ratio.df == 1
    assert ratio.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert not ratio.mismatch
    skewed = sample_ratio([700, 300], [5000, 5000])
    assert skewed is not None and skewed.mismatch
    assert sample_ratio([0, 0], [5000, 5000]) is None


def test_edge_cases_give_no_test_rather_than_a_wrong_one() -> None:
    constant = mean_of(moments([200, 200, 200]))
    assert constant.variance == 0 and constant.low == constant.high == 200
    no_spread = welch(constant, mean_of(moments([200, 200])))
    assert no_spread.p_value is None and no_spread.difference == 0
    assert no_spread.note == "no variance on either side"
    single = mean_of(moments([5]))
    assert single.mean == 5 and single.sd is None and single.low is None
    assert welch(single, constant).p_value is None
    empty = mean_of(moments([]))
    assert empty.n == 0 and empty.mean is None
    every = two_proportions(wilson(50, 50), wilson(20, 20))
    assert every.p_value is None and every.difference == 0
    assert two_proportions(wilson(0, 0), wilson(3, 4)).p_value is None
    # One side without variance still has a test: the other side's spread carries it.
    lopsided = welch(mean_of(moments([1, 2, 3, 4])), constant)
    reference = stats.ttest_ind_from_stats(
        2.5, np.std([1, 2, 3, 4], ddof=1), 4, 200, 0.0, 3, equal_var=False
    )
    assert lopsided.p_value == pytest.approx(reference.pvalue, rel=1e-9)
