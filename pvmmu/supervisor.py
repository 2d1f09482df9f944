"""The supervisor: start a host and its guest vCPUs, measure the workload, tear down.

``run_pair(config)`` is one measured run. It starts the host and the guests as
their own ``python -m`` processes (not forks of this one), handshakes, holds
every guest at a barrier after its unmeasured setup, samples every thread's
context switches, releases the guests, samples again when the last one reports
``done``, asks both sides to check the final state, and tears everything down.
Every wait is bounded and watches the other processes, so a dead or silent peer
ends the run with a ``RunError`` that says what happened, and nothing is left
behind: no process, no ``/dev/shm/pvmmu-*``, no socket file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from protocol.abi import KVM_PV_MMU_OP_BUFFER, MMU_QUEUE_SIZE
from protocol.messages import ControlReply, MessageError, Reject, pack_control, unpack
from pvmmu import ctxsw, phases, timeline
from pvmmu.doorbell import DoorbellTimeout, caller_for, pipe_address
from pvmmu.latency import histogram_percentile_us, merge
from pvmmu.liveness import PeerGone, PidWatch
from pvmmu.rundir import make_run_dir, runtime_dir, sweep_stale_run_dirs  # noqa: F401 (runtime_dir: re-exported)
from pvmmu.shm import sweep_stale, unlink_segment

RECORD_VERSION = 1
# The run's parameters a record repeats (the rest of RunConfig says how it was driven).
RECORDED_CONFIG = ("mode", "workload", "vcpus", "queue_bytes", "host_limit", "seed", "io_thread", "doorbell",
                   "placement", "coalesce", "status")  # fmt: skip
_DURING = re.compile(r"during (.*)$")

EXIT_INCONSISTENT = 1
EXIT_RUN_FAILED = 3


class RunError(RuntimeError):
    """A run that could not be completed; the message says why, for a person."""

    exit_code = EXIT_RUN_FAILED


@dataclass
class RunConfig:
    mode: str = "multicall"
    workload: str = "writes"
    ops: int = 10000
    seed: int = 1
    queue_bytes: int = MMU_QUEUE_SIZE
    host_limit: int = KVM_PV_MMU_OP_BUFFER
    vcpus: int = 1
    mem_mb: int = 256
    io_thread: str = "batch"  # SCHED_BATCH for ZeroMQ's I/O threads (see pvmmu.doorbell)
    doorbell: str = "zmq"  # or "pipe": OS pipes, no helper thread
    placement: str = "any"  # any | same | split: where host and guests may run
    poll_us: float = 500.0  # ring mode: the host polls this long after its last work
    spin_us: float = 50.0  # ring mode: a waiting guest spins this long before it sleeps
    phases: bool = False  # stamp every hypercall and break its time down
    coalesce: bool = False  # the guest folds a rewrite of an entry queued in the same batch into that op
    status: bool = False  # the host reports each op's status in its reply to KVM_HC_MMU_OP
    timeline: str | None = None  # write a Chrome trace-event file of the first hypercalls here
    timeline_max: int = 10_000
    timeout: float = 10.0  # any single reply or handshake
    max_seconds: float = 3600.0  # the whole measured part
    from_maps: str | None = None  # start from this maps/smaps file's address space (or a shipped capture's name)
    from_pid: int | None = None  # start from this live process's address space (/proc/PID/smaps)
    trace_out: str | None = None  # record the guest's op stream to this trace file
    replay: str | None = None  # replay this trace file instead of running the workload


def _how_it_died(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        name = signal.Signals(signum).name if signum else ""
    except ValueError:
        name = "?"
    if returncode < 0:
        return f"died (signal {signum}, {name})"
    if name:  # it caught the signal and exited 128 + N after its own teardown
        return f"exited with status {returncode} after {name}"
    return f"exited with status {returncode}"


class Child:
    """One spawned process: JSON events on its stdout, log in a file, stdin for commands."""

    def __init__(self, role: str, argv: list[str], rundir: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.role = role
        self.log_path = os.path.join(rundir, f"{role}.log")
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor, which tears down in order
            pass_fds=pass_fds,  # the pipe doorbell's ends, if that is the transport
        )
        self.pid = self.proc.pid
        self.watch = PidWatch(self.pid)
        self._buf = b""

    def send(self, line: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise RunError(
                f"{self.role} process {self.pid} {_how_it_died(self.proc.poll())}{self._log_hint()}"
            ) from None

    def read_event(self, expect: str, timeout_s: float, others: list[Child]) -> dict[str, Any]:
        """The next JSON event from this child; it must be ``expect``. Bounded, and watches ``others``.

        When another process dies meanwhile, this child gets a moment to report
        what it was doing (a guest names the hypercall it was blocked in), and
        the error says both: who died, how, and during what.
        """
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        dead: Child | None = None
        while b"\n" not in self._buf:
            if dead is None:
                dead = self._first_dead(others)
                if dead is not None:
                    deadline = min(deadline, time.monotonic() + 1.0)
            left = deadline - time.monotonic()
            if left <= 0:
                if dead is not None:
                    raise RunError(self.describe_death(dead, f"while {self.role} was working towards '{expect}'"))
                raise RunError(f"{self.role} process {self.pid} did not report '{expect}' within {timeout_s:g}s")
            r, _, _ = select.select([fd], [], [], min(left, 0.1))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    dead = dead or self._first_dead(others)
                    if dead is not None:
                        raise RunError(self.describe_death(dead, f"while {self.role} was working towards '{expect}'"))
                    raise RunError(self.describe_death(self, f"before reporting '{expect}'"))
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            event = json.loads(line)
        except ValueError:
            raise RunError(
                f"{self.role} process {self.pid} wrote something that is not an event: {line[:200]!r}"
            ) from None
        if event.get("event") == "error":
            message = str(event.get("message"))
            dead = dead or self._first_dead(others)
            during = _DURING.search(message)
            if dead is not None and during:
                raise RunError(self.describe_death(dead, f"during {during.group(1)} of {self.role}"))
            raise RunError(f"{self.role} failed during {event.get('phase')}: {message}")
        if event.get("event") != expect:
            raise RunError(f"{self.role} reported {event.get('event')!r}, expected {expect!r}")
        return event

    def _first_dead(self, others: list[Child]) -> Child | None:
        for other in others:
            if other is not self and not other.watch.alive():
                return other
        return None

    def describe_death(self, who: Child, when: str) -> str:
        try:
            who.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        return f"{who.role} process {who.pid} {_how_it_died(who.proc.returncode)} {when}{who._log_hint()}"

    def wait_exit(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Make sure the process is gone: SIGTERM, a moment's grace, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(2.0) is None:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self.watch.close()
        self._log.close()

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _log_hint(self) -> str:
        tail = self.log_tail(3)
        return f"\n  its last words: {tail}" if tail else ""


class HostControl:
    """The supervisor's control line to the host (same doorbell, secret token)."""

    def __init__(self, address: str, token: str, timeout_s: float, host_pid: int, host: Child | None = None) -> None:
        self.token = token
        self.host = host  # to say how the host died, if it does
        self.doorbell = caller_for(address, timeout_s, host_pid)

    def __call__(self, command: str) -> dict[str, Any]:
        try:
            reply = unpack(self.doorbell.call(pack_control(self.token, command), f"control '{command}'"))
        except PeerGone as exc:
            if self.host is None:
                raise RunError(str(exc)) from None
            raise RunError(self.host.describe_death(self.host, f"during control '{command}'")) from None
        except (DoorbellTimeout, MessageError) as exc:
            raise RunError(str(exc)) from None
        if isinstance(reply, Reject):
            raise RunError(f"host refused control '{command}': {reply.reason}")
        if not isinstance(reply, ControlReply) or reply.command != command:
            raise RunError(f"host answered control '{command}' with {reply!r}")
        return reply.result

    def close(self) -> None:
        self.doorbell.close()


def placement_plan(policy: str, vcpus: int) -> tuple[list[int] | None, list[list[int] | None]]:
    """CPUs for the host and for each guest: any (leave it to the scheduler), same (all on one CPU),
    split (host on one CPU, guests spread round-robin over the others)."""
    cpus = sorted(os.sched_getaffinity(0))
    if policy == "any":
        return None, [None] * vcpus
    if policy == "same":
        return [cpus[0]], [[cpus[0]] for _ in range(vcpus)]
    if policy == "split":
        if len(cpus) < 2:
            raise RunError(f"--placement split needs two CPUs; this process may only use CPU {cpus[0]}")
        others = cpus[1:]
        return [cpus[0]], [[others[v % len(others)]] for v in range(vcpus)]
    raise RunError(f"unknown placement {policy!r}: any, same or split")


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def _cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of every thread of ``pid`` so far."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    return t.user, t.system


def _thread_cpus(pid: int) -> list[int]:
    """The CPUs any thread of ``pid`` may run on (the union of their affinities)."""
    cpus: set[int] = set()
    try:
        for t in psutil.Process(pid).threads():
            cpus.update(psutil.Process(t.id).cpu_affinity())
    except psutil.NoSuchProcess:
        pass
    return sorted(cpus)


def _minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], a[1] - b[1]


def cpu_record(guests: list[tuple[float, float]], host: tuple[float, float], ops: int) -> dict[str, Any]:
    """CPU seconds of the measured part, per side, and per op in microseconds."""
    g_user, g_sys = sum(x[0] for x in guests), sum(x[1] for x in guests)
    side = {
        "guest": {"user": g_user, "system": g_sys, "total": g_user + g_sys},
        "host": {"user": host[0], "system": host[1], "total": host[0] + host[1]},
    }
    side["per_op_us"] = {k: side[k]["total"] / ops * 1e6 if ops else 0.0 for k in ("guest", "host")}
    return side


class Links:
    """Where host, guests and the supervisor's control line find the doorbell.

    zmq: one endpoint for all. pipe: a pair of OS pipes per guest and one for
    control, made here and inherited; each end is closed in this process as soon
    as the child that owns it has it, so a dead peer reads as end-of-file.
    """

    def __init__(self, kind: str, vcpus: int, endpoint: str) -> None:
        self.kind = kind
        self.endpoint = endpoint
        self._caller: list[tuple[int, int]] = []  # per guest, then control: (read, write) of the caller
        self._host: list[tuple[int, int]] = []
        self._open: set[int] = set()
        if kind == "pipe":
            for _ in range(vcpus + 1):
                to_host_r, to_host_w = os.pipe()
                to_caller_r, to_caller_w = os.pipe()
                self._caller.append((to_caller_r, to_host_w))
                self._host.append((to_host_r, to_caller_w))
                self._open |= {to_host_r, to_host_w, to_caller_r, to_caller_w}
        elif kind != "zmq":
            raise RunError(f"unknown doorbell {kind!r}: zmq or pipe")

    @property
    def host_address(self) -> str:
        return pipe_address(self._host) if self.kind == "pipe" else self.endpoint

    @property
    def host_fds(self) -> tuple[int, ...]:
        return tuple(fd for pair in self._host for fd in pair)

    def guest_address(self, v: int) -> str:
        return pipe_address([self._caller[v]]) if self.kind == "pipe" else self.endpoint

    def guest_fds(self, v: int) -> tuple[int, ...]:
        return self._caller[v] if self.kind == "pipe" else ()

    @property
    def control_address(self) -> str:
        return pipe_address([self._caller[-1]]) if self.kind == "pipe" else self.endpoint

    @property
    def control_fds(self) -> tuple[int, ...]:
        return self._caller[-1] if self.kind == "pipe" else ()

    def handed_over(self, fds: tuple[int, ...]) -> None:
        """These ends now belong to a child (or the control caller): close or forget our copies."""
        for fd in fds:
            if fd in self._open:
                self._open.discard(fd)
                if fd not in self.control_fds:
                    os.close(fd)

    def close(self) -> None:
        for fd in self._open:
            try:
                os.close(fd)
            except OSError:
                pass
        self._open.clear()


@dataclass
class HostedRun:
    """A running host and the processes spawned beside it (see ``hosted``)."""

    rundir: str
    links: Links
    host: Child
    control: HostControl
    shm_name: str
    children: list[Child]  # the host first; everything here is stopped at the end
    prepared: Any = None  # what ``hosted``'s ``prepare`` returned
    on_spawn: Callable[[Child], None] | None = None

    def spawn(self, role: str, argv: list[str], pass_fds: tuple[int, ...] = ()) -> Child:
        child = Child(role, argv, self.rundir, pass_fds)
        self.links.handed_over(pass_fds)
        self.children.append(child)
        if self.on_spawn is not None:
            self.on_spawn(child)
        return child


@contextmanager
def hosted(
    cfg: RunConfig,
    on_spawn: Callable[[Child], None] | None = None,
    prepare: Callable[[str], Any] | None = None,
) -> Iterator[HostedRun]:
    """Start a host in a fresh run directory; on leaving, tear down everything that belongs to it.

    Used by ``run_pair`` and ``pvmmu fuzz``. ``prepare(rundir)`` runs before any
    process starts (run_pair checks its input files there). ``on_spawn`` is told
    about each process as soon as it exists (``pvmmu stress`` uses it to inject
    faults). Teardown runs with SIGINT/SIGTERM/SIGHUP blocked: a second Ctrl-C must
    not leave a leak.
    """
    sweep_stale()
    sweep_stale_run_dirs()
    host_cpus, _ = placement_plan(cfg.placement, cfg.vcpus)
    links = Links(cfg.doorbell, cfg.vcpus, "")  # checks the kind before anything is made
    token = secrets.token_hex(16)
    children: list[Child] = []
    control: HostControl | None = None
    shm_name: str | None = None
    rundir: str | None = None
    try:
        rundir = make_run_dir()  # inside the try: a Ctrl-C right after it still removes it
        links.endpoint = f"ipc://{rundir}/doorbell"
        prepared = prepare(rundir) if prepare is not None else None
        host = Child(
            "host",
            [
                sys.executable, "-m", "host_proc",
                "--endpoint", links.host_address,
                "--vcpus", str(cfg.vcpus),
                "--mem-mb", str(cfg.mem_mb),
                "--host-limit", str(cfg.host_limit),
                "--poll-us", str(cfg.poll_us),
                "--io-thread", cfg.io_thread,
                "--parent-pid", str(os.getpid()),
                "--run-dir", rundir,
                "--token-stdin",
                *(["--phases"] if cfg.phases or cfg.timeline is not None else []),
                *(["--status"] if cfg.status else []),
                *(["--cpus", _cpu_list(host_cpus)] if host_cpus else []),
            ],
            rundir,
            links.host_fds,
        )  # fmt: skip
        links.handed_over(links.host_fds)
        children.append(host)
        if on_spawn is not None:
            on_spawn(host)
        host.send(token)
        ready = host.read_event("ready", cfg.timeout, children)
        shm_name = ready["shm"]
        control = HostControl(links.control_address, token, cfg.timeout, host.pid, host)
        links.handed_over(links.control_fds)  # the control caller owns them now
        yield HostedRun(rundir, links, host, control, shm_name, children, prepared, on_spawn)
    finally:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        if control is not None:
            control.close()
        links.close()
        for c in reversed(children):
            c.stop()
        if shm_name is not None:
            unlink_segment(shm_name)  # only does something if the host could not (SIGKILL)
        if rundir is not None:
            shutil.rmtree(rundir, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def run_pair(cfg: RunConfig, on_spawn: Callable[[Child], None] | None = None) -> dict[str, Any]:
    """One measured run; returns the run record (see README). Raises RunError."""
    from pvmmu.inputs import finish_outputs, prepare_inputs, record_details  # imports this module

    _, guest_cpus = placement_plan(cfg.placement, cfg.vcpus)
    phases_on = cfg.phases or cfg.timeline is not None
    if phases_on and cfg.mode == "ring":
        raise RunError("--phases and --timeline time hypercall round trips; ring mode makes none (it publishes)")
    # every input file is checked before any process starts
    with hosted(cfg, on_spawn, prepare=lambda rundir: prepare_inputs(cfg, rundir)) as run:
        host, control, children, links, inputs = run.host, run.control, run.children, run.links, run.prepared
        guests = []
        for v in range(cfg.vcpus):
            g = run.spawn(
                f"guest{v}" if cfg.vcpus > 1 else "guest",
                [
                    sys.executable, "-m", "guest_proc",
                    "--endpoint", links.guest_address(v),
                    "--vcpu", str(v),
                    "--mode", cfg.mode,
                    "--workload", cfg.workload,
                    "--ops", str(cfg.ops),
                    "--seed", str(cfg.seed + v),
                    "--queue-bytes", str(cfg.queue_bytes),
                    "--spin-us", str(cfg.spin_us),
                    "--timeout", str(cfg.timeout),
                    "--io-thread", cfg.io_thread,
                    "--host-pid", str(host.pid),
                    "--parent-pid", str(os.getpid()),
                    "--barrier",
                    *(["--phases"] if phases_on else []),
                    *(["--coalesce"] if cfg.coalesce else []),
                    *(["--status"] if cfg.status else []),
                    *(["--timeline-max", str(cfg.timeline_max)] if cfg.timeline else []),
                    *(["--cpus", _cpu_list(guest_cpus[v])] if guest_cpus[v] else []),
                    *inputs.guest_argv,
                ],
                links.guest_fds(v),
            )  # fmt: skip
            guests.append(g)
        # Setup (building the starting address space) is unmeasured but may take a while.
        for g in guests:
            g.read_event("ready", cfg.max_seconds, children)

        control("reset")
        cpu_before = {c.pid: _cpu_times(c.pid) for c in children}
        before = {c.pid: ctxsw.sample(c.pid) for c in children}
        for g in guests:
            g.send("go")
        done = [g.read_event("done", cfg.max_seconds, children) for g in guests]
        after = {c.pid: ctxsw.sample(c.pid) for c in children}
        cpu_after = {c.pid: _cpu_times(c.pid) for c in children}
        observed = {c.pid: _thread_cpus(c.pid) for c in children}

        host_stats = control("stats")
        host_check = control("check")
        checks = []
        for g in guests:
            g.send("check")
            checks.append(g.read_event("check", cfg.max_seconds, children))
        for g in guests:
            g.send("quit")
        for g in guests:
            code = g.wait_exit(cfg.timeout)
            if code != 0:
                raise RunError(g.describe_death(g, "while leaving") if code is not None else f"{g.role} did not exit")
        control("shutdown")
        if host.wait_exit(cfg.timeout) != 0:
            raise RunError(host.describe_death(host, "while shutting down"))

        guest_switches = [ctxsw.delta(before[g.pid], after[g.pid]) for g in guests]
        host_switches = ctxsw.delta(before[host.pid], after[host.pid])
        record = build_record(
            cfg, done, checks, host_stats, host_check, guest_switches, host_switches, host.pid, [g.pid for g in guests]
        )
        record["placement"] = {
            "policy": cfg.placement,
            "host_cpus": placement_plan(cfg.placement, cfg.vcpus)[0],
            "guest_cpus": guest_cpus,
            "cpus_available": sorted(os.sched_getaffinity(0)),
            # what the kernel says each process's threads may use, read during the run
            "observed": {"host": observed[host.pid], "guests": [observed[g.pid] for g in guests]},
        }
        record["cpu_s"] = cpu_record(
            [_minus(cpu_after[g.pid], cpu_before[g.pid]) for g in guests],
            _minus(cpu_after[host.pid], cpu_before[host.pid]),
            record["ops"]["total"],
        )
        if phases_on:
            record["phases"] = phases.summarize([d["phases"] for d in done], max(d["stamp_cost_ns"] for d in done))
        if cfg.timeline:
            trace = timeline.chrome_trace(
                host.pid,
                [{"vcpu": d["vcpu"], "pid": g.pid, "stamps": d["timeline"], "total": d["timeline_total"]}
                 for d, g in zip(done, guests, strict=True)],
            )  # fmt: skip
            try:
                timeline.write(cfg.timeline, trace)
            except OSError as exc:
                raise RunError(f"cannot write the timeline to {cfg.timeline}: {exc.strerror}") from None
            record["timeline"] = {"path": cfg.timeline, "events": len(trace["traceEvents"])}
        record.update(record_details(inputs, done, checks))
        if cfg.trace_out:
            record["trace"] = finish_outputs(cfg, inputs)
        return record


def build_record(
    cfg: RunConfig,
    done: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    host_stats: dict[str, Any],
    host_check: dict[str, Any],
    guest_switches: list[dict[str, Any]],
    host_switches: dict[str, Any],
    host_pid: int,
    guest_pids: list[int],
) -> dict[str, Any]:
    """The run record: what ``pvmmu run --json`` prints."""
    ops = {k: sum(d["ops"][k] for d in done) for k in ("write_pte", "flush_tlb", "release_pt", "total")}
    coalesced = sum(d["coalesced"] for d in done)
    # what reached the host: the kernel's ops less the write_ptes folded into one already queued
    applied = {**ops, "write_pte": ops["write_pte"] - coalesced, "total": ops["total"] - coalesced}
    hypercalls = sum(d["hypercalls"] for d in done)
    wall = max(d["wall_s"] for d in done)
    switches = {"guest": ctxsw.combine(guest_switches), "host": host_switches}
    total_switches = switches["guest"]["total"] + switches["host"]["total"]
    host_ops = host_stats["totals"]["ops"]
    problems = []
    if not host_check["ok"]:
        problems.append(
            f"host shadow vs guest memory: {host_check['mismatches']} mismatches, "
            f"{host_check['stale_tlb']} stale TLB entries"
        )
    per_vcpu = []
    for pid, d, c, sw in zip(guest_pids, done, checks, guest_switches, strict=True):
        v = d["vcpu"]
        host_v = host_stats["per_vcpu"].get(str(v), {"hypercalls": 0, "ops": {"total": 0}})
        agrees = host_check["digests"].get(str(v)) == c["digest"]
        if not c["ok"]:
            problems.append(f"vCPU {v}: guest memory differs from its page tables in {c['mismatches']} entries")
        if not agrees:
            problems.append(f"vCPU {v}: host and guest digests of the page tables differ")
        if c.get("expect_digest", c["digest"]) != c["digest"]:
            problems.append(f"vCPU {v}: the replayed trace left page tables {c['digest'][:12]}, "
                            f"the recording left {c['expect_digest'][:12]}")  # fmt: skip
        # in ring mode ops arrive through the ring: the host sees no hypercall in the measured part
        expect_hc = 0 if cfg.mode == "ring" else d["hypercalls"]
        if (host_v["hypercalls"], host_v["ops"]["total"]) != (expect_hc, d["ops"]["total"] - d["coalesced"]):
            folded = f" ({d['coalesced']} of them coalesced)" if d["coalesced"] else ""
            problems.append(
                f"vCPU {v}: host served {host_v['hypercalls']} hypercalls / {host_v['ops']['total']} ops, "
                f"the guest issued {d['hypercalls']} / {d['ops']['total']}{folded}"
            )
        per_vcpu.append(
            {
                "vcpu": v,
                "pid": pid,
                "ops": d["ops"],
                "coalesced": d["coalesced"],
                "hypercalls": d["hypercalls"],
                "theory_hypercalls": d["theory_hypercalls"],
                "doorbells": d["doorbells"],
                "wall_s": d["wall_s"],
                "ops_per_s": d["ops_per_s"],
                "ring": d.get("ring"),
                "hypercall_latency_us": d["hypercall_latency_us"],
                "ctx_switches": {**sw, "per_op": sw["total"] / d["ops"]["total"] if d["ops"]["total"] else 0.0},
                "digest": c["digest"],
                "entries": c["entries"],
            }
        )
    if host_ops != applied or host_stats["totals"]["hypercalls"] != (0 if cfg.mode == "ring" else hypercalls):
        folded = f" ({coalesced} of them coalesced)" if coalesced else ""
        problems.append(
            f"host applied {host_ops['total']} ops in {host_stats['totals']['hypercalls']} hypercalls, "
            f"guests issued {ops['total']}{folded} in {hypercalls}"
        )
    theory_hcs = sum(d["theory_hypercalls"] for d in done)
    theory = {"hypercalls": theory_hcs, "ops_per_hypercall": ops["total"] / theory_hcs if theory_hcs else 0.0}
    if theory_hcs != hypercalls:
        problems.append(f"{hypercalls} hypercalls where the op stream's theory says {theory_hcs}")
    if len(done) == 1:
        latency = {k: done[0]["hypercall_latency_us"][k] for k in ("p50", "p99")}
    else:  # percentiles over every vCPU's hypercalls, from their merged histograms (1% bins)
        hist = merge(d["latency_hist"] for d in done)
        latency = {"p50": histogram_percentile_us(hist, 50), "p99": histogram_percentile_us(hist, 99)}
    return {
        "version": RECORD_VERSION,
        **{k: v for k, v in asdict(cfg).items() if k in RECORDED_CONFIG},
        "size": cfg.ops,
        "ops": ops,
        "coalesced": coalesced,
        "op_status": _op_status(done) if cfg.status else None,
        "hypercalls": hypercalls,
        "doorbells": sum(d["doorbells"] for d in done),
        "ops_per_hypercall": ops["total"] / hypercalls if hypercalls else 0.0,
        "wall_s": wall,
        "ops_per_s": ops["total"] / wall if wall > 0 else 0.0,
        "hypercall_latency_us": latency,
        "ctx_switches": {
            **switches,
            "total": total_switches,
            "per_op": total_switches / ops["total"] if ops["total"] else 0.0,
        },
        "consistent": not problems,
        "problems": problems,
        "theory": theory,
        "host": {
            "pid": host_pid,
            "hypercalls": host_stats["totals"]["hypercalls"],
            "ops": host_ops,
            "partial": host_stats["totals"]["partial"],
            "refused": host_stats["totals"]["refused"],
            "rejected": host_stats["rejected"],
            "ring": {**host_stats["ring"], "passes": host_stats["totals"]["ring_passes"]}
            if cfg.mode == "ring"
            else None,
            "shadow": {k: host_check[k] for k in ("pages", "entries", "mismatches", "stale_tlb")},
        },
        "per_vcpu": per_vcpu,
        "fairness": fairness(per_vcpu),
        "digest": "+".join(c["digest"] for c in checks),
    }


def _op_status(done: list[dict[str, Any]]) -> dict[str, int]:
    """--status: the replies that carried per-op statuses (none in ring mode, which makes no KVM_HC_MMU_OP)."""
    return {k: sum(d["op_status"][k] for d in done) for k in ("replies", "statuses")}


STARVED_SHARE = 0.1  # a vCPU below a tenth of the fastest one's ops/s is starving


def fairness(per_vcpu: list[dict[str, Any]]) -> dict[str, Any]:
    """How evenly the host served its vCPUs: throughput spread, Jain's index, latency spread."""
    rates = [p["ops_per_s"] for p in per_vcpu]
    p50 = [p["hypercall_latency_us"]["p50"] for p in per_vcpu]
    p99 = [p["hypercall_latency_us"]["p99"] for p in per_vcpu]
    squares = sum(r * r for r in rates)
    return {
        "ops_per_s": {
            "min": min(rates),
            "max": max(rates),
            "max_over_min": max(rates) / min(rates) if min(rates) else None,
        },
        # (sum x)^2 / (n * sum x^2): 1.0 when every vCPU got the same throughput, 1/n when one got it all.
        "jain_index": sum(rates) ** 2 / (len(rates) * squares) if squares else None,
        "latency_p50_us": {"min": min(p50), "max": max(p50)},
        "latency_p99_us": {"min": min(p99), "max": max(p99)},
        "starved": [p["vcpu"] for p in per_vcpu if p["ops_per_s"] < STARVED_SHARE * max(rates)],
    }
