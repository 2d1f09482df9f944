"""``pvmmu record``, ``pvmmu replay`` and ``pvmmu maps``: trace files and real processes' address spaces.

Imported at the end of ``pvmmu.cli``, which it extends; the exit statuses are
the CLI's (0 ok, 1 inconsistent, 2 usage or bad input, 3 run failed).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from guest_proc.paravirt import MODES
from guest_proc.procmaps import KEPT_FIELDS, MapsError, parse_maps, summary, trim_smaps
from guest_proc.trace import load_trace
from protocol.trace import TraceError
from pvmmu.cli import _guarded, main, run_options
from pvmmu.inputs import BadInput, replace_file
from pvmmu.maps import capture_pid, read_maps_file, resolve, shipped
from pvmmu.report import format_run
from pvmmu.supervisor import EXIT_INCONSISTENT, RunConfig, run_pair

MODE_HELP = "direct: one hypercall per op; queued: one per op at each flush; multicall: the whole queue (the patch)."


def some_run_options(*names: str) -> Callable[[Any], Any]:
    """Just the named options of ``run_options`` (the same option objects, so they cannot drift apart)."""
    probe = run_options(lambda: None)
    chosen = [p for p in probe.__click_params__ if p.name in names]

    def apply(f: Any) -> Any:
        if not hasattr(f, "__click_params__"):
            f.__click_params__ = []
        f.__click_params__.extend(chosen)
        return f

    return apply


def _finish(record: dict[str, Any], as_json: bool) -> None:
    click.echo(json.dumps(record, indent=2) if as_json else format_run(record))
    if not record["consistent"]:
        sys.exit(EXIT_INCONSISTENT)


@main.command()
@click.option("--mode", type=click.Choice(MODES), default="multicall", show_default=True,
              help=f"Mode of the recording run ({MODE_HELP}); the trace is the same in every mode.")  # fmt: skip
@run_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Trace file to write (replaced only once the run has finished and the trace reads back).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the run record as one JSON object.")
def record(output: str, as_json: bool, **kwargs: Any) -> None:
    """Run a workload and record the guest's op stream, with its lazy MMU sections, to a trace file.

    The trace is what the guest kernel asked for (write_pte, flush_tlb,
    release_pt, enter and leave lazy MMU mode), before any queueing: the
    starting address space's setup, then the measured part. 'pvmmu replay'
    plays it in any mode.
    """
    cfg = RunConfig(**kwargs, trace_out=output)
    _finish(_guarded(lambda: run_pair(cfg)), as_json)


@main.command()
@click.argument("trace_file", type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(MODES), default="multicall", show_default=True, help=MODE_HELP)
@some_run_options("queue_bytes", "host_limit", "io_thread", "timeout", "coalesce", "status")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as one JSON object.")
def replay(trace_file: str, as_json: bool, **kwargs: Any) -> None:
    """Play a recorded trace through a real guest/host pair in --mode.

    The workload, size, seed and guest memory are the recording's. The whole
    file is checked before the pair starts: a corrupt or truncated trace fails
    with the byte offset of the problem (exit 2), never half-applied. The run is
    consistent only if the page tables end as they did when it was recorded.
    """

    def read_header() -> dict[str, Any]:
        try:
            return load_trace(trace_file).header
        except TraceError as exc:
            raise BadInput(str(exc)) from None

    header = _guarded(read_header)
    cfg = RunConfig(**kwargs, workload=header["workload"], ops=header["size"], seed=header["seed"],
                    vcpus=1, mem_mb=header["mem_bytes"] >> 20, replay=trace_file)  # fmt: skip
    _finish(_guarded(lambda: run_pair(cfg)), as_json)


@main.command("maps")
@click.argument("source", required=False)
@click.option("--pid", type=int, help="Read this live process's /proc/PID/smaps instead of a file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Save the capture here: the smaps text cut down to the maps lines and "
                   f"{', '.join(KEPT_FIELDS)}, with a comment saying where it came from.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def maps_command(source: str | None, pid: int | None, output: str | None, as_json: bool) -> None:
    """Show the address space pvmmu would build from SOURCE (a maps/smaps file or a shipped capture) or --pid.

    Without arguments, lists the shipped captures. With -o, saves a capture
    that --from-maps takes.
    """
    if source is not None and pid is not None:
        raise click.UsageError("give a SOURCE file or --pid, not both")
    _guarded(lambda: _maps(source, pid, output, as_json))


def _maps(source: str | None, pid: int | None, output: str | None, as_json: bool) -> None:
    try:
        if source is None and pid is None:
            rows = {name: summary(parse_maps(read_maps_file(path), name)) for name, path in sorted(shipped().items())}
            if as_json:
                click.echo(json.dumps(rows, indent=2))
            for name, s in [] if as_json else rows.items():
                click.echo(f"{name:<10} {_describe(s)}")
            return
        if pid is not None:
            text, comm = capture_pid(pid)
            origin = f"pid {pid} ({comm})"
        else:
            assert source is not None
            path = resolve(source)
            text, origin = read_maps_file(path), path
        s = summary(parse_maps(text, origin))
    except MapsError as exc:
        raise BadInput(str(exc)) from None
    click.echo(json.dumps({"source": origin, **s}, indent=2) if as_json else f"{origin}: {_describe(s)}")
    if output:
        kept = ", ".join(KEPT_FIELDS)
        head = f"# {origin}, captured by 'pvmmu maps' on {time.strftime('%Y-%m-%d')}: smaps cut to the maps lines and {kept}\n"
        try:
            replace_file(output, lambda tmp: Path(tmp).write_text(head + trim_smaps(text)))
        except OSError as exc:
            raise BadInput(f"cannot write {output}: {exc.strerror or exc}") from None
        click.echo(f"saved to {output}")


def _describe(s: dict[str, Any]) -> str:
    rss = "" if s["smaps"] else " (no Rss: plain maps, every accessible page counted)"
    return (f"{s['vmas']} VMAs, {s['mapped_pages']} pages mapped, {s['resident_pages']} resident{rss} "
            f"({s['private_writable_pages']} private writable), {s['page_tables']} page tables")  # fmt: skip
