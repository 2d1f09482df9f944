"""``python -m guest_proc``: one guest vCPU running guest-kernel MMU work.

It connects to the host, maps guest memory, builds the workload's starting
address space (unmeasured), then runs the measured part. Progress is reported as
JSON lines on stdout: ``ready``, ``done`` (the measured counters), ``check``
(guest memory against what it meant to write, and the digest of its tables).

With ``--barrier`` (what ``pvmmu run`` uses) it waits on stdin between phases
for the words ``go``, ``check`` and ``quit``, so the supervisor can sample
context switches around exactly the measured part. Without it, it runs straight
through.

``--from-maps FILE`` starts the workload from that maps/smaps file's address
space; ``--trace-out FILE`` records the op stream (``docs/trace.md``);
``--replay FILE`` replays a trace instead of running a workload.

Exit status: 0 done; 1 bad set-up (the host refused the handshake, memory
missing, an unusable maps file or trace); 3 the host refused an op or made no progress; 4 the host died or went
silent; 128 + N after signal N.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import sys
import time

import click

from guest_proc.pagetable import OutOfGuestMemory
from guest_proc.paravirt import MODES, HypercallError, KvmParaState
from guest_proc.procmaps import MapsError
from guest_proc.shell import GuestError, GuestSession
from guest_proc.trace import Replay, TracedKvmParaState, TraceRecorder, load_trace, prepare_recorded
from guest_proc.workloads import WORKLOADS, prepare, prepare_workload
from protocol.abi import MMU_QUEUE_SIZE
from protocol.layout import MAX_QUEUE_BYTES, MAX_VCPUS, LayoutError
from protocol.messages import MessageError
from protocol.trace import TraceError
from pvmmu.doorbell import DoorbellTimeout
from pvmmu.liveness import PeerGone, Terminated, die_with_parent, install_signal_handlers
from pvmmu.maps import load_vmas
from pvmmu.options import cpus_option, io_thread_option, parent_pid_option, pin_to
from pvmmu.shm import SharedMemoryError

EXIT_SETUP = 1
EXIT_HYPERCALL = 3
EXIT_PEER = 4
_TERMINATING = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class BarrierError(RuntimeError):
    pass


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


_pending = bytearray()  # stdin bytes read but not yet consumed (unbuffered, so select stays true)


def _await(word: str, timeout_s: float) -> None:
    """Block until the supervisor writes ``word`` on stdin (bounded; EOF means it is gone)."""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in _pending:
        r, _, _ = select.select([0], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            raise BarrierError(f"supervisor did not say {word!r} within {timeout_s:g}s")
        chunk = os.read(0, 4096)
        if not chunk:
            raise BarrierError(f"supervisor closed the control pipe while the guest waited for {word!r}")
        _pending.extend(chunk)
    line, _, rest = bytes(_pending).partition(b"\n")
    _pending[:] = rest
    said = line.decode(errors="replace").strip()
    if said != word:
        raise BarrierError(f"supervisor said {said!r}, expected {word!r}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--endpoint", required=True, help="The host's doorbell: a ZeroMQ endpoint, or fd:R:W for an inherited pipe pair."
)
@click.option("--vcpu", type=click.IntRange(0, MAX_VCPUS - 1), default=0, show_default=True, help="This vCPU's id.")
@click.option("--mode", type=click.Choice(MODES), default="multicall", show_default=True, help="Flush strategy.")
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="writes", show_default=True)
@click.option("--ops", "size", type=click.IntRange(1), default=10000, show_default=True, help="Workload size.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the workload's randomness.")
@click.option(
    "--queue-bytes",
    type=click.IntRange(24, MAX_QUEUE_BYTES),
    default=MMU_QUEUE_SIZE,
    show_default=True,
    help="Size of the per-vCPU mmu_queue (the patch: 1024).",
)
@click.option(
    "--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True, help="Seconds to wait for any reply."
)
@io_thread_option
@click.option("--phases", is_flag=True, help="Stamp every hypercall and report where its time went.")
@click.option(
    "--coalesce",
    is_flag=True,
    help="Fold a write_pte to an entry already queued in the same batch (no flush_tlb or release_pt between) "
    "into that op, instead of queueing another.",
)
@click.option(
    "--status",
    is_flag=True,
    help="Expect each op's status in the host's replies (a host started with --status) and name a refused op "
    "from the reply that refused it.",
)
@click.option(
    "--spin-us",
    type=click.FloatRange(0),
    default=50.0,
    show_default=True,
    help="Ring mode: how long a vCPU waiting for the host spins before it sleeps on a completion.",
)
@click.option(
    "--timeline-max",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="With --phases, also report the raw stamps of the first N hypercalls (for a timeline).",
)
@cpus_option
@click.option("--host-pid", type=int, help="Watch this host process from the start (else from the handshake).")
@parent_pid_option
@click.option("--barrier", is_flag=True, help="Wait for go/check/quit on stdin between phases.")
@click.option("--from-maps", help="Start the workload from the address space in this maps/smaps file.")
@click.option("--trace-out", help="Record the paravirt op stream to this trace file.")
@click.option("--replay", help="Replay this trace file instead of running a workload.")
def main(
    endpoint: str,
    vcpu: int,
    mode: str,
    workload: str,
    size: int,
    seed: int,
    queue_bytes: int,
    timeout: float,
    io_thread: str,
    phases: bool,
    coalesce: bool,
    status: bool,
    spin_us: float,
    timeline_max: int,
    cpus: str | None,
    host_pid: int | None,
    parent_pid: int | None,
    barrier: bool,
    from_maps: str | None,
    trace_out: str | None,
    replay: str | None,
) -> None:
    """Run one guest vCPU against a host."""
    pin_to(cpus)  # first, so every thread started later inherits it
    install_signal_handlers()
    session = None
    recorder = None
    code = 0
    phase = "handshake"
    try:
        die_with_parent(parent_pid)
        factory = KvmParaState
        if trace_out:
            recorder = TraceRecorder(trace_out)
            factory = functools.partial(TracedKvmParaState, recorder=recorder)
        session = GuestSession(
            endpoint,
            vcpu,
            queue_bytes,
            mode,
            timeout,
            host_pid,
            batch_io=io_thread == "batch",
            phases=phases,
            timeline_max=timeline_max,
            pv_factory=factory,
            spin_us=spin_us,
            coalesce=coalesce,
            status=status,
        )
        phase = "setup"
        expect_digest = None
        if replay:
            trace = load_trace(replay)
            _check_trace_fits(trace.header, session)
            work = prepare_workload(session.kernel, Replay(session.kernel, trace))
            expect_digest = trace.trailer["digest"]
        else:
            vmas = load_vmas(from_maps) if from_maps else None
            if recorder is not None:
                source = f"maps {os.path.basename(from_maps)}" if from_maps else "synthetic"
                work = prepare_recorded(session.kernel, recorder, workload, size, seed, vmas, source,
                                        session.layout.vcpus)  # fmt: skip
            else:
                work = prepare(session.kernel, workload, size, seed, vmas)
        space = work.address_space()
        _emit({"event": "ready", "pid": os.getpid(), "vcpu": vcpu, "setup_hypercalls": session.seq,
               "address_space": space})  # fmt: skip
        if barrier:
            _await("go", max(timeout, 60.0))
        phase = "run"
        session.start_measuring()
        t0 = time.perf_counter()
        work.run()
        wall = time.perf_counter() - t0
        _emit({"event": "done", **session.measured(wall), "address_space": space})
        phase = "check"
        if barrier:
            _await("check", max(timeout, 60.0))
        check = session.kernel.check()
        if recorder is not None:
            recorder.finish(check["digest"], check["entries"])
        if expect_digest is not None:
            check["expect_digest"] = expect_digest
        _emit({"event": "check", "vcpu": vcpu, **check})
        if barrier:
            _await("quit", max(timeout, 60.0))
        session.bye()
    except Terminated as t:
        code = t.exit_code
    except (HypercallError, OutOfGuestMemory) as exc:
        code = _fail(EXIT_HYPERCALL, phase, str(exc))
    except (PeerGone, DoorbellTimeout) as exc:
        code = _fail(EXIT_PEER, phase, str(exc))
    except (GuestError, MessageError, SharedMemoryError, LayoutError, BarrierError, MapsError, TraceError,
            ValueError) as exc:  # fmt: skip
        code = _fail(EXIT_SETUP, phase, str(exc))
    except OSError as exc:  # the trace file could not be written
        code = _fail(EXIT_SETUP, phase, f"{exc.filename or 'file'}: {exc.strerror or exc}")
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATING)
        if recorder is not None:
            recorder.close()
        if session is not None:
            session.close()
    sys.exit(code)


def _check_trace_fits(header: dict, session: GuestSession) -> None:
    """A trace names guest-physical addresses: it replays only into the memory layout it was recorded in."""
    area = session.pv.area
    have = (session.layout.mem_bytes, area.pool_gpa, area.pool_bytes)
    want = (header["mem_bytes"], header["pool_gpa"], header["pool_bytes"])
    if have != want:
        raise GuestError(
            f"the trace was recorded with {want[0] >> 20} MiB of guest memory and a frame pool at {want[1]:#x} "
            f"({want[2]} bytes); this guest has {have[0] >> 20} MiB, pool {have[1]:#x} ({have[2]} bytes)"
        )


def _fail(code: int, phase: str, message: str) -> int:
    print(f"pvmmu guest: {message}", file=sys.stderr)
    try:
        _emit({"event": "error", "phase": phase, "message": message, "exit": code})
    except (BrokenPipeError, OSError):
        pass
    return code


if __name__ == "__main__":
    main()
