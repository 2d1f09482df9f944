"""``pvmmu bench``: the doorbell's own floor, beside pvmmu's direct hypercall, in one sitting.

Three round trips between two fresh processes, measured alike (switches of
every thread of both, sampled from outside around exactly the measured part):

- ``os.pipe``: a raw pipe ping-pong, the cheapest blocking wake-up;
- ``pyzmq REQ/REP``: the transport pvmmu's doorbell is built on, with nothing
  of pvmmu around it (same message size, same I/O-thread scheduling);
- ``pvmmu direct``: ``run_pair`` in mode direct, one hypercall per write_pte.

pvmmu's overhead is the ratio of its round trip to the raw ones. Rounds are
interleaved (pipe, zmq, pvmmu, pipe, ...) so machine noise hits all alike.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pvmmu import conditions, ctxsw, stats
from pvmmu.compare import FORMAT_VERSION, Progress, format_warnings, header, machine_warnings, plural
from pvmmu.supervisor import Child, RunConfig, RunError, run_pair, runtime_dir

DOORBELLS = ("os.pipe", "pyzmq REQ/REP", "pvmmu direct")


def _threads(d: dict[str, Any]) -> dict[str, int]:
    """One side's switches split into its main thread and all the others (ZeroMQ's)."""
    main = d["threads"].get("main", {"voluntary": 0, "involuntary": 0})
    m = main["voluntary"] + main["involuntary"]
    return {"main": m, "other": d["total"] - m, "total": d["total"]}


def _row(name: str, n: int, wall: float, latency: dict[str, float], client: dict, server: dict) -> dict[str, Any]:
    total = client["total"] + server["total"]
    return {
        "doorbell": name,
        "round_trips": n,
        "wall_s": wall,
        "round_trip_us": wall / n * 1e6,
        "latency_us": {"p50": latency["p50"], "p99": latency["p99"]},
        "switches": {"client": client, "server": server, "total": total, "per_round_trip": total / n},
        "per_side": {"client": _threads(client), "server": _threads(server)},
    }


def raw_round_trips(transport: str, n: int, io_thread: str, timeout: float) -> dict[str, Any]:
    """``n`` round trips between two fresh ``pvmmu.benchpeer`` processes over ``pipe`` or ``zmq``."""
    rundir = tempfile.mkdtemp(prefix="pvmmu-", dir=runtime_dir())  # mode 0700
    common = [sys.executable, "-m", "pvmmu.benchpeer", "--transport", transport, "--timeout", str(timeout),
              "--io-thread", io_thread, "--parent-pid", str(os.getpid())]  # fmt: skip
    children: list[Child] = []
    fds: list[int] = []
    try:
        if transport == "pipe":
            to_server_r, to_server_w = os.pipe()
            to_client_r, to_client_w = os.pipe()
            fds = [to_server_r, to_server_w, to_client_r, to_client_w]
            server_args = ["--rfd", str(to_server_r), "--wfd", str(to_client_w)]
            client_args = ["--rfd", str(to_client_r), "--wfd", str(to_server_w)]
            server_fds, client_fds = (to_server_r, to_client_w), (to_client_r, to_server_w)
        else:
            endpoint = ["--endpoint", f"ipc://{rundir}/bench"]
            server_args, client_args, server_fds, client_fds = endpoint, endpoint, (), ()
        server = Child("server", [*common, "--role", "server", *server_args], rundir, server_fds)
        children.append(server)
        server.read_event("ready", timeout, children)
        client = Child("client", [*common, "--role", "client", "--round-trips", str(n), *client_args], rundir,
                       client_fds)  # fmt: skip
        children.append(client)
        for fd in fds:  # only the peers may hold the pipe ends, or a dead peer's EOF never comes
            os.close(fd)
        fds = []
        client.read_event("ready", timeout, children)
        before = {c.pid: ctxsw.sample(c.pid) for c in children}
        client.send("go")
        done = client.read_event("done", 3600.0, children)
        after = {c.pid: ctxsw.sample(c.pid) for c in children}
        client.send("quit")
        server.read_event("done", timeout, children)
        for c in children:
            if c.wait_exit(timeout) != 0:
                raise RunError(c.describe_death(c, "while leaving"))
        name = "os.pipe" if transport == "pipe" else "pyzmq REQ/REP"
        return _row(name, n, done["wall_s"], done["latency_us"], ctxsw.delta(before[client.pid], after[client.pid]),
                    ctxsw.delta(before[server.pid], after[server.pid]))  # fmt: skip
    finally:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        for fd in fds:
            os.close(fd)
        for c in reversed(children):
            c.stop()
        shutil.rmtree(rundir, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def pvmmu_round_trips(cfg: RunConfig) -> dict[str, Any]:
    """pvmmu's own hypercall round trip: a direct run, one write_pte per hypercall."""
    r = run_pair(cfg)
    if not r["consistent"]:
        raise RunError(f"the pvmmu direct run ended inconsistent: {'; '.join(r['problems'])}")
    cs = r["ctx_switches"]
    row = _row("pvmmu direct", r["hypercalls"], r["wall_s"], r["hypercall_latency_us"], cs["guest"], cs["host"])
    row["record"] = r
    return row


def bench(cfg: RunConfig, round_trips: int, repeat: int = 3, progress: Progress | None = None) -> dict[str, Any]:
    """Every doorbell ``repeat`` times, interleaved; medians and pvmmu's overhead ratios."""
    cond = conditions.collect(cfg)
    direct = replace(cfg, mode="direct", workload="writes", ops=round_trips)
    measures: dict[str, Callable[[], dict[str, Any]]] = {
        "os.pipe": lambda: raw_round_trips("pipe", round_trips, cfg.io_thread, cfg.timeout),
        "pyzmq REQ/REP": lambda: raw_round_trips("zmq", round_trips, cfg.io_thread, cfg.timeout),
        "pvmmu direct": lambda: pvmmu_round_trips(direct),
    }
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in DOORBELLS}
    runnable = []
    for rnd in range(repeat):
        for name in DOORBELLS:
            if progress is not None:
                progress(f"{name} round {rnd + 1}/{repeat}")
            runnable.append(conditions.runnable_others())
            samples[name].append(measures[name]())
    rows = []
    for name in DOORBELLS:
        runs = samples[name]
        rows.append({
            "doorbell": name,
            "n": len(runs),
            "round_trip_us": stats.summarize([r["round_trip_us"] for r in runs]),
            "latency_p50_us": stats.summarize([r["latency_us"]["p50"] for r in runs]),
            "latency_p99_us": stats.summarize([r["latency_us"]["p99"] for r in runs]),
            "switches_per_round_trip": stats.summarize([r["switches"]["per_round_trip"] for r in runs]),
            **{f"{side}_{part}_per_round_trip": stats.summarize([r["per_side"][side][part] / r["round_trips"] for r in runs])
               for side in ("client", "server") for part in ("main", "other")},
        })  # fmt: skip
    by = {r["doorbell"]: r for r in rows}
    pv = by["pvmmu direct"]
    overhead = {
        base: {
            "round_trip": pv["round_trip_us"]["median"] / by[base]["round_trip_us"]["median"],
            "latency_p50": pv["latency_p50_us"]["median"] / by[base]["latency_p50_us"]["median"],
            "switches": pv["switches_per_round_trip"]["median"] / by[base]["switches_per_round_trip"]["median"],
        }
        for base in ("os.pipe", "pyzmq REQ/REP")
    }
    return {
        "version": FORMAT_VERSION,
        "command": "bench",
        "conditions": cond,
        "round_trips": round_trips,
        "repeat": repeat,
        "rows": rows,
        "overhead": overhead,
        "runnable_others": runnable,
        "runs": {name: samples[name] for name in DOORBELLS},
        "consistent": True,  # a pvmmu run that is not raises RunError instead
        "warnings": machine_warnings(cond, runnable),
    }


def format_bench(result: dict[str, Any]) -> str:
    n = result["repeat"]
    lines = header(
        f"pvmmu bench: {result['round_trips']} round trips per run, each between two fresh processes",
        result,
        f"{plural(n, 'run')} of each doorbell, interleaved ({', '.join(DOORBELLS)}, ...)",
    )
    lines += [
        f"  {'median of ' + str(n):<16}{'round trip (us)':>24}   {'switches per round trip, all threads':>46}",
        f"  {'doorbell':<16}{'mean':>8}{'p50':>8}{'p99':>8}   {'client main':>12}{'other':>7}"
        f"{'server main':>13}{'other':>7}{'total':>7}{'σ/mean':>9}",
    ]
    for r in result["rows"]:
        m = {k: r[k]["median"] for k in r if isinstance(r[k], dict)}
        lines.append(
            f"  {r['doorbell']:<16}{m['round_trip_us']:>8.1f}{m['latency_p50_us']:>8.1f}{m['latency_p99_us']:>8.1f}   "
            f"{m['client_main_per_round_trip']:>12.2f}{m['client_other_per_round_trip']:>7.2f}"
            f"{m['server_main_per_round_trip']:>13.2f}{m['server_other_per_round_trip']:>7.2f}"
            f"{m['switches_per_round_trip']:>7.2f}{stats.relative_stdev(r['round_trip_us']):>9.0%}"
        )
    lines.append("  (pvmmu direct: client = guest, server = host; its mean includes building each op in guest memory)")
    lines.append("")
    o = result["overhead"]
    lines.append(
        f"pvmmu's direct hypercall takes {o['pyzmq REQ/REP']['round_trip']:.2f}x the time of a raw pyzmq REQ/REP "
        f"round trip and {o['os.pipe']['round_trip']:.2f}x an os.pipe ping-pong (mean per round trip; p50 "
        f"{o['pyzmq REQ/REP']['latency_p50']:.2f}x and {o['os.pipe']['latency_p50']:.2f}x), with "
        f"{o['pyzmq REQ/REP']['switches']:.2f}x and {o['os.pipe']['switches']:.2f}x their context switches"
    )
    lines += format_warnings(result["warnings"])
    return "\n".join(lines)
