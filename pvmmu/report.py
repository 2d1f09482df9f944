"""Human-readable summaries of run records."""

from __future__ import annotations

from typing import Any

from pvmmu.phases import PHASES


def _threads(part: dict[str, Any]) -> str:
    return ", ".join(f"{name} {t['voluntary'] + t['involuntary']}" for name, t in part["threads"].items())


def _si(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f} "


def placement_text(p: dict[str, Any] | None) -> str:
    if not p or p["policy"] == "any":
        return "placement any (scheduler's choice)"
    guests = ";".join(",".join(map(str, g)) for g in p["guest_cpus"])
    return f"placement {p['policy']} (host CPU {','.join(map(str, p['host_cpus']))}, guests CPU {guests})"


def ring_lines(r: dict[str, Any], th: str) -> list[str]:
    """The hypercall and time lines; ring mode makes no round trip, so it says what it did instead."""
    lat = r["hypercall_latency_us"]
    speed = f"  time         {r['wall_s']:.3f} s, {_si(r['ops_per_s'])}ops/s"
    if r["mode"] != "ring":
        return [
            f"  hypercalls   {r['hypercalls']}  ({r['ops_per_hypercall']:.1f} ops each{th}), doorbells {r['doorbells']}",
            f"{speed}, hypercall round trip p50 {lat['p50']:.1f} us, p99 {lat['p99']:.1f} us",
        ]
    ring = r["host"].get("ring") or {}
    sleeps = sum((p.get("ring") or {}).get("sleeps", 0) for p in r["per_vcpu"])
    return [
        f"  flushes      {r['hypercalls']}  ({r['ops_per_hypercall']:.1f} ops each{th}), each one publish to the "
        f"ring: no hypercall reached the host",
        f"  doorbells    {r['doorbells']} rung (the host had set NEED_WAKEUP); the host slept {ring.get('sleeps', 0)} "
        f"times and sent {ring.get('completions', 0)} completions; the guest slept {sleeps} times",
        f"{speed} (no round trips to time)",
    ]


def format_run(r: dict[str, Any]) -> str:
    ops = r["ops"]
    cs = r["ctx_switches"]
    theory = r.get("theory")
    th = f"; theory {theory['ops_per_hypercall']:.1f}" if theory else ""
    lines = [
        f"pvmmu run: mode {r['mode']}, workload {r['workload']} (size {r['size']}, seed {r['seed']}), "
        f"{r['vcpus']} vCPU{'s' if r['vcpus'] != 1 else ''}, queue {r['queue_bytes']} B, "
        f"host limit {r['host_limit']} B",
        f"  conditions   doorbell {r['doorbell']}"
        + (f", I/O threads {r['io_thread']}" if r["doorbell"] == "zmq" else " (no helper threads)")
        + f", {placement_text(r.get('placement'))}",
        f"  ops          {ops['total']}  (write_pte {ops['write_pte']}, flush_tlb {ops['flush_tlb']}, "
        f"release_pt {ops['release_pt']})",
        *ring_lines(r, th),
        f"  switches     guest {cs['guest']['total']} ({_threads(cs['guest'])})",
        f"               host  {cs['host']['total']} ({_threads(cs['host'])})",
        f"               total {cs['total']}, {cs['per_op']:.3f} per op",
    ]
    lines += option_lines(r)
    lines += workload_lines(r)
    cpu = r.get("cpu_s")
    if cpu:
        lines.append(
            f"  cpu          guest {cpu['guest']['total']:.2f} s, host {cpu['host']['total']:.2f} s "
            f"({cpu['per_op_us']['guest']:.1f} + {cpu['per_op_us']['host']:.1f} us per op)"
        )
    ph = r.get("phases")
    if ph:
        parts = ", ".join(f"{name} {ph[name]['p50_us']:.1f} us ({ph[name]['share']:.0%})" for name in PHASES)
        lines.append(f"  phases       median: {parts}")
        lines.append(
            f"               sum of medians {ph['sum_of_medians_us']:.1f} us = "
            f"{ph['sum_of_medians_over_median_round_trip']:.0%} of the median round trip "
            f"{ph['round_trip']['p50_us']:.1f} us; stamps cost {ph['stamp_cost_ns']:.0f} ns each, "
            f"{ph['stamps_per_hypercall']} per hypercall"
        )
    if len(r["per_vcpu"]) > 1:
        lines.append("  per vCPU     vcpu      ops  hypercalls     ops/s  switches/op  p50 us   p99 us")
        for p in r["per_vcpu"]:
            lat_v = p["hypercall_latency_us"]
            lines.append(
                f"               {p['vcpu']:>4} {p['ops']['total']:>8} {p['hypercalls']:>11} {p['ops_per_s']:>9.0f}"
                f" {p['ctx_switches']['per_op']:>12.3f} {lat_v['p50']:>7.1f} {lat_v['p99']:>8.1f}"
            )
        f = r["fairness"]
        lines.append(
            f"  fairness     ops/s max/min {f['ops_per_s']['max_over_min']:.2f}, Jain index {f['jain_index']:.3f}, "
            f"p99 {f['latency_p99_us']['min']:.0f}-{f['latency_p99_us']['max']:.0f} us"
            + (f"; STARVED: vCPU {', '.join(map(str, f['starved']))}" if f["starved"] else "; no vCPU starved")
        )
    if r["consistent"]:
        lines.append(
            f"  consistent   yes: host shadow, guest memory and the guest's page tables agree "
            f"({r['host']['shadow']['entries']} entries, digest {r['digest'][:12]})"
        )
    else:
        lines.append("  consistent   NO")
        lines += [f"    - {p}" for p in r["problems"]]
    return "\n".join(lines)


def option_lines(r: dict[str, Any]) -> list[str]:
    """What --coalesce and --status did in this run (nothing when they were off)."""
    out = []
    if r.get("coalesce"):
        writes, folded = r["ops"]["write_pte"], r["coalesced"]
        share = f" ({100 * folded / writes:.1f}%)" if writes else ""
        out.append(f"  coalesced    {folded} of {writes} write_pte{share} rewrote an entry already queued in the same "
                   f"batch; the host applied {r['ops']['total'] - folded} ops")  # fmt: skip
    st = r.get("op_status")
    if st is not None and r["mode"] == "ring":
        out.append("  op status    on, but ring mode makes no KVM_HC_MMU_OP: the ring's error words already name "
                   "a refused op and its code")  # fmt: skip
    elif st is not None:
        each = st["statuses"] / st["replies"] if st["replies"] else 0.0
        out.append(f"  op status    {st['statuses']} per-op statuses in {st['replies']} replies ({each:.1f} each)")
    return out


def workload_lines(r: dict[str, Any]) -> list[str]:
    """Where the run's ops came from and how much of them batching can reach at all."""
    out = []
    space = r.get("address_space")
    if space:
        every = f", summed over {r['vcpus']} vCPUs' processes" if r["vcpus"] > 1 else ""
        out.append(f"  process      {space['source']}: {space['vmas']} VMAs, {space['resident_pages']} resident pages, "
                   f"{space['page_tables']} page tables{every}")  # fmt: skip
    mix = r.get("op_mix")
    total = mix["in_lazy"] + mix["outside"] if mix else 0
    if mix and total:
        best = mix["best_reduction"]
        if best < 1.1:
            out.append(f"  op mix       {mix['outside']} of {total} ops outside lazy MMU sections: nothing to batch, "
                       f"so every mode makes about one hypercall per op (best possible reduction {best:.2f}x)")  # fmt: skip
        else:
            out.append(f"  op mix       {mix['in_lazy']} of {total} ops ({100 * mix['in_lazy'] / total:.1f}%) in "
                       f"{mix['lazy_sections']} lazy MMU sections, {mix['outside']} outside them; "
                       f"batching can cut hypercalls {best:.1f}x at most")  # fmt: skip
    paths = r.get("paths") or {}
    width = max((len(name) for name in paths), default=0)
    for i, (name, p) in enumerate(paths.items()):
        each = p["ops"] / p["hypercalls"] if p["hypercalls"] else 0.0
        out.append(f"  {'paths' if i == 0 else '':<13}{name:<{width}} {p['calls']:>6} calls {p['ops']:>8} ops "
                   f"{p['hypercalls']:>7} hypercalls ({each:.1f} ops each)")  # fmt: skip
    trace = r.get("trace")
    if trace and "recorded_digest" in trace:
        agree = "match the recording" if trace["matches"] else "DIFFER from the recording"
        out.append(f"  trace        replayed {trace['file']}: {trace['events']} events ({trace['run_events']} measured); "
                   f"page tables {agree} (digest {trace['recorded_digest'][:12]})")  # fmt: skip
    elif trace:
        out.append(f"  trace        wrote {trace['events']} events ({trace['run_events']} measured) to {trace['file']}")
    return out
