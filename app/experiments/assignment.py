"""Consistent assignment: a unit's hash with the experiment's salt picks its variant, always the
same one, and the variants' weights split the hash space in proportion."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

BUCKETS = 10_000  # weights are in basis points of the units: 1 bucket is 0.01 %


def bucket(salt: str, unit: str) -> int:
    """The unit's bucket, 0 to 9,999: BLAKE2b of salt and unit, reduced modulo 10,000 (the
    bias of reducing 64 bits is below 1e-15)."""
    digest = hashlib.blake2b(f"{salt}\x00{unit}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class Splitter:
    """Buckets to variant indexes by cumulative weight: weights (3000, 7000) send buckets
    0-2,999 to the first variant and 3,000-9,999 to the second."""

    def __init__(self, weights: Sequence[int]) -> None:
        if sum(weights) != BUCKETS or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive and sum to {BUCKETS}: {list(weights)}")
        self._bounds: list[int] = []
        total = 0
        for weight in weights:
            total += weight
            self._bounds.append(total)

    def index(self, bucket: int) -> int:
        return bisect.bisect_right(self._bounds, bucket)
