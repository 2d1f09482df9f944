"""Shared fixtures: an in-process guest/host pair, and a leak check after every test."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time

import psutil
import pytest

from pvmmu.inprocess import InProcessPair
from pvmmu.shm import list_segments
from pvmmu.supervisor import RunConfig, RunError, run_pair


@pytest.fixture
def pair_factory():
    return InProcessPair


class BackgroundRun:
    """``run_pair`` in a thread, so a test can find its processes and send them signals."""

    def __init__(self, cfg: RunConfig) -> None:
        self.record: dict | None = None
        self.error: RunError | None = None
        self.thread = threading.Thread(target=self._target, args=(cfg,))
        self.thread.start()

    def _target(self, cfg: RunConfig) -> None:
        try:
            self.record = run_pair(cfg)
        except RunError as exc:
            self.error = exc

    def child(self, *words: str, timeout: float = 20.0) -> psutil.Process:
        """The spawned process whose command line has all of ``words`` (e.g. "guest_proc", "--vcpu 1")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for c in psutil.Process().children(recursive=True):
                try:
                    cmd = " ".join(c.cmdline())
                except psutil.NoSuchProcess:
                    continue
                if all(w in cmd for w in words):
                    return c
            if not self.thread.is_alive():
                raise AssertionError(f"the run ended before {words} appeared: {self.error}")
            time.sleep(0.02)
        raise AssertionError(f"no process with {words} appeared within {timeout}s")

    def join(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not end"


# Scope the leak checks to this test session: other sessions may run on the same machine.
# Children inherit both variables: segments carry the tag, run directories go to a private dir.
SESSION_TAG = secrets.token_hex(4)
os.environ["PVMMU_SHM_TAG"] = SESSION_TAG
RUNTIME_DIR = tempfile.mkdtemp(prefix="pvmmu-tests-")
os.environ["XDG_RUNTIME_DIR"] = RUNTIME_DIR


def _segments() -> set[str]:
    return {n for n in list_segments() if n.split("-")[2].startswith(SESSION_TAG)}


def _pvmmu_dirs() -> set[str]:
    return {n for n in os.listdir(RUNTIME_DIR) if n.startswith("pvmmu-")}


def _pvmmu_processes() -> set[int]:
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "-m host_proc" in cmd or "-m guest_proc" in cmd or "-m pvmmu.benchpeer" in cmd:
            try:
                if p.environ().get("PVMMU_SHM_TAG") == SESSION_TAG:
                    found.add(p.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return found


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


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(RUNTIME_DIR, ignore_errors=True)
