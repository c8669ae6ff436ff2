"""Latency percentiles from the constant-memory histogram agree with exact ones."""

from __future__ import annotations

import random

from tmbatch.summary import Histogram, percentile


def test_histogram_percentiles_within_half_a_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-2.0, 1.0) for _ in range(50_000)] + [0.00001, 7200.0]
    h = Histogram()
    for v in values:
        h.add(v)
    exact = sorted(values)
    for q in (50, 90, 99, 99.9):
        want = percentile(exact, q)
        got = h.percentile(q)
        assert want is not None and got is not None
        assert abs(got - want) / want < 0.005, (q, got, want)
    assert h.count == len(values) and h.max == 7200.0


def test_empty_histogram() -> None:
    h = Histogram()
    assert h.percentile(50) is None and h.max is None and len(h) == 0
