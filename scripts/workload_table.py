#!/usr/bin/env python3
"""The README's per-workload table: switches per op in each mode, and the reduction batching buys.

Runs one real pair per workload and mode, one after the other (``pvmmu run``
each), and prints a Markdown table. Ratios are taken within one sitting; the
absolute numbers move with the machine's load, the ratios much less.

    python scripts/workload_table.py                      # synthetic processes of --ops pages, and the captures
    python scripts/workload_table.py --json > table.json  # every run record
"""

from __future__ import annotations

import json
import sys

import click

from guest_proc.paravirt import MODES
from pvmmu.supervisor import RunConfig, RunError, run_pair

ROWS = [  # workload, --from-maps (None: synthetic)
    ("writes", None), ("fork", None), ("exit", None), ("mprotect", None), ("munmap", None), ("faults", None),
    ("mixed", None),
    ("fork", "bash"), ("exit", "bash"), ("mprotect", "bash"),
    ("fork", "python3"), ("exit", "python3"), ("mprotect", "python3"), ("munmap", "python3"), ("mixed", "python3"),
    ("fork", "node"), ("exit", "node"), ("mprotect", "node"),
]  # fmt: skip


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ops", type=click.IntRange(1), default=5000, show_default=True,
              help="Size of the synthetic rows (resident pages; faults and write_pte for faults and writes).")  # fmt: skip
@click.option("--mixed-ops", type=click.IntRange(1), default=1000, show_default=True,
              help="Resident pages of the synthetic mixed row (it forks the process several times).")  # fmt: skip
@click.option("--only", multiple=True, help="Only rows of this workload (repeatable).")
@click.option("--mem-mb", type=click.IntRange(8), default=256, show_default=True, help="Guest memory in MiB.")
@click.option("--json", "as_json", is_flag=True, help="Print every run record as JSON instead of the table.")
def main(ops: int, mixed_ops: int, only: tuple[str, ...], mem_mb: int, as_json: bool) -> None:
    """Measure every workload in every mode and print the table."""
    records = []
    lines = [
        "| workload | process | ops | in lazy sections (ops each) | switches/op direct | queued | multicall "
        "| reduction (switches) | hypercalls direct / multicall | ring switches/op | ring reduction |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, maps in ROWS:
        if only and workload not in only:
            continue
        size = mixed_ops if workload == "mixed" and maps is None else ops
        try:
            by_mode = {m: run_pair(RunConfig(mode=m, workload=workload, ops=size, from_maps=maps, mem_mb=mem_mb))
                       for m in MODES}  # fmt: skip
        except RunError as exc:
            click.echo(f"workload_table: {workload} ({maps or 'synthetic'}): {exc}", err=True)
            sys.exit(exc.exit_code)
        records += by_mode.values()
        d, m = by_mode["direct"], by_mode["multicall"]
        if not all(r["consistent"] for r in by_mode.values()):
            click.echo(f"workload_table: {workload} ({maps or 'synthetic'}) was inconsistent", err=True)
            sys.exit(1)
        mix = m["op_mix"]
        space = m["address_space"]
        process = f"{maps} ({space['resident_pages']} pages)" if maps else (
            f"synthetic, {space['resident_pages']} pages" if space and workload != "writes" else "-")  # fmt: skip
        per = {k: r["ctx_switches"]["per_op"] for k, r in by_mode.items()}
        lines.append(
            f"| {workload} | {process} | {m['ops']['total']} | {100 * mix['in_lazy'] / m['ops']['total']:.0f}% "
            f"({mix['in_lazy'] / mix['lazy_sections'] if mix['lazy_sections'] else 0:.0f}) "
            f"| {per['direct']:.2f} | {per['queued']:.2f} | {per['multicall']:.3f} "
            f"| {per['direct'] / per['multicall']:.1f}x | {d['hypercalls']} / {m['hypercalls']} "
            f"({d['hypercalls'] / m['hypercalls']:.1f}x) | {per['ring']:.4f} | {per['direct'] / per['ring']:.0f}x |"
        )
        if not as_json:
            click.echo(lines[-1], err=True)  # progress
    click.echo(json.dumps(records, indent=1) if as_json else "\n".join(lines))


if __name__ == "__main__":
    main()
