"""``pvmmu stress``: many randomized runs, optionally with processes killed at random moments.

Each run draws a mode, workload, size, seed, vCPU count, queue size, host limit and
I/O-thread setting, and is a complete ``run_pair``. With ``--kill-rate P`` a
fraction P of the runs also gets a fault: a helper thread sends SIGKILL, SIGTERM
or SIGINT to the host or a guest at a random moment after it starts (through a
pidfd, so the signal can never reach a recycled pid).

After every run the stress loop checks that nothing was left behind (the run's
segment, its run directory and socket, any of its processes) and classifies the
outcome:

- ``ok``: consistent, no fault delivered;
- ``absorbed``: a fault was delivered but the run had already done its work
  and still completed (e.g. a guest killed while it was leaving);
- an explained failure (``host SIGKILL`` ...): a fault was delivered and the
  run's error names the process that was signalled;
- ``unexplained``: any other failure, or an inconsistent run. There must be none.

Exit status 0 when every failure was explained and nothing leaked; 1 otherwise.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from guest_proc.paravirt import MODES
from guest_proc.workloads import WORKLOADS
from protocol.layout import MAX_QUEUE_BYTES
from protocol.messages import MAX_STATUS_HOST_LIMIT
from protocol.ring import MAX_RING_BYTES
from pvmmu.liveness import Terminated
from pvmmu.progress import Progress
from pvmmu.rundir import run_dirs
from pvmmu.shm import list_segments
from pvmmu.supervisor import Child, RunConfig, RunError, run_pair

FAULT_SIGNALS = (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


@dataclass
class StressConfig:
    duration: float | None = 60.0
    runs: int | None = None
    kill_rate: float = 0.0
    seed: int = 1
    max_ops: int = 2000
    mem_mb: int = 48
    timeout: float = 10.0


@dataclass
class StressSummary:
    config: dict[str, Any]
    runs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # ok, absorbed, "host SIGKILL", ..., unexplained
    ops: int = 0
    hypercalls: int = 0
    faults_planned: int = 0
    faults_delivered: int = 0
    faults_missed: int = 0  # the target had already exited when its moment came
    detection_s: list[float] = field(default_factory=list)  # signal -> run_pair returned, explained failures
    unexplained: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: str | None = None  # "terminated by SIGINT" when Ctrl-C ended it
    exit_code: int = 0  # 128 + the signal, when interrupted

    @property
    def ok(self) -> bool:
        return not self.unexplained and not self.leaks

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["detection_s"] = _detection_stats(self.detection_s)
        return {**d, "ok": self.ok}


def _detection_stats(xs: list[float]) -> dict[str, float | int]:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    return {"n": len(s), "p50": round(s[len(s) // 2], 3), "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))], 3),
            "max": round(s[-1], 3)}  # fmt: skip


def random_config(rng: random.Random, cfg: StressConfig) -> RunConfig:
    """A random but valid run: every draw is something ``pvmmu run`` accepts and can finish."""
    mode = rng.choice(MODES)
    # ring mode keeps at least two queues in its ring (guest_proc.paravirt.ring_capacity)
    top_queue = MAX_RING_BYTES // 2 if mode == "ring" else MAX_QUEUE_BYTES
    status = rng.random() < 0.25
    top_limit = MAX_STATUS_HOST_LIMIT if status else 1 << 16
    cpus = len(os.sched_getaffinity(0))
    return RunConfig(
        mode=mode,
        workload=rng.choice(sorted(WORKLOADS)),
        ops=int(math.exp(rng.uniform(math.log(20), math.log(cfg.max_ops)))),  # log-uniform: many small, some big
        seed=rng.randrange(1 << 30),
        queue_bytes=rng.choice([24, 64, 256, 1024, 1024, 4096, rng.randint(24, top_queue)]),
        host_limit=rng.choice([24, 64, 512, 512, 1024, 4096, rng.randint(24, top_limit)]),
        vcpus=rng.choice([1, 1, 1, 2, 3]),
        mem_mb=cfg.mem_mb,
        io_thread=rng.choice(["batch", "normal"]),
        doorbell=rng.choice(["zmq", "zmq", "pipe"]),
        placement=rng.choice(["any", "any", "same", "split"] if cpus > 1 else ["any", "same"]),
        poll_us=rng.choice([0.0, 50.0, 50.0, 500.0]),
        spin_us=rng.choice([0.0, 50.0, 50.0, 500.0]),
        coalesce=rng.random() < 0.25,
        status=status,
        timeout=cfg.timeout,
        max_seconds=max(60.0, cfg.timeout * 6),
    )


class FaultInjector:
    """Signals one process of a run at a random moment after it starts, from a helper thread."""

    def __init__(self, target: str, sig: signal.Signals, delay_s: float, pick: float) -> None:
        self.target = target  # "host" or "guest"
        self.sig = sig
        self.delay_s = delay_s
        self.pick = pick  # in [0, 1): which of the guests, drawn from the run's seed
        self.victim_pid: int | None = None
        self.sent_at: float | None = None
        self.missed = False
        self._pidfds: list[tuple[int, int]] = []  # (pid, pidfd) of candidate victims, ours to close
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def on_spawn(self, child: Child) -> None:
        if child.role == self.target or (self.target == "guest" and child.role.startswith("guest")):
            with self._lock:
                # Our own pidfd: the child's is closed at teardown, and a closed fd number may be reused.
                self._pidfds.append((child.pid, os.pidfd_open(child.pid)))
            if not self._started.is_set():
                self._started.set()
                self._thread.start()

    def _run(self) -> None:
        if self._cancel.wait(self.delay_s):
            return
        with self._lock:
            if not self._pidfds:
                return
            pid, fd = self._pidfds[int(self.pick * len(self._pidfds))]
            try:
                signal.pidfd_send_signal(fd, self.sig)
                self.victim_pid, self.sent_at = pid, time.monotonic()
            except ProcessLookupError:
                self.missed = True

    def finish(self) -> None:
        self._cancel.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            for _, fd in self._pidfds:
                os.close(fd)
            self._pidfds.clear()


def _leaks(spawned: list[Child]) -> list[str]:
    found = []
    for child in spawned:
        try:
            p = psutil.Process(child.pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(f"process {child.pid} ({child.role}) still running")
        except psutil.NoSuchProcess:
            pass
        if child.role == "host":
            found += [f"/dev/shm/{n}" for n in list_segments() if n.startswith(f"pvmmu-{child.pid}-")]
    found += run_dirs(os.getpid())  # a run dir holds the doorbell socket and the logs
    return found


def run_stress(cfg: StressConfig, progress: Progress | None = None) -> StressSummary:
    """Run until ``duration`` seconds or ``runs`` runs; SIGINT/SIGTERM stop it early, summary kept."""
    progress = progress or Progress(enabled=False)
    rng = random.Random(cfg.seed)
    summary = StressSummary(config=asdict(cfg))
    t0 = time.monotonic()
    try:
        while (cfg.runs is None or summary.runs < cfg.runs) and (
            cfg.duration is None or time.monotonic() - t0 < cfg.duration
        ):
            _one_run(rng, cfg, summary)
            elapsed = time.monotonic() - t0
            progress.update(
                f"stress: {elapsed:.0f}s, {summary.runs} runs ({', '.join(f'{k} {v}' for k, v in sorted(summary.outcomes.items()))}), "
                f"{summary.ops} ops, {summary.faults_delivered} faults, {len(summary.leaks)} leaks"
            )
    except Terminated as t:  # the run in progress was torn down; keep what was counted
        summary.interrupted = str(t)
        summary.exit_code = t.exit_code
    finally:
        summary.wall_s = time.monotonic() - t0
        progress.done()
    return summary


def _one_run(rng: random.Random, cfg: StressConfig, summary: StressSummary) -> None:
    run_cfg = random_config(rng, cfg)
    injector = None
    if rng.random() < cfg.kill_rate:
        summary.faults_planned += 1
        # Early moments hit start-up and setup, later ones the measured part and the teardown.
        injector = FaultInjector(
            rng.choice(["host", "guest"]), rng.choice(FAULT_SIGNALS), rng.uniform(0.0, 1.0), rng.random()
        )
    spawned: list[Child] = []

    def on_spawn(child: Child) -> None:
        spawned.append(child)
        if injector is not None:
            injector.on_spawn(child)

    record = error = None
    try:
        record = run_pair(run_cfg, on_spawn)
    except RunError as exc:
        error = str(exc)
    finally:
        ended = time.monotonic()
        if injector is not None:
            injector.finish()
    summary.runs += 1
    summary.leaks += _leaks(spawned)
    delivered = injector is not None and injector.victim_pid is not None
    if injector is not None:
        summary.faults_delivered += delivered
        summary.faults_missed += injector.missed
    what = (f"{time.strftime('%H:%M:%S')} {run_cfg.mode}/{run_cfg.workload} size {run_cfg.ops} seed {run_cfg.seed} "
            f"vcpus {run_cfg.vcpus} queue {run_cfg.queue_bytes} limit {run_cfg.host_limit}")  # fmt: skip
    if record is not None:
        summary.ops += record["ops"]["total"]
        summary.hypercalls += record["hypercalls"]
        if not record["consistent"]:
            summary.count("unexplained")
            summary.unexplained.append(f"{what}: inconsistent: {'; '.join(record['problems'])}")
        else:
            summary.count("absorbed" if delivered else "ok")
        return
    assert error is not None
    if delivered and injector is not None and f"process {injector.victim_pid} " in error:
        summary.count(f"{injector.target} {injector.sig.name}")
        summary.detection_s.append(ended - (injector.sent_at or ended))
        return
    summary.count("unexplained")
    fault = (
        f" (fault: {injector.target} {injector.sig.name} pid {injector.victim_pid})" if delivered and injector else ""
    )
    summary.unexplained.append(f"{what}{fault}: {error.splitlines()[0]}")


def format_summary(s: StressSummary) -> str:
    c = s.config
    limit = f"{c['duration']:g} s" if c["duration"] is not None else f"{c['runs']} runs"
    d = _detection_stats(s.detection_s)
    lines = [
        f"pvmmu stress: {s.runs} runs in {s.wall_s:.0f} s (limit {limit}, kill rate {c['kill_rate']:g}, seed {c['seed']})"
        + (f", {s.interrupted}" if s.interrupted else ""),
        f"  outcomes   {', '.join(f'{k} {v}' for k, v in sorted(s.outcomes.items())) or 'none'}",
        f"  work       {s.ops} ops in {s.hypercalls} hypercalls (completed runs)",
        f"  faults     {s.faults_planned} planned, {s.faults_delivered} delivered, "
        f"{s.faults_planned - s.faults_delivered - s.faults_missed} not sent (the run ended first), "
        f"{s.faults_missed} missed (the target had just exited)",
    ]
    if d["n"]:
        lines.append(
            f"  detection  signal to pvmmu run's error: p50 {d['p50']:.2f} s, p99 {d['p99']:.2f} s, max {d['max']:.2f} s"
        )
    lines.append(f"  leaks      {len(s.leaks)}" + (": " + ", ".join(s.leaks[:10]) if s.leaks else ""))
    lines += [f"  ! unexplained: {u}" for u in s.unexplained[:20]]
    lines.append(
        f"  result     {'PASS' if s.ok else 'FAIL'}: {len(s.unexplained)} unexplained failures, {len(s.leaks)} leaks"
    )
    return "\n".join(lines)
