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
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from protocol.abi import KVM_PV_MMU_OP_BUFFER, MMU_QUEUE_SIZE
from protocol.messages import ControlReply, Reject, pack_control, unpack
from pvmmu import ctxsw
from pvmmu.doorbell import CallerDoorbell
from pvmmu.liveness import PidWatch
from pvmmu.shm import sweep_stale, unlink_segment

RECORD_VERSION = 1
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
    timeout: float = 10.0  # any single reply or handshake
    max_seconds: float = 3600.0  # the whole measured part


def runtime_dir() -> str:
    """Where per-run socket directories go: the user's runtime directory, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return xdg
    return tempfile.gettempdir()


def _how_it_died(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"died (signal {-returncode}, {name})"
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
            pass_fds=pass_fds,
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

    def __init__(self, endpoint: str, token: str, timeout_s: float, host_pid: int) -> None:
        self.token = token
        self.doorbell = CallerDoorbell(endpoint, timeout_s, host_pid)

    def __call__(self, command: str) -> dict[str, Any]:
        reply = unpack(self.doorbell.call(pack_control(self.token, command), f"control '{command}'"))
        if isinstance(reply, Reject):
            raise RunError(f"host refused control '{command}': {reply.reason}")
        if not isinstance(reply, ControlReply) or reply.command != command:
            raise RunError(f"host answered control '{command}' with {reply!r}")
        return reply.result

    def close(self) -> None:
        self.doorbell.close()


def run_pair(cfg: RunConfig) -> dict[str, Any]:
    """One measured run; returns the run record (see README). Raises RunError."""
    sweep_stale()
    rundir = tempfile.mkdtemp(prefix="pvmmu-", dir=runtime_dir())  # mode 0700
    endpoint = f"ipc://{rundir}/doorbell"
    token = secrets.token_hex(16)
    children: list[Child] = []
    control: HostControl | None = None
    shm_name: str | None = None
    try:
        host = Child(
            "host",
            [
                sys.executable, "-m", "host_proc",
                "--endpoint", endpoint,
                "--vcpus", str(cfg.vcpus),
                "--mem-mb", str(cfg.mem_mb),
                "--host-limit", str(cfg.host_limit),
                "--io-thread", cfg.io_thread,
                "--parent-pid", str(os.getpid()),
                "--token-stdin",
            ],
            rundir,
        )  # fmt: skip
        children.append(host)
        host.send(token)
        ready = host.read_event("ready", cfg.timeout, children)
        shm_name = ready["shm"]
        control = HostControl(endpoint, token, cfg.timeout, host.pid)

        guests = []
        for v in range(cfg.vcpus):
            g = Child(
                f"guest{v}" if cfg.vcpus > 1 else "guest",
                [
                    sys.executable, "-m", "guest_proc",
                    "--endpoint", endpoint,
                    "--vcpu", str(v),
                    "--mode", cfg.mode,
                    "--workload", cfg.workload,
                    "--ops", str(cfg.ops),
                    "--seed", str(cfg.seed + v),
                    "--queue-bytes", str(cfg.queue_bytes),
                    "--timeout", str(cfg.timeout),
                    "--io-thread", cfg.io_thread,
                    "--host-pid", str(host.pid),
                    "--parent-pid", str(os.getpid()),
                    "--barrier",
                ],
                rundir,
            )  # fmt: skip
            guests.append(g)
            children.append(g)
        # Setup (building the starting address space) is unmeasured but may take a while.
        for g in guests:
            g.read_event("ready", cfg.max_seconds, children)

        control("reset")
        before = {c.pid: ctxsw.sample(c.pid) for c in children}
        for g in guests:
            g.send("go")
        done = [g.read_event("done", cfg.max_seconds, children) for g in guests]
        after = {c.pid: ctxsw.sample(c.pid) for c in children}

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

        switches = {
            "guest": ctxsw.combine([ctxsw.delta(before[g.pid], after[g.pid]) for g in guests]),
            "host": ctxsw.delta(before[host.pid], after[host.pid]),
        }
        return build_record(cfg, done, checks, host_stats, host_check, switches, host.pid, [g.pid for g in guests])
    finally:
        # Tear down without being interrupted: a second Ctrl-C must not leave a leak.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        if control is not None:
            control.close()
        for c in reversed(children):
            c.stop()
        if shm_name is not None:
            unlink_segment(shm_name)  # only does something if the host could not (SIGKILL)
        shutil.rmtree(rundir, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def build_record(
    cfg: RunConfig,
    done: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    host_stats: dict[str, Any],
    host_check: dict[str, Any],
    switches: dict[str, Any],
    host_pid: int,
    guest_pids: list[int],
) -> dict[str, Any]:
    """The run record: what ``pvmmu run --json`` prints."""
    ops = {k: sum(d["ops"][k] for d in done) for k in ("write_pte", "flush_tlb", "release_pt", "total")}
    hypercalls = sum(d["hypercalls"] for d in done)
    wall = max(d["wall_s"] for d in done)
    total_switches = switches["guest"]["total"] + switches["host"]["total"]
    host_ops = host_stats["totals"]["ops"]
    problems = []
    if not host_check["ok"]:
        problems.append(f"host shadow vs guest memory: {host_check['mismatches']} mismatches, "
                        f"{host_check['stale_tlb']} stale TLB entries")  # fmt: skip
    for d, c in zip(done, checks, strict=True):
        v = d["vcpu"]
        if not c["ok"]:
            problems.append(f"vCPU {v}: guest memory differs from its page tables in {c['mismatches']} entries")
        if host_check["digests"].get(str(v)) != c["digest"]:
            problems.append(f"vCPU {v}: host and guest digests of the page tables differ")
    if host_ops != ops or host_stats["totals"]["hypercalls"] != hypercalls:
        problems.append(f"host applied {host_ops['total']} ops in {host_stats['totals']['hypercalls']} hypercalls, "
                        f"guests issued {ops['total']} in {hypercalls}")  # fmt: skip
    theory_hcs = sum(d["theory_hypercalls"] for d in done)
    theory = {"hypercalls": theory_hcs, "ops_per_hypercall": ops["total"] / theory_hcs if theory_hcs else 0.0}
    if theory_hcs != hypercalls:
        problems.append(f"{hypercalls} hypercalls where the op stream's theory says {theory_hcs}")
    lat = [d["hypercall_latency_us"] for d in done]
    return {
        "version": RECORD_VERSION,
        **{
            k: v
            for k, v in asdict(cfg).items()
            if k in ("mode", "workload", "vcpus", "queue_bytes", "host_limit", "seed", "io_thread")
        },
        "size": cfg.ops,
        "ops": ops,
        "hypercalls": hypercalls,
        "doorbells": sum(d["doorbells"] for d in done),
        "ops_per_hypercall": ops["total"] / hypercalls if hypercalls else 0.0,
        "wall_s": wall,
        "ops_per_s": ops["total"] / wall if wall > 0 else 0.0,
        "hypercall_latency_us": {
            "p50": sorted(x["p50"] for x in lat)[len(lat) // 2],
            "p99": max(x["p99"] for x in lat),
        },
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
            "shadow": {k: host_check[k] for k in ("pages", "entries", "mismatches", "stale_tlb")},
        },
        "guests": [
            {"pid": pid, "vcpu": d["vcpu"], "digest": c["digest"], "entries": c["entries"]}
            for pid, d, c in zip(guest_pids, done, checks, strict=True)
        ],
        "digest": "+".join(c["digest"] for c in checks),
    }
