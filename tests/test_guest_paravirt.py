"""guest_proc.paravirt: the patch's queue, lazy mode, flush and hypercall loop."""

from __future__ import annotations

import struct

import pytest

from guest_proc.paravirt import PARAVIRT_LAZY_MMU, PARAVIRT_LAZY_NONE, HypercallError, KvmParaState
from protocol import KVM_EFAULT, KVM_HC_MMU_OP, ReleasePt, WritePte, decode
from protocol.layout import POOL_BASE, Layout

PT = POOL_BASE


def lens(pair) -> list[int]:
    return [length for (_, _, length, _) in pair.calls]


def test_direct_mode_is_one_hypercall_per_op_from_the_stack(pair_factory):
    pair = pair_factory("direct")
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()  # no effect before the patch
    assert pv.lazy_mode == PARAVIRT_LAZY_NONE
    for i in range(3):
        pv.kvm_mmu_write(PT + 8 * i, 0x1067)
    pv.kvm_flush_tlb()
    pv.kvm_leave_lazy_mmu()
    assert lens(pair) == [24, 24, 24, 8]
    assert {gpa for (_, _, _, gpa) in pair.calls} == {pv.stack_gpa}
    assert all(nr == KVM_HC_MMU_OP for (_, nr, _, _) in pair.calls)
    assert pv.hypercalls == 4 and pv.ops == {"write_pte": 3, "flush_tlb": 1, "release_pt": 0}


def test_multicall_queues_in_lazy_mode_and_flushes_when_the_next_op_would_not_fit(pair_factory):
    pair = pair_factory("multicall", queue_bytes=1024, host_limit=512)
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    for i in range(42):  # 42 * 24 = 1008 bytes: fits
        pv.kvm_mmu_write(PT + 8 * i, 0x1067)
    assert pair.calls == [] and pv.mmu_queue_len == 1008
    pv.kvm_mmu_write(PT + 8 * 42, 0x1067)  # 1032 > 1024: flush the 42 first, then queue this one
    assert lens(pair) == [1008, 504]  # one kvm_mmu_op, two hypercalls: the host copies 512 bytes at a time
    assert [gpa for (*_, gpa) in pair.calls] == [pv.queue_gpa, pv.queue_gpa + 504]
    assert pv.mmu_queue_len == 24
    pv.kvm_leave_lazy_mmu()  # leaving lazy mode flushes the rest
    assert lens(pair) == [1008, 504, 24]
    assert pv.mmu_queue_len == 0 and pv.lazy_mode == PARAVIRT_LAZY_NONE
    assert pv.flushes == 2 and pv.hypercalls == 3


def test_queued_mode_buffers_but_flushes_one_hypercall_per_op(pair_factory):
    pair = pair_factory("queued")
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    for i in range(5):
        pv.kvm_mmu_write(PT + 8 * i, 0x1067)
    pv.kvm_flush_tlb()
    assert pair.calls == []
    pv.kvm_leave_lazy_mmu()
    assert lens(pair) == [24] * 5 + [8]
    assert [gpa - pv.queue_gpa for (*_, gpa) in pair.calls] == [0, 24, 48, 72, 96, 120]


def test_release_pt_is_never_queued(pair_factory):
    pair = pair_factory("multicall")
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0x1067)
    pv.kvm_release_pt(PT + 0x1000)
    assert lens(pair) == [16] and pair.calls[0][3] == pv.stack_gpa
    assert pv.mmu_queue_len == 24  # the queued write is still queued
    pv.kvm_leave_lazy_mmu()
    assert lens(pair) == [16, 24]


def test_para_state_lives_in_guest_memory_with_the_c_layout(pair_factory):
    pair = pair_factory("multicall", queue_bytes=1024)
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0xABC067)
    pv.kvm_flush_tlb()
    # struct kvm_para_state { u8 mmu_queue[1024]; int mmu_queue_len; enum paravirt_lazy_mode mode; }
    q = pv.queue_gpa
    assert struct.unpack_from("<iI", pair.mem, q + 1024) == (32, PARAVIRT_LAZY_MMU)
    assert decode(bytes(pair.mem[q : q + 32])) == [WritePte(PT, 0xABC067), decode(bytes(pair.mem[q + 24 : q + 32]))[0]]
    pv.kvm_leave_lazy_mmu()
    assert struct.unpack_from("<iI", pair.mem, q + 1024) == (0, PARAVIRT_LAZY_NONE)


def _stub(returns):
    calls = []

    def hypercall(nr, a0, a1, a2):
        calls.append(a0)
        return returns.pop(0)

    return hypercall, calls


def _pv(pair, hypercall, mode="multicall"):
    return KvmParaState(pair.mem, pair.layout.vcpu_area(0, 1024), hypercall, mode)


def test_the_guest_loops_on_partial_progress(pair_factory):
    pair = pair_factory()
    hypercall, calls = _stub([24, 48, 24])
    pv = _pv(pair, hypercall)
    pv.kvm_enter_lazy_mmu()
    for i in range(4):
        pv.kvm_mmu_write(PT + 8 * i, 0x1067)
    pv.kvm_leave_lazy_mmu()
    assert calls == [96, 72, 24]


def test_zero_progress_raises_and_names_the_op_instead_of_spinning(pair_factory):
    pair = pair_factory()
    hypercall, calls = _stub([24, 0])
    pv = _pv(pair, hypercall)
    pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0x1067)
    pv.kvm_mmu_write(PT + 0x7, 0x2067)
    with pytest.raises(HypercallError) as err:
        pv.kvm_leave_lazy_mmu()
    assert calls == [48, 24]
    assert "write_pte(pte_phys=0x400007, pte_val=0x2067)" in str(err.value)
    assert "processed 0 bytes" in str(err.value)
    assert err.value.gpa == pv.queue_gpa + 24


def test_an_error_code_raises_with_its_name(pair_factory):
    pair = pair_factory()
    pv = _pv(pair, _stub([-KVM_EFAULT])[0], mode="direct")
    with pytest.raises(HypercallError) as err:
        pv.kvm_release_pt(PT)
    assert "-KVM_EFAULT" in str(err.value) and "release_pt(pt_phys=0x400000)" in str(err.value)
    assert err.value.ret == -KVM_EFAULT


def test_a_host_claiming_more_than_offered_is_an_error(pair_factory):
    pair = pair_factory()
    pv = _pv(pair, _stub([100])[0], mode="direct")
    with pytest.raises(HypercallError, match="claims 100 bytes processed of 24"):
        pv.kvm_mmu_write(PT, 1)


def test_end_to_end_against_the_real_host_core_a_refused_write_is_named(pair_factory):
    pair = pair_factory("multicall")
    pv = pair.pv
    pv.kvm_enter_lazy_mmu()
    pv.kvm_mmu_write(PT, 0x1067)
    pv.kvm_mmu_write(pair.layout.mem_bytes, 0x1067)  # outside guest memory
    with pytest.raises(HypercallError, match=r"write_pte\(pte_phys=0x1000000"):
        pv.kvm_leave_lazy_mmu()
    # First call: the good write is applied, the walk stops at the bad one (24 bytes processed).
    # Second call starts at the bad one: 0 bytes, so the guest stops and names it.
    assert [length for (*_, length, _) in pair.calls] == [48, 24]
    assert pair.kvm.counters[0].refused == {"pte_phys outside guest memory": 2}
    assert pair.kvm.counters[0].write_pte == 1


def test_mode_must_be_known(pair_factory):
    pair = pair_factory()
    with pytest.raises(ValueError, match="mode must be one of"):
        _pv(pair, _stub([])[0], mode="turbo")


def test_release_pt_op_bytes(pair_factory):
    pair = pair_factory("direct")
    pair.pv.kvm_release_pt(PT)
    assert decode(bytes(pair.mem[pair.pv.stack_gpa : pair.pv.stack_gpa + 16])) == [ReleasePt(PT)]
    assert pair.pv.stack_gpa == Layout(16 << 20, 1).vcpu_area(0, 1024).stack_gpa
