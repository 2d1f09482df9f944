#!/usr/bin/env python3
"""What --status or --coalesce costs or buys on a real pair: runs with and without it, interleaved.

Each round runs the same workload (same size and seed) on a fresh pair without
the option and with it (which goes first alternates from round to round), and the report sets each figure of the "with" runs
against the "without" runs as a ratio of medians, with every round's own
ratio beside it. The machine is shared: ratios within one sitting are what to
quote, never the absolute speeds.

For --status it also gives the exact bytes of the host's replies to
KVM_HC_MMU_OP for this op stream, with and without the statuses (the guest and
host cores run it once in this process, and every reply is packed with the
functions the host sends with), and the CPU the statuses add per hypercall in
the cores alone, measured in this process, where the doorbell's noise does not reach.

    python scripts/with_without.py --option status --workload writes --ops 20000 --repeat 5
    python scripts/with_without.py --option coalesce --workload mprotect-clear --ops 5000 --repeat 5
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace

import click

from guest_proc.paravirt import MODES
from guest_proc.workloads import WORKLOADS, prepare
from protocol.abi import KVM_HC_MMU_OP, WritePte, encode
from protocol.messages import pack_return, pack_return_status, unpack
from pvmmu import conditions
from pvmmu.inprocess import InProcessPair
from pvmmu.supervisor import RunConfig, RunError, run_pair

FIGURES = [  # label, how to read it from a run record
    ("hypercalls", lambda r: r["hypercalls"]),
    ("switches per op", lambda r: r["ctx_switches"]["per_op"]),
    ("ops/s", lambda r: r["ops_per_s"]),
    ("CPU us per op, guest", lambda r: r["cpu_s"]["per_op_us"]["guest"]),
    ("CPU us per op, host", lambda r: r["cpu_s"]["per_op_us"]["host"]),
    ("CPU us per op, both", lambda r: r["cpu_s"]["per_op_us"]["guest"] + r["cpu_s"]["per_op_us"]["host"]),
    ("hypercall p50 (us)", lambda r: r["hypercall_latency_us"]["p50"]),
]


def reply_bytes(cfg: RunConfig) -> dict[str, float]:
    """Bytes of every measured RETURN for this op stream, without and with statuses (in-process, exact)."""
    pair = InProcessPair(cfg.mode, cfg.queue_bytes, cfg.host_limit, cfg.mem_mb, coalesce=cfg.coalesce, status=True)
    work = prepare(pair.kernel, cfg.workload, cfg.ops, cfg.seed)
    seq = len(pair.calls)  # the setup's hypercalls come first, as in a real run
    pair.replies.clear()
    work.run()
    plain = status = 0
    for i, (ret, statuses) in enumerate(pair.replies, start=seq + 1):
        plain += len(pack_return(i, ret))
        status += len(pack_return_status(i, ret, statuses))
    n = len(pair.replies)
    return {"replies": n, "plain": plain / n if n else 0.0, "status": status / n if n else 0.0}


def core_cost(blocks: int = 10, calls: int = 2000) -> dict[str, float]:
    """CPU per hypercall of the host's walk + the reply's packing + the guest's unpacking, without and
    with statuses, for 21 write_pte (a full 512-byte host copy): in-process, blocks alternating."""
    pair = InProcessPair("multicall")
    at = pair.pv.area.pool_gpa + 0x10000
    pair.mem[at : at + 504] = encode([WritePte(pair.pv.area.pool_gpa + 8 * i, 0x1067) for i in range(21)])
    hypercall = pair.kvm.kvm_emulate_hypercall
    spent = {"plain": 0.0, "status": 0.0}
    for block in range(blocks):
        for variant in ("plain", "status") if block % 2 == 0 else ("status", "plain"):
            t0 = time.process_time()
            for seq in range(calls):
                if variant == "plain":
                    unpack(pack_return(seq, hypercall(0, KVM_HC_MMU_OP, 504, at, 0)))
                else:
                    statuses = bytearray()
                    ret = hypercall(0, KVM_HC_MMU_OP, 504, at, 0, statuses)
                    unpack(pack_return_status(seq, ret, bytes(statuses)))
            spent[variant] += time.process_time() - t0
    return {k: v / (blocks * calls) * 1e6 for k, v in spent.items()}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--option", "flag", type=click.Choice(["status", "coalesce"]), required=True,
              help="The RunConfig option to turn on in every other run.")  # fmt: skip
@click.option("--mode", type=click.Choice(MODES), default="multicall", show_default=True)
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="writes", show_default=True)
@click.option("--ops", type=click.IntRange(1), default=20000, show_default=True, help="Workload size.")
@click.option("--repeat", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Rounds: each runs once without and once with the option, each a fresh pair.")  # fmt: skip
@click.option("--warmup", type=click.IntRange(0, 10), default=1, show_default=True, help="Uncounted rounds first.")
@click.option("--mem-mb", type=click.IntRange(8), default=64, show_default=True, help="Guest memory in MiB.")
def main(flag: str, mode: str, workload: str, ops: int, repeat: int, warmup: int, mem_mb: int) -> None:
    """Run a workload with and without --status or --coalesce, interleaved, and print the ratios."""
    base = RunConfig(mode=mode, workload=workload, ops=ops, mem_mb=mem_mb)
    configs = [base, replace(base, **{flag: True})]
    cond = conditions.collect(base)
    without: list[dict] = []
    with_: list[dict] = []
    busy = 0
    try:
        for rnd in range(warmup + repeat):
            for i in (0, 1) if rnd % 2 == 0 else (1, 0):
                busy += conditions.runnable_others() > 0
                record = run_pair(configs[i])
                if rnd >= warmup:
                    (with_ if i else without).append(record)
    except RunError as exc:
        click.echo(f"with_without: {exc}", err=True)
        sys.exit(exc.exit_code)
    if not all(r["consistent"] for r in without + with_):
        click.echo("with_without: a run was inconsistent", err=True)
        sys.exit(1)
    click.echo(f"{mode}, workload {workload} (size {ops}), with and without --{flag}: {repeat} rounds, interleaved, "
               f"after {warmup} warm-up round(s), each run a fresh pair")  # fmt: skip
    click.echo(f"machine: {cond['cpu_count']} CPUs, load {' '.join(f'{x:.2f}' for x in cond['load_average'])}; "
               f"other threads runnable before {busy} of {2 * (warmup + repeat)} runs")  # fmt: skip
    click.echo(f"{'figure (median)':<24}{'without':>12}{'with':>12}{'with/without':>14}   every round's ratio")
    for label, get in FIGURES:
        a, b = [get(r) for r in without], [get(r) for r in with_]
        ma, mb = statistics.median(a), statistics.median(b)
        rounds = " ".join(f"{y / x:.3f}" if x else "-" for x, y in zip(a, b, strict=True))
        click.echo(f"{label:<24}{ma:>12.3f}{mb:>12.3f}{(mb / ma if ma else 0.0):>14.3f}   {rounds}")
    if flag == "coalesce":
        r = with_[0]
        click.echo(f"coalesced: {r['coalesced']} of {r['ops']['write_pte']} write_pte; the host applied "
                   f"{r['host']['ops']['total']} of {r['ops']['total']} ops")  # fmt: skip
    if flag == "status":
        b = reply_bytes(base)
        click.echo(f"reply to KVM_HC_MMU_OP: {b['plain']:.2f} bytes without statuses, {b['status']:.2f} with "
                   f"({b['status'] / b['plain']:.2f}x, +{b['status'] - b['plain']:.2f} bytes) over the run's "
                   f"{b['replies']} replies (exact, packed in-process for the same op stream)")  # fmt: skip
        st = with_[0]["op_status"]
        click.echo(f"the live --status runs: {st['statuses']} statuses in {st['replies']} replies")
        c = core_cost()
        click.echo(f"in-process, per hypercall of 21 write_pte (host walk + reply packed + unpacked): "
                   f"{c['plain']:.2f} us without statuses, {c['status']:.2f} us with "
                   f"({c['status'] / c['plain']:.3f}x, +{(c['status'] - c['plain']) / 21 * 1000:.0f} ns per op)")  # fmt: skip


if __name__ == "__main__":
    main()
