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


def test_shape_theory_by_hand():
    E, L, R = theory.SHAPE_ENTER, theory.SHAPE_LEAVE, theory.SHAPE_RELEASE_PT
    # outside lazy mode: every op its own call; release_pt always
    assert theory.hypercalls_for_shape([24, 8, R], "multicall", 1024, 512) == 3
    # one lazy section of 42 write_pte: two calls at 512, one at 1024; then a direct flush
    shape = [E] + [24] * 42 + [L, 8]
    assert theory.hypercalls_for_shape(shape, "multicall", 1024, 512) == 3
    assert theory.hypercalls_for_shape(shape, "multicall", 1024, 1024) == 2
    assert theory.hypercalls_for_shape(shape, "direct", 1024, 512) == 43
    assert theory.hypercalls_for_shape(shape, "queued", 1024, 512) == 43
    # a 43rd op overflows the queue: flush 42 (2 calls), then 1 more at the end
    assert theory.hypercalls_for_shape([E] + [24] * 43 + [L], "multicall", 1024, 512) == 3
    # release_pt inside a lazy section goes at once and does not flush the queue
    assert theory.hypercalls_for_shape([E, 24, R, 24, L], "multicall", 1024, 512) == 2


@given(st.integers(0, 2000), st.integers(24, 5000), st.integers(24, 5000))
def test_shape_theory_of_one_lazy_section_equals_the_closed_form(n, queue, limit):
    shape = [theory.SHAPE_ENTER] + [24] * n + [theory.SHAPE_LEAVE]
    assert theory.hypercalls_for_shape(shape, "multicall", queue, limit) == theory.write_pte_hypercalls(
        n, "multicall", queue, limit
    )
