"""Shared fixtures: an in-process guest/host pair, and a leak check after every test."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

import psutil
import pytest

from guest_proc.pagetable import FrameAllocator
from guest_proc.paravirt import KvmParaState
from guest_proc.workloads import GuestKernel
from host_proc.kvm import Kvm
from protocol.layout import PAGE_SIZE, Layout
from pvmmu.shm import creator_pid, list_segments
from pvmmu.supervisor import runtime_dir

# Other test sessions may run on this machine at the same time, sharing /dev/shm and the temp dir.
# A marker in the environment, inherited by every process a test starts, tells this session's
# processes from theirs, and a private runtime directory keeps its run directories apart, so the
# leak check below neither blames nor kills another session's pairs.
_SESSION = f"{os.getpid()}-{time.time_ns()}"
os.environ["PVMMU_TEST_SESSION"] = _SESSION
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="pytest-pvmmu-rt-")
atexit.register(shutil.rmtree, os.environ["XDG_RUNTIME_DIR"], True)


class InProcessPair:
    """Guest core wired straight to host core: the h11 way, no sockets, microseconds."""

    def __init__(self, mode: str = "multicall", queue_bytes: int = 1024, host_limit: int = 512,
                 mem_mb: int = 16, vcpus: int = 1) -> None:  # fmt: skip
        self.layout = Layout(mem_mb << 20, vcpus)
        self.mem = memoryview(bytearray(self.layout.mem_bytes))
        header = self.layout.header_bytes()
        self.mem[: len(header)] = header
        self.kvm = Kvm(self.mem, self.layout, host_limit)
        self.calls: list[tuple[int, int, int, int]] = []  # (vcpu, nr, len, gpa) of every hypercall
        self.kernels = []
        for v in range(vcpus):
            area = self.layout.vcpu_area(v, queue_bytes)
            pv = KvmParaState(self.mem, area, self._hypercall_for(v), mode)
            self.kernels.append(GuestKernel(pv, FrameAllocator(area), self.layout.mem_bytes // PAGE_SIZE))
        self.kernel = self.kernels[0]
        self.pv = self.kernel.pv

    def _hypercall_for(self, vcpu: int):
        def hypercall(nr: int, a0: int, a1: int, a2: int) -> int:
            self.calls.append((vcpu, nr, a0, a1 | (a2 << 32)))
            return self.kvm.kvm_emulate_hypercall(vcpu, nr, a0, a1, a2)

        return hypercall


@pytest.fixture
def pair_factory():
    return InProcessPair


def _pvmmu_dirs() -> set[str]:
    base = runtime_dir()
    try:
        return {n for n in os.listdir(base) if n.startswith("pvmmu-")}
    except FileNotFoundError:
        return set()


def _ours(pid: int) -> bool:
    try:
        return psutil.Process(pid).environ().get("PVMMU_TEST_SESSION") == _SESSION
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _pvmmu_processes() -> set[int]:
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("-m host_proc" in cmd or "-m guest_proc" in cmd or "-m pvmmu.benchpeer" in cmd) and _ours(p.info["pid"]):
            found.add(p.info["pid"])
    return found


def _segments() -> set[str]:
    """This session's segments: those of its live hosts, and any whose host is gone (whoever's: a leak)."""
    out = set()
    for name in list_segments():
        host = creator_pid(name)
        if host is None or _ours(host) or not psutil.pid_exists(host):
            out.add(name)
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must leave no /dev/shm/pvmmu-*, no run directory, no host or guest process."""
    shm, dirs, procs = _segments(), _pvmmu_dirs(), _pvmmu_processes()
    yield
    deadline = time.monotonic() + 3
    while True:
        new_shm = _segments() - shm
        new_dirs = _pvmmu_dirs() - dirs
        new_procs = _pvmmu_processes() - procs
        if not (new_shm or new_dirs or new_procs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in new_procs:  # do not let one failure cascade into the next tests
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    assert not new_shm, f"leaked shared memory: {new_shm}"
    assert not new_dirs, f"leaked run directories: {new_dirs}"
    assert not new_procs, f"orphaned pvmmu processes: {new_procs}"
