"""Consistent assignment: a unit always gets the same variant, and units split as allocated."""

from __future__ import annotations

from collections import Counter

import pytest
from scipy import stats

from app.experiments.assignment import BUCKETS, Splitter, bucket


def test_a_unit_gets_the_same_bucket_every_time_and_another_salt_reshuffles() -> None:
    units = [f"user-{i}" for i in range(1000)]

    first = [bucket("salt-1", u) for u in units]

    assert first == [bucket("salt-1", u) for u in units]
    assert all(0 <= b < BUCKETS for b in first)
    reshuffled = [bucket("salt-2", u) for u in units]
    assert sum(a == b for a, b in zip(first, reshuffled, strict=True)) < 10


def test_buckets_split_by_cumulative_weight() -> None:
    splitter = Splitter([3000, 2000, 5000])

    assert [splitter.index(b) for b in (0, 2999, 3000, 4999, 5000, 9999)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        Splitter([5000, 4000])
    with pytest.raises(ValueError):
        Splitter([10_000, 0])


@pytest.mark.parametrize("weights", [[5000, 5000], [2000, 3000, 5000], [100, 9900]])
def test_ten_thousand_units_split_as_allocated_within_a_chi_squared_bound(
    weights: list[int],
) -> None:
    splitter = Splitter(weights)

    counts = Counter(splitter.index(bucket("experiment-salt", f"key-{i}")) for i in range(10_000))

    observed = [counts[i] for i in range(len(weights))]
    expected = [10_000 * w / BUCKETS for w in weights]
    assert stats.chisquare(observed, expected).pvalue > 0.001
