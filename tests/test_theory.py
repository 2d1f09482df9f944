"""protocol.theory: hypercall counts on paper, checked two independent ways."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import theory


@pytest.mark.parametrize(
    "queue, limit, per_hc",
    [
        (1024, 512, 21.0),
        (1024, 1024, 42.0),
        (4096, 4096, 170.0),
        (128, 512, 5.0),
        (4096, 512, 170 / 9),
        (512, 4096, 21.0),
    ],
)
def test_ops_per_hypercall(queue, limit, per_hc):
    assert theory.ops_per_hypercall(queue, limit) == pytest.approx(per_hc)


def test_the_issue_figures():
    assert theory.write_pte_hypercalls(50000, "multicall", 1024, 512) == 2381
    assert theory.write_pte_hypercalls(2000, "direct", 1024, 512) == 2000
    assert theory.write_pte_hypercalls(2000, "queued", 1024, 512) == 2000
    assert theory.write_pte_hypercalls(1000, "multicall", 1024, 1024) == math.ceil(1000 / 42)


@given(st.integers(0, 3000), st.integers(24, 5000), st.integers(24, 5000))
def test_closed_form_equals_simulation(n, queue, limit):
    sim = theory.hypercalls_for_lazy_section([24] * n, "multicall", queue, limit)
    assert theory.write_pte_hypercalls(n, "multicall", queue, limit) == sim


def test_mixed_streams_are_simulated_op_by_op():
    # 21 write_pte (504 B) + one flush (8 B) fill a 512 B host copy exactly; a second flush does not fit.
    assert theory.hypercalls_for_lazy_section([24] * 21 + [8], "multicall", 1024, 512) == 1
    assert theory.hypercalls_for_lazy_section([24] * 21 + [8, 8], "multicall", 1024, 512) == 2
    with pytest.raises(ValueError):
        theory.hypercalls_for_flush([24], 16)
