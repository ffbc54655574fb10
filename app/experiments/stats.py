"""The statistics of experiment results, from per-variant sums (never from every record).

Per variant: a success rate with its Wilson interval, and for each continuous metric the mean
with a t interval, from `Moments` (count, sum, sum of squares: exact integers for integer
columns, so the variance has no cancellation error). Each variant against control: Welch's t
for means, the pooled two-proportion z for the success rate, the difference with its 95 %
interval (Welch's degrees of freedom; the unpooled standard error for rates), and p-values
adjusted by Holm over every comparison made. An offline batch, where every item ran through
every variant, compares a variant with control on the same items instead: the paired t-test of
the per-item differences and McNemar's exact test of paired success. The split is checked by
a χ² test of the units each variant got against its allocation (a sample-ratio mismatch below
p = 0.001). The distributions are scipy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

from app.experiments.entities import Metric
from app.storage.protocol import Moments

ALPHA = 0.05
SRM_ALPHA = 0.001
CONFIDENCE = 1 - ALPHA
# Metrics where more is better; for every other one (latency, tokens, cost) less is.
HIGHER_IS_BETTER = frozenset({Metric.SUCCESS_RATE, Metric.FEEDBACK_SCORE})


def _z() -> float:
    return float(stats.norm.ppf(1 - ALPHA / 2))


@dataclass(frozen=True, slots=True)
class Rate:
    """k successes of n, with the Wilson score interval."""

    count: int
    n: int
    rate: float | None
    low: float | None
    high: float | None


def wilson(k: int, n: int) -> Rate:
    """The proportion k/n and its Wilson score interval at 95 %; Nones when n is 0."""
    if n == 0:
        return Rate(k, n, None, None, None)
    z = _z()
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At k = 0 or k = n one bound is exact; rounding must not put it past 0 or 1.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Rate(k, n, p, low, high)


@dataclass(frozen=True, slots=True)
class Mean:
    """The mean of n values, their sample variance, and the t interval of the mean."""

    n: int
    mean: float | None
    variance: float | None
    low: float | None
    high: float | None
    least: float | None = None
    most: float | None = None

    @property
    def sd(self) -> float | None:
        return None if self.variance is None else math.sqrt(self.variance)


def variance(m: Moments) -> float | None:
    """The sample variance (n - 1 in the denominator) from count, sum and sum of squares.

    Integer sums give the exact numerator n·Σx² - (Σx)², a single rounding at the division.
    """
    if m.n < 2:
        return None
    if isinstance(m.total, int) and isinstance(m.squares, int):
        return (m.n * m.squares - m.total * m.total) / (m.n * (m.n - 1))
    mean = m.total / m.n
    return max(0.0, (m.squares - m.n * mean * mean) / (m.n - 1))


def mean_of(m: Moments) -> Mean:
    """The mean of the values summed in `m`, with its 95 % t interval (none below 2 values)."""
    if m.n == 0:
        return Mean(0, None, None, None, None)
    mean = m.total / m.n
    var = variance(m)
    least = None if m.least is None else float(m.least)
    most = None if m.most is None else float(m.most)
    if var is None:
        return Mean(m.n, mean, None, None, None, least, most)
    half = float(stats.t.ppf(1 - ALPHA / 2, m.n - 1)) * math.sqrt(var / m.n)
    return Mean(m.n, mean, var, mean - half, mean + half, least, most)


@dataclass(frozen=True, slots=True)
class Test:
    """One comparison of a variant with control; `p_value` None when no test could be made."""

    statistic: float | None
    df: float | None
    p_value: float | None
    difference: float | None
    low: float | None
    high: float | None
    note: str | None = None


def _untested(note: str, difference: float | None = None) -> Test:
    return Test(None, None, None, difference, None, None, note)


def welch(variant: Mean, control: Mean) -> Test:
    """Welch's t-test of variant against control, and the difference of means with its 95 %
    interval on Welch-Satterthwaite degrees of freedom."""
    if variant.variance is None or control.variance is None:
        return _untested("needs at least 2 values on each side")
    assert variant.mean is not None and control.mean is not None
    difference = variant.mean - control.mean
    a, b = variant.variance / variant.n, control.variance / control.n
    if a + b == 0:
        return _untested("no variance on either side", difference)
    result = stats.ttest_ind_from_stats(
        variant.mean,
        math.sqrt(variant.variance),
        variant.n,
        control.mean,
        math.sqrt(control.variance),
        control.n,
        equal_var=False,
    )
    df = (a + b) ** 2 / (a * a / (variant.n - 1) + b * b / (control.n - 1))
    half = float(stats.t.ppf(1 - ALPHA / 2, df)) * math.sqrt(a + b)
    return Test(
        float(result.statistic),
        df,
        float(result.pvalue),
        difference,
        difference - half,
        difference + half,
    )


def two_proportions(variant: Rate, control: Rate) -> Test:
    """The two-proportion z-test (pooled standard error) of variant against control, and the
    difference of rates with its 95 % Wald interval (unpooled standard error)."""
    if variant.rate is None or control.rate is None:
        return _untested("needs at least 1 call on each side")
    difference = variant.rate - control.rate
    pooled = (variant.count + control.count) / (variant.n + control.n)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / variant.n + 1 / control.n))
    if se0 == 0:
        return _untested("every call on both sides had the same outcome", difference)
    z = difference / se0
    p = float(2 * stats.norm.sf(abs(z)))
    se = math.sqrt(
        variant.rate * (1 - variant.rate) / variant.n
        + control.rate * (1 - control.rate) / control.n
    )
    half = _z() * se
    return Test(z, None, p, difference, difference - half, difference + half)


def paired_t(differences: Moments) -> Test:
    """The paired t-test (as `scipy.stats.ttest_rel`) from the moments of the per-item
    differences variant minus control: their mean with its 95 % t interval, on n - 1 degrees
    of freedom."""
    mean = mean_of(differences)
    if mean.variance is None or mean.mean is None:
        return _untested("needs at least 2 items run through both", mean.mean)
    if mean.variance == 0:
        return _untested("every item differs by the same amount", mean.mean)
    df = mean.n - 1
    t = mean.mean / math.sqrt(mean.variance / mean.n)
    p = float(2 * stats.t.sf(abs(t), df))
    return Test(t, float(df), p, mean.mean, mean.low, mean.high)


def mcnemar(differences: Moments) -> Test:
    """McNemar's exact test of paired success, from the moments of the per-item differences
    d = variant - control in {-1, 0, 1}: b = (Σd² + Σd) / 2 items succeeded only through the
    variant, c = (Σd² - Σd) / 2 only through control, and the two-sided binomial test of b
    among b + c at one half (`scipy.stats.binomtest`). The difference of rates (b - c) / n
    has the Wald interval of paired proportions. The statistic is min(b, c)."""
    n, total, squares = differences.n, int(differences.total), int(differences.squares)
    if n == 0:
        return _untested("needs at least 1 item run through both")
    b, c = (squares + total) // 2, (squares - total) // 2
    difference = (b - c) / n
    if b + c == 0:
        return _untested("no item had different outcomes on the two sides", difference)
    p = float(stats.binomtest(b, b + c, 0.5).pvalue)
    half = _z() * math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n
    return Test(
        float(min(b, c)),
        None,
        p,
        difference,
        difference - half,
        difference + half,
        f"{b} items succeeded only through the variant, {c} only through control",
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the k-th smallest of m p-values times (m - k + 1), kept
    non-decreasing and capped at 1 (in the order given)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True, slots=True)
class Ratio:
    """The χ² goodness-of-fit test of observed counts against expected ones."""

    chi2: float
    df: int
    p_value: float
    expected: list[float]

    @property
    def mismatch(self) -> bool:
        return self.p_value < SRM_ALPHA


def sample_ratio(observed: Sequence[int], weights: Sequence[int]) -> Ratio | None:
    """Whether the units split as the weights say: χ² against total x weight / Σweights;
    None with no unit at all."""
    total = sum(observed)
    if total == 0:
        return None
    scale = sum(weights)
    expected = [total * w / scale for w in weights]
    result = stats.chisquare(list(observed), expected)
    return Ratio(float(result.statistic), len(observed) - 1, float(result.pvalue), expected)
