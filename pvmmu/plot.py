"""PNG charts of ``compare`` and ``sweep`` results (matplotlib, the optional ``[plot]`` extra)."""

from __future__ import annotations

import os
from typing import Any

INSTALL_HINT = "pip install 'pvmmu[plot]'"
# Tick notes for the modes people know by another name; a mode added later shows its bare name.
MODE_NOTES = {
    "direct": "one hypercall per op",
    "queued": "the seed's reading",
    "multicall": "the patch",
    "ring": "beyond the patch",
}
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


class PlotUnavailable(RuntimeError):
    """--plot cannot work here; the message says what to do."""


def require(path: str) -> None:
    """Fail before any measuring if the plot could not be written: no matplotlib, no such directory."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise PlotUnavailable(f"--plot {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise PlotUnavailable(f"--plot {path}: directory {directory} is not writable")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _footer(result: dict[str, Any]) -> str:
    c = result["conditions"]
    return (
        f"{c['cpu_count']} CPUs (affinity {','.join(map(str, c['cpu_affinity']))}), load {c['load_average'][0]:g} "
        f"at start, {c['kernel']}, {c['python']}, pyzmq {c['pyzmq']}, io-thread {c['run']['io_thread']}, "
        f"{c['time']}"
    )


def plot_compare(result: dict[str, Any], path: str) -> None:
    """Switches per op and ops/s per mode: bars are medians, dots single runs, theory marked."""
    from pvmmu.compare import BASELINE, claim

    plt = _pyplot()
    rows = result["rows"]
    run = result["conditions"]["run"]
    x = range(len(rows))
    many = len(rows) > 4
    small = 8 if many else 10
    width = 1.9 * len(rows) if many else 3.6 * len(rows)  # room under each bar for its tick label
    fig, (ax_sw, ax_speed) = plt.subplots(1, 2, figsize=(max(12, width), 5.6 if many else 5.2))

    spo = [r["figures"]["switches_per_op"] for r in rows]
    order = list(dict.fromkeys(r["mode"] for r in rows))
    colors = [COLORS[order.index(r["mode"]) % len(COLORS)] for r in rows]  # one colour per mode
    ax_sw.bar(x, [s["median"] for s in spo], color=colors, width=0.6)
    # Several orders of magnitude apart (ring against direct): a log axis keeps every bar visible.
    log = min(s["median"] for s in spo) > 0 and max(s["median"] for s in spo) / min(s["median"] for s in spo) > 50
    if log:
        ax_sw.set_yscale("log")
    for i, s in enumerate(spo):
        ax_sw.plot([i] * s["n"], s["samples"], "o", color="black", ms=3, alpha=0.6)
    theory = [r["baseline"]["switches_per_op"] / r["theory_reduction"] for r in rows]
    ax_sw.hlines(theory, [i - 0.38 for i in x], [i + 0.38 for i in x], colors="black", linestyles="--", lw=1.5,
                 label="theory: direct ÷ ops per hypercall (on paper)")  # fmt: skip
    top = max(s["max"] for s in spo)
    for i, (r, s) in enumerate(zip(rows, spo, strict=True)):
        text = f"{s['median']:.3g}"
        if r["mode"] != BASELINE:
            text += f"\n{claim(r['tests']['fewer_switches'], r['reduction'], 'fewer')}\n(theory {r['theory_reduction']:.1f}x)"
        y = s["median"] * 1.15 if log else s["median"] + top * 0.02
        ax_sw.text(i, y, text, ha="center", va="bottom", fontsize=small)
    if log:
        ax_sw.set_ylim(min(s["min"] for s in spo) / 3, top * 30)
    else:
        ax_sw.set_ylim(0, top * 1.35)
    ax_sw.set_title("context switches per op (lower is better)")
    ax_sw.set_ylabel("switches per op, guest + host, all threads" + (" (log scale)" if log else ""))
    ax_sw.legend(loc="upper right", fontsize=9)

    ops = [r["figures"]["ops_per_s"] for r in rows]
    ax_speed.bar(x, [s["median"] / 1e3 for s in ops], color=colors, width=0.6)
    for i, s in enumerate(ops):
        ax_speed.plot([i] * s["n"], [v / 1e3 for v in s["samples"]], "o", color="black", ms=3, alpha=0.6)
    ceiling = [r["baseline"]["ops_per_s"] * r["theory_reduction"] / 1e3 for r in rows]
    ax_speed.hlines(ceiling, [i - 0.38 for i in x], [i + 0.38 for i in x], colors="black", linestyles=":", lw=1.5,
                    label="ceiling if only hypercalls cost time: direct × theory")  # fmt: skip
    top = max(max(s["max"] for s in ops) / 1e3, max(ceiling))
    for i, (r, s) in enumerate(zip(rows, ops, strict=True)):
        text = f"{s['median'] / 1e3:.1f} k"
        if r["mode"] != BASELINE:
            text += f"\n{claim(r['tests']['faster'], r['speedup'], 'faster')}"
        y = s["max"] / 1e3
        if y <= ceiling[i] < y + top * 0.12:  # keep the label clear of the ceiling's line
            y = ceiling[i]
        ax_speed.text(i, y + top * 0.02, text, ha="center", va="bottom", fontsize=small)
    ax_speed.set_ylim(0, top * 1.2)
    ax_speed.set_title("ops per second (higher is better)")
    ax_speed.set_ylabel("thousand ops/s")
    ax_speed.legend(loc="upper left", fontsize=9)

    if len(result.get("placements", [])) > 1:  # mode above, placement below
        ticks = [f"{r['mode']}\n{r['placement']}" for r in rows]
    else:
        ticks = [f"{r['label']}\n({MODE_NOTES[r['mode']]})" if r["mode"] in MODE_NOTES else r["label"] for r in rows]
        ticks = [t.replace(" per op", "\nper op") for t in ticks]
    for ax in (ax_sw, ax_speed):
        ax.set_xticks(list(x), ticks, fontsize=small + 1)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(
        f"pvmmu compare: {run['workload']} {run['ops']}, queue {run['queue_bytes']} B, host limit "
        f"{run['host_limit']} B; bars = median of {result['repeat']} runs, dots = runs",
        fontsize=12,
    )
    fig.text(0.5, 0.01, _footer(result), ha="center", fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """Switches per op and ops/s against ops per hypercall (theory curve), and the gain per queue size."""
    plt = _pyplot()
    base = result["baseline"]
    points = result["points"]
    limits = sorted({p["host_limit"] for p in points})
    markers = "os^Dv<>"
    fig, (ax_sw, ax_speed, ax_cap) = plt.subplots(1, 3, figsize=(17, 5.4))
    per_hc = base["figures"]["switches_per_op"]["median"]  # direct: one hypercall per op
    xs = [1.0] + [p["theory"]["ops_per_hypercall"] for p in points]
    grid = [min(xs) * (max(xs) / min(xs)) ** (i / 50) for i in range(51)]
    ax_sw.plot(grid, [per_hc / g for g in grid], "--", color="black", lw=1.2,
               label="theory: direct's switches per hypercall\n÷ ops per hypercall")  # fmt: skip
    base_ops = base["figures"]["ops_per_s"]["median"]
    ax_speed.plot(grid, [base_ops * g / 1e3 for g in grid], ":", color="black", lw=1.2,
                  label="ceiling if only hypercalls cost time")  # fmt: skip
    for ax, key, scale in ((ax_sw, "switches_per_op", 1.0), (ax_speed, "ops_per_s", 1e3)):
        ax.plot([1.0], [base["figures"][key]["median"] / scale], "s", color="0.3", ms=8, label="direct")
        for i, limit in enumerate(limits):
            mine = [p for p in points if p["host_limit"] == limit]
            ax.plot([p["theory"]["ops_per_hypercall"] for p in mine], [p["figures"][key]["median"] / scale for p in mine],
                    markers[i % len(markers)], color=COLORS[i % len(COLORS)], ms=8, alpha=0.75, ls="none",
                    label=f"multicall, host limit {limit} B")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("ops per hypercall (theory, from queue size and host limit)")
    cap = result.get("cap_512")
    if cap:
        for ax in (ax_sw, ax_speed):
            ax.axvline(cap, color="#c44e52", lw=1, alpha=0.5)
        ax_sw.text(cap * 1.08, per_hc * 0.9, f"2.6.26's 512 B\nhost copy: at most\n{cap:.0f} ops per hypercall",
                   color="#c44e52", fontsize=9, va="top")  # fmt: skip
    ax_sw.set_title("context switches per op (lower is better)")
    ax_sw.set_ylabel("switches per op, guest + host, all threads")
    ax_speed.set_title("ops per second (higher is better)")
    ax_speed.set_ylabel("thousand ops/s")
    ax_sw.legend(loc="lower left", fontsize=8)
    ax_speed.legend(loc="upper left", fontsize=8)

    # The same points by queue size: where each host limit stops the gain.
    for i, limit in enumerate(limits):
        mine = sorted((p for p in points if p["host_limit"] == limit), key=lambda p: p["queue_bytes"])
        qs = [p["queue_bytes"] for p in mine]
        color = COLORS[i % len(COLORS)]
        ax_cap.plot(qs, [p["reduction"] for p in mine], marker=markers[i % len(markers)], color=color, ms=8,
                    label=f"host limit {limit} B: measured")  # fmt: skip
        ax_cap.plot(qs, [p["theory_reduction"] for p in mine], "--", color=color, lw=1.2, alpha=0.8,
                    label=f"host limit {limit} B: theory")  # fmt: skip
    ax_cap.set_xscale("log", base=2)
    ax_cap.set_yscale("log")
    queues = sorted({p["queue_bytes"] for p in points})
    ax_cap.set_xticks(queues, [str(q) for q in queues])
    ax_cap.set_xlabel("guest queue size, bytes (the patch: 1024)")
    ax_cap.set_ylabel("times fewer switches per op than direct")
    ax_cap.set_title("the gain by queue size: the host limit caps it")
    ax_cap.legend(loc="upper left", fontsize=8)
    for ax in (ax_sw, ax_speed, ax_cap):
        ax.grid(True, which="major", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    run = result["conditions"]["run"]
    fig.suptitle(f"pvmmu sweep: {run['workload']} {run['ops']}, multicall at queue sizes × host limits; "
                 f"median of {result['repeat']} run{'s' if result['repeat'] != 1 else ''} each", fontsize=12)  # fmt: skip
    fig.text(0.5, 0.01, _footer(result), ha="center", fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
