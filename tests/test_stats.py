"""pvmmu.stats: summaries and the Mann-Whitney U test, against hand computations, tables and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvmmu import stats


def test_summary_by_hand():
    s = stats.summarize([4, 1, 100, 3, 2])
    assert (s["n"], s["median"], s["mean"], s["min"], s["max"], s["p99"]) == (5, 3, 22, 1, 100, 100)
    # deviations -21 -20 -19 -18 78: squares sum to 7610, over n-1 = 4
    assert s["stdev"] == pytest.approx(math.sqrt(7610 / 4))
    assert s["samples"] == [4, 1, 100, 3, 2]  # in run order, for the JSON
    assert stats.summarize([7])["stdev"] == 0.0
    assert stats.relative_stdev(stats.summarize([9, 11])) == pytest.approx(math.sqrt(2) / 10)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_midranks_share_tied_ranks():
    assert stats.midranks([3, 1, 3, 2]) == [3.5, 1, 3.5, 2]
    assert stats.midranks([5, 5, 5]) == [2, 2, 2]


@pytest.mark.parametrize(
    "m, u, p",
    [
        # Published critical values of U (one-tailed): n1 = n2 = 3 reaches 0.05 only at U = 0;
        # n1 = n2 = 4 is significant at 0.05 up to U = 1; n1 = n2 = 5 up to U = 4 (P = 0.0476).
        (3, 0, 1 / 20),
        (3, 1, 2 / 20),
        (4, 0, 1 / 70),
        (4, 1, 2 / 70),
        (4, 2, 4 / 70),
        (5, 4, 12 / 252),
        (5, 5, 19 / 252),
    ],
)
def test_exact_p_matches_the_tables(m, u, p):
    # Build samples with exactly U pairs where x > y: x = 1..m shifted up past u of the y's.
    pooled = list(range(1, 2 * m + 1))
    x = pooled[:m]
    for _ in range(u):  # each swap of adjacent x/y ranks raises U by one
        for i in range(len(x) - 1, -1, -1):
            if x[i] + 1 not in x and x[i] + 1 <= 2 * m:
                x[i] += 1
                break
    y = [v for v in pooled if v not in x]
    t = stats.mann_whitney_less(x, y)
    assert t.u == u and t.method == "exact"
    assert t.p == pytest.approx(p)
    assert t.significant == (p <= 0.05)


def test_ties_by_hand():
    # pooled 1, 2, 2, 3: ranks 1, 2.5, 2.5, 4; x = {1, 2} sums to 3.5 (U = 0.5). Of the six ways to pick
    # two ranks, sums 3.5, 3.5, 5, 5, 6.5, 6.5: two are <= 3.5.
    t = stats.mann_whitney_less([1, 2], [2, 3])
    assert (t.u, t.p) == (0.5, pytest.approx(1 / 3))
    assert stats.mann_whitney_less([5, 5, 5], [5, 5, 5]).p == 1.0


def _brute_force_p(x: list[int], y: list[int]) -> float:
    pooled = [*x, *y]
    ranks = stats.midranks(pooled)
    observed = sum(ranks[: len(x)])
    splits = list(itertools.combinations(range(len(pooled)), len(x)))
    return sum(1 for c in splits if sum(ranks[i] for i in c) <= observed + 1e-9) / len(splits)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=6), st.lists(st.integers(0, 6), min_size=1, max_size=6))
def test_exact_p_equals_enumerating_every_split(x, y):
    assert stats.mann_whitney_less(x, y).p == pytest.approx(_brute_force_p(x, y))


def test_normal_approximation_by_hand():
    # m = n = 16 (32 pooled > EXACT_MAX_N): U = 80, mean 128, variance 16*16*33/12 = 704;
    # z = (80 - 128 + 0.5) / sqrt(704) = -1.790, and the normal table gives P(Z <= -1.79) = 0.0367.
    x = list(range(1, 12)) + list(range(28, 33))
    y = [v for v in range(1, 33) if v not in x]
    t = stats.mann_whitney_less(x, y)
    assert (t.method, t.u) == ("normal", 80)
    assert t.p == pytest.approx(0.0367, abs=5e-4)


def test_normal_approximation_with_tie_correction_by_hand():
    # x: eight 0s and eight 1s; y: eight 1s and eight 2s. Midranks 4.5, 16.5, 28.5; U = 168 - 136 = 32.
    # Ties: 2 * (8^3 - 8) + (16^3 - 16) = 5088, over 32 * 31: 5.129; variance 256/12 * (33 - 5.129) = 594.6;
    # z = (32 - 128 + 0.5) / 24.38 = -3.917, P(Z <= -3.92) = 4.4e-5.
    t = stats.mann_whitney_less([0] * 8 + [1] * 8, [1] * 8 + [2] * 8)
    assert t.u == 32 and t.p == pytest.approx(4.49e-5, rel=0.02)


@pytest.mark.parametrize("u", [10, 25, 40, 55, 70])
def test_normal_approximation_converges_on_the_exact_distribution(u):
    m = 12
    pooled = list(range(1, 2 * m + 1))
    # Choose x with rank sum m(m+1)/2 + u greedily from the top.
    x, need = list(range(1, m + 1)), u
    for i in range(m - 1, -1, -1):
        step = min(need, m)
        x[i] += step
        need -= step
    y = [v for v in pooled if v not in x]
    exact = stats.mann_whitney_less(x, y)
    normal = stats.mann_whitney_less(x, y, exact_max_n=0)
    assert exact.u == normal.u == u and (exact.method, normal.method) == ("exact", "normal")
    assert normal.p == pytest.approx(exact.p, abs=0.01)


def test_the_smallest_p_a_sample_size_allows():
    assert stats.min_exact_p(3, 3) == pytest.approx(0.05)  # --repeat 3 can just reach 0.05
    assert stats.min_exact_p(2, 2) > 0.05
    assert stats.mann_whitney_less([1], [2]).p == 0.5
