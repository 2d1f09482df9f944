"""Guest-kernel MMU work, written the way Linux does it, through the paravirt ops.

Each workload has an unmeasured ``setup`` (build the address space it starts
from; always batched, so a direct-mode run does not spend minutes there) and a
measured ``run``, whose op stream is the same in every mode. Lazy MMU sections
sit where Linux 2.6.25 has them: around the PTE loop of one page table in
``copy_pte_range`` (fork) and ``zap_pte_range`` (exit); page-table allocation,
``flush_tlb_mm`` and ``free_pgtables`` happen outside them.

``--ops N`` is the size: ``writes`` issues exactly N write_pte; ``fork`` and
``exit`` work on an address space of N resident pages.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from guest_proc.pagetable import LEAF_SPAN, AddressSpace, FrameAllocator, Vma, data_pfn
from guest_proc.paravirt import KvmParaState
from protocol.layout import PAGE_SIZE
from protocol.x86 import make_pte, pte_wrprotect, table_digest

MIB = 1 << 20


class GuestKernel:
    """One vCPU's kernel: its paravirt MMU, its frames, its address spaces."""

    def __init__(self, pv: KvmParaState, frames: FrameAllocator, mem_pages: int) -> None:
        self.pv = pv
        self.frames = frames
        self.mem_pages = mem_pages
        self.mms: list[AddressSpace] = []

    def new_mm(self) -> AddressSpace:
        mm = AddressSpace(self.pv, self.frames)
        self.mms.append(mm)
        return mm

    def table_pages(self) -> set[int]:
        pages: set[int] = set()
        for mm in self.mms:
            pages |= mm.table_pages()
        return pages

    # -- the kernel paths --------------------------------------------------------

    def copy_page_range(self, parent: AddressSpace) -> AddressSpace:
        """fork(): copy ``parent``'s PTEs into a new mm; write-protect COW pages in both."""
        pv = self.pv
        child = self.new_mm()
        for vma in parent.vmas:
            child.vmas.append(Vma(vma.start, vma.end, vma.write, vma.exec, vma.shared, vma.name, list(vma.resident)))
            for lo, hi in parent.leaf_chunks(vma):
                ptes = list(parent.present_ptes(lo, hi))
                if not ptes:
                    continue  # pmd_none(): nothing to copy, no table for the child
                child.leaf_table(lo)  # pte_alloc: set_pmd & co., outside lazy mode
                pv.kvm_enter_lazy_mmu()
                for va, src_gpa, pte in ptes:
                    if vma.cow and pte & 2:  # ptep_set_wrprotect(src); pte = pte_wrprotect(pte)
                        pte = pte_wrprotect(pte)
                        pv.kvm_mmu_write(src_gpa, pte)
                    child.set_pte(va, pte)
                pv.kvm_leave_lazy_mmu()
        pv.kvm_flush_tlb()  # dup_mmap's flush_tlb_mm(oldmm): the parent lost write access
        return child

    def exit_mmap(self, mm: AddressSpace) -> None:
        """exit()/munmap of everything: zap every PTE, flush, free the page tables."""
        pv = self.pv
        for vma in mm.vmas:
            for lo, hi in mm.leaf_chunks(vma):
                ptes = list(mm.present_ptes(lo, hi))
                if not ptes:
                    continue
                pv.kvm_enter_lazy_mmu()  # zap_pte_range
                for _, gpa, _ in ptes:
                    pv.kvm_mmu_write(gpa, 0)
                pv.kvm_leave_lazy_mmu()
        pv.kvm_flush_tlb()  # tlb_finish_mmu
        mm.free_pgtables()
        self.mms.remove(mm)

    def check(self) -> dict:
        """Guest memory against what this vCPU meant to write, and the digest of its tables."""
        mismatches, examples = self.pv.check_memory(self.table_pages())
        return {
            "ok": mismatches == 0,
            "mismatches": mismatches,
            "examples": examples,
            "entries": len(self.pv.intent),
            "digest": table_digest(list(self.pv.intent.items())),
        }


class Workload:
    """Base: ``setup()`` unmeasured, ``run()`` measured."""

    name = ""

    def __init__(self, kernel: GuestKernel, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError(f"workload size must be at least 1, not {size}")
        self.kernel = kernel
        self.size = size
        self.rng = random.Random(seed)

    def setup(self) -> None:
        pass

    def run(self) -> None:
        raise NotImplementedError


class Writes(Workload):
    """N write_pte in one lazy MMU section: the stream the theory is about."""

    name = "writes"
    BASE = 0x7F00_0000_0000

    def setup(self) -> None:
        self.mm = self.kernel.new_mm()
        self.mm.vmas.append(Vma(self.BASE, self.BASE + self.size * PAGE_SIZE, write=True, exec=False, name="[anon]"))
        for va in range(self.BASE, self.BASE + self.size * PAGE_SIZE, LEAF_SPAN):
            self.mm.leaf_table(va)  # the tables exist; the measured part fills their PTEs

    def run(self) -> None:
        mm, pv = self.mm, self.kernel.pv
        flags = mm.vmas[0].pte_flags()
        pages = self.kernel.mem_pages
        pv.kvm_enter_lazy_mmu()
        for i in range(self.size):
            va = self.BASE + i * PAGE_SIZE
            mm.set_pte(va, make_pte(data_pfn(va, pages), flags))
        pv.kvm_leave_lazy_mmu()


def synthetic_vmas(rng: random.Random, pages: int) -> list[Vma]:
    """A process-shaped address space with ``pages`` resident pages, seeded.

    Text and libraries (read-only, shared with the parent after fork), data, heap
    and stack (private writable: copy-on-write), and one shared writable mapping.
    """
    shape = [  # name, start, size, write, exec, shared, share of resident pages
        ("text", 0x0040_0000, 8 * MIB, False, True, False, 0.15),
        ("data", 0x00C0_0000, 2 * MIB, True, False, False, 0.05),
        ("heap", 0x0100_0000, 256 * MIB, True, False, False, 0.45),
        ("libc.so", 0x7F10_0000_0000, 4 * MIB, False, True, False, 0.10),
        ("libc.so data", 0x7F10_0040_0000, 1 * MIB, True, False, False, 0.03),
        ("shm", 0x7F20_0000_0000, 64 * MIB, True, False, True, 0.12),
        ("stack", 0x7FFF_F000_0000, 64 * MIB, True, False, False, 0.10),
    ]
    vmas = []
    left = pages
    for i, (name, start, size, write, exe, shared, share) in enumerate(shape):
        want = left if i == len(shape) - 1 else min(left, round(pages * share))
        span = size // PAGE_SIZE
        want = min(want, span)
        # Touched memory clusters at the start of a mapping (heaps and stacks grow,
        # programs touch their text from the start): 80% dense, holes at random.
        chosen = sorted(rng.sample(range(min(span, -(-want * 5 // 4))), want))
        left -= want
        vmas.append(Vma(start, start + size, write, exe, shared, name, [start + p * PAGE_SIZE for p in chosen]))
    if left:  # everything else goes in the heap, which always has room
        heap = vmas[2]
        taken = set(heap.resident)
        extra = [va for va in range(heap.start, heap.end, PAGE_SIZE) if va not in taken][:left]
        heap.resident = sorted(taken | set(extra))
        if len(extra) < left:
            raise ValueError(f"address space too small for {pages} resident pages")
    return vmas


class _ProcessWorkload(Workload):
    """Setup: one process-shaped mm with ``size`` resident pages."""

    def setup(self) -> None:
        self.mm = self.kernel.new_mm()
        self.mm.vmas = synthetic_vmas(self.rng, self.size)
        self.mm.populate(self.kernel.mem_pages)


class Fork(_ProcessWorkload):
    """fork(): copy the mm's page tables, write-protecting COW pages, then flush."""

    name = "fork"

    def run(self) -> None:
        self.child = self.kernel.copy_page_range(self.mm)


class Exit(_ProcessWorkload):
    """exit(): zap every PTE, flush the TLB, release every page table."""

    name = "exit"

    def run(self) -> None:
        self.kernel.exit_mmap(self.mm)


WORKLOADS: dict[str, Callable[[GuestKernel, int, int], Workload]] = {w.name: w for w in (Writes, Fork, Exit)}


def prepare(kernel: GuestKernel, name: str, size: int, seed: int) -> Workload:
    """Build workload ``name`` and run its setup, batched whatever the mode; zero the counters."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}: choose from {', '.join(WORKLOADS)}") from None
    workload = factory(kernel, size, seed)
    pv = kernel.pv
    mode, pv.mode = pv.mode, "multicall"
    try:
        pv.kvm_enter_lazy_mmu()
        workload.setup()
        pv.kvm_leave_lazy_mmu()
    finally:
        pv.mode = mode
    pv.reset_counters()
    return workload
