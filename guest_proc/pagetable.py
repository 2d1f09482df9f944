"""Guest page tables: x86-64 4-level tables in guest memory, changed only by paravirt ops.

An ``AddressSpace`` is one ``mm``: a PML4 page and the tables under it, all
allocated from the vCPU's own frame pool. It never writes guest memory itself:
every entry goes through ``KvmParaState.kvm_mmu_write`` (set_pgd, set_pud,
set_pmd, set_pte), so the host applies it and keeps its shadow in step. It reads
entries from the guest's own record of what it wrote (``intent``): inside a lazy
MMU section, memory lags behind until the queue is flushed, as in the kernel.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from guest_proc.paravirt import KvmParaState
from protocol.layout import PAGE_SIZE, VcpuArea
from protocol.x86 import (
    ENTRY_BYTES,
    PAGE_ACCESSED,
    PAGE_DIRTY,
    PAGE_NX,
    PAGE_PRESENT,
    PAGE_RW,
    PAGE_TABLE,
    PAGE_USER,
    PTRS_PER_TABLE,
    level_span,
    make_pte,
    pte_pfn,
    table_index,
)

LEAF_SPAN = level_span(2)  # 2 MiB: the virtual range one page table (PT) maps
TASK_SIZE = 1 << 47  # x86-64 user space: [0, 128 TiB)
MMAP_BASE = 0x7F00_0000_0000  # where top-down mmap() starts looking for room


class OutOfGuestMemory(RuntimeError):
    """The vCPU's frame pool has no page left for a page table."""


class FrameAllocator:
    """Page frames of one vCPU's pool; freed frames are reused (they are zero: tables are emptied first)."""

    def __init__(self, area: VcpuArea) -> None:
        self.base = area.pool_gpa
        self.end = area.pool_gpa + area.pool_bytes
        self.next = self.base
        self.free_list: list[int] = []
        self.in_use = 0

    def alloc(self) -> int:
        self.in_use += 1
        if self.free_list:
            return self.free_list.pop()
        if self.next >= self.end:
            self.in_use -= 1
            raise OutOfGuestMemory(
                f"vCPU frame pool exhausted ({(self.end - self.base) // PAGE_SIZE} pages): "
                "give the guest more memory (--mem-mb)"
            )
        gpa = self.next
        self.next += PAGE_SIZE
        return gpa

    def free(self, gpa: int) -> None:
        self.in_use -= 1
        self.free_list.append(gpa)


@dataclass
class Vma:
    """A virtual memory area: [start, end), its protection, and which pages are resident."""

    start: int
    end: int
    write: bool
    exec: bool
    shared: bool = False
    name: str = ""
    resident: list[int] = field(default_factory=list)  # page-aligned vas with a PTE
    read: bool = True  # False with write and exec False too: PROT_NONE (a guard page, a reservation)

    @property
    def accessible(self) -> bool:
        return self.read or self.write or self.exec

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def cow(self) -> bool:
        """is_cow_mapping() && writable: fork write-protects these pages in both mms."""
        return self.write and not self.shared

    def pte_flags(self) -> int:
        flags = PAGE_PRESENT | PAGE_USER | PAGE_ACCESSED
        if self.write:
            flags |= PAGE_RW | PAGE_DIRTY
        if not self.exec:
            flags |= PAGE_NX
        return flags

    def vm_page_prot(self) -> int:
        """The protection ``change_pte_range`` gives present PTEs (protection_map[vm_flags]).

        A private writable mapping is PAGE_COPY: read-only, so the next write
        faults and do_wp_page decides whether to copy. Only shared mappings get RW.
        """
        flags = PAGE_PRESENT | PAGE_USER | PAGE_ACCESSED
        if self.write and self.shared:
            flags |= PAGE_RW
        if not self.exec:
            flags |= PAGE_NX
        return flags

    def split(self, addr: int) -> tuple[Vma, Vma]:
        """The two halves of this VMA at page-aligned ``addr`` (split_vma)."""
        cut = bisect.bisect_left(self.resident, addr)
        return (replace(self, end=addr, resident=self.resident[:cut]),
                replace(self, start=addr, resident=self.resident[cut:]))  # fmt: skip


def data_pfn(va: int, pool_pages: int) -> int:
    """The guest frame a user page at ``va`` maps: spread over guest memory, deterministic."""
    return ((va >> 12) * 0x9E3779B1) % pool_pages + 0x400


class AddressSpace:
    """One mm: its PML4, the tables below it, its VMAs."""

    def __init__(self, pv: KvmParaState, frames: FrameAllocator) -> None:
        self.pv = pv
        self.frames = frames
        self.pgd = frames.alloc()
        # (level, base va of the range the table maps) -> table gpa, for levels 1..3
        self.tables: dict[tuple[int, int], int] = {}
        self.vmas: list[Vma] = []

    def table_pages(self) -> set[int]:
        return {self.pgd, *self.tables.values()}

    # -- VMAs (kept sorted by start, never overlapping) ---------------------------

    def find_vma(self, va: int) -> Vma | None:
        """The VMA containing ``va``, if any."""
        i = bisect.bisect_right([v.start for v in self.vmas], va) - 1
        if i >= 0 and va < self.vmas[i].end:
            return self.vmas[i]
        return None

    def insert_vma(self, vma: Vma) -> None:
        starts = [v.start for v in self.vmas]
        i = bisect.bisect_left(starts, vma.start)
        if i > 0 and self.vmas[i - 1].end > vma.start or i < len(self.vmas) and self.vmas[i].start < vma.end:
            raise ValueError(f"VMA {vma.start:#x}-{vma.end:#x} overlaps an existing one")
        self.vmas.insert(i, vma)

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """The VMAs inside [start, end), split at both ends first (as mprotect and munmap do)."""
        for addr in (start, end):
            vma = self.find_vma(addr)
            if vma is not None and vma.start < addr:
                i = self.vmas.index(vma)
                self.vmas[i : i + 1] = vma.split(addr)
        return [v for v in self.vmas if start <= v.start and v.end <= end]

    def get_unmapped_area(self, length: int) -> int:
        """A free, page-aligned range of ``length`` bytes, top-down from MMAP_BASE (arch_get_unmapped_area_topdown)."""
        top = MMAP_BASE
        for vma in reversed(self.vmas):
            if vma.start >= top:
                continue
            if vma.end <= top - length:
                break
            top = vma.start
        if top - length < 1 << 32:
            raise ValueError(f"no room for a mapping of {length} bytes")
        return top - length

    def leaf_table(self, va: int, create: bool = True) -> int | None:
        """The PT that maps ``va``; allocate missing levels (set_pgd/set_pud/set_pmd) if ``create``."""
        leaf = self.tables.get((1, va & ~(LEAF_SPAN - 1)))
        if leaf is not None:
            return leaf
        table = self.pgd
        for level in (4, 3, 2):
            slot = table + ENTRY_BYTES * table_index(va, level)
            entry = self.pv.intent.get(slot, 0)
            if not entry & PAGE_PRESENT:
                if not create:
                    return None
                new = self.frames.alloc()
                self.tables[(level - 1, va & ~(level_span(level) - 1))] = new
                self.pv.kvm_mmu_write(slot, make_pte(new >> 12, PAGE_TABLE))
                entry = self.pv.intent[slot]
            table = pte_pfn(entry) << 12
        return table

    def pte_gpa(self, va: int, create: bool = True) -> int | None:
        leaf = self.leaf_table(va, create)
        return None if leaf is None else leaf + ENTRY_BYTES * table_index(va, 1)

    def set_pte(self, va: int, pte: int) -> None:
        gpa = self.pte_gpa(va)
        assert gpa is not None
        self.pv.kvm_mmu_write(gpa, pte)

    def get_pte(self, va: int) -> int:
        gpa = self.pte_gpa(va, create=False)
        return 0 if gpa is None else self.pv.intent.get(gpa, 0)

    def leaf_chunks(self, vma: Vma) -> Iterator[tuple[int, int]]:
        """[lo, hi) pieces of ``vma``, one per 2 MiB page table (the kernel's pmd loop)."""
        lo = vma.start
        while lo < vma.end:
            hi = min((lo & ~(LEAF_SPAN - 1)) + LEAF_SPAN, vma.end)
            yield lo, hi
            lo = hi

    def present_ptes(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(va, pte gpa, pte) for each present entry mapping [lo, hi), which lies in one PT."""
        leaf = self.leaf_table(lo, create=False)
        if leaf is None:
            return
        intent = self.pv.intent
        first = table_index(lo, 1)
        last = table_index(hi - 1, 1)
        for i in range(first, last + 1):
            gpa = leaf + ENTRY_BYTES * i
            pte = intent.get(gpa, 0)
            if pte & PAGE_PRESENT:
                yield (lo & ~(LEAF_SPAN - 1)) + i * PAGE_SIZE, gpa, pte

    def populate(self, pool_pages: int) -> None:
        """Give every VMA its resident pages (setup, before the measured work; the caller batches it)."""
        for vma in self.vmas:
            flags = vma.pte_flags()
            for va in vma.resident:  # sorted: page table by page table, as the kernel's walk
                self.set_pte(va, make_pte(data_pfn(va, pool_pages), flags))

    def free_pgtables(self) -> None:
        """Unhook and release every table, leaves first (free_pgtables, then pgd_free)."""
        self.free_pgd_range(0, TASK_SIZE, keep=())
        self.pv.kvm_release_pt(self.pgd)
        self.frames.free(self.pgd)

    def free_pgd_range(self, lo: int, hi: int, keep: list[Vma] | tuple[Vma, ...] | None = None) -> None:
        """Release the tables under [lo, hi) that no VMA in ``keep`` (default: the mm's) still needs.

        Leaves first. Each parent entry is cleared (pmd_clear/pud_clear/pgd_clear)
        and the page released, outside lazy mode as in the kernel: each is its own
        hypercall. A table is kept while any remaining VMA overlaps the range it
        maps, which is what the kernel's floor/ceiling arguments achieve.
        """
        keep = self.vmas if keep is None else keep
        for level in (1, 2, 3):
            span = level_span(level + 1)
            for (lvl, base), table in sorted(self.tables.items()):
                if lvl != level or base + span <= lo or base >= hi:
                    continue
                if any(v.start < base + span and base < v.end for v in keep):
                    continue
                if level > 1 and any(lv == level - 1 and base <= b < base + span for lv, b in self.tables):
                    continue  # a table below it is still in use
                parent = self.pgd if level == 3 else self.tables[(level + 1, base & ~(level_span(level + 2) - 1))]
                self.pv.kvm_mmu_write(parent + ENTRY_BYTES * table_index(base, level + 1), 0)
                self.pv.kvm_release_pt(table)
                self.frames.free(table)
                del self.tables[(lvl, base)]


__all__ = [
    "AddressSpace",
    "FrameAllocator",
    "LEAF_SPAN",
    "OutOfGuestMemory",
    "PTRS_PER_TABLE",
    "TASK_SIZE",
    "Vma",
    "data_pfn",
]
