"""Where a hypercall's time goes: phases, placement, the timeline file, CPU seconds, the pipe doorbell."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from protocol import messages as m
from pvmmu import phases
from pvmmu.supervisor import RunConfig, run_pair

N = 200


def run(**kw) -> dict:
    kw.setdefault("mem_mb", 32)
    return run_pair(RunConfig(**kw))


def test_stamped_return_round_trips_and_plain_return_is_unchanged():
    assert m.unpack(m.pack_return_stamped(5, 24, 10, 20, 30)) == m.Return(5, 24, (10, 20, 30))
    assert m.unpack(m.pack_return(5, 24)) == m.Return(5, 24, None)
    assert len(m.pack_return(5, 24)) == 4  # the default path carries no stamps
    with pytest.raises(m.MessageError):
        m.unpack(m.msgpack.packb([m.MSG_RETURN, 5, 24, 10]))


def test_phases_split_and_sum_to_the_round_trip():
    stamps = [100, 110, 150, 170, 172, 220, 1000, 1003, 1100, 1110, 1111, 1200]  # two hypercalls
    d = phases.split(stamps)
    assert d == {"encode": [10, 3], "to_host": [40, 97], "apply": [20, 10], "to_guest": [50, 90],
                 "round_trip": [120, 200]}  # fmt: skip
    s = phases.summarize([phases.digest(stamps)], stamp_ns=50.0)
    assert sum(s[p]["mean_us"] for p in phases.PHASES) == pytest.approx(s["round_trip"]["mean_us"])
    assert sum(s[p]["share"] for p in phases.PHASES) == pytest.approx(1.0)
    assert s["stamp_cost_ns"] == 50.0 and s["stamps_per_hypercall"] == 6


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    path = tmp_path_factory.mktemp("tl") / "trace.json"
    return run(mode="direct", workload="writes", ops=N, timeline=str(path), timeline_max=50), path


def test_direct_run_with_phases_breaks_every_hypercall_down(timed):
    r, _ = timed
    assert r["consistent"], r["problems"]
    ph = r["phases"]
    assert set(ph) >= {*phases.PHASES, "round_trip", "sum_of_medians_us", "stamp_cost_ns"}
    # Means add up exactly (every hypercall's phases sum to its round trip); medians roughly.
    assert sum(ph[p]["mean_us"] for p in phases.PHASES) == pytest.approx(ph["round_trip"]["mean_us"], rel=1e-9)
    assert all(ph[p]["p50_us"] > 0 for p in phases.PHASES)
    assert ph["stamp_cost_ns"] > 0


def test_timeline_is_valid_trace_event_json(timed):
    r, path = timed
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    assert r["timeline"] == {"path": str(path), "events": len(events)}
    assert "first 50 of 200 hypercalls" in trace["otherData"]["note"]
    for e in events:
        assert {"name", "ph", "pid", "tid"} <= set(e) and e["ph"] in ("X", "M", "s", "f")
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
    calls = [e for e in events if e["name"] == "hypercall"]
    assert len(calls) == 50 and len([e for e in events if e["name"] == "apply"]) == 50
    assert {e["pid"] for e in calls} == {r["per_vcpu"][0]["pid"]}
    assert {e["pid"] for e in events if e["name"] == "apply"} == {r["host"]["pid"]}
    # children sit inside their hypercall slice on the guest's track
    enc = [e for e in events if e["name"] == "encode"]
    for c, e in zip(calls, enc, strict=True):
        assert c["ts"] <= e["ts"] and e["ts"] + e["dur"] <= c["ts"] + c["dur"] + 1e-3
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert any(n.startswith("host") for n in names) and any(n.startswith("guest vCPU 0") for n in names)


def test_cpu_seconds_are_in_every_record(timed):
    cpu = timed[0]["cpu_s"]
    for side in ("guest", "host"):
        assert cpu[side]["user"] >= 0 and cpu[side]["system"] >= 0
        assert cpu[side]["total"] == pytest.approx(cpu[side]["user"] + cpu[side]["system"])
    assert set(cpu["per_op_us"]) == {"guest", "host"}


@pytest.mark.parametrize("placement", ["same", "split"])
def test_placement_pins_every_thread_and_every_mode_stays_consistent(placement):
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "split" and len(cpus) < 2:
        pytest.skip("split needs two CPUs")
    digests = set()
    for mode in ("direct", "queued", "multicall"):
        r = run(mode=mode, workload="fork", ops=100, placement=placement)
        assert r["consistent"], r["problems"]
        digests.add(r["digest"])
        p = r["placement"]
        assert p["observed"]["host"] == [cpus[0]]  # every host thread, ZeroMQ's included
        want_guest = [cpus[0]] if placement == "same" else [cpus[1]]
        assert p["observed"]["guests"] == [want_guest]
    assert len(digests) == 1


def test_split_placement_on_one_cpu_is_a_clear_error():
    code = "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from pvmmu.cli import main; main(['run', '--placement', 'split', '--ops', '10'])"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert "--placement split needs two CPUs" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("mode", ["direct", "queued", "multicall"])
def test_pipe_doorbell_runs_every_mode_to_the_same_state_without_helper_threads(mode):
    zmq_run = run(mode=mode, workload="exit", ops=150, doorbell="zmq")
    pipe_run = run(mode=mode, workload="exit", ops=150, doorbell="pipe", vcpus=1)
    assert pipe_run["consistent"], pipe_run["problems"]
    assert pipe_run["digest"] == zmq_run["digest"] and pipe_run["hypercalls"] == zmq_run["hypercalls"]
    for side in ("guest", "host"):
        assert set(pipe_run["ctx_switches"][side]["threads"]) == {"main"}  # no ZeroMQ threads at all
        assert set(zmq_run["ctx_switches"][side]["threads"]) >= {"main", "ZMQbg/IO/0"}


def test_pipe_doorbell_with_several_vcpus_and_phases():
    r = run(mode="multicall", workload="writes", ops=N, doorbell="pipe", vcpus=3, phases=True)
    assert r["consistent"], r["problems"]
    assert len(r["per_vcpu"]) == 3 and r["phases"]["round_trip"]["p50_us"] > 0
