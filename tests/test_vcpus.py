"""Several vCPUs on one host: own queues and pools, exact per-vCPU counts, isolation, a vCPU dying."""

from __future__ import annotations

import math
import os
import random
import signal
import time

import pytest
from conftest import BackgroundRun

from guest_proc.paravirt import MODES
from guest_proc.workloads import prepare
from protocol import theory
from pvmmu import latency
from pvmmu.supervisor import RunConfig, fairness, run_pair


def interleaved(pair, workload: str, size: int, seed: int = 5) -> None:
    """Run every vCPU's workload in-process, setups first, then the measured parts one after another."""
    works = [prepare(k, workload, size, seed + v) for v, k in enumerate(pair.kernels)]
    pair.kvm.reset_counters()
    pair.calls.clear()
    for w in works:
        w.run()


@pytest.mark.parametrize("vcpus", [1, 2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_each_vcpu_gets_exactly_its_own_hypercalls(pair_factory, vcpus, mode):
    pair = pair_factory(mode, vcpus=vcpus, mem_mb=32)
    interleaved(pair, "writes", 100)
    # ring: a flush is one publish of up to 42 ops, and no hypercall reaches the host
    want = {"direct": 100, "queued": 100, "multicall": math.ceil(100 / 21), "ring": math.ceil(100 / 42)}[mode]
    calls = 0 if mode == "ring" else want
    for v, k in enumerate(pair.kernels):
        assert k.pv.hypercalls == want
        assert pair.kvm.counters[v].hypercalls == calls and pair.kvm.counters[v].write_pte == 100
        assert sum(1 for (vc, *_) in pair.calls if vc == v) == calls
    assert len(pair.calls) == vcpus * calls


@pytest.mark.parametrize("workload", ["fork", "exit", "writes"])
def test_vcpus_never_touch_each_others_tables(pair_factory, workload):
    pair = pair_factory("multicall", vcpus=4, mem_mb=32)
    interleaved(pair, workload, 200)
    host = pair.kvm.check()
    assert host.ok, host.examples
    for v, k in enumerate(pair.kernels):
        area = pair.layout.vcpu_area(v, 1024)
        pages = k.table_pages() | {gpa & ~0xFFF for gpa in k.pv.intent}
        assert all(area.pool_gpa <= p < area.pool_gpa + area.pool_bytes for p in pages)
        guest = k.check()
        assert guest["ok"] and host.digests[str(v)] == guest["digest"]
        # the shape of each vCPU's own stream prices to its own hypercall count
        assert k.pv.hypercalls == theory.hypercalls_for_shape(k.pv.shape, "multicall", 1024, 512)
    assert "other" not in host.digests  # no page-table page outside every pool


@pytest.mark.parametrize("vcpus", [2, 4])
def test_real_pairs_with_several_vcpus_report_per_vcpu_rows(vcpus):
    r = run_pair(RunConfig(mode="multicall", workload="writes", ops=200, vcpus=vcpus, mem_mb=32))
    assert r["consistent"], r["problems"]
    assert [p["vcpu"] for p in r["per_vcpu"]] == list(range(vcpus))
    assert all(p["hypercalls"] == math.ceil(200 / 21) for p in r["per_vcpu"])
    assert r["hypercalls"] == vcpus * math.ceil(200 / 21) and r["ops"]["total"] == vcpus * 200
    assert len({p["pid"] for p in r["per_vcpu"]}) == vcpus
    assert len({p["digest"] for p in r["per_vcpu"]}) == vcpus  # own pools, own tables
    assert sum(p["ctx_switches"]["total"] for p in r["per_vcpu"]) == r["ctx_switches"]["guest"]["total"]
    f = r["fairness"]
    assert 0 < f["jain_index"] <= 1 and f["ops_per_s"]["max_over_min"] >= 1
    assert f["starved"] == []


def test_direct_mode_with_several_vcpus_is_one_hypercall_per_op_each():
    r = run_pair(RunConfig(mode="direct", workload="fork", ops=100, vcpus=2, mem_mb=32))
    assert r["consistent"], r["problems"]
    for p in r["per_vcpu"]:
        assert p["hypercalls"] == p["ops"]["total"] == p["theory_hypercalls"]


def test_a_vcpu_that_dies_fails_the_run_clearly():
    run = BackgroundRun(RunConfig(mode="direct", workload="writes", ops=10**6, vcpus=2, mem_mb=64))
    victim = run.child("guest_proc", "--vcpu 1")
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)
    run.join()
    assert f"guest1 process {victim.pid} died (signal 9, SIGKILL)" in str(run.error)


def test_merged_histogram_percentiles_are_within_one_percent():
    rng = random.Random(3)
    parts = [[int(rng.lognormvariate(11.5, 0.6)) for _ in range(3000)] for _ in range(4)]
    merged = latency.merge(latency.histogram(p) for p in parts)
    every = sorted(x for p in parts for x in p)
    for q in (50, 90, 99):
        exact = latency.percentile(every, q) / 1000
        assert latency.histogram_percentile_us(merged, q) == pytest.approx(exact, rel=0.01)
    assert sum(merged.values()) == 12000
    # JSON turns bins into strings; merge takes them back
    assert latency.merge([{str(k): v for k, v in merged.items()}]) == merged


def test_fairness_figures():
    rows = [
        {"vcpu": v, "ops_per_s": r, "hypercall_latency_us": {"p50": 100.0 * (v + 1), "p99": 200.0 * (v + 1)}}
        for v, r in enumerate([1000.0, 1000.0, 50.0])
    ]
    f = fairness(rows)
    assert f["ops_per_s"]["max_over_min"] == 20.0
    assert f["jain_index"] == pytest.approx(2050**2 / (3 * (2 * 1000**2 + 50**2)))
    assert f["starved"] == [2]
    assert f["latency_p99_us"] == {"min": 200.0, "max": 600.0}
