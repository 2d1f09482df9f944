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

Two options beyond the patch, both off by default:

- ``coalesce``: a write_pte to an entry already queued in the same batch
  (nothing handed over, no flush_tlb or release_pt since) rewrites that op's
  ``pte_val`` in place instead of queueing another op. ``ops`` still counts
  every paravirt call the kernel made; ``coalesced`` counts the ones folded
  away, and ``shape`` records only what was queued, so the theory prices the
  hypercalls actually made.
- ``status_hypercall``: a host that reports each op's status (--status). A
  refused op is then named, with its error code, from the reply that refused it.
"""

from __future__ import annotations

import struct
import time
from array import array
from collections.abc import Callable
from typing import Protocol

from protocol.abi import (
    FLUSH_TLB,
    KVM_HC_MMU_OP,
    KVM_MMU_OP_FLUSH_TLB,
    KVM_MMU_OP_RELEASE_PT,
    KVM_MMU_OP_WRITE_PTE,
    OP_SIZE,
    PTE_VAL_OFFSET,
    PVMMU_HC_RING_SETUP,
    RELEASE_PT,
    WRITE_PTE,
    count_ops,
    describe_op,
    errno_name,
    peek_op,
    refusal_reason,
)
from protocol.layout import PAGE_SIZE, PARA_STATE_TAIL, VcpuArea
from protocol.messages import op_status
from protocol.ring import ERROR_AT, MAX_RING_BYTES, Ring, RingProducer
from protocol.theory import MODES, SHAPE_ENTER, SHAPE_LEAVE, SHAPE_RELEASE_PT
from protocol.x86 import ENTRY_BYTES, PTRS_PER_TABLE

# enum paravirt_lazy_mode
PARAVIRT_LAZY_NONE = 0
PARAVIRT_LAZY_MMU = 1

Hypercall = Callable[[int, int, int, int], int]
# A hypercall to a host started with --status: RAX and one status byte per op the host looked at.
StatusHypercall = Callable[[int, int, int, int], tuple[int, bytes]]
_U64 = struct.Struct("<Q")


def ring_capacity(queue_bytes: int) -> int:
    """Ring mode: room for four queues of ops (two at least), so the guest keeps producing while
    the host drains the previous ones."""
    capacity = min(4 * queue_bytes, MAX_RING_BYTES) // 8 * 8
    if capacity < 2 * queue_bytes:
        raise ValueError(f"ring mode needs a queue of at most {MAX_RING_BYTES // 2} bytes, not {queue_bytes}")
    return capacity


_PAGE_ENTRIES = struct.Struct(f"<{PTRS_PER_TABLE}Q")


class HypercallError(RuntimeError):
    """The host refused an op or made no progress; the 2008 guest would spin forever here."""

    def __init__(self, message: str, ret: int, gpa: int) -> None:
        super().__init__(message)
        self.ret = ret
        self.gpa = gpa


class RingPort(Protocol):
    """What ring mode needs from the process shell: the two doorbells, neither with a reply."""

    def kick(self) -> None:
        """Wake a host that set NEED_WAKEUP."""

    def sleep(self) -> None:
        """Block until the host sends a completion (bounded: raises if the host dies or goes silent)."""


class KvmParaState:
    """One vCPU's paravirtual MMU: ``kvm_para_state`` plus the ops that use it."""

    def __init__(
        self,
        mem: memoryview,
        area: VcpuArea,
        hypercall: Hypercall,
        mode: str = "multicall",
        ring_port: RingPort | None = None,
        spin_us: float = 50.0,
        coalesce: bool = False,
        status_hypercall: StatusHypercall | None = None,
    ) -> None:
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
        # Ring mode: the vCPU slot holds the op ring instead of struct kvm_para_state.
        self.ring: RingProducer | None = None
        self.ring_port = ring_port
        self.spin_s = spin_us / 1e6
        # --coalesce: the write_ptes of the current batch, pte_phys -> gpa (ring: position) of the queued op.
        # None when off, so the default path costs one attribute check per op.
        self.batch_ptes: dict[int, int] | None = {} if coalesce else None
        self.status_hypercall = status_hypercall
        if mode == "ring":
            self._ring_setup()
        self._store_state()
        # What the guest meant its page tables to hold: entry gpa -> value (nonzero only).
        self.intent: dict[int, int] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        self.ops = {"write_pte": 0, "flush_tlb": 0, "release_pt": 0}
        self.hypercalls = 0  # in ring mode: flushes (publishes); the doorbells rung are counted by the port
        self.flushes = 0  # mmu_queue_flush calls that had something to flush
        self.ring_waits = 0  # ring mode: waits for the host, and how many of them had to sleep
        self.ring_sleeps = 0
        self.coalesced = 0  # write_ptes folded into one already queued (--coalesce)
        self.status_replies = 0  # replies that carried per-op statuses, and how many (--status)
        self.statuses = 0
        # The op stream's shape, a byte per event, whatever the mode: sizes of deferrable
        # ops, release_pt, lazy section boundaries. protocol.theory prices it on paper.
        self.shape = array("b")

    # -- the patch ---------------------------------------------------------------

    def kvm_mmu_op(self, gpa: int, length: int) -> None:
        """Hand ``length`` bytes of ops at ``gpa`` to the host, calling again until all are done."""
        if self.status_hypercall is not None:
            self._kvm_mmu_op_status(gpa, length)
            return
        start, total = gpa, length
        while length:
            r = self.hypercall(KVM_HC_MMU_OP, length, gpa & 0xFFFFFFFF, gpa >> 32)
            self.hypercalls += 1
            if r <= 0 or r > length:
                raise self._no_progress(r, gpa, length, start, total)
            gpa += r
            length -= r

    def mmu_queue_flush(self) -> None:
        if self.batch_ptes:
            self.batch_ptes.clear()  # handed over: a later write is a new op
        if self.mmu_queue_len:
            self.flushes += 1
            if self.ring is not None:
                self._ring_publish()
            elif self.mode == "queued":
                self._flush_one_by_one()
            else:
                self.kvm_mmu_op(self.queue_gpa, self.mmu_queue_len)
            self.mmu_queue_len = 0
            self._store_state()

    def kvm_deferred_mmu_op(self, layout: struct.Struct, *fields: int) -> None:
        """Issue the op now outside lazy MMU mode; inside it, queue it (flushing first if full)."""
        size = layout.size
        if self.lazy_mode != PARAVIRT_LAZY_MMU:
            self._mmu_op_now(layout, *fields)
            return
        if self.mmu_queue_len + size > self.queue_bytes:
            self.mmu_queue_flush()
        if self.ring is not None:
            self._ring_append(layout.pack(*fields))
        else:
            layout.pack_into(self.mem, self.queue_gpa + self.mmu_queue_len, *fields)
        self.mmu_queue_len += size
        self._store_state()

    def _mmu_op_now(self, layout: struct.Struct, *fields: int) -> None:
        """An op that is not deferred: built on the stack, handed over, done before we return."""
        if self.ring is not None:
            # Its own flush. The ring is in order, so it also publishes any ops queued before it
            # (the patch sent it ahead of them); the queue's own flush points stay where they were.
            self._ring_append(layout.pack(*fields))
            self._ring_publish()
            self._ring_wait(self.ring.tail)
            return
        layout.pack_into(self.mem, self.stack_gpa, *fields)
        self.kvm_mmu_op(self.stack_gpa, layout.size)

    def kvm_mmu_write(self, dest: int, val: int) -> None:
        """Set the page-table entry at guest-physical ``dest`` (set_pte, set_pmd, pte_clear, ...)."""
        self.ops["write_pte"] += 1
        if val:
            self.intent[dest] = val
        else:
            self.intent.pop(dest, None)
        if self.batch_ptes is not None:
            self._coalescing_write(dest, val)
            return
        self.shape.append(24)
        self.kvm_deferred_mmu_op(WRITE_PTE, KVM_MMU_OP_WRITE_PTE, 0, dest, val)

    def kvm_flush_tlb(self) -> None:
        self.ops["flush_tlb"] += 1
        self.shape.append(8)
        if self.batch_ptes:
            self.batch_ptes.clear()  # a write after a flush must reach the host after it
        self.kvm_deferred_mmu_op(FLUSH_TLB, KVM_MMU_OP_FLUSH_TLB, 0)

    def kvm_release_pt(self, pt_phys: int) -> None:
        """The page at ``pt_phys`` stops being a page table. Never deferred, as in the patch."""
        self.ops["release_pt"] += 1
        self.shape.append(SHAPE_RELEASE_PT)
        if self.batch_ptes:
            # It overtakes the queue (multicall) or publishes it (ring): either way a batch boundary,
            # in the same place in every mode, so every mode coalesces the same writes.
            self.batch_ptes.clear()
        page = pt_phys & ~(PAGE_SIZE - 1)
        for gpa in range(page, page + PAGE_SIZE, ENTRY_BYTES):
            self.intent.pop(gpa, None)
        self._mmu_op_now(RELEASE_PT, KVM_MMU_OP_RELEASE_PT, 0, pt_phys)

    def kvm_enter_lazy_mmu(self) -> None:
        self.shape.append(SHAPE_ENTER)
        if self.mode != "direct":  # the kernel before the patch had no lazy MMU hooks
            self.lazy_mode = PARAVIRT_LAZY_MMU
            self._store_state()

    def kvm_leave_lazy_mmu(self) -> None:
        self.shape.append(SHAPE_LEAVE)
        self.mmu_queue_flush()
        if self.ring is not None:  # still synchronous: the caller is about to use these mappings
            self._ring_wait(self.ring.tail)
        self.lazy_mode = PARAVIRT_LAZY_NONE
        self._store_state()

    # -- coalescing and per-op status (beyond the patch) ---------------------------

    def _coalescing_write(self, dest: int, val: int) -> None:
        """kvm_mmu_write with --coalesce: rewrite the queued op for ``dest`` if this batch has one.

        The host sees the entry's last value at the earlier op's place in the
        batch; nothing between them can tell (no flush_tlb, no release_pt, and the
        shadow keys entries by address), so the final state is the same.
        """
        batch = self.batch_ptes
        assert batch is not None
        lazy = self.lazy_mode == PARAVIRT_LAZY_MMU
        if lazy:
            at = batch.get(dest)
            if at is not None:
                self.coalesced += 1
                if self.ring is not None:  # not yet published: the host cannot have read it
                    self.ring.ring.write(at + PTE_VAL_OFFSET, _U64.pack(val))
                else:
                    _U64.pack_into(self.mem, at + PTE_VAL_OFFSET, val)
                return
        self.shape.append(24)
        self.kvm_deferred_mmu_op(WRITE_PTE, KVM_MMU_OP_WRITE_PTE, 0, dest, val)
        if lazy:  # queued (after any flush it caused): remember where
            batch[dest] = (self.ring.tail if self.ring is not None else self.queue_gpa + self.mmu_queue_len) - 24

    def _kvm_mmu_op_status(self, gpa: int, length: int) -> None:
        """kvm_mmu_op against a host that reports each op's status: a refusal is named from the reply
        that carries it, without the second, zero-progress hypercall the plain loop needs."""
        assert self.status_hypercall is not None
        start, total = gpa, length
        while length:
            r, statuses = self.status_hypercall(KVM_HC_MMU_OP, length, gpa & 0xFFFFFFFF, gpa >> 32)
            self.hypercalls += 1
            self.status_replies += 1
            self.statuses += len(statuses)
            if statuses and statuses[-1]:
                raise self._refused(statuses, r, gpa, length, start, total)
            if r <= 0 or r > length:
                raise self._no_progress(r, gpa, length)
            gpa += r
            length -= r

    def _refused(self, statuses: bytes, r: int, gpa: int, length: int, start: int, total: int) -> HypercallError:
        code = op_status(statuses[-1])
        applied = len(statuses) - 1
        if statuses.count(0) != applied or not 0 <= r < length or count_ops(self.mem, gpa, gpa + r) != applied:
            return HypercallError(
                f"KVM_HC_MMU_OP at gpa {gpa:#x}: the host's statuses ({applied} applied, then {code}) "
                f"disagree with its return value {r}",
                code,
                gpa,
            )
        at = gpa + r
        buf = bytes(self.mem[start : start + total])
        op = peek_op(buf, at - start, total)[0]
        return HypercallError(
            f"host refused {describe_op(buf, at - start)} of the {total}-byte buffer at gpa {start:#x}: "
            f"{errno_name(code)} ({refusal_reason(op, -code)})",
            code,
            at,
        )

    # -- ring mode (beyond the patch: protocol.ring) -------------------------------

    def _ring_setup(self) -> None:
        capacity = ring_capacity(self.queue_bytes)
        self.ring = RingProducer(Ring(self.mem, self.queue_gpa, capacity))
        r = self.hypercall(PVMMU_HC_RING_SETUP, capacity, self.queue_gpa & 0xFFFFFFFF, self.queue_gpa >> 32)
        if r != 0:
            raise HypercallError(f"host refused the op ring at gpa {self.queue_gpa:#x}: {errno_name(r)}", r, 0)

    def _ring_append(self, blob: bytes) -> None:
        ring = self.ring
        assert ring is not None
        if not ring.append(blob):
            # Full of published ops the host has not consumed yet (the capacity is at least two
            # queues, so what is unpublished always fits once those are gone): wait for room.
            self._ring_wait(ring.tail + len(blob) - ring.ring.capacity)
            ring.append(blob)

    def _ring_publish(self) -> None:
        """A flush: make the batch visible; ring the doorbell only if the host said it sleeps."""
        assert self.ring is not None
        self.hypercalls += 1
        if self.ring.publish():
            assert self.ring_port is not None
            self.ring_port.kick()

    def _ring_wait(self, target: int) -> None:
        """Until the host has consumed up to ``target``: spin briefly, then sleep on a completion."""
        ring = self.ring
        assert ring is not None and self.ring_port is not None
        if ring.consumed(target):
            return
        self.ring_waits += 1
        spin_until = time.perf_counter() + self.spin_s
        while not ring.consumed(target) and not ring.ring.error:
            if time.perf_counter() < spin_until:
                continue
            if ring.prepare_to_wait(target):
                self.ring_sleeps += 1
                try:
                    self.ring_port.sleep()
                finally:
                    ring.done_waiting()
        if ring.ring.error:
            raise self._ring_failed()

    def _ring_failed(self) -> HypercallError:
        ring = self.ring.ring  # type: ignore[union-attr]
        at = ring.words[ERROR_AT]
        blob = ring.read(at, 24)
        why = refusal_reason(peek_op(blob, 0, len(blob))[0], -ring.error)
        return HypercallError(
            f"host refused {describe_op(blob, 0)} at ring position {at}: {errno_name(ring.error)} ({why})",
            ring.error,
            at,
        )

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
        if self.ring is not None:
            return  # the slot holds the ring, not struct kvm_para_state
        PARA_STATE_TAIL.pack_into(self.mem, self.area.queue_len_gpa, self.mmu_queue_len, self.lazy_mode)

    def _no_progress(self, r: int, gpa: int, length: int, start: int, total: int) -> HypercallError:
        buf = bytes(self.mem[start : start + total])
        what = describe_op(buf, gpa - start)
        if r < 0:
            why = f"host returned {errno_name(r)}"
        elif r == 0:
            why = "host processed 0 bytes (refused the op)"
        else:
            why = f"host claims {r} bytes processed of {length} offered"
        return HypercallError(
            f"KVM_HC_MMU_OP failed at {what} of the {total}-byte buffer at gpa {start:#x}: {why}", r, gpa
        )

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
