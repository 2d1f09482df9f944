"""Real process pairs: a host process and guest processes, shared memory, ZeroMQ doorbells."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import BackgroundRun

from pvmmu.supervisor import RunConfig, RunError, run_pair

N = 300


def run(**kw) -> dict:
    kw.setdefault("mem_mb", 32)
    kw.setdefault("timeout", 10.0)
    return run_pair(RunConfig(**kw))


@pytest.fixture(scope="module")
def writes_by_mode():
    return {mode: run(mode=mode, workload="writes", ops=N) for mode in ("direct", "queued", "multicall")}


def test_direct_is_one_hypercall_per_op(writes_by_mode):
    r = writes_by_mode["direct"]
    assert r["consistent"], r["problems"]
    assert r["ops"] == {"write_pte": N, "flush_tlb": 0, "release_pt": 0, "total": N}
    assert r["hypercalls"] == r["doorbells"] == N
    assert r["host"]["hypercalls"] == N and r["host"]["ops"]["total"] == N


def test_queued_is_one_hypercall_per_op_too(writes_by_mode):
    r = writes_by_mode["queued"]
    assert r["consistent"] and r["hypercalls"] == N


def test_multicall_is_ceil_n_over_21_at_the_512_byte_host_limit(writes_by_mode):
    r = writes_by_mode["multicall"]
    assert r["consistent"], r["problems"]
    assert r["hypercalls"] == math.ceil(N / 21) == r["theory"]["hypercalls"]
    assert r["host"]["partial"] == N // 42  # every full queue needed a second call


def test_multicall_is_ceil_n_over_42_at_a_1024_byte_host_limit():
    r = run(mode="multicall", workload="writes", ops=N, host_limit=1024)
    assert r["consistent"] and r["hypercalls"] == math.ceil(N / 42)


def test_every_mode_leaves_the_same_page_tables(writes_by_mode):
    assert len({r["digest"] for r in writes_by_mode.values()}) == 1
    assert len({r["host"]["shadow"]["entries"] for r in writes_by_mode.values()}) == 1


def test_switches_are_counted_on_every_thread_of_both_processes(writes_by_mode):
    r = writes_by_mode["direct"]
    cs = r["ctx_switches"]
    for side in ("guest", "host"):
        threads = cs[side]["threads"]
        assert {"main", "ZMQbg/IO/0"} <= set(threads)
        assert cs[side]["total"] == sum(t["voluntary"] + t["involuntary"] for t in threads.values())
        # Both main threads and both I/O threads did block (how often per hypercall depends on load).
        assert threads["main"]["voluntary"] > 0 and threads["ZMQbg/IO/0"]["voluntary"] > 0
    assert cs["total"] == cs["guest"]["total"] + cs["host"]["total"]
    assert cs["per_op"] == pytest.approx(cs["total"] / N)


@pytest.mark.parametrize("workload", ["fork", "exit"])
def test_fork_and_exit_are_consistent_and_identical_in_every_mode(workload):
    records = [run(mode=m, workload=workload, ops=200) for m in ("direct", "queued", "multicall")]
    assert all(r["consistent"] for r in records), [r["problems"] for r in records]
    assert len({r["digest"] for r in records}) == 1
    assert len({json.dumps(r["ops"]) for r in records}) == 1
    direct, queued, multi = records
    assert direct["hypercalls"] == queued["hypercalls"] == direct["ops"]["total"]
    assert multi["hypercalls"] < direct["hypercalls"]


def test_a_host_that_refuses_every_op_fails_the_run_naming_the_op():
    # A 16-byte host limit never holds a 24-byte write_pte: zero progress, which the 2008 guest spun on.
    with pytest.raises(RunError) as err:
        run(mode="multicall", workload="writes", ops=10, host_limit=16)
    assert "write_pte(pte_phys=" in str(err.value) and "0 bytes" in str(err.value)
    assert err.value.exit_code == 3


def test_a_host_killed_mid_run_is_reported_with_the_signal_and_the_hypercall():
    run = BackgroundRun(RunConfig(mode="direct", workload="writes", ops=10**6, mem_mb=64, timeout=10))
    host = run.child("host_proc")
    time.sleep(1.0)  # let the measured part start
    os.kill(host.pid, signal.SIGKILL)
    run.join()
    assert f"host process {host.pid} died (signal 9, SIGKILL) during hypercall" in str(run.error)


def test_a_silent_host_times_out_instead_of_hanging():
    run = BackgroundRun(RunConfig(mode="direct", workload="writes", ops=10**6, mem_mb=64, timeout=1.0))
    host = run.child("host_proc")
    time.sleep(1.0)
    os.kill(host.pid, signal.SIGSTOP)  # alive, but says nothing
    run.join()
    assert "did not answer hypercall" in str(run.error) and "within 1s" in str(run.error)


def test_cli_run_json_prints_exactly_one_json_object():
    out = subprocess.run(
        [sys.executable, "-m", "pvmmu", "run", "--mode", "multicall", "--ops", "100", "--mem-mb", "16", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    for key in ("mode", "workload", "vcpus", "queue_bytes", "host_limit", "seed", "ops", "hypercalls", "doorbells",
                "wall_s", "ops_per_s", "hypercall_latency_us", "ctx_switches", "consistent"):  # fmt: skip
        assert key in record
    assert set(record["ops"]) == {"write_pte", "flush_tlb", "release_pt", "total"}
    assert set(record["hypercall_latency_us"]) >= {"p50", "p99"}
    assert set(record["ctx_switches"]) >= {"guest", "host", "total", "per_op"}
    assert set(record["ctx_switches"]["host"]) >= {"voluntary", "involuntary", "total", "threads"}
    assert record["consistent"] is True and record["hypercalls"] == 5


@pytest.mark.parametrize(
    "args, text",
    [
        (["--ops", "0"], "Invalid value for '--ops'"),
        (["--mode", "turbo"], "Invalid value for '--mode'"),
        (["--queue-bytes", "8"], "Invalid value for '--queue-bytes'"),
        (["--vcpus", "99"], "Invalid value for '--vcpus'"),
    ],
)
def test_cli_bad_input_is_a_clear_usage_error(args, text):
    out = subprocess.run([sys.executable, "-m", "pvmmu", "run", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert text in out.stderr and "Traceback" not in out.stderr


def test_cli_run_that_fails_exits_3_without_a_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "pvmmu", "run", "--workload", "writes", "--ops", "1000000", "--mem-mb", "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr
    assert "frame pool exhausted" in out.stderr and "Traceback" not in out.stderr
