"""The host's hypercall handler: KVM_HC_MMU_OP as ``kvm_pv_mmu_op()`` of Linux 2.6.26.

A plain object over a guest-memory buffer: no sockets, no processes, so every
rule below is testable in one process.

What 2.6.26 did, and this does:

- copy at most ``host_limit`` bytes (its on-stack ``buffer.buf[512]``) of the
  guest's op buffer out of guest memory *before* looking at it (kvm_read_guest),
  so a guest that rewrites the buffer meanwhile cannot make the host check one
  thing and apply another;
- apply the ops in order; stop at one it cannot complete: cut off at the end of
  what it copied, unknown op code, or a write it refuses;
- return the bytes processed; the guest calls again for the rest.

Where pvmmu differs, deliberately:

- A buffer gpa outside guest memory returns ``-KVM_EFAULT`` (2.6.26 returned 0
  bytes processed, and its guest then spun forever).
- 2.6.26 counted an op's bytes as processed *before* applying it
  (``pv_mmu_read_buffer``), so a refused write was silently skipped. Here only
  fully applied ops count, so the guest stops at the refused op and can name it.
- A write_pte must target an 8-byte aligned entry inside guest memory (KVM's
  emulator_write_phys would have faulted outside memory and split an unaligned
  write); release_pt of a page outside memory is refused.
- On request (a host started with --status) the hypercall also reports one
  status per op it looked at, as the patch's v1 did: 0 applied, -KVM_E* refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from host_proc.shadow import ShadowCheck, ShadowMmu
from protocol.abi import (
    KVM_E2BIG,
    KVM_EFAULT,
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EOPNOTSUPP,
    KVM_HC_MMU_OP,
    KVM_MMU_OP_FLUSH_TLB,
    KVM_MMU_OP_WRITE_PTE,
    KVM_PV_MMU_OP_BUFFER,
    OP_REFUSALS,
    OP_SIZE,
    PVMMU_HC_RING_SETUP,
    RELEASE_PT,
    UNKNOWN_OP,
    WRITE_PTE,
    peek_op,
)
from protocol.layout import Layout
from protocol.messages import hc_gpa
from protocol.ring import Ring, RingConsumer, RingError

_U64 = struct.Struct("<Q")

# What each refusal returns (negated): RAX for a hypercall, the error word of a ring.
REFUSAL_CODES = {
    "unknown hypercall": KVM_ENOSYS,
    "buffer outside guest memory": KVM_EFAULT,
    UNKNOWN_OP: KVM_EOPNOTSUPP,
    **{reason: code for (_, code), reason in OP_REFUSALS.items()},  # an op's own refusals
    "ring outside the vCPU's slot": KVM_EINVAL,
    "ring that does not fit": KVM_EINVAL,
}


@dataclass
class VcpuCounters:
    """What one vCPU asked of the host (kvm->stat and vcpu->stat, roughly)."""

    hypercalls: int = 0
    bytes: int = 0  # op bytes processed
    write_pte: int = 0
    flush_tlb: int = 0
    release_pt: int = 0
    partial: int = 0  # hypercalls offering more bytes than the host copies
    ring_passes: int = 0  # ring mode: drains that consumed something
    refused: dict[str, int] = field(default_factory=dict)  # reason -> count

    def as_dict(self) -> dict:
        return {
            "hypercalls": self.hypercalls,
            "bytes": self.bytes,
            "ops": {
                "write_pte": self.write_pte,
                "flush_tlb": self.flush_tlb,
                "release_pt": self.release_pt,
                "total": self.write_pte + self.flush_tlb + self.release_pt,
            },
            "partial": self.partial,
            "ring_passes": self.ring_passes,
            "refused": dict(self.refused),
        }


class Kvm:
    """One guest's worth of host: its memory, its shadow MMU, its vCPUs' counters."""

    def __init__(self, mem: memoryview, layout: Layout, host_limit: int = KVM_PV_MMU_OP_BUFFER) -> None:
        if host_limit < 8:
            raise ValueError(f"host limit must be at least 8 bytes, not {host_limit}")
        if len(mem) < layout.mem_bytes:
            raise ValueError("guest memory buffer is smaller than its layout")
        self.mem = mem
        self.layout = layout
        self.mem_bytes = layout.mem_bytes
        self.host_limit = host_limit
        self.shadow = ShadowMmu(mem)
        self.counters: dict[int, VcpuCounters] = {}
        self.first_refusals: list[str] = []  # the first time each reason was seen, for the log
        self.rings: dict[int, RingConsumer] = {}  # ring mode: vCPU -> its op ring

    # -- the hypercall path --------------------------------------------------------

    def kvm_emulate_hypercall(
        self, vcpu: int, nr: int, a0: int, a1: int, a2: int, statuses: bytearray | None = None
    ) -> int:
        """The VM exit: dispatch on the hypercall number, return what goes in RAX.

        ``statuses`` (--status) gets one status byte per op a KVM_HC_MMU_OP looked at.
        """
        c = self._counters(vcpu)
        c.hypercalls += 1
        if nr == KVM_HC_MMU_OP:
            return self.kvm_pv_mmu_op(vcpu, a0, hc_gpa(a1, a2), statuses)
        if nr == PVMMU_HC_RING_SETUP:
            return self.kvm_pv_ring_setup(vcpu, a0, hc_gpa(a1, a2))
        return self._refuse(c, "unknown hypercall", f"hypercall nr {nr}")

    def kvm_pv_mmu_op(self, vcpu: int, nbytes: int, gpa: int, statuses: bytearray | None = None) -> int:
        """Apply up to ``host_limit`` bytes of the op buffer at ``gpa``; return bytes processed.

        With ``statuses``, append one signed byte per op looked at: 0 for each op
        applied, then -KVM_E* for the op refused, if one was. Worked out from the
        counters around the walk, so the walk itself is the same with or without.
        """
        c = self._counters(vcpu)
        n = min(nbytes, self.host_limit)
        if gpa + n > self.mem_bytes:
            return self._refuse(c, "buffer outside guest memory", f"{n} bytes at gpa {gpa:#x}")
        buf = self.kvm_read_guest(gpa, n)
        if statuses is not None:
            before = c.write_pte + c.flush_tlb + c.release_pt
        processed = r = 0
        while processed < n:
            r = self.kvm_pv_mmu_op_one(vcpu, c, buf, processed, n)
            if r <= 0:
                break
            processed += r
        if n < nbytes:
            c.partial += 1  # the guest offered more than the host copies: it calls again
        c.bytes += processed
        if statuses is not None:
            statuses += bytes(c.write_pte + c.flush_tlb + c.release_pt - before)
            if r < 0:
                statuses.append(r & 0xFF)
        return processed

    def kvm_read_guest(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes of guest memory into the host's own buffer; only the copy is parsed."""
        return bytes(self.mem[gpa : gpa + n])

    def kvm_pv_mmu_op_one(self, vcpu: int, c: VcpuCounters, buf: bytes, off: int, end: int) -> int:
        """Apply the op at ``off``: its size if applied, 0 if cut off at ``end``, -KVM_E* if refused."""
        code, size = peek_op(buf, off, end)
        if size == 0:
            if code is not None and code not in OP_SIZE:
                return self._refuse(c, "unknown op code", f"op code {code} at offset {off}")
            return 0  # truncated: the end of this copy (or of the guest's buffer)
        if code == KVM_MMU_OP_WRITE_PTE:
            _, _, pte_phys, pte_val = WRITE_PTE.unpack_from(buf, off)
            r = self.kvm_pv_mmu_write(vcpu, c, pte_phys, pte_val)
        elif code == KVM_MMU_OP_FLUSH_TLB:
            r = self.kvm_pv_mmu_flush_tlb(vcpu, c)
        else:
            _, _, pt_phys = RELEASE_PT.unpack_from(buf, off)
            r = self.kvm_pv_mmu_release_pt(vcpu, c, pt_phys)
        return size if r == 0 else r

    def kvm_pv_mmu_write(self, vcpu: int, c: VcpuCounters, pte_phys: int, pte_val: int) -> int:
        """Write the guest's page-table entry on its behalf and update the shadow; 0 or -KVM_E*."""
        if pte_phys & 7 or pte_phys + 8 > self.mem_bytes:
            why = "misaligned pte_phys" if pte_phys & 7 else "pte_phys outside guest memory"
            return self._refuse(c, why, f"write_pte(pte_phys={pte_phys:#x}, pte_val={pte_val:#x})")
        _U64.pack_into(self.mem, pte_phys, pte_val)
        self.shadow.write(vcpu, pte_phys, pte_val)
        c.write_pte += 1
        return 0

    def kvm_pv_mmu_flush_tlb(self, vcpu: int, c: VcpuCounters) -> int:
        """kvm_set_cr3(vcpu, cr3): drop the vCPU's cached translations."""
        self.shadow.flush_tlb(vcpu)
        c.flush_tlb += 1
        return 0

    def kvm_pv_mmu_release_pt(self, vcpu: int, c: VcpuCounters, pt_phys: int) -> int:
        """mmu_unshadow(): the page at ``pt_phys`` is no longer a page table; 0 or -KVM_E*."""
        if pt_phys >= self.mem_bytes:
            return self._refuse(c, "pt_phys outside guest memory", f"release_pt(pt_phys={pt_phys:#x})")
        self.shadow.unshadow(pt_phys)
        c.release_pt += 1
        return 0

    # -- ring mode (beyond the patch: protocol.ring) --------------------------------

    def kvm_pv_ring_setup(self, vcpu: int, capacity: int, gpa: int) -> int:
        """Register vCPU ``vcpu``'s op ring, which must sit at the start of its own slot."""
        c = self._counters(vcpu)
        if gpa != self.layout.vcpu_area(vcpu, 24).queue_gpa:
            return self._refuse(c, "ring outside the vCPU's slot", f"ring at gpa {gpa:#x}")
        try:
            ring = Ring(self.mem, gpa, capacity)
        except RingError as exc:
            return self._refuse(c, "ring that does not fit", str(exc))
        self.drop_ring(vcpu)
        self.rings[vcpu] = RingConsumer(ring)
        return 0

    def kvm_pv_ring_drain(self, vcpu: int) -> int:
        """Apply what vCPU ``vcpu`` has published (at most ``host_limit`` bytes); bytes consumed.

        Copy first, then parse the copy, as for a hypercall. A refused op stops the
        ring for good: its code and position go in the ring's error words.
        """
        consumer = self.rings[vcpu]
        if consumer.ring.error:
            return 0
        c = self._counters(vcpu)
        start, buf = consumer.take(self.host_limit)
        end = len(buf)
        processed = 0
        while processed < end:
            r = self.kvm_pv_mmu_op_one(vcpu, c, buf, processed, end)
            if r < 0 or (r == 0 and processed == 0 and end == self.host_limit):
                # refused, or an op larger than everything the host will ever copy at once
                consumer.fail(r if r < 0 else -KVM_E2BIG, start + processed)
                break
            if r == 0:
                break  # the rest of an op past host_limit: next pass
            processed += r
        if processed:
            consumer.advance(processed)
            c.bytes += processed
            c.ring_passes += 1
        return processed

    def drop_ring(self, vcpu: int) -> None:
        consumer = self.rings.pop(vcpu, None)
        if consumer is not None:
            consumer.ring.release()

    # -- bookkeeping ---------------------------------------------------------------

    def _counters(self, vcpu: int) -> VcpuCounters:
        c = self.counters.get(vcpu)
        if c is None:
            c = self.counters[vcpu] = VcpuCounters()
        return c

    def _refuse(self, c: VcpuCounters, reason: str, detail: str) -> int:
        """Count a refusal under its reason, remember the first of each; return its -KVM_E* code."""
        count = c.refused.get(reason, 0)
        c.refused[reason] = count + 1
        if count == 0:
            self.first_refusals.append(f"{reason}: {detail}")
        return -REFUSAL_CODES[reason]

    def reset_counters(self) -> None:
        self.counters.clear()
        self.first_refusals.clear()

    def forget_vcpu(self, vcpu: int) -> None:
        """A vCPU went away: drop its TLB model and ring (its counters stay for the report)."""
        self.shadow.forget_vcpu(vcpu)
        self.drop_ring(vcpu)

    def reset_vcpu_pool(self, vcpu: int) -> tuple[int, int]:
        """A vCPU is starting over: forget the shadow of its pool's pages.

        Returns the pool's (gpa, bytes); the caller zeroes that memory, so the new
        vCPU finds the blank pages a fresh guest would.
        """
        area = self.layout.vcpu_area(vcpu, 24)
        lo, hi = area.pool_gpa, area.pool_gpa + area.pool_bytes
        for page in [p for p in self.shadow.pages if lo <= p < hi]:
            self.shadow.unshadow(page)
        self.forget_vcpu(vcpu)
        return lo, area.pool_bytes

    def check(self) -> ShadowCheck:
        return self.shadow.check(self.mem, self.layout)

    def totals(self) -> VcpuCounters:
        t = VcpuCounters()
        for c in self.counters.values():
            t.hypercalls += c.hypercalls
            t.bytes += c.bytes
            t.write_pte += c.write_pte
            t.flush_tlb += c.flush_tlb
            t.release_pt += c.release_pt
            t.partial += c.partial
            t.ring_passes += c.ring_passes
            for k, v in c.refused.items():
                t.refused[k] = t.refused.get(k, 0) + v
        return t
