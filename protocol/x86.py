"""x86-64 4-level paging facts shared by the guest's page tables and the host's shadow.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import struct

_PAIR = struct.Struct("<QQ")

PTRS_PER_TABLE = 512
ENTRY_BYTES = 8
LEVELS = 4  # PML4 -> PDPT -> PD -> PT
LEVEL_NAMES = ("pte", "pmd", "pud", "pgd")  # index = level - 1

_PRESENT = 1 << 0
_RW = 1 << 1
_USER = 1 << 2
_ACCESSED = 1 << 5
_DIRTY = 1 << 6
_NX = 1 << 63
# The frame number bits of an entry (bits 12..51).
PTE_PFN_MASK = ((1 << 52) - 1) & ~0xFFF

PAGE_PRESENT = _PRESENT
PAGE_RW = _RW
PAGE_USER = _USER
PAGE_ACCESSED = _ACCESSED
PAGE_DIRTY = _DIRTY
PAGE_NX = _NX
# What a kernel puts in an upper-level entry (pgd/pud/pmd) that points at a table.
PAGE_TABLE = _PRESENT | _RW | _USER | _ACCESSED | _DIRTY


def table_index(va: int, level: int) -> int:
    """Index of ``va`` in its level-``level`` table (level 1 = PT, 4 = PML4)."""
    return (va >> (12 + 9 * (level - 1))) & 0x1FF


def level_span(level: int) -> int:
    """Bytes of virtual address space one entry at ``level`` maps."""
    return 1 << (12 + 9 * (level - 1))


def make_pte(pfn: int, flags: int) -> int:
    return ((pfn << 12) & PTE_PFN_MASK) | flags


def pte_pfn(pte: int) -> int:
    return (pte & PTE_PFN_MASK) >> 12


def pte_present(pte: int) -> bool:
    return bool(pte & _PRESENT)


def pte_wrprotect(pte: int) -> int:
    return pte & ~_RW


def pte_mkwrite(pte: int) -> int:
    return pte | _RW


# What pte_modify() keeps of an entry when its protection changes (_PAGE_CHG_MASK).
PAGE_CHG_MASK = PTE_PFN_MASK | _ACCESSED | _DIRTY


def pte_modify(pte: int, newprot: int) -> int:
    """``pte`` with the protection bits of ``newprot``; frame, accessed and dirty kept (mprotect)."""
    return (pte & PAGE_CHG_MASK) | (newprot & ~PAGE_CHG_MASK)


def table_digest(pairs: list[tuple[int, int]]) -> str:
    """Digest of page-table contents given as (entry gpa, value) pairs, in any order.

    Host (from guest memory under its shadow) and guest (from what it meant to
    write) compute it independently; equal digests mean they agree.
    """
    h = hashlib.sha256()
    for gpa, value in sorted(pairs):
        h.update(_PAIR.pack(gpa, value))
    return h.hexdigest()[:32]
