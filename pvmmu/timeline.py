"""A run's hypercalls as a Chrome trace-event file, which Perfetto and chrome://tracing open.

One track per process (the host, each guest vCPU). A guest's hypercall is a slice
with two children, "encode" and "blocked on host"; the host's side of it is an
"apply" slice and a "reply" slice; a flow arrow joins the doorbell's send to the
host's receipt. Format: the JSON object form of the Trace Event Format
(``traceEvents``, complete events ``ph: X`` with ``ts``/``dur`` in microseconds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pvmmu.phases import STAMPS_PER_HYPERCALL


def chrome_trace(host_pid: int, guests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``guests``: dicts with ``vcpu``, ``pid``, ``stamps`` (flat, six per hypercall) and ``total``."""
    stamps_all = [g["stamps"] for g in guests if g["stamps"]]
    base = min(s[0] for s in stamps_all) if stamps_all else 0

    def us(t: int) -> float:
        return (t - base) / 1000

    events: list[dict[str, Any]] = [
        {
            "name": "process_name",
            "ph": "M",
            "pid": host_pid,
            "tid": host_pid,
            "args": {"name": f"host (pid {host_pid})"},
        },
        {"name": "process_sort_index", "ph": "M", "pid": host_pid, "tid": host_pid, "args": {"sort_index": 0}},
    ]
    notes = []
    flow = 0
    for g in guests:
        pid = g["pid"]
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
                       "args": {"name": f"guest vCPU {g['vcpu']} (pid {pid})"}})  # fmt: skip
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": pid,
                       "args": {"sort_index": 1 + g["vcpu"]}})  # fmt: skip
        s = g["stamps"]
        shown = len(s) // STAMPS_PER_HYPERCALL
        if shown < g["total"]:
            notes.append(f"vCPU {g['vcpu']}: first {shown} of {g['total']} hypercalls")
        for i in range(shown):
            t0, t_sent, t_recv, t_applied, t_reply, t_resume = s[i * 6 : i * 6 + 6]
            args = {"vcpu": g["vcpu"], "n": i + 1}
            flow += 1
            events += [
                {"name": "hypercall", "cat": "guest", "ph": "X", "pid": pid, "tid": pid, "ts": us(t0),
                 "dur": (t_resume - t0) / 1000, "args": args},
                {"name": "encode", "cat": "guest", "ph": "X", "pid": pid, "tid": pid, "ts": us(t0),
                 "dur": (t_sent - t0) / 1000},
                {"name": "blocked on host", "cat": "guest", "ph": "X", "pid": pid, "tid": pid, "ts": us(t_sent),
                 "dur": (t_resume - t_sent) / 1000},
                {"name": "apply", "cat": "host", "ph": "X", "pid": host_pid, "tid": host_pid, "ts": us(t_recv),
                 "dur": (t_applied - t_recv) / 1000, "args": args},
                {"name": "reply", "cat": "host", "ph": "X", "pid": host_pid, "tid": host_pid, "ts": us(t_applied),
                 "dur": (t_reply - t_applied) / 1000},
                {"name": "doorbell", "cat": "doorbell", "ph": "s", "id": flow, "pid": pid, "tid": pid, "ts": us(t_sent)},
                {"name": "doorbell", "cat": "doorbell", "ph": "f", "bp": "e", "id": flow, "pid": host_pid,
                 "tid": host_pid, "ts": us(t_recv)},
            ]  # fmt: skip
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {"source": "pvmmu", "clock": "CLOCK_MONOTONIC", "note": "; ".join(notes) or "every hypercall"},
    }


def write(path: str, trace: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(trace, f)
