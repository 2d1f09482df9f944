"""pvmmu stress: randomized runs with faults injected, every failure explained, nothing leaked."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil

PVMMU = [sys.executable, "-m", "pvmmu"]


def test_stress_with_a_fault_in_every_run_explains_every_failure_and_leaks_nothing():
    out = subprocess.run(
        [*PVMMU, "stress", "--runs", "8", "--kill-rate", "1", "--seed", "5", "--max-ops", "3000", "--json",
         "--no-progress"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    s = json.loads(out.stdout)
    assert out.returncode == 0, s["unexplained"]
    assert s["ok"] and s["runs"] == 8 and s["leaks"] == [] and s["unexplained"] == []
    assert sum(s["outcomes"].values()) == 8 and s["faults_planned"] == 8
    # Seed 5 puts some faults mid-run: those runs failed and named the process that was signalled.
    failed = {k: v for k, v in s["outcomes"].items() if k not in ("ok", "absorbed")}
    assert sum(failed.values()) >= 1 and s["detection_s"]["n"] == sum(failed.values())
    assert all(k.split()[0] in ("host", "guest") and k.split()[1].startswith("SIG") for k in failed)


def test_stress_interrupted_by_sigint_tears_down_prints_its_summary_and_exits_130():
    proc = subprocess.Popen([*PVMMU, "stress", "--duration", "600", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any("guest_proc" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "terminated by SIGINT" in out and "leaks      0" in out and "Traceback" not in err
