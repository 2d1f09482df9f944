"""The host's shadow MMU: its copy of the guest's page tables, and a TLB model.

KVM never lets the hardware walk a paravirtual guest's page tables; it walks its
own *shadow* tables, built from the guest's with guest frame numbers translated
to host ones. A guest page-table write that KVM applies (write_pte) therefore has
to update the shadow in the same step, and a page the guest stops using as a page
table (release_pt) has its shadow dropped (``mmu_unshadow``).

The TLB model records, per vCPU, the entries that changed while present since
that vCPU's last flush: those are the translations a real TLB could still hold
stale. A guest that leaves any at the end forgot a flush.

Pure: a plain object; the guest memory it checks against is any buffer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from protocol.layout import PAGE_SIZE, Layout
from protocol.x86 import ENTRY_BYTES, PTE_PFN_MASK, PTRS_PER_TABLE, table_digest

# Guest frame n lives at host frame n + HOST_PFN_BASE (one memslot, as if guest
# memory were mapped at 1 TiB in the host): shadow entries carry host frames.
HOST_PFN_BASE = 1 << 28
_PAGE_ENTRIES = struct.Struct(f"<{PTRS_PER_TABLE}Q")


def gpte_to_spte(gpte: int) -> int:
    """The shadow entry for a present guest entry: same flags, host frame."""
    return (gpte & ~PTE_PFN_MASK) | ((gpte & PTE_PFN_MASK) + (HOST_PFN_BASE << 12))


@dataclass
class ShadowCheck:
    """The result of comparing the shadow with guest memory."""

    ok: bool
    pages: int  # shadowed page-table pages
    entries: int  # present shadow entries
    mismatches: int  # entries where shadow and guest memory disagree
    stale_tlb: int  # entries changed since the last flush of the vCPU that changed them
    examples: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # per vCPU pool: digest of its tables


class ShadowMmu:
    """Shadow entries keyed by the guest-physical address of the guest entry."""

    def __init__(self, mem: bytes | bytearray | memoryview | None = None) -> None:
        self.mem = mem  # guest memory, read when a page starts being shadowed
        self.spte: dict[int, int] = {}
        self.pages: set[int] = set()  # gpas of guest pages currently shadowed
        self.stale: dict[int, set[int]] = {}  # vcpu -> pte gpas possibly stale in its TLB
        self.tlb_flushes = 0

    def write(self, vcpu: int, pte_phys: int, pte_val: int) -> None:
        """The guest entry at ``pte_phys`` is now ``pte_val``: keep the shadow in step."""
        spte = self.spte
        page = pte_phys & ~(PAGE_SIZE - 1)
        if page not in self.pages:
            self._shadow_page(page)
        old = spte.get(pte_phys)
        if pte_val & 1:
            new = gpte_to_spte(pte_val)
            spte[pte_phys] = new
            if old is not None and old != new:
                self._stale(vcpu).add(pte_phys)
        elif old is not None:
            del spte[pte_phys]
            self._stale(vcpu).add(pte_phys)

    def _shadow_page(self, page: int) -> None:
        """Start shadowing ``page``: every present entry it holds, as KVM builds a shadow page from
        the guest's table. A page released and reused without being cleared keeps its old entries."""
        self.pages.add(page)
        if self.mem is None:
            return
        spte = self.spte
        for i, gpte in enumerate(_PAGE_ENTRIES.unpack_from(self.mem, page)):
            if gpte & 1:
                spte[page + i * ENTRY_BYTES] = gpte_to_spte(gpte)

    def flush_tlb(self, vcpu: int) -> None:
        self.tlb_flushes += 1
        stale = self.stale.get(vcpu)
        if stale:
            stale.clear()

    def unshadow(self, pt_phys: int) -> int:
        """Drop the shadow of the page at ``pt_phys`` (mmu_unshadow); returns entries dropped."""
        page = pt_phys & ~(PAGE_SIZE - 1)
        if page not in self.pages:
            return 0
        self.pages.discard(page)
        spte = self.spte
        dropped = 0
        for gpa in range(page, page + PAGE_SIZE, ENTRY_BYTES):
            if spte.pop(gpa, None) is not None:
                dropped += 1
            for stale in self.stale.values():
                stale.discard(gpa)
        return dropped

    def forget_vcpu(self, vcpu: int) -> None:
        self.stale.pop(vcpu, None)

    def _stale(self, vcpu: int) -> set[int]:
        s = self.stale.get(vcpu)
        if s is None:
            s = self.stale[vcpu] = set()
        return s

    def check(self, mem: bytes | memoryview, layout: Layout | None = None) -> ShadowCheck:
        """Compare every shadowed page with guest memory, entry by entry.

        Every present guest entry of a shadowed page must have the shadow entry
        it translates to, and no shadow entry may exist that guest memory lacks.
        Also computes, per vCPU pool (``layout``), a digest of the live page-table
        contents: sorted (gpa, value) of the nonzero entries of shadowed pages,
        the same thing the guest computes from what it meant to write.
        """
        mismatches = 0
        examples: list[str] = []
        entries_by_owner: dict[str, list[tuple[int, int]]] = {}
        if layout is not None:
            entries_by_owner = {str(v): [] for v in range(layout.vcpus)}
        seen = 0
        for page in sorted(self.pages):
            values = _PAGE_ENTRIES.unpack_from(mem, page)
            owner = "other" if layout is None else str(layout.pool_owner(page))
            bucket = entries_by_owner.setdefault(owner, [])
            for i, gpte in enumerate(values):
                gpa = page + i * ENTRY_BYTES
                have = self.spte.get(gpa)
                want = gpte_to_spte(gpte) if gpte & 1 else None
                if have is not None:
                    seen += 1
                if have != want:
                    mismatches += 1
                    if len(examples) < 5:
                        examples.append(
                            f"entry {gpa:#x}: guest memory {gpte:#x}, shadow {'none' if have is None else hex(have)}"
                        )
                if gpte:
                    bucket.append((gpa, gpte))
        orphans = len(self.spte) - seen  # shadow entries on pages not marked shadowed
        if orphans:
            mismatches += orphans
            examples.append(f"{orphans} shadow entries outside shadowed pages")
        stale = sum(len(s) for s in self.stale.values())
        if stale and len(examples) < 5:
            examples.append(f"{stale} entries changed since their vCPU's last TLB flush")
        digests = {owner: table_digest(pairs) for owner, pairs in entries_by_owner.items()}
        return ShadowCheck(
            ok=mismatches == 0 and stale == 0,
            pages=len(self.pages),
            entries=len(self.spte),
            mismatches=mismatches,
            stale_tlb=stale,
            examples=examples,
            digests=digests,
        )
