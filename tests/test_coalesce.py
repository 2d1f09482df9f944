"""Op coalescing (--coalesce): a rewrite of an entry queued in the same batch replaces that op's value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from guest_proc.pagetable import FrameAllocator
from guest_proc.paravirt import MODES
from guest_proc.trace import Replay, TracedKvmParaState, TraceRecorder, load_trace, prepare_recorded
from guest_proc.workloads import WORKLOADS, GuestKernel, prepare, prepare_workload
from protocol import decode
from protocol.abi import FlushTlb, WritePte
from protocol.layout import PAGE_SIZE, POOL_BASE
from protocol.theory import hypercalls_for_shape
from pvmmu.supervisor import RunConfig, run_pair

PT = POOL_BASE


def queued(pair) -> list:
    pv = pair.pv
    return decode(bytes(pair.mem[pv.queue_gpa : pv.queue_gpa + pv.mmu_queue_len]))


def test_a_rewrite_in_the_same_batch_changes_the_queued_op_in_place(pair_factory):
    pair = pair_factory("multicall", coalesce=True)
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0x1067)
    pv.kvm_mmu_write(PT + 8, 0x2067)
    pv.kvm_mmu_write(PT, 0)  # pte_clear, then set again: only the last value reaches the host
    pv.kvm_mmu_write(PT, 0x3067)
    assert queued(pair) == [WritePte(PT, 0x3067), WritePte(PT + 8, 0x2067)]  # at the first write's place
    assert pv.ops["write_pte"] == 4 and pv.coalesced == 2
    assert list(pv.shape) == [1, 24, 24]  # enter, then what was queued
    pv.kvm_leave_lazy_mmu()
    assert [length for (*_, length, _) in pair.calls] == [48]
    assert pair.kvm.counters[0].write_pte == 2
    assert pv.intent == {PT: 0x3067, PT + 8: 0x2067}
    assert pair.kvm.check().ok and pair.kernel.check()["ok"]


@pytest.mark.parametrize("barrier", ["flush_tlb", "release_pt", "full queue", "leave lazy mode"])
def test_nothing_is_coalesced_across_a_batch_boundary(pair_factory, barrier):
    pair = pair_factory("multicall", queue_bytes=72, coalesce=True)  # three write_pte fill the queue
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0x1067)
    if barrier == "flush_tlb":
        pv.kvm_flush_tlb()
    elif barrier == "release_pt":
        pv.kvm_release_pt(PT + 0x10000)
    elif barrier == "full queue":
        pv.kvm_mmu_write(PT + 8, 0x1067)
        pv.kvm_mmu_write(PT + 16, 0x1067)
        pv.kvm_mmu_write(PT + 24, 0x1067)  # does not fit: the three go to the host first
    else:
        pv.kvm_leave_lazy_mmu()
        pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0x2067)
    assert pv.coalesced == 0
    assert queued(pair)[-1] == WritePte(PT, 0x2067)
    pv.kvm_leave_lazy_mmu()
    assert pair.kvm.counters[0].write_pte == pv.ops["write_pte"]


def test_a_flush_between_two_writes_keeps_both_in_order(pair_factory):
    pair = pair_factory("multicall", coalesce=True)
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0x1067)
    pv.kvm_flush_tlb()
    pv.kvm_mmu_write(PT, 0x2067)
    assert queued(pair) == [WritePte(PT, 0x1067), FlushTlb(), WritePte(PT, 0x2067)]


def test_outside_lazy_mode_and_in_direct_mode_nothing_is_queued_so_nothing_is_coalesced(pair_factory):
    for mode, lazy in (("multicall", False), ("direct", True)):
        pair = pair_factory(mode, coalesce=True)
        pv = pair.pv
        if lazy:
            pv.kvm_enter_lazy_mmu()  # direct: the kernel before the patch had no lazy hooks
        pv.kvm_mmu_write(PT, 0x1067)
        pv.kvm_mmu_write(PT, 0x2067)
        assert pv.coalesced == 0 and len(pair.calls) == 2


def test_ring_mode_coalesces_only_what_is_not_yet_published(pair_factory):
    pair = pair_factory("ring", coalesce=True)
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0x1067)
    pv.kvm_mmu_write(PT, 0x2067)  # still ours: rewritten in the ring
    assert pv.coalesced == 1 and pv.ring.unpublished() == 24
    pv.kvm_release_pt(PT + 0x10000)  # publishes everything before it, and waits for the host
    assert pair.kvm.counters[0].write_pte == 1 and bytes(pair.mem[PT : PT + 8]) == (0x2067).to_bytes(8, "little")
    pv.kvm_mmu_write(PT, 0x3067)  # the host has the first op: this is a new one
    assert pv.coalesced == 1 and pv.ring.unpublished() == 24
    pv.kvm_flush_tlb()  # a present entry changed
    pv.kvm_leave_lazy_mmu()
    assert pair.kvm.counters[0].write_pte == 2 and pair.kvm.check().ok and pair.kernel.check()["ok"]


WORKLOAD_SIZES = [("writes", 300), ("fork", 200), ("exit", 200), ("mprotect", 200), ("mprotect-clear", 200),
                  ("munmap", 200), ("faults", 200), ("mixed", 80)]  # fmt: skip


def test_every_workload_is_listed():
    assert {w for w, _ in WORKLOAD_SIZES} == set(WORKLOADS)


@pytest.mark.parametrize("workload, size", WORKLOAD_SIZES)
def test_every_mode_with_coalescing_ends_where_the_patch_does_and_counts_add_up(pair_factory, workload, size):
    plain = pair_factory("multicall")
    prepare(plain.kernel, workload, size, 5).run()
    digest = plain.kernel.check()["digest"]
    coalesced = set()
    for mode in MODES:
        pair = pair_factory(mode, coalesce=True)
        work = prepare(pair.kernel, workload, size, 5)
        pair.kvm.reset_counters()
        work.run()
        pv, host = pair.pv, pair.kvm.totals()
        assert pair.kvm.check().ok and pair.kernel.check()["ok"]
        assert pair.kernel.check()["digest"] == pair.kvm.check().digests["0"] == digest
        assert pv.ops == plain.pv.ops  # the kernel's op stream is the same
        assert host.write_pte + host.flush_tlb + host.release_pt == pv.ops_total - pv.coalesced
        assert pv.hypercalls == hypercalls_for_shape(pv.shape, mode, 1024, 512)
        if mode != "direct":
            coalesced.add(pv.coalesced)
    assert len(coalesced) == 1  # every queueing mode folds the same writes


def test_mprotect_clear_is_mprotect_with_every_pte_cleared_first_and_coalescing_folds_the_clears(pair_factory):
    def run(workload: str, coalesce: bool):
        pair = pair_factory("multicall", coalesce=coalesce)
        prepare(pair.kernel, workload, 400, 2).run()
        return pair.pv, pair.kernel.check()["digest"]

    plain, plain_digest = run("mprotect", False)
    cleared, cleared_digest = run("mprotect-clear", False)
    folded, folded_digest = run("mprotect-clear", True)
    assert plain_digest == cleared_digest == folded_digest
    rewritten = plain.ops["write_pte"]  # every present PTE of every writable mapping, twice (ro, then rw)
    assert cleared.ops["write_pte"] == 2 * rewritten and cleared.coalesced == 0
    assert cleared.hypercalls > plain.hypercalls
    assert folded.ops == cleared.ops and folded.coalesced == rewritten
    assert folded.hypercalls == plain.hypercalls and list(folded.shape) == list(plain.shape)


def test_a_trace_records_the_kernels_stream_before_coalescing(pair_factory, tmp_path):
    pair = pair_factory("multicall", coalesce=True)
    recorder = TraceRecorder(str(tmp_path / "t"))
    pv = TracedKvmParaState(pair.mem, pair.pv.area, pair.pv.hypercall, "multicall", None, spin_us=0,
                            coalesce=True, recorder=recorder)  # fmt: skip
    kernel = GuestKernel(pv, FrameAllocator(pv.area), pair.layout.mem_bytes // PAGE_SIZE)
    prepare_recorded(kernel, recorder, "mprotect-clear", 150, 4).run()
    check = kernel.check()
    recorder.finish(check["digest"], check["entries"])
    assert pv.coalesced > 0
    run_ops = [e for e in load_trace(str(tmp_path / "t")).sections["run"] if e[0] < 0x100]
    assert len(run_ops) == pv.ops_total  # every paravirt call, the folded ones too
    # replayed without coalescing, the same stream ends in the same page tables
    again = pair_factory("multicall")
    prepare_workload(again.kernel, Replay(again.kernel, load_trace(str(tmp_path / "t")))).run()
    assert again.kernel.check()["digest"] == check["digest"] and again.pv.coalesced == 0


@pytest.mark.parametrize("mode", ["multicall", "ring"])
def test_a_real_pair_counts_the_folded_ops_and_stays_consistent(mode):
    r = run_pair(RunConfig(mode=mode, workload="mprotect-clear", ops=300, coalesce=True, mem_mb=16))
    assert r["consistent"], r["problems"]
    assert r["coalesce"] is True and r["coalesced"] == r["ops"]["write_pte"] // 2 > 0
    assert r["host"]["ops"]["total"] == r["ops"]["total"] - r["coalesced"]
    assert r["hypercalls"] == r["theory"]["hypercalls"]
    assert r["per_vcpu"][0]["coalesced"] == r["coalesced"]


def test_the_cli_reports_the_folded_ops():
    out = subprocess.run(
        [sys.executable, "-m", "pvmmu", "run", "--workload", "mprotect-clear", "--ops", "200", "--coalesce",
         "--mem-mb", "16"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.lstrip().startswith("coalesced"))
    ops = next(x for x in out.stdout.splitlines() if x.lstrip().startswith("ops "))
    writes = int(ops.split("write_pte ")[1].split(",")[0])
    assert f"{writes // 2} of {writes} write_pte (50.0%)" in line and "consistent   yes" in out.stdout


def test_a_real_pair_records_the_stream_before_coalescing_and_replays_it_either_way(tmp_path):
    path = str(tmp_path / "t.trace")
    rec = run_pair(RunConfig(workload="mprotect-clear", ops=150, coalesce=True, mem_mb=16, trace_out=path))
    assert rec["consistent"] and rec["coalesced"] > 0
    assert rec["trace"]["run_events"] - rec["op_mix"]["lazy_sections"] * 2 == rec["ops"]["total"]
    for coalesce in (False, True):
        again = run_pair(RunConfig(replay=path, workload="mprotect-clear", ops=150, coalesce=coalesce, mem_mb=16))
        assert again["consistent"] and again["trace"]["matches"]
        assert again["coalesced"] == (rec["coalesced"] if coalesce else 0)
