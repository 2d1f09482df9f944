"""Address spaces of real processes: the text of ``/proc/PID/maps`` or ``smaps`` -> VMAs.

Pure: text in, VMAs out (reading ``/proc`` is the shell's job: ``pvmmu/maps.py``).

What is taken from the text, exactly:

- every VMA's range, its permissions (``r``/``w``/``x``), whether it is shared
  (``s``) or private (``p``: copy-on-write at fork when writable), and its name
  (the path, ``[heap]``, ``[stack]``, ...);
- from ``smaps``: ``Rss``, the number of the VMA's pages that have a present PTE
  in that process (what fork copies and exit zaps), and ``VmFlags`` ``gd``
  (grows down: a stack).

What is approximated:

- *which* pages of a VMA are resident: ``Rss`` is only a count, so they are
  taken from the VMA's start (heaps, mappings touched from the front), or from its
  end for a VMA that grows down. How many 2 MiB page tables a VMA needs can
  therefore come out lower than in the real process, never higher;
- frame numbers: hashed over guest memory, as for the synthetic address spaces;
- transparent huge pages (``AnonHugePages``, mapped by one PMD entry) count as
  512 PTEs; swapped-out pages (swap entries) are left out;
- VMAs with no access at all (guard pages, reservations) get no PTEs; the
  ``[vsyscall]`` page lies outside user space and is skipped;
- a plain ``maps`` text has no ``Rss``: every page of a VMA that allows some
  access counts as resident (an upper bound: capture ``smaps`` when you can).

Lines starting with ``#`` are comments (the shipped captures say where they
came from); the kernel never writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from guest_proc.pagetable import Vma
from protocol.layout import PAGE_SIZE

# x86-64 user space ends below 2^47; [vsyscall] (0xffffffffff600000) is kernel space.
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE

_HEADER = re.compile(
    r"^([0-9a-f]{1,16})-([0-9a-f]{1,16}) ([r-][w-][x-][ps]) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)(?: +(.*))?$"
)
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(?:\s+(.*))?$")
_KB = re.compile(r"^(\d+) kB$")
# The smaps fields a trimmed capture keeps (besides each VMA's maps line).
KEPT_FIELDS = ("Size", "Rss", "Anonymous", "AnonHugePages", "Swap", "VmFlags")


class MapsError(ValueError):
    """A maps or smaps text that cannot be an address space; says where (``line``) and why."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Mapping:
    """One VMA as the kernel printed it."""

    start: int
    end: int
    perms: str  # "rw-p"
    offset: int
    inode: int
    path: str
    rss_kb: int | None  # None: a plain maps text
    vmflags: tuple[str, ...]
    line: int

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def accessible(self) -> bool:
        return self.perms[:3] != "---"

    @property
    def grows_down(self) -> bool:
        return "gd" in self.vmflags or self.path == "[stack]"

    @property
    def resident_pages(self) -> int:
        """Pages with a present PTE: Rss, or every page when there is no Rss (plain maps)."""
        if not self.accessible or self.start > TASK_SIZE_MAX:
            return 0
        if self.rss_kb is None:
            return self.pages
        return min(self.pages, self.rss_kb * 1024 // PAGE_SIZE)


def parse_maps(text: str, source: str = "maps") -> list[Mapping]:
    """The VMAs in a maps or smaps text. Strict: raises MapsError naming the line."""
    maps: list[Mapping] = []
    cur: dict | None = None

    def finish() -> None:
        if cur is None:
            return
        fields = cur["fields"]
        size = fields.get("Size")
        if size is not None and size * 1024 != cur["end"] - cur["start"]:
            raise MapsError(f"{source}: line {cur['line']}: Size {size} kB but the range is "
                            f"{(cur['end'] - cur['start']) // 1024} kB", cur["line"])  # fmt: skip
        rss = fields.get("Rss")
        if fields and rss is None:
            raise MapsError(f"{source}: line {cur['line']}: smaps block has no Rss (truncated?)", cur["line"])
        if rss is not None and rss * 1024 > cur["end"] - cur["start"]:
            raise MapsError(f"{source}: line {cur['line']}: Rss {rss} kB exceeds the VMA's "
                            f"{(cur['end'] - cur['start']) // 1024} kB", cur["line"])  # fmt: skip
        maps.append(
            Mapping(cur["start"], cur["end"], cur["perms"], cur["offset"], cur["inode"], cur["path"], rss,
                    cur["vmflags"], cur["line"])
        )  # fmt: skip

    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        m = _HEADER.match(line)
        if m:
            finish()
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if start >= end or start % PAGE_SIZE or end % PAGE_SIZE:
                raise MapsError(f"{source}: line {n}: bad range {m.group(1)}-{m.group(2)} "
                                "(must be page-aligned, start below end)", n)  # fmt: skip
            if maps and start < maps[-1].end:
                raise MapsError(f"{source}: line {n}: VMA {m.group(1)}-{m.group(2)} overlaps or precedes "
                                "the one before it (maps are sorted)", n)  # fmt: skip
            cur = {"start": start, "end": end, "perms": m.group(3), "offset": int(m.group(4), 16),
                   "inode": int(m.group(6)), "path": (m.group(7) or "").strip(), "fields": {}, "vmflags": (),
                   "line": n}  # fmt: skip
            continue
        f = _FIELD.match(line)
        if not f:
            raise MapsError(f"{source}: line {n}: neither a maps line nor an smaps field: {line[:60]!r}", n)
        if cur is None:
            raise MapsError(f"{source}: line {n}: smaps field {f.group(1)!r} before any VMA", n)
        key, value = f.group(1), (f.group(2) or "").strip()
        if key == "VmFlags":
            cur["vmflags"] = tuple(value.split())
        elif key in ("Size", "Rss") or value.endswith("kB"):
            kb = _KB.match(value)
            if not kb:
                raise MapsError(f"{source}: line {n}: {key} is {value!r}, not a number of kB", n)
            if key in cur["fields"]:
                raise MapsError(f"{source}: line {n}: {key} given twice for one VMA", n)
            cur["fields"][key] = int(kb.group(1))
        # Other fields (THPeligible, ProtectionKey, ...) carry nothing this model uses.
    finish()
    if not maps:
        raise MapsError(f"{source}: no VMAs in it (empty, or not a maps/smaps text)")
    with_rss = {m.rss_kb is not None for m in maps}
    if len(with_rss) > 1:
        bad = next(m for m in maps if m.rss_kb is None)
        raise MapsError(f"{source}: line {bad.line}: VMA without smaps fields among VMAs with them "
                        "(a cut or spliced file?)", bad.line)  # fmt: skip
    return maps


def to_vmas(maps: list[Mapping]) -> list[Vma]:
    """The VMAs to build a guest address space from, with their resident pages placed (see above)."""
    vmas = []
    for m in maps:
        if m.start > TASK_SIZE_MAX:
            continue
        n = m.resident_pages
        first = m.pages - n if m.grows_down else 0
        resident = [m.start + (first + i) * PAGE_SIZE for i in range(n)]
        name = m.path or f"[anon {m.perms}]"
        vmas.append(Vma(m.start, m.end, "w" in m.perms, "x" in m.perms, m.perms[3] == "s", name, resident,
                        read="r" in m.perms))  # fmt: skip
    return vmas


def summary(maps: list[Mapping]) -> dict[str, int | bool]:
    """Counts for a report: VMAs, mapped and resident pages, the page tables they need, whether Rss was known."""
    user = [m for m in maps if m.start <= TASK_SIZE_MAX]
    regions = {(shift, va >> shift) for v in to_vmas(maps) for va in v.resident for shift in (21, 30, 39)}
    return {
        "vmas": len(user),
        "mapped_pages": sum(m.pages for m in user),
        "resident_pages": sum(m.resident_pages for m in user),
        "private_writable_pages": sum(m.resident_pages for m in user if m.perms[1] == "w" and m.perms[3] == "p"),
        "page_tables": len(regions) + 1,  # a PT per 2 MiB, PD per 1 GiB, PDPT per 512 GiB in use, and the PML4
        "smaps": all(m.rss_kb is not None for m in maps),
    }


def trim_smaps(text: str) -> str:
    """An smaps text cut down to the maps lines and ``KEPT_FIELDS`` (a shipped capture stays small)."""
    out = []
    for line in text.splitlines():
        key = line.split(":", 1)[0]
        if _HEADER.match(line) or key in KEPT_FIELDS or line.startswith("#"):
            out.append(line.rstrip())
    return "\n".join(out) + "\n"


__all__ = ["KEPT_FIELDS", "Mapping", "MapsError", "TASK_SIZE_MAX", "parse_maps", "summary", "to_vmas", "trim_smaps"]
