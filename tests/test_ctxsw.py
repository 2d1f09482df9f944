"""pvmmu.ctxsw: switches of every thread, not just the main one psutil reports per process."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from pvmmu import ctxsw

# A REQ/REP ping-pong: most of the switching is done by ZeroMQ's I/O threads.
PINGPONG = """
import sys, zmq
ctx = zmq.Context()
rep = ctx.socket(zmq.REP); port = rep.bind_to_random_port("tcp://127.0.0.1")
req = ctx.socket(zmq.REQ); req.connect(f"tcp://127.0.0.1:{port}")
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[1])):
    req.send(b"x"); rep.send(rep.recv()); req.recv()
print("done", flush=True)
sys.stdin.readline()
"""


def _blocked_on_stdin(pid: int) -> None:
    """Wait (bounded) until the child's main thread sleeps in readline: between "ready" and that
    block it still switches, and the two samples below would differ by that one switch."""
    for _ in range(2000):
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().startswith("0 0x0 "):  # blocked in read(0, ...)
                return
        time.sleep(0.005)


def test_every_thread_is_counted_and_named():
    proc = subprocess.Popen(
        [sys.executable, "-c", PINGPONG, "500"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        _blocked_on_stdin(proc.pid)
        before = ctxsw.sample(proc.pid)
        main_before = psutil.Process(proc.pid).num_ctx_switches()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        _blocked_on_stdin(proc.pid)
        after = ctxsw.sample(proc.pid)
        main_after = psutil.Process(proc.pid).num_ctx_switches()
    finally:
        proc.stdin.write("bye\n")
        proc.stdin.flush()
        proc.wait(10)
    d = ctxsw.delta(before, after)
    assert {"main", "ZMQbg/IO/0", "ZMQbg/Reaper"} <= set(d["threads"])
    assert d["total"] == d["voluntary"] + d["involuntary"]
    assert d["voluntary"] == sum(t["voluntary"] for t in d["threads"].values())
    # psutil's per-process figure is the main thread's alone: it matches ours for "main" ...
    main = d["threads"]["main"]
    assert main_after.voluntary - main_before.voluntary == main["voluntary"]
    # ... and misses the I/O thread, which does the socket work (and switches; how often per
    # message depends on load: a busy I/O thread handles several messages per wake-up).
    assert d["threads"]["ZMQbg/IO/0"]["voluntary"] > 0
    assert d["total"] > (main_after.voluntary + main_after.involuntary) - (
        main_before.voluntary + main_before.involuntary
    )


def test_a_thread_that_appears_counts_from_zero_and_combine_sums():
    a = {1: ctxsw.ThreadSample("main", 10, 1)}
    b = {1: ctxsw.ThreadSample("main", 15, 2), 2: ctxsw.ThreadSample("ZMQbg/IO/0", 7, 0)}
    d = ctxsw.delta(a, b)
    assert d["threads"] == {
        "ZMQbg/IO/0": {"voluntary": 7, "involuntary": 0},
        "main": {"voluntary": 5, "involuntary": 1},
    }
    assert (d["total"], d["threads_lost"]) == (13, 0)
    lost = ctxsw.delta(b, a)
    assert lost["threads_lost"] == 1
    both = ctxsw.combine([d, d])
    assert both["total"] == 26 and both["threads"]["main"] == {"voluntary": 10, "involuntary": 2}


def test_a_gone_process_samples_empty():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert ctxsw.sample(p.pid) == {}
