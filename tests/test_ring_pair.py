"""Ring mode with real processes: same final state as the patch, doorbells only when the host sleeps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pvmmu.supervisor import RunConfig, RunError, run_pair


def run(**kw) -> dict:
    kw.setdefault("mem_mb", 32)
    kw.setdefault("timeout", 10.0)
    return run_pair(RunConfig(**kw))


@pytest.mark.parametrize("workload, size", [("writes", 3000), ("fork", 300), ("exit", 300), ("mixed", 60)])
def test_ring_leaves_the_same_page_tables_as_the_patch(workload, size):
    ring = run(mode="ring", workload=workload, ops=size)
    patch = run(mode="multicall", workload=workload, ops=size)
    assert ring["consistent"], ring["problems"]
    assert ring["digest"] == patch["digest"] and ring["ops"] == patch["ops"]
    assert ring["hypercalls"] == ring["theory"]["hypercalls"]  # flushes: one publish each
    assert ring["host"]["hypercalls"] == 0  # the host never saw a hypercall in the measured part
    host_ring = ring["host"]["ring"]
    # every doorbell the guest rang is a kick the host received, and nothing else was rung
    assert ring["doorbells"] == host_ring["kicks"] <= ring["hypercalls"]
    assert host_ring["passes"] > 0


@pytest.mark.parametrize("doorbell", ["zmq", "pipe"])
def test_no_lost_wakeups_when_both_sides_sleep_at_every_gap(doorbell):
    # poll 0 and spin 0: the host sets NEED_WAKEUP whenever a ring is empty and the guests sleep
    # on every wait, so both races are hit constantly. A lost wake-up would hang a run until its
    # timeout; three vCPUs and a mixed workload give many short sections.
    r = run(mode="ring", workload="mixed", ops=60, vcpus=3, poll_us=0, spin_us=0, doorbell=doorbell, timeout=5.0)
    assert r["consistent"], r["problems"]
    assert r["host"]["ring"]["sleeps"] > 0 and r["host"]["ring"]["completions"] > 0
    assert sum(p["ring"]["sleeps"] for p in r["per_vcpu"]) > 0


def test_ring_refuses_phases_clearly():
    with pytest.raises(RunError, match="ring mode makes none"):
        run(mode="ring", phases=True, ops=10)


def test_ring_from_the_cli():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pvmmu",
            "run",
            "--mode",
            "ring",
            "--ops",
            "500",
            "--mem-mb",
            "16",
            "--queue-bytes",
            "4096",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "mode ring" in out.stdout and "consistent   yes" in out.stdout
