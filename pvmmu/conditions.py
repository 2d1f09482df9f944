"""The conditions a measurement was taken under, and how busy the machine is.

Every report records them, because on a shared two-core virtual machine the
same command can run twice as fast a few minutes later: CPU count and
affinity, load average, kernel, Python and the versions of the libraries that
sit on the measured path.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from importlib import metadata
from typing import Any

import zmq

from pvmmu import __version__
from pvmmu.supervisor import RunConfig


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def runnable_others() -> int:
    """Threads runnable on the whole machine right now, besides the one asking.

    The fourth field of /proc/loadavg is "runnable/total" kernel scheduling
    entities; it counts the reader itself, hence the minus one. Sampled while
    no pair is running, anything above zero is someone else's work.
    """
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0
    return max(0, running - 1)


def collect(cfg: RunConfig) -> dict[str, Any]:
    """Machine, software and run parameters, as of now."""
    uname = platform.uname()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "runnable_others": runnable_others(),
        "kernel": f"{uname.system} {uname.release}",
        "machine": uname.machine,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pvmmu": __version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "psutil": _version("psutil"),
        "msgpack": _version("msgpack"),
        "click": _version("click"),
        "run": {k: v for k, v in asdict(cfg).items() if k not in ("mode", "max_seconds")},
    }


def describe(c: dict[str, Any]) -> str:
    """The conditions on two lines, for the top of a text report."""
    r = c["run"]
    cpus = ",".join(map(str, c["cpu_affinity"]))
    load = " ".join(f"{x:g}" for x in c["load_average"])
    return (
        f"  machine      {c['cpu_count']} CPUs ({c['cpu_model']}), affinity {cpus}, load {load}, "
        f"{c['kernel']}\n"
        f"  software     {c['python']}, pyzmq {c['pyzmq']} (libzmq {c['libzmq']}), psutil {c['psutil']}, "
        f"msgpack {c['msgpack']}, io-thread {r['io_thread']}"
    )
