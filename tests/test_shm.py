"""pvmmu.shm: one creator that unlinks, attachers that never do, and nothing left after a SIGKILL."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from pvmmu.shm import SHM_DIR, GuestMemory, SharedMemoryError, list_segments, sweep_stale, unlink_segment

ATTACH_AND_EXIT = """
import sys
from pvmmu.shm import GuestMemory
m = GuestMemory.attach(sys.argv[1])
m.buf[100] = 42
m.close()
"""


def test_created_segment_is_private_and_unlinked_by_its_creator():
    mem = GuestMemory.create(1 << 20)
    try:
        st = os.stat(mem.path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 1 << 20
        assert mem.name in list_segments()
    finally:
        mem.unlink()
        mem.close()
    assert not os.path.exists(mem.path)


def test_an_attacher_that_exits_leaves_the_segment_intact():
    # The multiprocessing.shared_memory trap: an attacher's resource tracker unlinked the host's memory.
    mem = GuestMemory.create(1 << 20)
    try:
        subprocess.run([sys.executable, "-c", ATTACH_AND_EXIT, mem.name], check=True)
        assert os.path.exists(mem.path)
        assert mem.buf[100] == 42  # and it really was the same memory
    finally:
        mem.unlink()
        mem.close()


def test_an_attacher_may_not_unlink():
    mem = GuestMemory.create(1 << 16)
    other = GuestMemory.attach(mem.name)
    try:
        with pytest.raises(SharedMemoryError, match="only its creator"):
            other.unlink()
        assert os.path.exists(mem.path)
    finally:
        other.close()
        mem.unlink()
        mem.close()


def test_attach_refuses_missing_and_foreign_names():
    with pytest.raises(SharedMemoryError, match="cannot open"):
        GuestMemory.attach("pvmmu-1-0123456789abcdef")
    for bad in ("../etc/passwd", "pvmmu-x-00", "other-1-0123456789abcdef", "pvmmu-1-0123456789abcdef/../x"):
        with pytest.raises(SharedMemoryError, match="not a pvmmu shared-memory name"):
            GuestMemory.attach(bad)


def test_discard_zeroes_a_range():
    mem = GuestMemory.create(1 << 20)
    try:
        mem.buf[4096:8192] = b"\xff" * 4096
        mem.buf[8192] = 7
        mem.discard(4096, 4096)
        assert bytes(mem.buf[4096:8192]) == bytes(4096) and mem.buf[8192] == 7
    finally:
        mem.unlink()
        mem.close()


def test_sweep_removes_segments_whose_creator_is_dead_and_keeps_live_ones():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = f"pvmmu-{dead_pid}-00112233aabbccdd"
    with open(os.path.join(SHM_DIR, stale), "wb") as f:
        f.write(b"x")
    live = GuestMemory.create(4096)
    try:
        removed = sweep_stale()
        assert stale in removed and live.name not in removed
        assert not os.path.exists(os.path.join(SHM_DIR, stale)) and os.path.exists(live.path)
    finally:
        unlink_segment(stale)
        live.unlink()
        live.close()
