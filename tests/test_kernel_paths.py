"""The new kernel paths in one process: exact op and hypercall counts, derived independently of the guest."""

from __future__ import annotations

import math

import pytest

from guest_proc.pagetable import LEAF_SPAN, Vma
from guest_proc.paravirt import MODES
from guest_proc.workloads import PROCESS_WORKLOADS, prepare
from protocol import theory
from protocol.layout import PAGE_SIZE
from protocol.x86 import PAGE_NX, PAGE_PRESENT, PAGE_RW
from pvmmu.maps import load_vmas, shipped


def run(pair_factory, workload: str, size: int, mode: str, seed: int = 7, vmas=None, **kw):
    pair = pair_factory(mode, **kw)
    work = prepare(pair.kernel, workload, size, seed, vmas)
    pair.kvm.reset_counters()
    work.run()
    return pair, work


def consistent(pair) -> str:
    host, guest = pair.kvm.check(), pair.kernel.check()
    assert host.ok, host.examples
    assert guest["ok"], guest["examples"]
    assert host.digests["0"] == guest["digest"]
    return guest["digest"]


def chunks(vma: Vma) -> list[int]:
    """Resident pages per 2 MiB page table, computed from the VMA alone."""
    counts: dict[int, int] = {}
    for va in vma.resident:
        counts[va // LEAF_SPAN] = counts.get(va // LEAF_SPAN, 0) + 1
    return list(counts.values())


def test_faults_take_one_hypercall_per_op_in_every_mode(pair_factory):
    n = 400
    for mode in MODES:
        pair = pair_factory(mode)
        work = prepare(pair.kernel, "faults", n, 7)
        tables = len(work.mm.tables)
        work.run()
        new_tables = len(work.mm.tables) - tables
        # One PTE per fault, plus one entry hooking in each page table the faults had to allocate.
        assert new_tables > 0
        assert pair.pv.ops == {"write_pte": n + new_tables, "flush_tlb": 0, "release_pt": 0}
        assert pair.kernel.paths["handle_mm_fault"] == [n, n + new_tables, n + new_tables]
        assert pair.pv.hypercalls == n + new_tables  # multicall too: nothing was ever queued
        assert theory.op_mix(pair.pv.shape) == {"lazy_sections": 0, "in_lazy": 0, "outside": n + new_tables}
        assert sum(len(v.resident) for v in work.mm.vmas) == 2 * n
        consistent(pair)


def test_faults_grow_the_process_when_its_mappings_are_full(pair_factory):
    pages = sum(v.pages - len(v.resident) for v in load_vmas(shipped()["bash"]) if v.accessible)
    pair, work = run(pair_factory, "faults", pages + 50, "multicall", vmas=load_vmas(shipped()["bash"]))
    extra = [v for v in work.mm.vmas if v.name == "[anon: faults]"]
    assert len(extra) == 1 and extra[0].pages == 50 and len(extra[0].resident) == 50
    consistent(pair)


@pytest.mark.parametrize("limit, per_call", [(512, 21), (1024, 42)])
def test_mprotect_rewrites_every_present_pte_twice_in_lazy_sections(pair_factory, limit, per_call):
    pair = pair_factory("multicall", host_limit=limit)
    work = prepare(pair.kernel, "mprotect", 600, 3)
    writable = [v for v in work.mm.vmas if v.write and v.resident]
    present = sum(len(v.resident) for v in writable)
    expect_calls = sum(math.ceil(k / per_call) for v in writable for k in chunks(v)) + len(writable)
    work.run()
    assert pair.pv.ops == {"write_pte": 2 * present, "flush_tlb": 2 * len(writable), "release_pt": 0}
    assert pair.pv.hypercalls == 2 * expect_calls
    for vma in writable:  # private pages stay read-only until written (PAGE_COPY); shared ones are RW again
        for va in vma.resident:
            pte = work.mm.get_pte(va)
            assert pte & PAGE_PRESENT and bool(pte & PAGE_RW) == vma.shared and pte & PAGE_NX
    consistent(pair)


def test_mprotect_of_part_of_a_mapping_splits_it(pair_factory):
    pair = pair_factory("multicall")
    work = prepare(pair.kernel, "fork", 300, 1)  # any process; only its address space is used
    heap = next(v for v in work.mm.vmas if v.name == "heap")
    lo, hi = heap.resident[10], heap.resident[20]
    pair.kernel.sys_mprotect(work.mm, lo, hi, write=False, exec=False)
    pieces = [v for v in work.mm.vmas if v.name == "heap"]
    assert [(v.start, v.end, v.write) for v in pieces] == [
        (heap.start, lo, True),
        (lo, hi, False),
        (hi, heap.end, True),
    ]
    assert pair.pv.ops["write_pte"] == 10 and pair.pv.ops["flush_tlb"] == 1
    consistent(pair)


def test_munmap_unmaps_half_and_frees_exactly_the_tables_nothing_needs(pair_factory):
    pair = pair_factory("multicall")
    work = prepare(pair.kernel, "munmap", 800, 5)
    mm = work.mm
    before_tables = dict(mm.tables)
    in_use = pair.kernel.frames.in_use
    work.run()
    assert sum(len(v.resident) for v in mm.vmas) == 800 - 400
    for start, end in work.ranges:
        assert mm.find_vma(start) is None and mm.find_vma(end - PAGE_SIZE) is None
        assert all(not mm.get_pte(va) for va in range(start, min(end, start + 64 * PAGE_SIZE), PAGE_SIZE))
    freed = set(before_tables) - set(mm.tables)
    for level, base in mm.tables:  # every table left is needed by a mapping left
        span = LEAF_SPAN << (9 * (level - 1))
        assert any(v.start < base + span and base < v.end for v in mm.vmas)
    assert freed and pair.pv.ops["release_pt"] == len(freed)
    assert pair.pv.ops["write_pte"] == 400 + len(freed)  # each zapped PTE, each cleared parent entry
    assert pair.pv.ops["flush_tlb"] == len(work.ranges)
    assert pair.kernel.frames.in_use == in_use - len(freed)
    consistent(pair)


def test_mixed_batches_its_forks_but_never_its_faults(pair_factory):
    pair, work = run(pair_factory, "mixed", 400, "multicall", seed=11)
    paths = pair.kernel.path_counts()
    assert {"copy_page_range", "exit_mmap", "handle_mm_fault"} <= set(paths)
    faults = paths["handle_mm_fault"]
    assert faults["hypercalls"] == faults["ops"] > 0
    forks = paths["copy_page_range"]
    assert forks["ops"] > 5 * forks["hypercalls"]
    assert sum(p["ops"] for p in paths.values()) == pair.pv.ops_total
    assert sum(p["hypercalls"] for p in paths.values()) == pair.pv.hypercalls
    assert pair.kernel.mms == [work.mm]  # every child and exec'd image has exited
    consistent(pair)


def test_mixed_is_deterministic_per_seed(pair_factory):
    def outcome(seed: int) -> tuple:
        pair, _ = run(pair_factory, "mixed", 200, "direct", seed=seed)
        return consistent(pair), pair.pv.hypercalls, tuple(sorted(pair.pv.ops.items()))

    assert outcome(4) == outcome(4) != outcome(5)


@pytest.mark.parametrize("capture", ["bash", "python3", "node"])
def test_fork_of_a_captured_process_copies_exactly_its_resident_pages(pair_factory, capture):
    vmas = load_vmas(shipped()[capture])
    resident = sum(len(v.resident) for v in vmas)
    cow = sum(len(v.resident) for v in vmas if v.write and not v.shared)
    pair, work = run(pair_factory, "fork", 1, "multicall", vmas=vmas)
    child_tables = len(work.child.tables)
    assert pair.pv.ops == {"write_pte": resident + cow + child_tables, "flush_tlb": 1, "release_pt": 0}
    assert pair.pv.hypercalls == theory.hypercalls_for_shape(pair.pv.shape, "multicall", 1024, 512)
    assert work.address_space()["resident_pages"] == resident
    consistent(pair)


@pytest.mark.parametrize("workload", PROCESS_WORKLOADS)
def test_every_process_workload_runs_from_a_capture_in_every_mode(pair_factory, workload):
    digests = set()
    for mode in MODES:
        pair, _ = run(pair_factory, workload, 200, mode, vmas=load_vmas(shipped()["bash"]))
        digests.add(consistent(pair))
        assert pair.pv.hypercalls == theory.hypercalls_for_shape(pair.pv.shape, mode, 1024, 512)
    assert len(digests) == 1


def test_writes_refuses_an_address_space(pair_factory):
    with pytest.raises(ValueError, match="does not start from a process"):
        prepare(pair_factory().kernel, "writes", 10, 1, load_vmas(shipped()["bash"]))


def test_a_fault_no_mapping_allows_is_refused(pair_factory):
    pair = pair_factory()
    work = prepare(pair.kernel, "fork", 50, 1)
    text = next(v for v in work.mm.vmas if v.name == "text")
    with pytest.raises(ValueError, match="SIGSEGV"):
        pair.kernel.handle_mm_fault(work.mm, text.start, write=True)
    with pytest.raises(ValueError, match="SIGSEGV"):
        pair.kernel.handle_mm_fault(work.mm, 0x1000, write=False)
