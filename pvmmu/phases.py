"""Where a hypercall's time goes: per-phase durations from six CLOCK_MONOTONIC stamps.

With ``--phases`` every hypercall is stamped at: the guest starts the call (t0),
the doorbell is sent (t_sent), the host has the message (t_recv), the host has
applied the ops (t_applied), the host sends the answer (t_reply, carried back in
the reply), the guest resumes (t_resume). CLOCK_MONOTONIC is one clock for all
processes on Linux, so differences across processes are meaningful. The phases:

    encode    t0 -> t_sent        pack the registers, hand the message to the transport
    to_host   t_sent -> t_recv    the doorbell: wake the host, deliver the message
    apply     t_recv -> t_applied decode, validate, kvm_emulate_hypercall
    to_guest  t_applied -> t_resume  pack the answer, wake the guest, deliver it

They add up to the round trip exactly; their medians add up to roughly its median.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from pvmmu.latency import histogram, histogram_percentile_us, merge

PHASES = ("encode", "to_host", "apply", "to_guest")
STAMPS_PER_HYPERCALL = 6


def split(stamps: Sequence[int]) -> dict[str, list[int]]:
    """Per-phase durations (ns) from flat stamps, six per hypercall."""
    out: dict[str, list[int]] = {p: [] for p in (*PHASES, "round_trip")}
    for i in range(0, len(stamps) - STAMPS_PER_HYPERCALL + 1, STAMPS_PER_HYPERCALL):
        t0, t_sent, t_recv, t_applied, _t_reply, t_resume = stamps[i : i + STAMPS_PER_HYPERCALL]
        out["encode"].append(t_sent - t0)
        out["to_host"].append(t_recv - t_sent)
        out["apply"].append(t_applied - t_recv)
        out["to_guest"].append(t_resume - t_applied)
        out["round_trip"].append(t_resume - t0)
    return out


def digest(stamps: Sequence[int]) -> dict[str, Any]:
    """What one vCPU reports: per phase a mergeable histogram, a sum and a count."""
    return {name: {"hist": histogram(v), "sum_ns": sum(v), "n": len(v)} for name, v in split(stamps).items()}


def stamp_cost_ns(samples: int = 200_000) -> float:
    """What one CLOCK_MONOTONIC read costs here, in ns (measured, not assumed)."""
    clock = time.monotonic_ns
    t0 = time.perf_counter_ns()
    for _ in range(samples):
        clock()
    return (time.perf_counter_ns() - t0) / samples


def summarize(digests: Iterable[dict[str, Any]], stamp_ns: float) -> dict[str, Any]:
    """Merge vCPUs' phase digests into medians, p99s, means and shares of the round trip."""
    parts = list(digests)
    out: dict[str, Any] = {}
    for name in (*PHASES, "round_trip"):
        hist = merge(p[name]["hist"] for p in parts)
        n = sum(p[name]["n"] for p in parts)
        total = sum(p[name]["sum_ns"] for p in parts)
        out[name] = {
            "p50_us": histogram_percentile_us(hist, 50),
            "p99_us": histogram_percentile_us(hist, 99),
            "mean_us": total / n / 1000 if n else 0.0,
        }
    rtt_mean = out["round_trip"]["mean_us"]
    for name in PHASES:
        out[name]["share"] = out[name]["mean_us"] / rtt_mean if rtt_mean else 0.0
    sum_medians = sum(out[name]["p50_us"] for name in PHASES)
    out["sum_of_medians_us"] = sum_medians
    out["sum_of_medians_over_median_round_trip"] = (
        sum_medians / out["round_trip"]["p50_us"] if out["round_trip"]["p50_us"] else 0.0
    )
    out["stamp_cost_ns"] = stamp_ns
    out["stamps_per_hypercall"] = STAMPS_PER_HYPERCALL
    return out
