"""Guest physical memory: one POSIX shared-memory segment, owned explicitly.

Not ``multiprocessing.shared_memory``: on Python < 3.13 a process that merely
attaches registers the segment with its resource tracker, which unlinks it when
that process exits, so a guest's exit deleted the host's memory. Here the
segment is ``/dev/shm/pvmmu-<host pid>-<random>`` (what ``shm_open`` makes on
Linux), created 0600 by the host, which alone unlinks it; attachers only map it.
If the host is SIGKILLed its supervisor unlinks the orphan, and
``sweep_stale()`` removes segments whose creator no longer exists.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets

SHM_DIR = "/dev/shm"
PREFIX = "pvmmu-"
_NAME = re.compile(r"^pvmmu-(\d+)-[0-9a-f]{8,32}$")


class SharedMemoryError(OSError):
    """A segment that cannot be created, found or mapped."""


class GuestMemory:
    """A mapped segment; ``buf`` is guest physical memory (gpa = offset)."""

    def __init__(self, name: str, size: int, owner: bool, mm: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._mmap = mm
        self.buf = memoryview(mm)

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, size: int) -> GuestMemory:
        """Create a fresh zeroed segment of ``size`` bytes, mode 0600 (the host does this)."""
        # PVMMU_SHM_TAG (hex, optional) lets a test session tell its own segments from others'.
        name = f"{PREFIX}{os.getpid()}-{os.environ.get('PVMMU_SHM_TAG', '')}{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise SharedMemoryError(f"cannot create shared memory {path}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.unlink(path)
            raise SharedMemoryError(f"cannot size shared memory {path} to {size} bytes: {exc}") from None
        finally:
            os.close(fd)
        return cls(name, size, True, mm)

    @classmethod
    def attach(cls, name: str) -> GuestMemory:
        """Map an existing segment by name (a guest does this); never unlinks it."""
        if not _NAME.match(name):
            raise SharedMemoryError(f"{name!r} is not a pvmmu shared-memory name")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryError(f"cannot open shared memory {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, size, False, mm)

    def discard(self, offset: int, length: int) -> None:
        """Zero [offset, offset+length) by giving the pages back (MADV_REMOVE): reads see zeros."""
        if offset % mmap.PAGESIZE or length % mmap.PAGESIZE or offset + length > self.size:
            raise ValueError("discard needs a page-aligned range inside the segment")
        try:
            self._mmap.madvise(mmap.MADV_REMOVE, offset, length)
        except (AttributeError, OSError):
            self.buf[offset : offset + length] = bytes(length)

    def unlink(self) -> None:
        """Remove the name (the owner only); mappings stay valid until closed."""
        if not self.owner:
            raise SharedMemoryError(f"{self.name} is not ours to unlink: only its creator does")
        unlink_segment(self.name)

    def close(self) -> None:
        """Unmap. Callers must have dropped every view of ``buf`` first."""
        self.buf.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process


def unlink_segment(name: str) -> bool:
    """Unlink ``/dev/shm/<name>`` if it exists; True if it did."""
    if not _NAME.match(name):
        raise SharedMemoryError(f"{name!r} is not a pvmmu shared-memory name")
    try:
        os.unlink(os.path.join(SHM_DIR, name))
        return True
    except FileNotFoundError:
        return False


def creator_pid(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def list_segments() -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def sweep_stale() -> list[str]:
    """Unlink segments whose creating host process is gone (a SIGKILLed run's leftovers)."""
    removed = []
    for name in list_segments():
        pid = creator_pid(name)
        if pid is None or pid_alive(pid):
            continue
        if unlink_segment(name):
            removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie counts: its pid is not free yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
