"""Statistics for repeated runs: summaries and a Mann-Whitney U rank test. Pure, stdlib only.

Timings on a shared machine are skewed (a run is slowed by others, never sped
up), so a rank test suits them better than a t-test. For the handful of samples
``--repeat`` gives, the p-value is exact: the distribution of the rank sum over
every way of splitting the pooled samples, by dynamic programming, which stays
exact when values tie. Beyond ``EXACT_MAX_N`` pooled samples it is the normal
approximation with tie and continuity corrections.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from guest_proc.shell import percentile

EXACT_MAX_N = 30  # pooled samples up to which the exact distribution is computed
ALPHA = 0.05


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """N, median, mean, sample standard deviation, min, max, p99 (nearest rank) and the samples."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("no samples")
    ordered = sorted(xs)
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": ordered[0],
        "max": ordered[-1],
        "p99": percentile(ordered, 99),
        "samples": xs,
    }


def relative_stdev(summary: dict[str, Any]) -> float:
    """σ as a fraction of the mean (0 when the mean is 0)."""
    return summary["stdev"] / abs(summary["mean"]) if summary["mean"] else 0.0


def midranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..N of ``values``; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _rank_sum_counts(doubled_ranks: Sequence[int], m: int) -> list[int]:
    """counts[s]: how many m-element subsets of the pooled (doubled) ranks sum to s.

    Knapsack over the pooled samples: ways[k][s] = subsets of k elements seen so
    far summing to s. Doubling keeps midranks (which end in .5) integral.
    """
    total = sum(doubled_ranks)
    ways = [[0] * (total + 1) for _ in range(m + 1)]
    ways[0][0] = 1
    for r in doubled_ranks:
        for k in range(m, 0, -1):
            row, prev = ways[k], ways[k - 1]
            for s in range(total, r - 1, -1):
                if prev[s - r]:
                    row[s] += prev[s - r]
    return ways[m]


@dataclass(frozen=True)
class RankTest:
    """A one-sided Mann-Whitney U test of "x tends to be smaller than y"."""

    u: float  # pairs (x_i, y_j) with x_i > y_j, ties counting one half: small when x is smaller
    p: float
    n_x: int
    n_y: int
    method: str  # "exact" or "normal"
    alpha: float = ALPHA

    @property
    def significant(self) -> bool:
        return self.p <= self.alpha

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant, "test": "Mann-Whitney U, one-sided"}


def mann_whitney_less(
    x: Sequence[float], y: Sequence[float], alpha: float = ALPHA, exact_max_n: int = EXACT_MAX_N
) -> RankTest:
    """P(U <= observed) when x and y come from one distribution: small p says x is smaller.

    Exact (conditional on the ties present) up to ``exact_max_n`` pooled samples;
    normal approximation with tie and continuity corrections beyond.
    """
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError("both samples need at least one value")
    pooled = [*x, *y]
    ranks = midranks(pooled)
    rank_sum_x = sum(ranks[:m])
    u = rank_sum_x - m * (m + 1) / 2
    if m + n <= exact_max_n:
        doubled = [round(2 * r) for r in ranks]
        counts = _rank_sum_counts(doubled, m)
        observed = round(2 * rank_sum_x)
        p = sum(counts[: observed + 1]) / math.comb(m + n, m)
        return RankTest(u, min(1.0, p), m, n, "exact", alpha)
    big_n = m + n
    ties = {}
    for v in pooled:
        ties[v] = ties.get(v, 0) + 1
    tie_term = sum(t**3 - t for t in ties.values()) / (big_n * (big_n - 1))
    var = m * n / 12 * ((big_n + 1) - tie_term)
    if var == 0:  # every value equal: no evidence either way
        return RankTest(u, 1.0, m, n, "normal", alpha)
    z = (u - m * n / 2 + 0.5) / math.sqrt(var)  # +0.5: continuity correction towards the null
    return RankTest(u, 0.5 * math.erfc(-z / math.sqrt(2)), m, n, "normal", alpha)


def min_exact_p(m: int, n: int) -> float:
    """The smallest one-sided p a test of m against n samples can give (complete separation)."""
    return 1 / math.comb(m + n, m)
