"""``pvmmu``: the command line.

Exit status, for every command: 0 success; 1 the run finished but its final
state is inconsistent; 2 bad usage; 3 the run could not be completed (a process
died, a peer went silent, the host refused an op); 130 / 143 interrupted by
SIGINT / SIGTERM, after an orderly teardown.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from guest_proc.paravirt import MODES
from guest_proc.workloads import WORKLOADS
from protocol.abi import KVM_PV_MMU_OP_BUFFER, MMU_QUEUE_SIZE
from protocol.layout import MAX_QUEUE_BYTES, MAX_VCPUS
from protocol.messages import MAX_STATUS_HOST_LIMIT
from pvmmu import __version__
from pvmmu.liveness import Terminated, install_signal_handlers
from pvmmu.options import io_thread_option
from pvmmu.report import format_run
from pvmmu.rundir import sweep_stale_run_dirs
from pvmmu.shm import list_segments, sweep_stale
from pvmmu.supervisor import EXIT_INCONSISTENT, EXIT_RUN_FAILED, RunConfig, RunError, run_pair


def run_options(f: Any) -> Any:
    """The options every command that launches pairs shares."""
    options = [
        click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="writes", show_default=True,
                     help="Guest MMU work: writes (N write_pte in one lazy section), fork, exit, mprotect, munmap "
                          "(batched in lazy sections), faults (demand faults: nothing to batch), mixed (a busy guest)."),
        click.option("--ops", type=click.IntRange(1), default=10000, show_default=True,
                     help="Size: write_pte count for writes; faults for faults; resident pages of the starting "
                          "process for the others (unless --from-maps/--from-pid gives the process)."),
        click.option("--from-maps", metavar="FILE",
                     help="Start from the address space in this /proc/PID/smaps (or maps) file, or a shipped "
                          "capture named bash, python3 or node (see 'pvmmu maps')."),
        click.option("--from-pid", type=int, metavar="PID",
                     help="Start from the address space of this live process (its /proc/PID/smaps, read once)."),
        click.option("--seed", type=int, default=1, show_default=True, help="Seed of the workload's randomness."),
        click.option("--queue-bytes", type=click.IntRange(24, MAX_QUEUE_BYTES), default=MMU_QUEUE_SIZE,
                     show_default=True, help="Guest per-vCPU mmu_queue size (the patch: 1024)."),
        click.option("--host-limit", type=click.IntRange(24, 1 << 20), default=KVM_PV_MMU_OP_BUFFER,
                     show_default=True, help="Bytes the host copies per hypercall (2.6.26: 512)."),
        click.option("--vcpus", type=click.IntRange(1, MAX_VCPUS), default=1, show_default=True,
                     help="Guest vCPU processes."),
        click.option("--mem-mb", type=click.IntRange(8, 65536), default=256, show_default=True,
                     help="Guest memory in MiB (sparse: untouched pages cost nothing)."),
        io_thread_option,
        click.option("--placement", type=click.Choice(["any", "same", "split"]), default="any", show_default=True,
                     help="CPU placement: any leaves it to the scheduler; same pins host and guests to one CPU; "
                          "split pins the host to one CPU and the guests to the others."),
        click.option("--poll-us", type=click.FloatRange(0), default=500.0, show_default=True,
                     help="Ring mode: the host keeps polling the rings this long after its last work, then "
                          "sets NEED_WAKEUP and sleeps on the doorbell (longer: fewer doorbells, more CPU)."),
        click.option("--spin-us", type=click.FloatRange(0), default=50.0, show_default=True,
                     help="Ring mode: a guest waiting for the host spins this long, then sleeps on a completion."),
        click.option("--phases", is_flag=True,
                     help="Stamp every hypercall at six points and report where its time goes."),
        click.option("--coalesce", is_flag=True,
                     help="Guest folds a write_pte to an entry already queued in the same batch (no flush_tlb or "
                          "release_pt between) into that op, so only the entry's last value is sent; the report "
                          "counts the ops saved, the final state is the same."),
        click.option("--status", is_flag=True,
                     help="Host reports each op's status in its reply to KVM_HC_MMU_OP (0 applied, -KVM_E* "
                          "refused), as the patch's v1 did, so a refused op is named from the first reply; "
                          f"needs --host-limit {MAX_STATUS_HOST_LIMIT} or less; no effect in ring mode."),
        click.option("--doorbell", type=click.Choice(["zmq", "pipe"]), default="zmq", show_default=True,
                     help="zmq: ZeroMQ REQ/ROUTER over ipc:// (the design's doorbell); pipe: a pair of OS pipes per "
                          "vCPU, no helper thread, to see what ZeroMQ's machinery costs."),
        click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
                     help="Seconds any process may stay silent before the run fails."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pvmmu")
def main() -> None:
    """Measure what batching paravirtual MMU ops into one hypercall buys.

    pvmmu runs a guest and a host as real processes: guest memory is POSIX
    shared memory, the hypercall is a ZeroMQ doorbell, and op buffers are the
    byte layouts of Linux's KVM_HC_MMU_OP. It counts the context switches of
    every thread of both.
    """
    install_signal_handlers()


@main.command()
@click.option("--mode", type=click.Choice(MODES), default="multicall", show_default=True,
              help="direct: one hypercall per op (before the patch); queued: ops queued in lazy mode, "
                   "one hypercall each at the flush; multicall: the whole queue per hypercall (the patch).")  # fmt: skip
@run_options
@click.option("--timeline", type=click.Path(dir_okay=False, writable=True),
              help="Write the first hypercalls (--timeline-max) as a Chrome trace-event file for Perfetto; "
                   "implies --phases.")  # fmt: skip
@click.option("--timeline-max", type=click.IntRange(1), default=10_000, show_default=True,
              help="Hypercalls per vCPU in the --timeline file.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the run record as one JSON object.")
def run(as_json: bool, **kwargs: Any) -> None:
    """Run one guest/host pair on a workload and report counts and switches."""
    cfg = RunConfig(**kwargs)
    record = _guarded(lambda: run_pair(cfg))
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(format_run(record))
    if not record["consistent"]:
        sys.exit(EXIT_INCONSISTENT)


@main.command()
def clean() -> None:
    """Remove shared-memory segments and run directories left by runs that were killed."""
    removed = sweep_stale()
    for name in removed:
        click.echo(f"removed /dev/shm/{name}")
    dirs = sweep_stale_run_dirs()
    for path in dirs:
        click.echo(f"removed {path}")
    live = list_segments()
    click.echo(
        f"{len(removed)} stale segment(s) and {len(dirs)} run director(ies) removed; "
        f"{len(live)} segment(s) in use by running hosts"
    )


def _guarded(action: Any) -> Any:
    """Run ``action``; turn expected failures into a message and an exit status, never a traceback."""
    try:
        return action()
    except RunError as exc:
        click.echo(f"pvmmu: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Terminated as t:
        click.echo(f"pvmmu: {t}; the pair was torn down", err=True)
        sys.exit(t.exit_code)


# --- compare, sweep, bench: measurements beside the theory (logic in their own modules) ---


def _plot_check(path: str | None) -> None:
    """Refuse --plot before measuring anything if it could not be written (exit 2, one line)."""
    if path is None:
        return
    from pvmmu.plot import PlotUnavailable, require

    try:
        require(path)
    except PlotUnavailable as exc:
        click.echo(f"pvmmu: {exc}", err=True)
        sys.exit(2)


@contextlib.contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[str], None] | None]:
    """A progress bar on stderr, only for a person watching (a terminal, not --json)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=False,
                           item_show_func=lambda s: s) as bar:  # fmt: skip
        started = False

        def step(what: str) -> None:
            nonlocal started
            bar.update(1 if started else 0, what)
            started = True

        yield step
        bar.update(1, "done")


def _finish(result: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], str], plot: Any,
            plot_path: str | None) -> None:  # fmt: skip
    """Print, plot, and exit 1 when any run was inconsistent."""
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(text(result))
    if plot_path:
        try:
            plot(result, plot_path)
        except OSError as exc:
            click.echo(f"pvmmu: could not write the plot: {exc}", err=True)
            sys.exit(EXIT_RUN_FAILED)
        click.echo(f"plot written to {plot_path}", err=True)  # stdout ends with the verdict (or is pure JSON)
    if not result["consistent"]:
        sys.exit(EXIT_INCONSISTENT)


_json_option = click.option("--json", "as_json", is_flag=True,
                            help="Print one JSON object: every run's full record, the summary rows, conditions.")  # fmt: skip
_plot_option = click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
                            help="Also draw the result as a PNG (needs matplotlib: pip install 'pvmmu[plot]').")  # fmt: skip


class _IntList(click.ParamType):
    """A comma-separated list of integers in a range, e.g. 128,256,512."""

    name = "LIST"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            items = [int(x) for x in str(value).split(",") if x.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not items:
            self.fail("the list is empty", param, ctx)
        for x in items:
            if not self.low <= x <= self.high:
                self.fail(f"{x} is not in the range {self.low}<=x<={self.high}", param, ctx)
        return tuple(dict.fromkeys(items))  # in the order given, once each


def _without(*names: str) -> Callable[[Any], Any]:
    """Drop options that ``run_options`` added below (click keeps them in ``__click_params__`` until the
    command is built), so a command can offer its own version of them."""

    def drop(f: Any) -> Any:
        f.__click_params__ = [p for p in f.__click_params__ if p.name not in names]
        return f

    return drop


class _Choices(click.ParamType):
    """A comma-separated list of names from a fixed set, e.g. any,same,split."""

    name = "LIST"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        items = [x.strip() for x in str(value).split(",") if x.strip()]
        if not items:
            self.fail("the list is empty", param, ctx)
        for x in items:
            if x not in self.choices:
                self.fail(f"{x!r} is not one of {', '.join(self.choices)}", param, ctx)
        return tuple(dict.fromkeys(items))


@main.command()
@_without("placement")
@run_options
@click.option("--modes", type=_Choices(MODES), default=",".join(MODES), show_default=True,
              help="The modes to run, comma-separated; direct (the baseline) must be one.")  # fmt: skip
@click.option("--placement", "placements", type=_Choices(("any", "same", "split")), default="any",
              show_default=True,
              help="CPU placement, or several comma-separated (any,same,split) to set placement beside "
                   "batching: each placement then has its own direct baseline.")  # fmt: skip
@click.option("--repeat", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Counted runs of each mode, interleaved (direct, queued, multicall, direct, ...); "
                   "3 or more for a significance test.")  # fmt: skip
@click.option("--warmup", type=click.IntRange(0, 100), default=1, show_default=True,
              help="Uncounted rounds before the counted ones (every mode once each).")  # fmt: skip
@_json_option
@_plot_option
def compare(
    modes: tuple[str, ...],
    placements: tuple[str, ...],
    repeat: int,
    warmup: int,
    as_json: bool,
    plot_path: str | None,
    **kwargs: Any,
) -> None:
    """Run every mode on the same op stream and compare each with direct, beside the theory.

    Each run is a fresh host/guest pair. A mode is called "N x fewer switches"
    or "faster" only when a one-sided Mann-Whitney U test says so (p <= 0.05).
    """
    from pvmmu import compare as cmp
    from pvmmu.plot import plot_compare

    _plot_check(plot_path)
    if "direct" not in modes:
        raise click.BadParameter("direct is the baseline: include it", param_hint="--modes")
    cfg = RunConfig(placement=placements[0], **kwargs)
    total = (repeat + warmup) * len(modes) * len(placements)
    with _progress(total, "pvmmu compare", not as_json) as progress:
        result = _guarded(lambda: cmp.compare(cfg, repeat, warmup, modes, progress, placements))
    _finish(result, as_json, cmp.format_compare, plot_compare, plot_path)


@main.command()
@click.option("--queue-bytes", "queues", type=_IntList(24, MAX_QUEUE_BYTES), default="128,256,512,1024,2048,4096",
              show_default=True, help="Guest mmu_queue sizes to try, comma-separated.")  # fmt: skip
@click.option("--host-limit", "limits", type=_IntList(24, 1 << 20), default="512,1024,4096", show_default=True,
              help="Bytes the host copies per hypercall, comma-separated (2.6.26: 512).")  # fmt: skip
@_without("queue_bytes", "host_limit")
@run_options
@click.option("--repeat", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Counted runs of every point, round-robin; the table shows medians.")  # fmt: skip
@click.option("--warmup", type=click.IntRange(0, 100), default=0, show_default=True,
              help="Uncounted rounds of the whole grid before the counted ones.")  # fmt: skip
@_json_option
@_plot_option
def sweep(queues: tuple[int, ...], limits: tuple[int, ...], repeat: int, warmup: int, as_json: bool,
          plot_path: str | None, **kwargs: Any) -> None:  # fmt: skip
    """Vary the queue size and the host's copy limit: switches per op and ops/s against ops per hypercall.

    Runs direct once as the baseline, then multicall at every queue size ×
    host limit, each a fresh pair, and sets each beside the theory.
    """
    from pvmmu import sweep as sw
    from pvmmu.plot import plot_sweep

    _plot_check(plot_path)
    cfg = RunConfig(**kwargs)
    total = (repeat + warmup) * (1 + len(queues) * len(limits))
    with _progress(total, "pvmmu sweep", not as_json) as progress:
        result = _guarded(lambda: sw.sweep(cfg, queues, limits, repeat, warmup, progress))
    _finish(result, as_json, sw.format_sweep, plot_sweep, plot_path)


@main.command()
@click.option("--round-trips", type=click.IntRange(1, 10**7), default=10000, show_default=True,
              help="Round trips per run of each doorbell (pvmmu: direct-mode write_pte, one hypercall each).")  # fmt: skip
@click.option("--repeat", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Runs of each doorbell, interleaved (pipe, zmq, pvmmu, pipe, ...); the table shows medians.")  # fmt: skip
@io_thread_option
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds any process may stay silent before the run fails.")  # fmt: skip
@_json_option
def bench(round_trips: int, repeat: int, io_thread: str, timeout: float, as_json: bool) -> None:
    """The doorbell's floor: raw os.pipe and pyzmq REQ/REP round trips beside pvmmu's direct hypercall.

    Each is measured between two fresh processes, switches counted on every
    thread of both, in the same sitting; pvmmu's overhead is printed as ratios.
    """
    from pvmmu import bench as bn

    cfg = RunConfig(mode="direct", workload="writes", ops=round_trips, io_thread=io_thread, timeout=timeout)
    with _progress(repeat * len(bn.DOORBELLS), "pvmmu bench", not as_json) as progress:
        result = _guarded(lambda: bn.bench(cfg, round_trips, repeat, progress))
    _finish(result, as_json, bn.format_bench, None, None)


# -- pvmmu fuzz (pvmmu/fuzz.py) ---------------------------------------------------------------

progress_option = click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show a status line on stderr."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")


@main.command()
@click.option(
    "--cases",
    type=click.IntRange(0),
    default=2000,
    show_default=True,
    help="Hostile messages and op buffers to send after the handshake.",
)
@click.option(
    "--seed", type=int, default=1, show_default=True, help="Seed of the case generator (a run is reproducible)."
)
@click.option(
    "--flood",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="First send this many malformed messages and check the host's memory grows by less than 10%.",
)
@click.option(
    "--vcpus",
    type=click.IntRange(1, MAX_VCPUS),
    default=2,
    show_default=True,
    help="vCPUs of the fuzzed guest (the fuzzer holds vCPU 0, and more when a case attaches them).",
)
@click.option(
    "--mem-mb",
    type=click.IntRange(8, 1024),
    default=8,
    show_default=True,
    help="Guest memory in MiB; all of it is compared with the model every --check-every cases.",
)
@click.option(
    "--host-limit",
    type=click.IntRange(8, 1 << 20),
    default=KVM_PV_MMU_OP_BUFFER,
    show_default=True,
    help="Bytes the host copies per hypercall.",
)
@click.option(
    "--check-every",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Compare all of guest memory with the model after this many cases (and at the end).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1),
    default=10.0,
    show_default=True,
    help="Seconds the host may take to answer one message before the fuzz fails.",
)
@progress_option
@json_option
def fuzz(progress: bool, as_json: bool, **kwargs: Any) -> None:
    """Attack a live host through its real doorbell and check it against the protocol.

    Exit status 0 when the host stayed up, every reply, every byte of guest memory,
    the shadow and every counter matched the protocol model, and nothing leaked;
    1 when any of that failed (the failures are listed); 3 when the host could not
    be started.
    """  # fmt: skip
    from pvmmu.fuzz import FuzzConfig, format_result, run_fuzz
    from pvmmu.progress import Progress

    result = _guarded(lambda: run_fuzz(FuzzConfig(**kwargs), Progress(enabled=progress)))
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_result(result))
    if not result.ok:
        sys.exit(EXIT_INCONSISTENT)


# -- pvmmu stress (pvmmu/stress.py) -------------------------------------------------------------


@main.command()
@click.option(
    "--duration",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Seconds to keep starting runs (default 60 unless --runs is given).",
)
@click.option("--runs", type=click.IntRange(1), default=None, help="Stop after this many runs.")
@click.option(
    "--kill-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Fraction of runs in which the host or a guest gets SIGKILL, SIGTERM or SIGINT at a random moment.",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the random configurations and faults.")
@click.option(
    "--max-ops",
    type=click.IntRange(20, 5000),
    default=2000,
    show_default=True,
    help="Largest workload size drawn (sizes are log-uniform from 20).",
)
@click.option(
    "--mem-mb",
    type=click.IntRange(48, 65536),
    default=48,
    show_default=True,
    help="Guest memory per run, MiB (48 holds the largest draw: 5000 pages on 3 vCPUs).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1),
    default=10.0,
    show_default=True,
    help="Seconds any process may stay silent before a run fails.",
)
@progress_option
@json_option
def stress(progress: bool, as_json: bool, duration: float | None, runs: int | None, **kwargs: Any) -> None:
    """Randomized runs (modes, workloads, sizes, queues, host limits, seeds), optionally with faults.

    Ends with a summary: runs, ops, outcomes by kind, faults, detection times,
    leaks. Exit status 0 when every failure is explained by an injected fault and
    nothing leaked; 1 otherwise; 130/143 when interrupted (after the summary).
    """  # fmt: skip
    from pvmmu.progress import Progress
    from pvmmu.stress import StressConfig, format_summary, run_stress

    if duration is None and runs is None:
        duration = 60.0
    cfg = StressConfig(duration=duration, runs=runs, **kwargs)
    summary = run_stress(cfg, Progress(enabled=progress))
    click.echo(json.dumps(summary.as_dict(), indent=2) if as_json else format_summary(summary))
    if summary.interrupted:
        sys.exit(summary.exit_code)
    if not summary.ok:
        sys.exit(EXIT_INCONSISTENT)


# Commands that live in their own modules register themselves on ``main`` when imported.
from pvmmu import cli_workloads  # noqa: E402, F401  (record, replay, maps)
