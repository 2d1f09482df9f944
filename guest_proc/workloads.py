"""Guest-kernel MMU work, written the way Linux does it, through the paravirt ops.

Each workload has an unmeasured ``setup`` (build the address space it starts
from; always batched, so a direct-mode run does not spend minutes there) and a
measured ``run``, whose op stream is the same in every mode. Lazy MMU sections
sit where Linux 2.6.25 has them: around the PTE loop of one page table in
``copy_pte_range`` (fork), ``zap_pte_range`` (exit, munmap) and
``change_pte_range`` (mprotect). Page-table allocation, TLB flushes,
``free_pgtables`` and page faults happen outside them: a fault installs one PTE,
so there is never anything to queue.

``--ops N`` is the size: ``writes`` issues exactly N write_pte; ``fork``,
``exit``, ``mprotect``, ``munmap`` and ``mixed`` start from a process of N
resident pages; ``faults`` takes N demand faults in one. A process's address
space is synthetic (``synthetic_vmas``) unless the caller passes one, e.g.
taken from a real process (``guest_proc.procmaps``).
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from guest_proc.pagetable import LEAF_SPAN, AddressSpace, FrameAllocator, Vma, data_pfn
from guest_proc.paravirt import KvmParaState
from protocol.layout import PAGE_SIZE
from protocol.x86 import (
    PAGE_DIRTY,
    PAGE_PRESENT,
    PAGE_RW,
    make_pte,
    pte_mkwrite,
    pte_modify,
    pte_wrprotect,
    table_digest,
)

MIB = 1 << 20

F = TypeVar("F", bound=Callable[..., Any])


def kernel_path(fn: F) -> F:
    """Count calls, ops and hypercalls of one kernel entry point (a few attribute reads per call, not per op)."""
    name = fn.__name__

    @functools.wraps(fn)
    def counted(self: GuestKernel, *args: Any, **kwargs: Any) -> Any:
        pv = self.pv
        ops, calls = pv.ops_total, pv.hypercalls
        try:
            return fn(self, *args, **kwargs)
        finally:
            path = self.paths.setdefault(name, [0, 0, 0])
            path[0] += 1
            path[1] += pv.ops_total - ops
            path[2] += pv.hypercalls - calls

    return counted  # type: ignore[return-value]


class GuestKernel:
    """One vCPU's kernel: its paravirt MMU, its frames, its address spaces."""

    def __init__(self, pv: KvmParaState, frames: FrameAllocator, mem_pages: int) -> None:
        self.pv = pv
        self.frames = frames
        self.mem_pages = mem_pages
        self.mms: list[AddressSpace] = []
        self.paths: dict[str, list[int]] = {}  # kernel entry point -> [calls, ops, hypercalls]
        self.extra_table_pages: set[int] = set()  # page tables no mm here knows of (a replayed trace's)

    def new_mm(self) -> AddressSpace:
        mm = AddressSpace(self.pv, self.frames)
        self.mms.append(mm)
        return mm

    def table_pages(self) -> set[int]:
        pages: set[int] = set(self.extra_table_pages)
        for mm in self.mms:
            pages |= mm.table_pages()
        return pages

    def reset_counters(self) -> None:
        self.pv.reset_counters()
        self.paths = {}

    def path_counts(self) -> dict[str, dict[str, int]]:
        """Per kernel entry point: calls, the ops they issued, the hypercalls those took."""
        return {name: {"calls": c, "ops": o, "hypercalls": h} for name, (c, o, h) in sorted(self.paths.items())}

    # -- the kernel paths --------------------------------------------------------

    @kernel_path
    def copy_page_range(self, parent: AddressSpace) -> AddressSpace:
        """fork(): copy ``parent``'s PTEs into a new mm; write-protect COW pages in both."""
        pv = self.pv
        child = self.new_mm()
        for vma in parent.vmas:
            child.vmas.append(replace(vma, resident=list(vma.resident)))
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

    @kernel_path
    def exit_mmap(self, mm: AddressSpace) -> None:
        """exit()/munmap of everything: zap every PTE, flush, free the page tables."""
        self.unmap_vmas(mm, mm.vmas)
        self.pv.kvm_flush_tlb()  # tlb_finish_mmu
        mm.free_pgtables()
        self.mms.remove(mm)

    @kernel_path
    def do_munmap(self, mm: AddressSpace, start: int, end: int) -> None:
        """munmap(start, end - start): split VMAs at the ends, zap their PTEs, flush, free emptied tables."""
        gone = mm.vmas_in(start, end)
        if not gone:
            return
        for vma in gone:
            mm.vmas.remove(vma)
        self.unmap_vmas(mm, gone)  # unmap_region
        mm.free_pgd_range(start, end)  # free_pgtables: only tables no remaining VMA needs
        self.pv.kvm_flush_tlb()  # tlb_finish_mmu, after the pmd_clears: they change present entries

    def unmap_vmas(self, mm: AddressSpace, vmas: list[Vma]) -> None:
        for vma in vmas:
            for lo, hi in mm.leaf_chunks(vma):
                self.zap_pte_range(mm, lo, hi)

    def zap_pte_range(self, mm: AddressSpace, lo: int, hi: int) -> None:
        """Clear the present PTEs of [lo, hi) (one page table) in a lazy MMU section."""
        self._lazy_pte_loop(mm, lo, hi, lambda pte: 0)

    def _lazy_pte_loop(
        self, mm: AddressSpace, lo: int, hi: int, new_pte: Callable[[int], int], clear_first: bool = False
    ) -> None:
        """Write ``new_pte(pte)`` over each present PTE of [lo, hi), inside one lazy MMU section;
        with ``clear_first``, clear each one just before (ptep_get_and_clear)."""
        ptes = list(mm.present_ptes(lo, hi))
        if not ptes:
            return
        pv = self.pv
        pv.kvm_enter_lazy_mmu()
        if clear_first:
            for _, gpa, pte in ptes:
                pv.kvm_mmu_write(gpa, 0)
                pv.kvm_mmu_write(gpa, new_pte(pte))
        else:
            for _, gpa, pte in ptes:
                pv.kvm_mmu_write(gpa, new_pte(pte))
        pv.kvm_leave_lazy_mmu()

    @kernel_path
    def sys_mprotect(
        self, mm: AddressSpace, start: int, end: int, write: bool, exec: bool, get_and_clear: bool = False
    ) -> None:
        """mprotect(start, end - start): mprotect_fixup (split, new flags) and change_protection per VMA.

        change_protection rewrites every present PTE, page table by page table
        in lazy MMU mode, then flush_tlb_range (a flush_tlb here) for the VMA. A
        VMA that already has the protection is left alone, as mprotect_fixup does.
        Split VMAs are not merged back (no vma_merge). ``get_and_clear``: clear
        each PTE before setting it, as 2.6.25 did (``change_pte_range``).
        """
        for vma in mm.vmas_in(start, end):
            if (vma.write, vma.exec) == (write, exec) or not vma.accessible:
                continue
            vma.write, vma.exec = write, exec
            newprot = vma.vm_page_prot()
            for lo, hi in mm.leaf_chunks(vma):
                self.change_pte_range(mm, lo, hi, newprot, get_and_clear)
            self.pv.kvm_flush_tlb()  # flush_tlb_range

    def change_pte_range(self, mm: AddressSpace, lo: int, hi: int, newprot: int, get_and_clear: bool = False) -> None:
        """Give the present PTEs of [lo, hi) (one page table) ``newprot``, in a lazy MMU section.

        With ``get_and_clear``, as Linux 2.6.25 wrote it: ``ptent =
        ptep_get_and_clear(mm, addr, pte)`` (a write_pte of 0, "to avoid an SMP race
        with hardware updated dirty/clean bits"), then ``set_pte_at(..., pte_modify(ptent,
        newprot))``: two writes to each entry in the same lazy section.
        """
        self._lazy_pte_loop(mm, lo, hi, lambda pte: pte_modify(pte, newprot), get_and_clear)

    @kernel_path
    def handle_mm_fault(self, mm: AddressSpace, va: int, write: bool) -> None:
        """A page fault at ``va``: install the missing PTE, or make a read-only one writable.

        Each is one PTE written outside any lazy MMU section (plus the page
        tables pte_alloc may have to hook in first): nothing can be batched.
        """
        vma = mm.find_vma(va)
        if vma is None or not vma.accessible or write and not vma.write:
            raise ValueError(f"fault at {va:#x} ({'write' if write else 'read'}) that no VMA allows: SIGSEGV")
        pte = mm.get_pte(va)
        if not pte & PAGE_PRESENT:
            self.do_anonymous_page(mm, vma, va)
        elif write and not pte & PAGE_RW:
            self.do_wp_page(mm, va, pte)

    def do_anonymous_page(self, mm: AddressSpace, vma: Vma, va: int) -> None:
        """A page appears where there was none (do_anonymous_page, do_linear_fault): set_pte_at."""
        mm.set_pte(va, make_pte(data_pfn(va, self.mem_pages), vma.pte_flags()))
        bisect.insort(vma.resident, va)

    def do_wp_page(self, mm: AddressSpace, va: int, pte: int) -> None:
        """A write to a read-only (COW) PTE: the page becomes writable (the reuse path), then flush_tlb_page."""
        mm.set_pte(va, pte_mkwrite(pte) | PAGE_DIRTY)
        self.pv.kvm_flush_tlb()  # the old read-only translation may be cached

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
    batched_setup = True  # prepare() wraps setup() in one lazy MMU section
    takes_address_space = False  # starts from a process, synthetic or given

    def __init__(self, kernel: GuestKernel, size: int, seed: int, vmas: list[Vma] | None = None) -> None:
        if size < 1:
            raise ValueError(f"workload size must be at least 1, not {size}")
        if vmas is not None and not self.takes_address_space:
            raise ValueError(f"workload {self.name!r} does not start from a process's address space")
        self.kernel = kernel
        self.size = size
        self.rng = random.Random(seed)
        self.vmas = vmas
        self.mm: AddressSpace | None = None

    def setup(self) -> None:
        pass

    def run(self) -> None:
        raise NotImplementedError

    def address_space(self) -> dict[str, int] | None:
        """The starting address space's shape (after setup), for the run record."""
        if self.mm is None:
            return None
        return {
            "vmas": len(self.mm.vmas),
            "resident_pages": sum(len(v.resident) for v in self.mm.vmas),
            "page_tables": len(self.mm.table_pages()),
        }


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
    """Setup: one process-shaped mm: ``size`` resident pages, or the address space given."""

    takes_address_space = True
    mm: AddressSpace

    def setup(self) -> None:
        self.mm = self.kernel.new_mm()
        self.mm.vmas = self.vmas if self.vmas is not None else synthetic_vmas(self.rng, self.size)
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


class Mprotect(_ProcessWorkload):
    """Write-protect every writable mapping, then give write access back.

    What a checkpointer or an incremental garbage collector does: two
    mprotect() calls per mapping, each rewriting every present PTE in lazy
    sections and flushing once. Private pages stay read-only after the second
    call until written (PAGE_COPY), as in Linux.
    """

    name = "mprotect"
    get_and_clear = False

    def run(self) -> None:
        k, mm = self.kernel, self.mm
        targets = [(v.start, v.end, v.exec) for v in mm.vmas if v.write and v.resident]
        for start, end, exe in targets:
            k.sys_mprotect(mm, start, end, write=False, exec=exe, get_and_clear=self.get_and_clear)
        for start, end, exe in targets:
            k.sys_mprotect(mm, start, end, write=True, exec=exe, get_and_clear=self.get_and_clear)


class MprotectClear(Mprotect):
    """``mprotect`` as Linux 2.6.25's ``change_pte_range`` did it: each present PTE is first cleared
    (``ptep_get_and_clear``) and then set with the new protection, both inside one lazy MMU section.

    Two write_pte per PTE, the first overwritten by the second before the queue
    is flushed: the case op coalescing (--coalesce) is for. Later in 2008 Linux
    replaced the pair with ``ptep_modify_prot_start``/``commit`` (Xen's side: commit
    e57778a1, "each mprotect pte update turns from two expensive trap-and-emulate
    faults into a single hypercall"). The final page tables are those of ``mprotect``.
    """

    name = "mprotect-clear"
    get_and_clear = True


class Munmap(_ProcessWorkload):
    """munmap() half the resident memory: whole mappings in a seeded order, the last one cut short.

    Each call zaps PTEs in lazy sections, flushes, and frees the page tables no
    remaining mapping needs (pmd_clear and release_pt, one hypercall each).
    """

    name = "munmap"
    KEEP = ("[stack]", "[vdso]", "[vvar]", "[vvar_vclock]")

    def setup(self) -> None:
        super().setup()
        candidates = [v for v in self.mm.vmas if v.resident and v.name not in self.KEEP]
        self.rng.shuffle(candidates)
        left = sum(len(v.resident) for v in self.mm.vmas) // 2
        self.ranges: list[tuple[int, int]] = []
        for vma in candidates:
            if left <= 0:
                break
            if len(vma.resident) <= left:
                self.ranges.append((vma.start, vma.end))
                left -= len(vma.resident)
            else:  # unmap the top of it: the pages from its left-th last resident one (split_vma)
                self.ranges.append((vma.resident[-left], vma.end))
                left = 0

    def run(self) -> None:
        for start, end in self.ranges:
            self.kernel.do_munmap(self.mm, start, end)


def pick_fault_targets(mm: AddressSpace, rng: random.Random, n: int) -> list[tuple[int, bool]]:
    """``n`` (va, write) demand faults at pages without a PTE, in runs of consecutive pages.

    A program touching fresh memory faults page after page; runs of 1 to 64
    pages start at seeded places in the mappings that allow access, chosen by
    how much room they have. With too little room, an anonymous mapping (a big
    malloc) is added for the rest.
    """
    vmas = [v for v in mm.vmas if v.accessible]
    room = [v.pages - len(v.resident) for v in vmas]
    if sum(room) < n:
        length = (n - sum(room)) * PAGE_SIZE
        extra = Vma(0, 0, True, False, False, "[anon: faults]")
        extra.start = mm.get_unmapped_area(length)
        extra.end = extra.start + length
        mm.insert_vma(extra)
        vmas.append(extra)
        room.append(extra.pages)
    taken: list[set[int]] = [set(v.resident) for v in vmas]
    targets: list[tuple[int, bool]] = []
    while len(targets) < n:
        i = rng.choices(range(len(vmas)), weights=room)[0]
        vma, used = vmas[i], taken[i]
        page = rng.randrange(vma.pages)
        run = rng.randint(1, 64)
        for step in range(vma.pages):  # from the start page on, wrapping: room[i] > 0 means one is free
            va = vma.start + (page + step) % vma.pages * PAGE_SIZE
            if va in used:
                if run == 0:
                    break
                continue
            used.add(va)
            room[i] -= 1
            targets.append((va, vma.write))
            run -= 1
            if run == 0 or len(targets) == n or room[i] == 0:
                break
    return targets


class Faults(_ProcessWorkload):
    """``size`` demand faults in a process (of ``size`` resident pages, or the one given).

    Each fault installs one PTE outside any lazy MMU section: every mode makes
    one hypercall per op, and batching has nothing to work with.
    """

    name = "faults"

    def setup(self) -> None:
        super().setup()
        self.targets = pick_fault_targets(self.mm, self.rng, self.size)

    def run(self) -> None:
        k, mm = self.kernel, self.mm
        for va, write in self.targets:
            k.handle_mm_fault(mm, va, write)


class Mixed(_ProcessWorkload):
    """A busy guest: a seeded mix of forks, execs, mprotects, fault bursts and mmap/munmap.

    The process (``size`` resident pages, or the one given) lives through
    ``EVENTS`` events; lazy sections are wherever the kernel paths have them,
    so the batched share of the ops depends on the mix, as on a real guest.
    """

    name = "mixed"
    EVENTS = 16
    KINDS = ("fork_exit", "exec", "mprotect", "faults", "mmap_munmap")
    WEIGHTS = (3, 2, 3, 4, 2)

    def setup(self) -> None:
        super().setup()
        self.plan = self.rng.choices(self.KINDS, weights=self.WEIGHTS, k=self.EVENTS)

    def run(self) -> None:
        for kind in self.plan:
            getattr(self, "_" + kind)()

    def _cow_faults(self, mm: AddressSpace, n: int) -> None:
        """Writes to pages that fork left read-only (do_wp_page)."""
        pages = [va for v in mm.vmas if v.write and not v.shared for va in v.resident]
        read_only = [va for va in pages if not mm.get_pte(va) & PAGE_RW]
        for va in self.rng.sample(read_only, min(n, len(read_only))):
            self.kernel.handle_mm_fault(mm, va, True)

    def _fork_exit(self) -> None:
        """fork(); parent and child write to a few COW pages; the child exits."""
        child = self.kernel.copy_page_range(self.mm)
        self._cow_faults(self.mm, self.rng.randint(4, 32))
        self._cow_faults(child, self.rng.randint(4, 32))
        self.kernel.exit_mmap(child)

    def _exec(self) -> None:
        """fork() and exec() of a small program: the copy is dropped, the new image faults in, runs, exits."""
        k = self.kernel
        k.exit_mmap(k.copy_page_range(self.mm))
        image = k.new_mm()
        image.vmas = synthetic_vmas(self.rng, self.rng.randint(64, 512))
        touched = [(va, v.write) for v in image.vmas for va in v.resident]
        for v in image.vmas:
            v.resident = []
        for va, write in touched:
            k.handle_mm_fault(image, va, write)
        k.exit_mmap(image)

    def _mprotect(self) -> None:
        """A writable mapping made read-only and writable again (a GC's or checkpointer's barrier)."""
        vmas = [v for v in self.mm.vmas if v.write and v.resident]
        if vmas:
            vma = self.rng.choice(vmas)
            start, end, exe = vma.start, vma.end, vma.exec
            self.kernel.sys_mprotect(self.mm, start, end, write=False, exec=exe)
            self.kernel.sys_mprotect(self.mm, start, end, write=True, exec=exe)

    def _faults(self) -> None:
        for va, write in pick_fault_targets(self.mm, self.rng, self.rng.randint(16, 256)):
            self.kernel.handle_mm_fault(self.mm, va, write)

    def _mmap_munmap(self) -> None:
        """malloc() of a big block: mmap, touch every page, munmap."""
        length = self.rng.randint(16, 256) * PAGE_SIZE
        vma = Vma(0, 0, True, False, False, "[anon: malloc]")
        vma.start = self.mm.get_unmapped_area(length)
        vma.end = vma.start + length
        self.mm.insert_vma(vma)
        for va in range(vma.start, vma.end, PAGE_SIZE):
            self.kernel.handle_mm_fault(self.mm, va, True)
        self.kernel.do_munmap(self.mm, vma.start, vma.end)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    w.name: w for w in (Writes, Fork, Exit, Mprotect, MprotectClear, Munmap, Faults, Mixed)
}
# Workloads that start from a process's address space (--from-maps / --from-pid apply).
PROCESS_WORKLOADS = tuple(name for name, w in WORKLOADS.items() if getattr(w, "takes_address_space", False))


def prepare(kernel: GuestKernel, name: str, size: int, seed: int, vmas: list[Vma] | None = None) -> Workload:
    """Build workload ``name`` (from ``vmas`` if given) and run its setup; zero the counters."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}: choose from {', '.join(WORKLOADS)}") from None
    return prepare_workload(kernel, factory(kernel, size, seed, vmas))


def prepare_workload(kernel: GuestKernel, workload: Workload) -> Workload:
    """Run ``workload``'s setup, batched whatever the mode (unmeasured); zero the counters."""
    pv = kernel.pv
    # direct and queued would make setup one hypercall per op; ring mode batches already (and
    # its slot holds the ring, so the multicall queue must not be written there).
    mode = pv.mode
    pv.mode = mode if mode == "ring" else "multicall"
    try:
        if workload.batched_setup:
            pv.kvm_enter_lazy_mmu()
        workload.setup()
        if workload.batched_setup:
            pv.kvm_leave_lazy_mmu()
    finally:
        pv.mode = mode
    kernel.reset_counters()
    return workload
