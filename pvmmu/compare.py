"""``pvmmu compare``: every mode on one op stream, measured beside the theory.

Each run is a fresh pair from ``run_pair``. With ``repeat`` R the modes are
interleaved (direct, queued, multicall, direct, ...) so that whatever the
machine does meanwhile hits every mode alike, after ``warmup`` rounds that are
not counted. A mode's figures are summarised over its R runs; a difference from
``direct`` is called "N x fewer" or "faster" only when a one-sided Mann-Whitney
U test finds it significant.

The theoretical switch reduction of a mode is direct's hypercalls over the
mode's, both priced on paper from the op stream's shape (``protocol.theory``):
switches scale with hypercalls, so the per-op cost should fall by that factor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from guest_proc.paravirt import MODES
from pvmmu import conditions, stats
from pvmmu.report import _si
from pvmmu.supervisor import RunConfig, run_pair

FORMAT_VERSION = 1
BASELINE = "direct"
NOISY_STDEV = 0.10  # σ above this fraction of the mean is worth a warning
SLOW_FIRST = 1.5  # a first counted run this much slower than the rest's median is worth a warning
NEGLIGIBLE = 0.02  # a significant difference smaller than this is not claimed ("1.0x fewer" says nothing)

Record = dict[str, Any]
Progress = Callable[[str], None]

# Every figure taken from a run record, in table order: (key, label, format).
FIGURES: list[tuple[str, str, str]] = [
    ("ops", "ops", "{:.0f}"),
    ("hypercalls", "hypercalls", "{:.0f}"),
    ("ops_per_hypercall", "ops per hypercall", "{:.1f}"),
    ("doorbells", "doorbells", "{:.0f}"),
    ("switches_guest_voluntary", "switches guest voluntary", "{:.0f}"),
    ("switches_guest_involuntary", "               involuntary", "{:.0f}"),
    ("switches_guest", "               total", "{:.0f}"),
    ("switches_host_voluntary", "switches host  voluntary", "{:.0f}"),
    ("switches_host_involuntary", "               involuntary", "{:.0f}"),
    ("switches_host", "               total", "{:.0f}"),
    ("switches", "switches total", "{:.0f}"),
    ("switches_per_op", "switches per op", "{:.3f}"),
    ("ops_per_s", "ops/s", "si"),
    ("latency_p50_us", "hypercall p50 (us)", "{:.1f}"),
    ("latency_p99_us", "hypercall p99 (us)", "{:.1f}"),
    ("wall_s", "wall (s)", "{:.3f}"),
]
# Figures whose spread the text report shows (the JSON has every figure's).
SPREAD = ("switches_guest", "switches_host", "switches", "switches_per_op", "ops_per_s", "latency_p50_us",
          "latency_p99_us", "wall_s")  # fmt: skip
_LABELS = {key: label.strip() for key, label, _ in FIGURES}
_LABELS.update(switches_guest_involuntary="guest involuntary switches", switches_guest="guest switches",
               switches_host_involuntary="host involuntary switches", switches_host="host switches")  # fmt: skip


def figures_of(r: Record) -> dict[str, float]:
    """The numbers a summary is made of, from one run record."""
    cs = r["ctx_switches"]
    out = {
        "ops": r["ops"]["total"],
        "hypercalls": r["hypercalls"],
        "ops_per_hypercall": r["ops_per_hypercall"],
        "doorbells": r["doorbells"],
    }
    for side in ("guest", "host"):
        out[f"switches_{side}_voluntary"] = cs[side]["voluntary"]
        out[f"switches_{side}_involuntary"] = cs[side]["involuntary"]
        out[f"switches_{side}"] = cs[side]["total"]
    return {
        **out,
        "switches": cs["total"],
        "switches_per_op": cs["per_op"],
        "ops_per_s": r["ops_per_s"],
        "latency_p50_us": r["hypercall_latency_us"]["p50"],
        "latency_p99_us": r["hypercall_latency_us"]["p99"],
        "wall_s": r["wall_s"],
    }


def fmt(value: float, spec: str) -> str:
    return _si(value).strip() if spec == "si" else spec.format(value)


def run_plan(
    configs: Sequence[RunConfig],
    repeat: int,
    warmup: int,
    progress: Progress | None = None,
    name: Callable[[RunConfig], str] = lambda c: c.mode,
) -> tuple[list[list[Record]], list[Record], list[int]]:
    """Run every config ``warmup`` + ``repeat`` times, round-robin; each run a fresh pair.

    Returns the counted records per config, the warm-up records, and how many
    other threads were runnable just before each run (no pair alive then).
    ``name`` labels a config in the progress bar.
    """
    counted: list[list[Record]] = [[] for _ in configs]
    warm: list[Record] = []
    runnable: list[int] = []
    for rnd in range(warmup + repeat):
        for i, cfg in enumerate(configs):
            is_warm = rnd < warmup
            if progress is not None:
                what = "warm-up" if is_warm else f"round {rnd - warmup + 1}/{repeat}"
                progress(f"{name(cfg)}, {what}")
            runnable.append(conditions.runnable_others())
            record = {**run_pair(cfg), "round": rnd - warmup, "warmup": is_warm}
            (warm if is_warm else counted[i]).append(record)
    return counted, warm, runnable


def summarize_runs(records: Sequence[Record]) -> dict[str, Any]:
    """Every figure of one config's runs summarised, its theory, and whether all runs were consistent."""
    per_run = [figures_of(r) for r in records]
    theory_hcs = stats.summarize([r["theory"]["hypercalls"] for r in records])["median"]
    return {
        "n": len(records),
        "figures": {key: stats.summarize([f[key] for f in per_run]) for key, _, _ in FIGURES},
        "theory": {
            "hypercalls": theory_hcs,
            "ops_per_hypercall": stats.summarize([r["theory"]["ops_per_hypercall"] for r in records])["median"],
        },
        "consistent": all(r["consistent"] for r in records),
    }


def versus(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A mode's row against the baseline's: measured and theoretical switch reduction, speed-up, tests."""
    f, b = row["figures"], base["figures"]
    spo, base_spo = f["switches_per_op"]["median"], b["switches_per_op"]["median"]
    theory = base["theory"]["hypercalls"] / row["theory"]["hypercalls"] if row["theory"]["hypercalls"] else 0.0
    reduction = base_spo / spo if spo else 0.0
    return {
        "reduction": reduction,
        "theory_reduction": theory,
        "measured_over_theory": reduction / theory if theory else 0.0,
        "speedup": f["ops_per_s"]["median"] / b["ops_per_s"]["median"] if b["ops_per_s"]["median"] else 0.0,
        # One-sided tests in the direction batching is meant to move each figure.
        "tests": {
            "fewer_switches": stats.mann_whitney_less(f["switches_per_op"]["samples"],
                                                      b["switches_per_op"]["samples"]).as_dict(),
            "faster": stats.mann_whitney_less(b["ops_per_s"]["samples"], f["ops_per_s"]["samples"]).as_dict(),
        },
    }  # fmt: skip


def compare(
    cfg: RunConfig,
    repeat: int = 3,
    warmup: int = 1,
    modes: Sequence[str] = MODES,
    progress: Progress | None = None,
    placements: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every mode (at every placement) on ``cfg``'s workload; the report as one JSON-able dict.

    With several ``placements`` each has its own ``direct`` baseline, so a row says
    what batching buys at that placement; placements are compared across rows.
    """
    if BASELINE not in modes:
        raise ValueError(f"the modes must include {BASELINE}, the baseline")
    placements = list(placements or [cfg.placement])
    cond = conditions.collect(cfg)
    # ring mode makes no hypercall round trips to stamp: --phases applies to the others
    configs = [replace(cfg, mode=m, placement=p, phases=cfg.phases and m != "ring") for p in placements for m in modes]
    counted, warm, runnable = run_plan(configs, repeat, warmup, progress, name=lambda c: label(c, placements))
    cond["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    rows = [
        {"mode": c.mode, "placement": c.placement, "label": label(c, placements), **summarize_runs(recs)}
        for c, recs in zip(configs, counted, strict=True)
    ]
    for p in placements:
        group = [r for r in rows if r["placement"] == p]
        base = next(r for r in group if r["mode"] == BASELINE)
        for row in group:
            row.update(versus(row, base))
            row["baseline"] = {
                "label": base["label"],
                "switches_per_op": base["figures"]["switches_per_op"]["median"],
                "ops_per_s": base["figures"]["ops_per_s"]["median"],
            }
    labels = [_name(r) for r in rows]
    result = {
        "version": FORMAT_VERSION,
        "command": "compare",
        "conditions": cond,
        "modes": list(modes),
        "placements": placements,
        "repeat": repeat,
        "warmup": warmup,
        "order": "interleaved: " + ", ".join(labels) + ", then again",
        "rows": rows,
        "runnable_others": runnable,
        "runs": [r for rnd in range(repeat) for recs in counted for r in recs if r["round"] == rnd],
        "warmup_runs": warm,
    }
    result["warnings"] = noise_warnings(result)
    result["verdict"] = [verdict_line(row) for row in rows if row["mode"] != BASELINE]
    if len(placements) > 1:
        result["verdict"] += placement_lines(rows, placements)
    result["consistent"] = all(row["consistent"] for row in rows)
    return result


def _name(row: dict[str, Any]) -> str:
    return row.get("label", row["mode"])


def _base(row: dict[str, Any]) -> str:
    return row.get("baseline", {}).get("label", BASELINE)


def _ring_note(row: dict[str, Any]) -> str:
    """Ring mode's theory counts a doorbell per flush; the ring rings only for a sleeping host."""
    if row["mode"] != "ring":
        return ""
    f = row["figures"]
    return (f"; the ring rang {f['doorbells']['median']:.0f} doorbells for {f['hypercalls']['median']:.0f} "
            f"flushes (medians): theory assumes one each")  # fmt: skip


def label(cfg: RunConfig, placements: Sequence[str]) -> str:
    """A row's name: the mode, and the placement when several are compared."""
    return f"{cfg.mode} {cfg.placement}" if len(placements) > 1 else cfg.mode


def placement_lines(rows: Sequence[dict[str, Any]], placements: Sequence[str]) -> list[str]:
    """Per mode, what each placement did to its speed, against the first placement given."""
    out = []
    first = placements[0]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        by = {r["placement"]: r for r in rows if r["mode"] == mode}
        ref = by[first]["figures"]
        parts = []
        for p in placements[1:]:
            f = by[p]["figures"]
            speed = f["ops_per_s"]["median"] / ref["ops_per_s"]["median"] if ref["ops_per_s"]["median"] else 0.0
            spo = (
                f["switches_per_op"]["median"] / ref["switches_per_op"]["median"]
                if ref["switches_per_op"]["median"]
                else 0.0
            )
            parts.append(f"{p} {speed:.2f}x the ops/s and {spo:.2f}x the switches per op of {first}")
        out.append(f"{mode}: {'; '.join(parts)}")
    return out


def machine_warnings(cond: dict[str, Any], runnable: Sequence[int]) -> list[str]:
    """Signs that other work shared the CPUs: the load average at the start, runnable threads between runs."""
    out = []
    cpus = len(cond["cpu_affinity"]) or cond["cpu_count"] or 1
    load1 = cond["load_average"][0]
    if load1 > cpus / 2:
        out.append(f"load average was {load1:g} on {cpus} CPUs at the start: other work competes for the CPUs; "
                   f"rerun when `uptime` shows a load well below {cpus / 2:g}")  # fmt: skip
    busy = [n for n in runnable if n > 0]
    if len(busy) * 2 >= len(runnable) > 0:
        out.append(f"other threads were runnable before {len(busy)} of {len(runnable)} runs "
                   f"(up to {max(busy)}): another program is using the CPUs; stop it, or rerun when "
                   f"/proc/loadavg shows 1 runnable")  # fmt: skip
    return out


def noise_warnings(result: dict[str, Any]) -> list[str]:
    """What in these numbers a reader should not trust, each with what to do about it."""
    out = []
    rows, cond = result["rows"], result["conditions"]
    for row in rows:
        if not row["consistent"]:
            out.append(f"{_name(row)}: a run ended inconsistent (see its record's problems): its figures "
                       f"describe a broken run; report it, do not quote them")  # fmt: skip
    noisy = []
    for row in rows:
        for key in ("switches_per_op", "ops_per_s", "latency_p50_us"):
            s = row["figures"][key]
            if s["n"] > 1 and stats.relative_stdev(s) > NOISY_STDEV:
                noisy.append(f"{_name(row)} {_LABELS[key]} {stats.relative_stdev(s):.0%}")
    if noisy:
        out.append(f"σ above {NOISY_STDEV:.0%} of the mean ({', '.join(noisy)}): rerun with a larger --repeat, "
                   f"on an idle machine")  # fmt: skip
    out += machine_warnings(cond, result["runnable_others"])
    for row in rows:
        samples = row["figures"]["ops_per_s"]["samples"]
        if len(samples) >= 3:
            rest = stats.summarize(samples[1:])["median"]
            if samples[0] > 0 and rest / samples[0] > SLOW_FIRST:
                out.append(f"{_name(row)}: the first counted run was {rest / samples[0]:.1f}x slower than the "
                           f"rest: caches were cold or the machine busy; raise --warmup")  # fmt: skip
    return out


def claim(test: dict[str, Any], ratio: float, word: str) -> str:
    """'20.8x fewer' only when the rank test says so; otherwise the bare ratio, marked."""
    if test["significant"] and ratio >= 1 + NEGLIGIBLE:
        return f"{ratio:.1f}x {word}"
    if test["significant"]:
        return f"{ratio:.2f}x (no meaningful difference)"
    if stats.min_exact_p(test["n_x"], test["n_y"]) > test["alpha"]:
        return f"{ratio:.2f}x (untested)"
    return f"{ratio:.2f}x (not significant)"


def verdict_line(row: dict[str, Any]) -> str:
    """e.g. ``multicall: 20.6x fewer context switches than direct (theory 21.0x, 98%; p=0.05), ...``."""
    t = row["tests"]
    sw, fast = t["fewer_switches"], t["faster"]
    n = (
        f"N={sw['n_x']} run{'s' if sw['n_x'] != 1 else ''} each"
        if sw["n_x"] == sw["n_y"]
        else f"N={sw['n_x']} and {sw['n_y']} runs"
    )
    theory = f"theory {row['theory_reduction']:.1f}x, {row['measured_over_theory']:.0%}"
    if stats.min_exact_p(sw["n_x"], sw["n_y"]) > sw["alpha"]:
        base = _base(row)
        return (f"{_name(row)}: switches per op {base}/{_name(row)} {row['reduction']:.1f}x ({theory}), "
                f"speed {_name(row)}/{base} {row['speedup']:.2f}x; untested for significance with {n}: "
                f"use --repeat 3 or more{_ring_note(row)}")  # fmt: skip
    base = _base(row)
    if sw["significant"] and row["reduction"] >= 1 + NEGLIGIBLE:
        switches = f"{row['reduction']:.1f}x fewer context switches than {base} ({theory}; p={sw['p']:.2g})"
    elif sw["significant"]:  # separates completely, yet too small to be worth a claim
        switches = (f"no meaningful difference in context switches from {base} "
                    f"({row['reduction']:.3f}x, significant but under {NEGLIGIBLE:.0%}, {theory}; p={sw['p']:.2g})")  # fmt: skip
    else:
        switches = (f"no significant difference in context switches from {base} "
                    f"({row['reduction']:.2f}x, {theory}; p={sw['p']:.2g})")  # fmt: skip
    if fast["significant"] and row["speedup"] >= 1 + NEGLIGIBLE:
        speed = f"{row['speedup']:.1f}x faster (p={fast['p']:.2g})"
    elif fast["significant"]:
        speed = f"not meaningfully faster ({row['speedup']:.3f}x, significant but under {NEGLIGIBLE:.0%}; p={fast['p']:.2g})"
    else:
        speed = f"not significantly faster ({row['speedup']:.2f}x, p={fast['p']:.2g})"
    return f"{_name(row)}: {switches}, {speed}; Mann-Whitney U, one-sided, {n}{_ring_note(row)}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def header(title: str, result: dict[str, Any], runs: str) -> list[str]:
    """A report's first lines: what was run, the conditions, how the runs were arranged."""
    return [title, conditions.describe(result["conditions"]), f"  runs         {runs}", ""]


def format_compare(result: dict[str, Any]) -> str:
    """The text report: the table of medians, the spread of what varied, warnings, verdict."""
    rows = result["rows"]
    run = result["conditions"]["run"]
    n = result["repeat"]
    lines = header(
        f"pvmmu compare: workload {run['workload']} (size {run['ops']}, seed {run['seed']}), "
        f"{plural(run['vcpus'], 'vCPU')}, queue {run['queue_bytes']} B, host limit {run['host_limit']} B",
        result,
        f"{n} per mode, interleaved ({', '.join(_name(r) for r in rows)}, ...), each a fresh pair, "
        f"after {plural(result['warmup'], 'uncounted warm-up round')}",
    )
    width = max(11, *(len(_name(r)) + 2 for r in rows))
    head = f"  {'median of ' + str(n) + ' runs':<28}" + "".join(f"{_name(r):>{width}}" for r in rows)
    lines.append(head)
    for key, label, spec in FIGURES:
        lines.append(f"  {label:<28}" + "".join(f"{fmt(r['figures'][key]['median'], spec):>{width}}" for r in rows))
        if key == "switches_per_op":
            lines.append(
                f"  {'  reduction vs ' + BASELINE:<28}" + "".join(f"{r['reduction']:>{width - 1}.1f}x" for r in rows)
            )
            lines.append(f"  {'  theory (ops per hypercall)':<28}"
                         + "".join(f"{r['theory_reduction']:>{width - 1}.1f}x" for r in rows))  # fmt: skip
            lines.append(f"  {'  measured / theory':<28}"
                         + "".join(f"{r['measured_over_theory']:>{width}.0%}" for r in rows))  # fmt: skip
        if key == "ops_per_s":
            lines.append(
                f"  {'  speed vs ' + BASELINE:<28}" + "".join(f"{r['speedup']:>{width - 1}.2f}x" for r in rows)
            )
    lines += ["", *format_spread(rows, n), *format_warnings(result["warnings"]), "", *result["verdict"]]
    return "\n".join(lines)


def format_warnings(warnings: Sequence[str]) -> list[str]:
    if not warnings:
        return []
    return ["", "warnings (the machine may be shared; ratios within one run are what to quote):",
            *(f"  ! {w}" for w in warnings)]  # fmt: skip


def format_spread(rows: Sequence[dict[str, Any]], n: int) -> list[str]:
    """N, median, mean ± σ, min–max and p99 of every figure that varied between runs."""
    if n < 2:
        return ["  one run per mode: no spread to show (--repeat 3 or more for statistics)"]
    lab = max(11, *(len(_name(r)) + 1 for r in rows))
    lines = [
        f"  {'spread over runs':<28}{'mode':<{lab}}{'N':>3}{'median':>10}{'mean ± σ':>24}{'min – max':>24}{'p99':>10}"
    ]
    steady = []
    for key, _, spec in FIGURES:
        if key not in SPREAD:
            continue
        if all(r["figures"][key]["min"] == r["figures"][key]["max"] for r in rows):
            steady.append(_LABELS[key])
            continue
        for i, r in enumerate(rows):
            s = r["figures"][key]
            mean_sd = f"{fmt(s['mean'], spec)} ± {fmt(s['stdev'], spec)} ({stats.relative_stdev(s):.0%})"
            lines.append(
                f"  {(_LABELS[key] if i == 0 else ''):<28}{_name(r):<{lab}}{s['n']:>3}{fmt(s['median'], spec):>10}"
                f"{mean_sd:>24}{fmt(s['min'], spec) + ' – ' + fmt(s['max'], spec):>24}{fmt(s['p99'], spec):>10}"
            )
    if steady:
        lines.append(f"  the same in every run: {', '.join(steady)}")
    lines.append("  (every figure's N, median, mean, σ, min, max, p99 and samples: --json)")
    return lines
