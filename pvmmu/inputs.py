"""What a run takes in and gives out besides a workload name: real address spaces and trace files.

The supervisor checks every input here before it starts a single process, so a
bad maps file, a dead pid or a corrupt trace fails the command at once with one
line naming the problem (exit status 2), and nothing is half-applied. A
recorded trace is written by the guest into the run directory and only copied
to its destination, atomically, once the run has finished and the file has been
read back and checked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guest_proc.procmaps import MapsError, parse_maps
from guest_proc.trace import load_trace
from guest_proc.workloads import PROCESS_WORKLOADS
from protocol.messages import MAX_STATUS_HOST_LIMIT, status_limit_error
from protocol.trace import Trace, TraceError
from pvmmu.maps import capture_pid, read_maps_file, resolve
from pvmmu.supervisor import RunConfig, RunError

EXIT_USAGE = 2


class BadInput(RunError):
    """An input file or process that cannot be used; exit status 2, like any usage error."""

    exit_code = EXIT_USAGE


@dataclass
class RunInputs:
    guest_argv: list[str] = field(default_factory=list)
    source: str = "synthetic"  # where the starting address space came from
    trace_part: str | None = None  # where the guest writes the trace it records
    trace: Trace | None = None  # the trace being replayed
    trace_path: str | None = None


def prepare_inputs(cfg: RunConfig, rundir: str) -> RunInputs:
    """Check the run's inputs and say what the guests need to be told; raises BadInput."""
    given = [name for name, v in (("--from-maps", cfg.from_maps), ("--from-pid", cfg.from_pid),
                                  ("a replayed trace", cfg.replay)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise BadInput(f"{' and '.join(given)} exclude each other: one starting address space per run")
    if (cfg.from_maps is not None or cfg.from_pid is not None) and cfg.workload not in PROCESS_WORKLOADS:
        raise BadInput(f"--from-maps/--from-pid apply to {', '.join(PROCESS_WORKLOADS)}; "
                       f"{cfg.workload} does not start from a process")  # fmt: skip
    if cfg.status and cfg.host_limit > MAX_STATUS_HOST_LIMIT:
        raise BadInput(status_limit_error(cfg.host_limit))
    if (cfg.trace_out or cfg.replay) and cfg.vcpus != 1:
        raise BadInput("a trace is one vCPU's op stream: record and replay with --vcpus 1")
    inputs = RunInputs()
    try:
        if cfg.from_maps is not None:
            path = resolve(cfg.from_maps)
            parse_maps(read_maps_file(path), source=cfg.from_maps)
            inputs.guest_argv += ["--from-maps", os.path.abspath(path)]
            inputs.source = f"maps {cfg.from_maps}"
        elif cfg.from_pid is not None:
            text, comm = capture_pid(cfg.from_pid)
            parse_maps(text, source=f"/proc/{cfg.from_pid}/smaps")
            path = os.path.join(rundir, f"pid-{cfg.from_pid}.smaps")  # captured once: the process moves on
            with open(path, "w") as f:
                f.write(text)
            inputs.guest_argv += ["--from-maps", path]
            inputs.source = f"pid {cfg.from_pid} ({comm})"
    except MapsError as exc:
        raise BadInput(f"--{'from-maps' if cfg.from_maps is not None else 'from-pid'}: {exc}") from None
    if cfg.trace_out:
        folder = os.path.dirname(os.path.abspath(cfg.trace_out))
        if not os.path.isdir(folder):
            raise BadInput(f"cannot write the trace to {cfg.trace_out}: no directory {folder}")
        if not os.access(folder, os.W_OK):
            raise BadInput(f"cannot write the trace to {cfg.trace_out}: {folder} is not writable")
        inputs.trace_part = os.path.join(rundir, "trace.part")
        inputs.guest_argv += ["--trace-out", inputs.trace_part]
    if cfg.replay:
        try:
            inputs.trace = load_trace(cfg.replay)
        except TraceError as exc:
            raise BadInput(str(exc)) from None
        mem = inputs.trace.header["mem_bytes"]
        if mem != cfg.mem_mb << 20:
            raise BadInput(f"{cfg.replay} was recorded with --mem-mb {mem >> 20}; replay it with the same")
        inputs.trace_path = cfg.replay
        inputs.guest_argv += ["--replay", os.path.abspath(cfg.replay)]
        inputs.source = f"trace {cfg.replay} ({inputs.trace.header['source']})"
    return inputs


def finish_outputs(cfg: RunConfig, inputs: RunInputs) -> dict[str, Any] | None:
    """Check the trace the guest recorded, then put it where it was asked for; its record entry."""
    if not cfg.trace_out or inputs.trace_part is None:
        return None
    try:
        trace = load_trace(inputs.trace_part)
    except TraceError as exc:  # the guest wrote something it cannot read back: a bug, not bad input
        raise RunError(f"the recorded trace does not read back: {exc}") from None
    try:
        replace_file(cfg.trace_out, lambda tmp: shutil.copyfile(inputs.trace_part, tmp))
    except OSError as exc:
        raise RunError(f"cannot write the trace to {cfg.trace_out}: {exc.strerror or exc}") from None
    return {"file": cfg.trace_out, "events": trace.events, "run_events": len(trace.sections["run"]),
            "digest": trace.trailer["digest"]}  # fmt: skip


def replace_file(path: str, write: Callable[[str], object]) -> None:
    """Make ``path`` with ``write(tmp)`` and rename it into place: never a half-written file, no leftover."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # an OSError, or a signal's Terminated: leave nothing behind either way
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def record_details(inputs: RunInputs, done: list[dict[str, Any]], checks: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's workload keys: address space, op mix, kernel paths, trace."""
    spaces = [d.get("address_space") for d in done]
    space = None
    if all(spaces):
        space = {"source": inputs.source, **{k: sum(s[k] for s in spaces) for k in spaces[0]}}
    mix = {k: sum(d["op_mix"][k] for d in done) for k in done[0]["op_mix"]}
    ops = mix["in_lazy"] + mix["outside"]
    mix["best_reduction"] = ops / mix["multicall_hypercalls"] if mix["multicall_hypercalls"] else 1.0
    paths: dict[str, dict[str, int]] = {}
    for d in done:
        for name, counts in d["paths"].items():
            into = paths.setdefault(name, {"calls": 0, "ops": 0, "hypercalls": 0})
            for k in into:
                into[k] += counts[k]
    details: dict[str, Any] = {"address_space": space, "op_mix": mix, "paths": paths}
    if inputs.trace is not None:
        recorded = inputs.trace.trailer["digest"]
        details["trace"] = {"file": inputs.trace_path, "events": inputs.trace.events,
                            "run_events": len(inputs.trace.sections["run"]), "recorded_digest": recorded,
                            "matches": all(c["digest"] == recorded for c in checks)}  # fmt: skip
    return details


__all__ = ["BadInput", "RunInputs", "finish_outputs", "prepare_inputs", "record_details"]
