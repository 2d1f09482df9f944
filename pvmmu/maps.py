"""Real processes' address spaces, from the operating system: ``/proc/PID/smaps``, maps files, shipped captures.

The parsing is pure (``guest_proc.procmaps``); this is the I/O around it. Every
failure is a ``MapsError`` whose message names the file or pid and the problem,
on one line.
"""

from __future__ import annotations

import os
from importlib import resources

from guest_proc.pagetable import Vma
from guest_proc.procmaps import MapsError, parse_maps, to_vmas

MAX_MAPS_BYTES = 64 << 20  # a browser's smaps is a few MiB; anything far larger is not one
CAPTURES = "captures"  # shipped captures: guest_proc/captures/<name>.smaps


def shipped() -> dict[str, str]:
    """The captures that ship with pvmmu: name -> path."""
    folder = resources.files("guest_proc") / CAPTURES
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {e.name[: -len(".smaps")]: str(e) for e in entries if e.name.endswith(".smaps")}


def resolve(spec: str) -> str:
    """A maps file's path: ``spec`` itself if it exists, else the shipped capture of that name."""
    if os.path.exists(spec):
        return spec
    captures = shipped()
    if spec in captures:
        return captures[spec]
    names = ", ".join(sorted(captures)) or "none"
    raise MapsError(f"{spec}: no such file, nor a shipped capture (shipped: {names})")


def read_maps_file(path: str) -> str:
    """The text of a maps or smaps file (bounded, any bytes decoded)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MAPS_BYTES + 1)
    except FileNotFoundError:
        raise MapsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MapsError(f"{path}: is a directory, not a maps file") from None
    except PermissionError:
        raise MapsError(f"{path}: permission denied") from None
    except OSError as exc:
        raise MapsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_MAPS_BYTES:
        raise MapsError(f"{path}: larger than {MAX_MAPS_BYTES >> 20} MiB, not a maps file")
    return data.decode("utf-8", errors="replace")


def capture_pid(pid: int) -> tuple[str, str]:
    """``(smaps text, command name)`` of a live process, read from /proc."""
    if pid <= 0:
        raise MapsError(f"pid {pid}: not a process id")
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/comm") as f:
            comm = f.read().strip()
        with open(f"{base}/smaps", "rb") as f:
            data = f.read(MAX_MAPS_BYTES + 1)
    except (FileNotFoundError, ProcessLookupError):
        raise MapsError(f"pid {pid}: no such process") from None
    except PermissionError:
        raise MapsError(f"pid {pid}: not allowed to read {base}/smaps (another user's process?)") from None
    except OSError as exc:
        raise MapsError(f"pid {pid}: cannot read {base}/smaps: {exc.strerror or exc}") from None
    if not data.strip():
        raise MapsError(f"pid {pid} ({comm}): no user address space (a kernel thread, or it just exited)")
    if len(data) > MAX_MAPS_BYTES:
        raise MapsError(f"pid {pid} ({comm}): smaps larger than {MAX_MAPS_BYTES >> 20} MiB")
    return data.decode("utf-8", errors="replace"), comm


def load_vmas(path: str) -> list[Vma]:
    """The VMAs (with resident pages) of the maps or smaps file at ``path``."""
    return to_vmas(parse_maps(read_maps_file(path), source=path))


__all__ = ["MapsError", "capture_pid", "load_vmas", "read_maps_file", "resolve", "shipped"]
