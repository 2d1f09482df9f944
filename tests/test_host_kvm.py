"""host_proc.kvm: KVM_HC_MMU_OP as kvm_pv_mmu_op() of 2.6.26, in one process."""

from __future__ import annotations

import struct

import pytest

import protocol
from host_proc.kvm import Kvm
from host_proc.shadow import HOST_PFN_BASE, gpte_to_spte
from protocol import FlushTlb, ReleasePt, WritePte
from protocol.layout import POOL_BASE, Layout
from protocol.messages import gpa_args

MEM = 16 << 20
BUF = 0x10000  # where the tests put op buffers (vCPU 0's queue)
PT = POOL_BASE  # a page-table page
U64 = struct.Struct("<Q")


@pytest.fixture
def kvm():
    layout = Layout(MEM, 1)
    return Kvm(memoryview(bytearray(MEM)), layout, host_limit=512)


def put(kvm: Kvm, ops, at: int = BUF) -> int:
    buf = protocol.encode(ops)
    kvm.mem[at : at + len(buf)] = buf
    return len(buf)


def hc(kvm: Kvm, length: int, gpa: int = BUF, nr: int = protocol.KVM_HC_MMU_OP) -> int:
    return kvm.kvm_emulate_hypercall(0, nr, length, *gpa_args(gpa))


def pte(kvm: Kvm, gpa: int) -> int:
    return U64.unpack_from(kvm.mem, gpa)[0]


def writes(n: int, base: int = PT):
    return [WritePte(base + 8 * i, (0x1000 + i) << 12 | 0x67) for i in range(n)]


def test_a_full_queue_takes_two_hypercalls_at_the_512_byte_limit(kvm):
    length = put(kvm, writes(42))
    assert length == 1008
    assert hc(kvm, length) == 504  # 21 ops; the 22nd is cut at byte 512 of the copy
    assert [pte(kvm, PT + 8 * i) != 0 for i in (20, 21)] == [True, False]
    assert hc(kvm, length - 504, BUF + 504) == 504
    assert all(pte(kvm, PT + 8 * i) == (0x1000 + i) << 12 | 0x67 for i in range(42))
    c = kvm.counters[0]
    assert (c.hypercalls, c.write_pte, c.bytes, c.partial) == (2, 42, 1008, 1)


def test_a_larger_host_limit_takes_the_whole_queue(kvm):
    kvm.host_limit = 1024
    length = put(kvm, writes(42))
    assert hc(kvm, length) == 1008


def test_truncated_op_at_the_end_of_the_guest_buffer_stops_the_walk(kvm):
    buf = protocol.encode(writes(2))[:40]  # one whole write, then 16 of 24 bytes
    kvm.mem[BUF : BUF + 40] = buf
    assert hc(kvm, 40) == 24
    assert hc(kvm, 16, BUF + 24) == 0
    assert pte(kvm, PT + 8) == 0


def test_unknown_op_stops_the_walk_and_is_counted(kvm):
    length = put(kvm, writes(1))
    kvm.mem[BUF + length : BUF + length + 8] = struct.pack("<II", 77, 0)
    put(kvm, writes(1, PT + 0x100), BUF + length + 8)
    assert hc(kvm, length + 8 + 24) == 24
    assert kvm.counters[0].refused == {"unknown op code": 1}
    assert pte(kvm, PT + 0x100) == 0  # nothing after the unknown op was applied
    assert "op code 77 at offset 24" in kvm.first_refusals[0]


@pytest.mark.parametrize(
    "target, reason",
    [(PT + 4, "misaligned pte_phys"), (MEM, "pte_phys outside guest memory"), (MEM - 4, "misaligned pte_phys"),
     ((1 << 64) - 8, "pte_phys outside guest memory")],
)  # fmt: skip
def test_a_refused_write_is_not_applied_and_not_counted_as_processed(kvm, target, reason):
    before = bytes(kvm.mem)
    length = put(kvm, [WritePte(target, 0x67)] + writes(1))
    assert hc(kvm, length) == 0
    assert kvm.counters[0].refused == {reason: 1}
    after = bytes(kvm.mem)
    assert after[:BUF] == before[:BUF] and after[BUF + length :] == before[BUF + length :]
    assert kvm.shadow.spte == {}


@pytest.mark.parametrize("gpa", [MEM, MEM - 8, (1 << 64) - 8, 1 << 40])
def test_a_buffer_outside_guest_memory_is_efault(kvm, gpa):
    assert hc(kvm, 24, gpa) == -protocol.KVM_EFAULT
    assert kvm.counters[0].refused == {"buffer outside guest memory": 1}


def test_huge_length_is_capped_by_the_host_limit(kvm):
    put(kvm, writes(3))
    # The host copies 512 bytes, not 2**64 - 1; the zero bytes after the 3 ops are op code 0: the walk stops.
    assert hc(kvm, (1 << 64) - 1) == 72
    assert kvm.counters[0].write_pte == 3
    assert kvm.counters[0].refused == {"unknown op code": 1}


def test_unknown_hypercall_is_enosys(kvm):
    assert hc(kvm, 24, nr=99) == -protocol.KVM_ENOSYS
    assert kvm.counters[0].refused == {"unknown hypercall": 1}


def test_write_updates_guest_memory_and_shadow_and_flush_clears_stale_tlb(kvm):
    put(kvm, [WritePte(PT, 0x5000 | 0x67)])
    assert hc(kvm, 24) == 24
    assert kvm.shadow.spte == {PT: 0x5067 + (HOST_PFN_BASE << 12)}
    assert gpte_to_spte(0x5067) == kvm.shadow.spte[PT]
    assert kvm.check().ok
    put(kvm, [WritePte(PT, 0x5000 | 0x65)])  # present -> present, read-only: a TLB may hold the old one
    hc(kvm, 24)
    check = kvm.check()
    assert (check.ok, check.stale_tlb, check.mismatches) == (False, 1, 0)
    put(kvm, [FlushTlb()])
    assert hc(kvm, 8) == 8
    assert kvm.check().ok
    assert kvm.counters[0].flush_tlb == 1


def test_release_pt_drops_the_shadow_of_that_page(kvm):
    length = put(kvm, writes(3) + writes(1, PT + 0x1000))
    hc(kvm, length)
    put(kvm, [ReleasePt(PT)])
    assert hc(kvm, 16) == 16
    assert set(kvm.shadow.spte) == {PT + 0x1000}
    assert kvm.shadow.pages == {PT + 0x1000}
    put(kvm, [ReleasePt(MEM + 0x1000)])
    assert hc(kvm, 16) == 0
    assert kvm.counters[0].refused == {"pt_phys outside guest memory": 1}


def test_check_catches_guest_memory_changed_behind_the_hosts_back(kvm):
    hc(kvm, put(kvm, writes(4)))
    assert kvm.check().ok
    U64.pack_into(kvm.mem, PT + 8, 0xBAD067)  # a write that bypassed the hypercall
    U64.pack_into(kvm.mem, PT + 0x800, 0x777067)  # an entry the host never shadowed
    check = kvm.check()
    assert (check.ok, check.mismatches) == (False, 2)
    assert any("0x%x" % (PT + 8) in e for e in check.examples)


def test_host_applies_what_it_copied_even_if_the_guest_rewrites_the_buffer(kvm):
    class RacingKvm(Kvm):
        """The guest rewrites its buffer the moment after the host copied it."""

        def kvm_read_guest(self, gpa: int, n: int) -> bytes:
            copy = super().kvm_read_guest(gpa, n)
            evil = protocol.encode([WritePte(PT + 0x800, 0xBAD067)] * (n // 24))
            self.mem[gpa : gpa + len(evil)] = evil
            return copy

    racing = RacingKvm(kvm.mem, kvm.layout, 512)
    length = put(racing, writes(2))
    assert racing.kvm_emulate_hypercall(0, protocol.KVM_HC_MMU_OP, length, *gpa_args(BUF)) == 48
    assert [pte(racing, PT), pte(racing, PT + 8), pte(racing, PT + 0x800)] == [0x1000067, 0x1001067, 0]


def test_a_page_released_and_reused_without_clearing_is_shadowed_with_all_its_entries(kvm):
    # Found by pvmmu fuzz: KVM builds a shadow page from the whole guest table, not just the entry written.
    hc(kvm, put(kvm, writes(2)))
    put(kvm, [ReleasePt(PT)])
    assert hc(kvm, 16) == 16 and kvm.shadow.spte == {}
    put(kvm, [WritePte(PT + 0x100, 0x9067)])  # the page is a page table again; entries 0 and 1 are still there
    assert hc(kvm, 24) == 24
    assert set(kvm.shadow.spte) == {PT, PT + 8, PT + 0x100}
    assert kvm.check().ok
