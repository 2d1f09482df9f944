"""Real pairs on the new workloads, captured address spaces and traces, and the CLI's handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from guest_proc.procmaps import parse_maps, summary
from pvmmu.maps import capture_pid, shipped
from pvmmu.report import format_run
from pvmmu.supervisor import RunConfig, run_pair


def run(**kw) -> dict:
    kw.setdefault("mem_mb", 64)
    return run_pair(RunConfig(**kw))


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pvmmu", *args], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def test_faults_cannot_be_batched_and_the_report_says_so():
    direct, multi = (run(mode=m, workload="faults", ops=1000) for m in ("direct", "multicall"))
    for r in (direct, multi):
        assert r["consistent"], r["problems"]
        assert r["hypercalls"] == r["ops"]["total"] > 1000
        assert r["op_mix"]["in_lazy"] == 0 and r["op_mix"]["best_reduction"] == 1.0
        assert "nothing to batch" in format_run(r)
    assert direct["digest"] == multi["digest"]
    ratio = multi["ctx_switches"]["per_op"] / direct["ctx_switches"]["per_op"]
    assert 0.9 <= ratio <= 1.1, ratio


@pytest.mark.parametrize("workload", ["fork", "exit", "mprotect"])
def test_a_real_captured_process_batches_at_least_ten_fold(workload):
    """The python3 capture: 204 VMAs, 7882 resident pages, from a real interpreter on this machine."""
    direct, multi = (run(mode=m, workload=workload, from_maps="python3") for m in ("direct", "multicall"))
    for r in (direct, multi):
        assert r["consistent"], r["problems"]
        assert r["address_space"]["source"] == "maps python3" and r["address_space"]["resident_pages"] == 7882
    assert direct["digest"] == multi["digest"] and direct["ops"] == multi["ops"]
    assert direct["hypercalls"] / multi["hypercalls"] >= 10
    assert direct["ctx_switches"]["per_op"] / multi["ctx_switches"]["per_op"] >= 10
    assert "batching can cut hypercalls" in format_run(multi)


def test_munmap_is_consistent_and_identical_in_every_mode():
    # mixed goes through every mode in the record/replay test below.
    records = [run(mode=m, workload="munmap", ops=300) for m in ("direct", "queued", "multicall")]
    assert all(r["consistent"] for r in records), [r["problems"] for r in records]
    assert len({r["digest"] for r in records}) == 1
    direct, queued, multi = records
    assert direct["hypercalls"] == queued["hypercalls"] == direct["ops"]["total"]
    assert multi["hypercalls"] == multi["theory"]["hypercalls"] < direct["hypercalls"]
    assert multi["paths"]["do_munmap"]["ops"] == multi["ops"]["total"]


def test_from_pid_builds_the_live_process_address_space():
    # A shell blocked in 'read' after saying so: its address space holds still while we look twice.
    sleeper = subprocess.Popen(["bash", "--norc", "-c", "echo ready; read x"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert sleeper.stdout.readline() == "ready\n"
        expect = summary(parse_maps(capture_pid(sleeper.pid)[0]))
        r = run(mode="multicall", workload="fork", from_pid=sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.communicate()
    assert r["consistent"], r["problems"]
    assert r["address_space"]["source"] == f"pid {sleeper.pid} (bash)"
    assert r["address_space"]["resident_pages"] == expect["resident_pages"]
    assert r["address_space"]["page_tables"] == expect["page_tables"]


def test_record_then_replay_in_every_mode_through_the_cli(tmp_path):
    trace = str(tmp_path / "mixed.trace")
    rec = cli("record", "--workload", "mixed", "--ops", "40", "--mem-mb", "32", "-o", trace, "--json")
    assert rec.returncode == 0, rec.stderr
    recorded = json.loads(rec.stdout)
    assert recorded["trace"]["file"] == trace and recorded["trace"]["events"] > recorded["ops"]["total"]
    replays = {}
    for mode in ("direct", "queued", "multicall"):
        out = cli("replay", trace, "--mode", mode, "--json")
        assert out.returncode == 0, out.stderr
        replays[mode] = json.loads(out.stdout)
    for r in replays.values():
        assert r["consistent"] and r["trace"]["matches"], r["problems"]
        assert r["digest"] == recorded["digest"] == r["trace"]["recorded_digest"]
        assert r["ops"] == recorded["ops"] and r["workload"] == "mixed"
    assert len({json.dumps(r["host"]["shadow"]) for r in replays.values()}) == 1
    assert replays["multicall"]["hypercalls"] == recorded["hypercalls"] < replays["direct"]["hypercalls"]

    damaged = bytearray(open(trace, "rb").read())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "damaged.trace").write_bytes(damaged)
    (tmp_path / "cut.trace").write_bytes(damaged[: len(damaged) // 3])
    for name in ("damaged.trace", "cut.trace"):
        out = cli("replay", str(tmp_path / name), "--mode", "direct")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.count("\n") == 1 and "corrupt trace" in out.stderr and "at byte offset" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--workload", "fork", "--from-maps", "/no/such.smaps"], "no such file, nor a shipped capture"),
        (["run", "--workload", "writes", "--from-maps", "bash"], "writes does not start from a process"),
        (["run", "--workload", "fork", "--from-maps", "bash", "--from-pid", "1"], "exclude each other"),
        (["record", "--workload", "fork", "-o", "/no/such/dir/t.trace"], "no directory /no/such/dir"),
        (["record", "--workload", "fork", "--vcpus", "2", "-o", "t.trace"], "record and replay with --vcpus 1"),
        (["replay", "/no/such.trace"], "/no/such.trace: no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and out.stderr.count("\n") == 1


def test_a_malformed_maps_file_and_a_dead_pid_are_refused(tmp_path):
    bad = tmp_path / "bad.smaps"
    bad.write_text(open(shipped()["bash"]).read().replace("Rss:", "Rss: x", 1))
    out = cli("run", "--workload", "exit", "--from-maps", str(bad))
    assert out.returncode == 2 and f"{bad}: line " in out.stderr and "not a number of kB" in out.stderr
    child = subprocess.Popen(["true"])
    child.wait()
    out = cli("run", "--workload", "exit", "--from-pid", str(child.pid))
    assert out.returncode == 2 and out.stderr == f"pvmmu: --from-pid: pid {child.pid}: no such process\n"


def test_maps_lists_shows_and_saves_captures(tmp_path):
    out = cli("maps")
    assert out.returncode == 0 and [line.split()[0] for line in out.stdout.splitlines()] == ["bash", "node", "python3"]
    saved = tmp_path / "me.smaps"
    out = cli("maps", "--pid", str(subprocess.os.getpid()), "-o", str(saved))
    assert out.returncode == 0 and saved.read_text().startswith(f"# pid {subprocess.os.getpid()} (")
    assert summary(parse_maps(saved.read_text()))["smaps"]
    assert cli("maps", "/no/such").returncode == 2
