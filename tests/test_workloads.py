"""Workloads in one process: the same op stream in every mode, exact hypercall counts, consistent state."""

from __future__ import annotations

import math

import pytest

from guest_proc.paravirt import MODES
from guest_proc.workloads import WORKLOADS, prepare
from protocol import theory
from protocol.x86 import PAGE_PRESENT, PAGE_RW


def run(pair_factory, workload: str, size: int, mode: str, seed: int = 7, **kw):
    pair = pair_factory(mode, **kw)
    work = prepare(pair.kernel, workload, size, seed)
    pair.kvm.reset_counters()
    pair.calls.clear()
    work.run()
    return pair, work


def final_state(pair) -> tuple:
    host = pair.kvm.check()
    guest = pair.kernel.check()
    assert host.ok, host.examples
    assert guest["ok"], guest["examples"]
    assert host.digests["0"] == guest["digest"]
    return guest["digest"], tuple(sorted(pair.pv.ops.items()))


@pytest.mark.parametrize(
    "workload, size",
    [("writes", 500), ("fork", 300), ("exit", 300), ("mprotect", 300), ("munmap", 300), ("faults", 300),
     ("mixed", 150)],
)  # fmt: skip
def test_every_mode_issues_the_same_ops_and_ends_in_the_same_state(pair_factory, workload, size):
    results = {}
    for mode in MODES:
        pair, _ = run(pair_factory, workload, size, mode)
        results[mode] = final_state(pair)
        host = pair.kvm.totals()
        assert host.write_pte + host.flush_tlb + host.release_pt == pair.pv.ops_total
        if mode == "ring":  # no hypercall at all: ops travel through the ring, flushes are publishes
            assert host.hypercalls == 0 and host.ring_passes > 0 and host.bytes > 0
        else:
            assert host.hypercalls == pair.pv.hypercalls
        if mode in ("direct", "queued"):
            assert pair.pv.hypercalls == pair.pv.ops_total  # one per op
    assert len(set(results.values())) == 1, results


@pytest.mark.parametrize("n", [1, 20, 21, 22, 42, 43, 500, 2000])
@pytest.mark.parametrize("limit, per_hc", [(512, 21), (1024, 42)])
def test_multicall_writes_hypercall_count_is_exact(pair_factory, n, limit, per_hc):
    pair, _ = run(pair_factory, "writes", n, "multicall", host_limit=limit)
    assert pair.pv.ops == {"write_pte": n, "flush_tlb": 0, "release_pt": 0}
    assert pair.pv.hypercalls == math.ceil(n / per_hc)
    assert pair.pv.hypercalls == theory.write_pte_hypercalls(n, "multicall", 1024, limit)


@pytest.mark.parametrize("queue, limit", [(128, 512), (4096, 4096), (4096, 512), (512, 1024)])
def test_multicall_writes_match_theory_for_other_sizes(pair_factory, queue, limit):
    pair, _ = run(pair_factory, "writes", 1000, "multicall", queue_bytes=queue, host_limit=limit)
    assert pair.pv.hypercalls == theory.write_pte_hypercalls(1000, "multicall", queue, limit)


def test_fork_copies_every_pte_and_write_protects_cow_pages_in_both(pair_factory):
    pair, work = run(pair_factory, "fork", 400, "multicall")
    parent, child = work.mm, work.child
    copied = cow = 0
    for vma in parent.vmas:
        for va in vma.resident:
            p, c = parent.get_pte(va), child.get_pte(va)
            assert p & PAGE_PRESENT and p == c
            copied += 1
            if vma.cow:
                assert not p & PAGE_RW
                cow += 1
    assert copied == 400 and 0 < cow < 400
    ops = pair.pv.ops
    assert ops["write_pte"] == copied + cow + len(child.tables)  # each PTE, each COW parent, each child table
    assert (ops["flush_tlb"], ops["release_pt"]) == (1, 0)
    final_state(pair)


def test_exit_zaps_everything_and_releases_every_table(pair_factory):
    pair = pair_factory("multicall")
    work = prepare(pair.kernel, "exit", 300, 3)
    tables = len(work.mm.tables) + 1
    in_use = pair.kernel.frames.in_use
    work.run()
    assert pair.pv.ops["release_pt"] == tables
    assert pair.pv.ops["write_pte"] == 300 + tables - 1  # every PTE, every upper entry
    assert pair.pv.intent == {} and pair.kvm.shadow.spte == {} and pair.kvm.shadow.pages == set()
    assert pair.kernel.frames.in_use == in_use - tables
    final_state(pair)


def test_same_seed_same_stream_other_seed_other_stream(pair_factory):
    a = final_state(run(pair_factory, "fork", 300, "multicall", seed=1)[0])
    b = final_state(run(pair_factory, "fork", 300, "multicall", seed=1)[0])
    c = final_state(run(pair_factory, "fork", 300, "multicall", seed=2)[0])
    assert a == b and a != c


def test_unknown_workload_is_refused(pair_factory):
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        prepare(pair_factory().kernel, "nope", 1, 1)
    assert set(WORKLOADS) == {"writes", "fork", "exit", "mprotect", "mprotect-clear", "munmap", "faults", "mixed"}


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("queue, limit", [(1024, 512), (1024, 1024), (4096, 512), (128, 512)])
def test_the_op_streams_shape_priced_on_paper_matches_the_real_flushes(pair_factory, workload, queue, limit):
    for mode in MODES:
        pair, _ = run(pair_factory, workload, 300, mode, queue_bytes=queue, host_limit=limit)
        assert pair.pv.hypercalls == theory.hypercalls_for_shape(pair.pv.shape, mode, queue, limit)
        assert pair.kvm.totals().hypercalls == (0 if mode == "ring" else pair.pv.hypercalls)
