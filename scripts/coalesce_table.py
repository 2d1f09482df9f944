#!/usr/bin/env python3
"""What op coalescing (--coalesce) saves on every workload: exact counts, in one process.

Each row runs the workload twice through the patch's multicall path, guest core
wired to host core (``pvmmu.inprocess``), without and with coalescing, and
checks both end in the same page tables. Counts, not timings: they do not
depend on the machine. The rows are the README's workload table's, plus
``mprotect-clear`` (2.6.25's change_pte_range, the case coalescing is for).

    python scripts/coalesce_table.py            # --ops 5000 for the synthetic rows, 1000 for mixed
"""

from __future__ import annotations

import sys

import click
from workload_table import ROWS

from guest_proc.workloads import prepare
from pvmmu.inprocess import InProcessPair
from pvmmu.maps import load_vmas, resolve

EXTRA = [
    ("mprotect-clear", None),
    ("mprotect-clear", "bash"),
    ("mprotect-clear", "python3"),
    ("mprotect-clear", "node"),
]


def measure(workload: str, size: int, maps: str | None, coalesce: bool, mem_mb: int, mode: str) -> dict:
    pair = InProcessPair(mode, mem_mb=mem_mb, coalesce=coalesce)
    vmas = load_vmas(resolve(maps)) if maps else None
    work = prepare(pair.kernel, workload, size, 1, vmas)
    pair.kvm.reset_counters()
    work.run()
    host, guest = pair.kvm.check(), pair.kernel.check()
    if not (host.ok and guest["ok"] and host.digests["0"] == guest["digest"]):
        raise click.ClickException(f"{workload} ({maps or 'synthetic'}): inconsistent final state")
    applied = pair.kvm.totals()
    pv = pair.pv
    if applied.write_pte + applied.flush_tlb + applied.release_pt != pv.ops_total - pv.coalesced:
        raise click.ClickException(f"{workload}: the host applied other than ops - coalesced")
    return {"ops": pv.ops_total, "write_pte": pv.ops["write_pte"], "coalesced": pv.coalesced,
            "hypercalls": pv.hypercalls, "digest": guest["digest"]}  # fmt: skip


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ops", type=click.IntRange(1), default=5000, show_default=True,
              help="Size of the synthetic rows (resident pages; write_pte for writes, faults for faults).")  # fmt: skip
@click.option("--mixed-ops", type=click.IntRange(1), default=1000, show_default=True,
              help="Resident pages of the synthetic mixed row.")  # fmt: skip
@click.option("--mode", type=click.Choice(["queued", "multicall", "ring"]), default="multicall", show_default=True,
              help="Queueing mode (every one folds the same writes; their hypercalls differ).")  # fmt: skip
@click.option("--mem-mb", type=click.IntRange(8), default=256, show_default=True, help="Guest memory in MiB.")
def main(ops: int, mixed_ops: int, mode: str, mem_mb: int) -> None:
    """Print a Markdown table: ops, write_pte folded, hypercalls without and with coalescing."""
    lines = [
        f"| workload | process | ops | write_pte | coalesced | host applies | {mode} hypercalls | with --coalesce "
        "| fewer hypercalls |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, maps in ROWS + EXTRA:
        size = mixed_ops if workload == "mixed" and maps is None else ops
        off = measure(workload, size, maps, False, mem_mb, mode)
        on = measure(workload, size, maps, True, mem_mb, mode)
        if (off["digest"], off["ops"]) != (on["digest"], on["ops"]):
            raise click.ClickException(f"{workload} ({maps or 'synthetic'}): coalescing changed the stream or state")
        share = 100 * on["coalesced"] / on["write_pte"] if on["write_pte"] else 0.0
        lines.append(
            f"| {workload} | {maps or 'synthetic'} | {on['ops']} | {on['write_pte']} | {on['coalesced']} ({share:.1f}%) "
            f"| {on['ops'] - on['coalesced']} | {off['hypercalls']} | {on['hypercalls']} "
            f"| {off['hypercalls'] / on['hypercalls']:.2f}x |"
        )
        click.echo(lines[-1], err=True)  # progress
    click.echo("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
