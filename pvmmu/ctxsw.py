"""Where a context switch is counted: every thread of a process, from outside it.

``psutil.Process(pid).num_ctx_switches()`` on Linux reads the *main thread's*
``/proc/PID/status`` only, so it misses ZeroMQ's I/O thread (``ZMQbg/IO/0``),
which does about three quarters of the switching. Here each thread is sampled
on its own (``Process(pid).threads()``, then ``Process(tid)``) and reported by
name: ``main``, ``ZMQbg/IO/0``, ``ZMQbg/Reaper``, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class ThreadSample:
    name: str
    voluntary: int
    involuntary: int


Sample = dict[int, ThreadSample]  # tid -> counts at one instant


def sample(pid: int) -> Sample:
    """Voluntary and involuntary switches of every thread of ``pid`` right now."""
    out: Sample = {}
    try:
        tids = [t.id for t in psutil.Process(pid).threads()]
    except psutil.NoSuchProcess:
        return out
    for tid in tids:
        try:
            thread = psutil.Process(tid)
            counts = thread.num_ctx_switches()
            name = "main" if tid == pid else thread.name()
        except psutil.NoSuchProcess:
            continue  # the thread ended between listing and reading
        out[tid] = ThreadSample(name, counts.voluntary, counts.involuntary)
    return out


def delta(before: Sample, after: Sample) -> dict[str, Any]:
    """Switches between two samples of one process, per thread name and in total.

    A thread that started in between counts from zero; one that ended in
    between is lost (its counts go with it), which the ``threads_lost`` field says.
    """
    threads: dict[str, dict[str, int]] = {}
    for tid, a in after.items():
        b = before.get(tid)
        vol = a.voluntary - (b.voluntary if b else 0)
        inv = a.involuntary - (b.involuntary if b else 0)
        t = threads.setdefault(a.name, {"voluntary": 0, "involuntary": 0})
        t["voluntary"] += vol
        t["involuntary"] += inv
    vol = sum(t["voluntary"] for t in threads.values())
    inv = sum(t["involuntary"] for t in threads.values())
    return {
        "voluntary": vol,
        "involuntary": inv,
        "total": vol + inv,
        "threads": dict(sorted(threads.items())),
        "threads_lost": len(set(before) - set(after)),
    }


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum several processes' deltas (e.g. all guest vCPUs) into one of the same shape."""
    threads: dict[str, dict[str, int]] = {}
    for p in parts:
        for name, t in p["threads"].items():
            s = threads.setdefault(name, {"voluntary": 0, "involuntary": 0})
            s["voluntary"] += t["voluntary"]
            s["involuntary"] += t["involuntary"]
    vol = sum(p["voluntary"] for p in parts)
    inv = sum(p["involuntary"] for p in parts)
    return {
        "voluntary": vol,
        "involuntary": inv,
        "total": vol + inv,
        "threads": dict(sorted(threads.items())),
        "threads_lost": sum(p["threads_lost"] for p in parts),
    }
