"""``pvmmu sweep``: the patch's gain as the guest queue and the host's copy grow.

One ``direct`` baseline, then ``multicall`` at every queue size × host limit,
each a fresh pair, round-robin like ``compare``. Switches per op should follow
the theory curve: direct's switches per hypercall divided by the ops each
hypercall carries, which the smaller of queue and host copy sets. At 2.6.26's
512-byte host copy the curve stops at 21 write_pte per hypercall however large
the queue; the larger host limits show what a bigger buffer would have bought.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from protocol.abi import KVM_PV_MMU_OP_BUFFER
from pvmmu import conditions
from pvmmu.compare import (
    BASELINE,
    FORMAT_VERSION,
    Progress,
    fmt,
    format_warnings,
    header,
    machine_warnings,
    plural,
    run_plan,
    summarize_runs,
    versus,
)
from pvmmu.supervisor import RunConfig

DEFAULT_QUEUES = (128, 256, 512, 1024, 2048, 4096)
DEFAULT_LIMITS = (512, 1024, 4096)


def sweep_configs(cfg: RunConfig, queues: Sequence[int], limits: Sequence[int]) -> list[RunConfig]:
    """The direct baseline first, then multicall at every (queue, host limit)."""
    return [replace(cfg, mode=BASELINE)] + [
        replace(cfg, mode="multicall", queue_bytes=q, host_limit=limit) for q in queues for limit in limits
    ]


def _name(c: RunConfig) -> str:
    return c.mode if c.mode == BASELINE else f"queue {c.queue_bytes} B, host limit {c.host_limit} B"


def sweep(
    cfg: RunConfig,
    queues: Sequence[int] = DEFAULT_QUEUES,
    limits: Sequence[int] = DEFAULT_LIMITS,
    repeat: int = 1,
    warmup: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the grid; the whole result as one JSON-able dict."""
    cond = conditions.collect(cfg)
    configs = sweep_configs(cfg, queues, limits)
    counted, warm, runnable = run_plan(configs, repeat, warmup, progress, _name)
    baseline = {"mode": BASELINE, **summarize_runs(counted[0])}
    baseline.update(versus(baseline, baseline))
    points = []
    for c, records in zip(configs[1:], counted[1:], strict=True):
        point = {"mode": c.mode, "queue_bytes": c.queue_bytes, "host_limit": c.host_limit, **summarize_runs(records)}
        point.update(versus(point, baseline))
        points.append(point)
    result = {
        "version": FORMAT_VERSION,
        "command": "sweep",
        "conditions": cond,
        "queues": list(queues),
        "limits": list(limits),
        "repeat": repeat,
        "warmup": warmup,
        "baseline": baseline,
        "points": points,
        "by_limit": best_by_limit(points),
        "runnable_others": runnable,
        "runs": [r for recs in counted for r in recs],
        "warmup_runs": warm,
        "consistent": baseline["consistent"] and all(p["consistent"] for p in points),
        "warnings": machine_warnings(cond, runnable),
    }
    at_512 = [p["theory"]["ops_per_hypercall"] for p in points if p["host_limit"] == KVM_PV_MMU_OP_BUFFER]
    result["cap_512"] = max(at_512) if at_512 else None
    return result


def best_by_limit(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each host limit, the point with the most ops per hypercall on paper (the smallest such queue)."""
    out = []
    for limit in sorted({p["host_limit"] for p in points}):
        mine = sorted((p for p in points if p["host_limit"] == limit), key=lambda p: p["queue_bytes"])
        best = max(mine, key=lambda p: p["theory"]["ops_per_hypercall"])  # first of equals: the smallest queue
        out.append({
            "host_limit": limit,
            "queue_bytes": best["queue_bytes"],
            "theory_ops_per_hypercall": best["theory"]["ops_per_hypercall"],
            "theory_reduction": best["theory_reduction"],
            "reduction": best["reduction"],
            "speedup": best["speedup"],
        })  # fmt: skip
    return out


def format_sweep(result: dict[str, Any]) -> str:
    """Table of every point beside the baseline, then where each host limit caps the gain."""
    run = result["conditions"]["run"]
    lines = header(
        f"pvmmu sweep: workload {run['workload']} (size {run['ops']}, seed {run['seed']}), multicall at "
        f"{len(result['queues'])} queue sizes × {len(result['limits'])} host limits, beside {BASELINE}",
        result,
        f"{result['repeat']} per point (median shown), each a fresh pair, round-robin, "
        f"after {plural(result['warmup'], 'uncounted warm-up round')}",
    )
    lines += [
        "   queue  host limit  ops per hypercall  switches   switches fewer than direct      ops/s  speed vs",
        "   bytes       bytes  theory   measured    per op  measured  theory  meas/theory             direct",
    ]
    for p in [result["baseline"], *result["points"]]:
        f = p["figures"]
        q = "direct" if p["mode"] == BASELINE else str(p["queue_bytes"])
        limit = "-" if p["mode"] == BASELINE else str(p["host_limit"])
        lines.append(
            f"  {q:>6}  {limit:>10}  {p['theory']['ops_per_hypercall']:>6.1f}  {f['ops_per_hypercall']['median']:>9.1f}"
            f"  {f['switches_per_op']['median']:>8.3f}  {p['reduction']:>7.1f}x {p['theory_reduction']:>6.1f}x"
            f"  {p['measured_over_theory']:>11.0%}  {fmt(f['ops_per_s']['median'], 'si'):>9}  {p['speedup']:>7.2f}x"
        )
    lines.append("")
    for b in result["by_limit"]:
        tag = " (2.6.26)" if b["host_limit"] == KVM_PV_MMU_OP_BUFFER else ""
        lines.append(
            f"host limit {b['host_limit']} B{tag}: at most {b['theory_ops_per_hypercall']:.1f} ops per hypercall "
            f"(with a {b['queue_bytes']} B queue): {b['theory_reduction']:.1f}x fewer switches in theory, "
            f"{b['reduction']:.1f}x measured, {b['speedup']:.1f}x the speed"
        )
    patch_q = [p for p in result["points"] if p["queue_bytes"] == 1024]
    if len(patch_q) > 1:
        lines.append(
            "with the patch's 1024 B queue: "
            + ", ".join(
                f"host limit {p['host_limit']} B {p['theory_reduction']:.1f}x in theory, {p['reduction']:.1f}x measured"
                for p in patch_q
            )
        )
    bad = [
        f"queue {p['queue_bytes']} B / host limit {p['host_limit']} B" for p in result["points"] if not p["consistent"]
    ]
    if not result["baseline"]["consistent"]:
        bad.insert(0, "the direct baseline")
    warnings = [f"inconsistent runs (see their records' problems): {', '.join(bad)}"] if bad else []
    lines += format_warnings(warnings + result["warnings"])
    return "\n".join(lines)
