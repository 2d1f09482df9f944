"""The guest kernel's paravirtual MMU ops: the patch's ``arch/x86/kernel/kvm.c``.

One small function per paravirt op, named as in the kernel, over two things the
shell provides: guest memory (a writable buffer) and a ``hypercall(nr, a0, a1,
a2) -> ret`` callable, the stand-in for the ``vmcall`` instruction. No sockets
here, so a test can wire a guest straight to an in-process host.

Three flush strategies, the same op stream in each:

- ``direct``: before the patch. Lazy MMU mode has no hooks; every op is its
  own hypercall.
- ``queued``: ops are queued in lazy mode, but the flush hands them over one
  hypercall per op (the reading of the patch in the seed's question).
- ``multicall``: the patch. The flush hands the whole queue to one
  ``kvm_mmu_op()`` call, which the host works through ``host_limit`` bytes per
  hypercall.

The per-vCPU state ``struct kvm_para_state { u8 mmu_queue[Q]; int
mmu_queue_len; enum paravirt_lazy_mode mode; }`` lives in the vCPU's slot in
guest memory, exactly laid out; ops that are not deferred are built in the
slot's "stack" page, as the kernel built them on its stack.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable

from protocol.abi import (
    FLUSH_TLB,
    KVM_HC_MMU_OP,
    KVM_MMU_OP_FLUSH_TLB,
    KVM_MMU_OP_RELEASE_PT,
    KVM_MMU_OP_WRITE_PTE,
    OP_SIZE,
    RELEASE_PT,
    WRITE_PTE,
    describe_op,
    errno_name,
    peek_op,
)
from protocol.layout import PAGE_SIZE, PARA_STATE_TAIL, VcpuArea
from protocol.theory import SHAPE_ENTER, SHAPE_LEAVE, SHAPE_RELEASE_PT
from protocol.x86 import ENTRY_BYTES, PTRS_PER_TABLE

MODES = ("direct", "queued", "multicall")

# enum paravirt_lazy_mode
PARAVIRT_LAZY_NONE = 0
PARAVIRT_LAZY_MMU = 1

Hypercall = Callable[[int, int, int, int], int]

_PAGE_ENTRIES = struct.Struct(f"<{PTRS_PER_TABLE}Q")


class HypercallError(RuntimeError):
    """The host refused an op or made no progress; the 2008 guest would spin forever here."""

    def __init__(self, message: str, ret: int, gpa: int) -> None:
        super().__init__(message)
        self.ret = ret
        self.gpa = gpa


class KvmParaState:
    """One vCPU's paravirtual MMU: ``kvm_para_state`` plus the ops that use it."""

    def __init__(self, mem: memoryview, area: VcpuArea, hypercall: Hypercall, mode: str = "multicall") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mem = mem
        self.area = area
        self.hypercall = hypercall
        self.mode = mode
        self.queue_gpa = area.queue_gpa
        self.queue_bytes = area.queue_bytes
        self.stack_gpa = area.stack_gpa
        self.mmu_queue_len = 0
        self.lazy_mode = PARAVIRT_LAZY_NONE
        self._store_state()
        # What the guest meant its page tables to hold: entry gpa -> value (nonzero only).
        self.intent: dict[int, int] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        self.ops = {"write_pte": 0, "flush_tlb": 0, "release_pt": 0}
        self.hypercalls = 0
        self.flushes = 0  # mmu_queue_flush calls that had something to flush
        # The op stream's shape, a byte per event, whatever the mode: sizes of deferrable
        # ops, release_pt, lazy section boundaries. protocol.theory prices it on paper.
        self.shape = array("b")

    # -- the patch ---------------------------------------------------------------

    def kvm_mmu_op(self, gpa: int, length: int) -> None:
        """Hand ``length`` bytes of ops at ``gpa`` to the host, calling again until all are done."""
        while length:
            r = self.hypercall(KVM_HC_MMU_OP, length, gpa & 0xFFFFFFFF, gpa >> 32)
            self.hypercalls += 1
            if r <= 0 or r > length:
                raise self._no_progress(r, gpa, length)
            gpa += r
            length -= r

    def mmu_queue_flush(self) -> None:
        if self.mmu_queue_len:
            self.flushes += 1
            if self.mode == "queued":
                self._flush_one_by_one()
            else:
                self.kvm_mmu_op(self.queue_gpa, self.mmu_queue_len)
            self.mmu_queue_len = 0
            self._store_state()

    def kvm_deferred_mmu_op(self, layout: struct.Struct, *fields: int) -> None:
        """Issue the op now outside lazy MMU mode; inside it, queue it (flushing first if full)."""
        size = layout.size
        if self.lazy_mode != PARAVIRT_LAZY_MMU:
            layout.pack_into(self.mem, self.stack_gpa, *fields)
            self.kvm_mmu_op(self.stack_gpa, size)
            return
        if self.mmu_queue_len + size > self.queue_bytes:
            self.mmu_queue_flush()
        layout.pack_into(self.mem, self.queue_gpa + self.mmu_queue_len, *fields)
        self.mmu_queue_len += size
        self._store_state()

    def kvm_mmu_write(self, dest: int, val: int) -> None:
        """Set the page-table entry at guest-physical ``dest`` (set_pte, set_pmd, pte_clear, ...)."""
        self.ops["write_pte"] += 1
        self.shape.append(24)
        if val:
            self.intent[dest] = val
        else:
            self.intent.pop(dest, None)
        self.kvm_deferred_mmu_op(WRITE_PTE, KVM_MMU_OP_WRITE_PTE, 0, dest, val)

    def kvm_flush_tlb(self) -> None:
        self.ops["flush_tlb"] += 1
        self.shape.append(8)
        self.kvm_deferred_mmu_op(FLUSH_TLB, KVM_MMU_OP_FLUSH_TLB, 0)

    def kvm_release_pt(self, pt_phys: int) -> None:
        """The page at ``pt_phys`` stops being a page table. Never deferred, as in the patch."""
        self.ops["release_pt"] += 1
        self.shape.append(SHAPE_RELEASE_PT)
        page = pt_phys & ~(PAGE_SIZE - 1)
        for gpa in range(page, page + PAGE_SIZE, ENTRY_BYTES):
            self.intent.pop(gpa, None)
        RELEASE_PT.pack_into(self.mem, self.stack_gpa, KVM_MMU_OP_RELEASE_PT, 0, pt_phys)
        self.kvm_mmu_op(self.stack_gpa, RELEASE_PT.size)

    def kvm_enter_lazy_mmu(self) -> None:
        self.shape.append(SHAPE_ENTER)
        if self.mode != "direct":  # the kernel before the patch had no lazy MMU hooks
            self.lazy_mode = PARAVIRT_LAZY_MMU
            self._store_state()

    def kvm_leave_lazy_mmu(self) -> None:
        self.shape.append(SHAPE_LEAVE)
        self.mmu_queue_flush()
        self.lazy_mode = PARAVIRT_LAZY_NONE
        self._store_state()

    # -- helpers -----------------------------------------------------------------

    def _flush_one_by_one(self) -> None:
        """The seed's reading: one hypercall for each queued op."""
        off, end = 0, self.mmu_queue_len
        while off < end:
            code, size = peek_op(self.mem, self.queue_gpa + off, self.queue_gpa + end)
            if size == 0:  # cannot happen with ops we queued ourselves
                raise HypercallError(f"corrupt mmu_queue at offset {off}", 0, self.queue_gpa + off)
            self.kvm_mmu_op(self.queue_gpa + off, size)
            off += size

    def _store_state(self) -> None:
        PARA_STATE_TAIL.pack_into(self.mem, self.area.queue_len_gpa, self.mmu_queue_len, self.lazy_mode)

    def _no_progress(self, r: int, gpa: int, length: int) -> HypercallError:
        what = describe_op(self.mem, gpa, gpa + length)
        if r < 0:
            why = f"host returned {errno_name(r)}"
        elif r == 0:
            why = "host processed 0 bytes (refused the op)"
        else:
            why = f"host claims {r} bytes processed of {length} offered"
        return HypercallError(f"KVM_HC_MMU_OP failed at {what} (gpa {gpa:#x}): {why}", r, gpa)

    @property
    def ops_total(self) -> int:
        return sum(self.ops.values())

    def check_memory(self, table_pages: set[int]) -> tuple[int, list[str]]:
        """Compare guest memory with what the guest meant to write.

        Looks at every page that is a page table (``table_pages``) or holds an
        entry the guest wrote; returns (mismatches, up to five examples).
        """
        pages = set(table_pages)
        pages.update(gpa & ~(PAGE_SIZE - 1) for gpa in self.intent)
        mismatches = 0
        examples: list[str] = []
        intent = self.intent
        for page in sorted(pages):
            values = _PAGE_ENTRIES.unpack_from(self.mem, page)
            for i, have in enumerate(values):
                gpa = page + i * ENTRY_BYTES
                want = intent.get(gpa, 0)
                if have != want:
                    mismatches += 1
                    if len(examples) < 5:
                        examples.append(f"entry {gpa:#x}: memory {have:#x}, guest meant {want:#x}")
        return mismatches, examples


__all__ = [
    "MODES",
    "OP_SIZE",
    "HypercallError",
    "KvmParaState",
    "PARAVIRT_LAZY_MMU",
    "PARAVIRT_LAZY_NONE",
]
