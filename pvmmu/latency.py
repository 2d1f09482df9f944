"""Hypercall round-trip latencies: exact percentiles in one process, mergeable histograms across many.

A vCPU knows its own samples and reports exact nearest-rank percentiles. To give
percentiles over *all* vCPUs, each also reports a histogram with logarithmic
bins 1% wide, which the supervisor merges: a merged percentile is within 1% of
the exact one.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping

_LOG_STEP = math.log(1.01)  # bin width: 1%


def percentile(sorted_values: list[int] | array, q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(len(sorted_values) * q / 100))
    return float(sorted_values[rank - 1])


def histogram(samples_ns: Iterable[int]) -> dict[int, int]:
    """Log-binned counts: bin b holds samples in [1.01**b, 1.01**(b+1)) ns."""
    out: dict[int, int] = {}
    for ns in samples_ns:
        b = int(math.log(ns) / _LOG_STEP) if ns > 0 else 0
        out[b] = out.get(b, 0) + 1
    return out


def merge(histograms: Iterable[Mapping[int | str, int]]) -> dict[int, int]:
    """Sum histograms (keys may arrive as strings, from JSON)."""
    out: dict[int, int] = {}
    for h in histograms:
        for b, n in h.items():
            out[int(b)] = out.get(int(b), 0) + n
    return out


def histogram_percentile_us(hist: Mapping[int, int], q: float) -> float:
    """Nearest-rank percentile of a histogram, in microseconds (bin centre)."""
    total = sum(hist.values())
    if not total:
        return 0.0
    rank = max(1, math.ceil(total * q / 100))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return math.exp((b + 0.5) * _LOG_STEP) / 1000
    raise AssertionError("unreachable: rank <= total")
