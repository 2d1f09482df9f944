"""Per-run directories: where a run's doorbell socket and process logs live.

One directory per run, mode 0700, under the user's runtime directory (else the
temp directory), named ``pvmmu-<supervisor pid>-<random>``. The supervisor
removes it when the run ends; if the supervisor is SIGKILLed, its host removes
it on the way out (``python -m host_proc --run-dir``), and if both were killed,
the next run's ``sweep_stale_run_dirs()`` (or ``pvmmu clean``) does.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile

from pvmmu.shm import pid_alive

RUN_DIR_PREFIX = "pvmmu-"
_RUN_DIR = re.compile(r"^pvmmu-(\d+)-[A-Za-z0-9_]+$")


def runtime_dir() -> str:
    """Where per-run socket directories go: the user's runtime directory, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return xdg
    return tempfile.gettempdir()


def make_run_dir() -> str:
    """A fresh 0700 directory for one run, named after this (the supervisor's) pid."""
    return tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=runtime_dir())


def run_dir_owner(path: str) -> int | None:
    """The pid of the supervisor that made run directory ``path`` (None if it is not one)."""
    m = _RUN_DIR.match(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else None


def run_dirs(pid: int | None = None) -> list[str]:
    """Paths of run directories in the runtime directory (of supervisor ``pid`` only, if given)."""
    base = runtime_dir()
    try:
        names = os.listdir(base)
    except OSError:
        return []
    found = []
    for name in names:
        owner = run_dir_owner(name)
        if owner is not None and (pid is None or owner == pid):
            found.append(os.path.join(base, name))
    return sorted(found)


def sweep_stale_run_dirs() -> list[str]:
    """Remove run directories whose supervisor is gone (SIGKILLed together with its host)."""
    removed = []
    for path in run_dirs():
        owner = run_dir_owner(path)
        if owner is None or pid_alive(owner):
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        # Only real directories of ours: never follow a link, never touch another user's files.
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
