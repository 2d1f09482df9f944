"""The installed distribution carries every package and the console script (what a fresh install gets)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata


def test_distribution_ships_all_four_packages():
    files = {str(f) for f in metadata.files("pvmmu") or []}
    for module in ("protocol/abi.py", "host_proc/__main__.py", "guest_proc/__main__.py", "pvmmu/cli.py"):
        assert any(f.endswith(module) for f in files), f"{module} is not installed"
    for capture in ("bash", "python3", "node"):  # package data: --from-maps NAME must work after pip install
        assert any(f.endswith(f"guest_proc/captures/{capture}.smaps") for f in files), f"{capture} capture missing"


def test_console_script_and_module_entry_points():
    script = os.path.join(os.path.dirname(sys.executable), "pvmmu")  # where pip puts console scripts
    assert os.access(script, os.X_OK)
    for argv in ([script, "--version"], [sys.executable, "-m", "pvmmu", "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "pvmmu" in out.stdout
    for module in ("host_proc", "guest_proc"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "--endpoint" in out.stdout
