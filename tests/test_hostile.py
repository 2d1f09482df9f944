"""Hostile guests against the pure host core: any bytes give a defined result and touch only their targets.

The oracle is ``pvmmu.fuzzmodel``, written from docs/protocol.md rather than from
host_proc: the host must agree with it on every return value, every byte of
guest memory and every shadow entry.
"""

from __future__ import annotations

import os
import struct
import subprocess

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import host_proc.shell as shell_module
from host_proc.kvm import Kvm
from host_proc.shadow import gpte_to_spte
from host_proc.shell import HostShell
from protocol import messages as m
from protocol.abi import KVM_EFAULT, KVM_EINVAL, KVM_ENOSYS
from protocol.layout import MIN_MEM_BYTES, Layout
from pvmmu.fuzzmodel import HostModel, expected_hypercall
from pvmmu.liveness import PidWatch

MEM = MIN_MEM_BYTES  # the smallest legal guest: 4.25 MiB
U64_MAX = (1 << 64) - 1
u64 = st.integers(0, U64_MAX)
u32 = st.integers(0, (1 << 32) - 1)

# Addresses a hostile guest would try: legal entries, misaligned ones, the last bytes of
# memory and just past them, anywhere in 64 bits, and the values that wrap.
address = st.one_of(
    st.integers(0, MEM // 8 - 1).map(lambda i: i * 8),
    st.integers(0, MEM - 1),
    st.integers(MEM - 24, MEM + 24),
    u64,
    st.sampled_from([U64_MAX - 7, U64_MAX, 1 << 32, (1 << 32) - 8, 1 << 63]),
)
op_bytes = st.one_of(
    st.builds(lambda p, v: struct.pack("<IIQQ", 1, 0, p, v), address, u64),
    st.just(struct.pack("<II", 2, 0)),
    st.builds(lambda p: struct.pack("<IIQ", 3, 0, p), address),
    st.builds(lambda code, pad: struct.pack("<II", code, pad), u32, u32),  # any header, often unknown
    st.binary(max_size=24),  # garbage, and truncated ops
)
buffer = st.lists(op_bytes, max_size=30).map(b"".join)
call = st.tuples(
    buffer,
    st.one_of(st.integers(0, MEM - 1), st.just(0x10000)),  # where the guest puts it
    st.one_of(st.just(None), u64, st.integers(0, 800)),  # a0: the buffer's length (None), or anything
    st.one_of(st.just(None), address),  # the gpa: where the buffer is (None), or anything
    st.one_of(st.just(2), st.just(2), u64),  # nr
    st.tuples(u32, u32),  # junk in the high halves of a1/a2: the host must ignore it
)


def _run_calls(kvm: Kvm, model: HostModel, calls) -> None:
    mem = kvm.mem
    for buf, where, a0, gpa, nr, (junk1, junk2) in calls:
        buf = buf[: MEM - where]
        mem[where : where + len(buf)] = buf
        model.mem[where : where + len(buf)] = buf
        a0 = len(buf) if a0 is None else a0
        gpa = where if gpa is None else gpa
        a1 = (gpa & 0xFFFFFFFF) | (junk1 << 32)
        a2 = (gpa >> 32) | (junk2 << 32)
        out = expected_hypercall(model.mem, kvm.host_limit, nr, a0, a1, a2, kvm.layout.vcpu_area(0, 24).queue_gpa)
        model.apply(out)  # the model changes only the 8-byte entries its legal write_pte ops target
        ret = kvm.kvm_emulate_hypercall(0, nr, a0, a1, a2)
        assert ret == out.ret
        assert ret in (-KVM_EFAULT, -KVM_ENOSYS, -KVM_EINVAL) or 0 <= ret <= min(a0, kvm.host_limit)
    # Byte for byte: so the host changed nothing outside those entries either.
    assert mem == model.mem


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(call, min_size=1, max_size=4), st.sampled_from([8, 24, 512, 1024, 4096]))
def test_any_hypercall_gives_the_protocols_answer_and_touches_only_its_targets(calls, host_limit):
    layout = Layout(MEM, 2)
    kvm = Kvm(memoryview(bytearray(MEM)), layout, host_limit)
    model = HostModel(layout, host_limit)
    kvm.mem[:] = model.mem
    _run_calls(kvm, model, calls)
    assert kvm.shadow.spte == {gpa: gpte_to_spte(v) for gpa, v in model.spte.items()}
    assert kvm.shadow.pages == model.pages
    t = kvm.totals()
    assert (t.hypercalls, t.bytes, t.write_pte, t.flush_tlb, t.release_pt, t.partial) == tuple(
        model.totals[k] for k in ("hypercalls", "bytes", "write_pte", "flush_tlb", "release_pt", "partial")
    )
    assert t.refused == model.refused


def test_the_model_is_not_the_host_a_host_that_skips_the_alignment_check_is_caught():
    class SloppyKvm(Kvm):
        def kvm_pv_mmu_write(self, vcpu, c, pte_phys, pte_val):
            if pte_phys + 8 > self.mem_bytes:
                return super().kvm_pv_mmu_write(vcpu, c, pte_phys, pte_val)
            struct.pack_into("<Q", self.mem, pte_phys, pte_val)  # no alignment check
            c.write_pte += 1
            return True

    layout = Layout(MEM, 1)
    kvm = SloppyKvm(memoryview(bytearray(MEM)), layout, 512)
    model = HostModel(layout, 512)
    kvm.mem[:] = model.mem
    try:
        _run_calls(kvm, model, [(struct.pack("<IIQQ", 1, 0, 0x400004, 0x67), 0x10000, None, None, 2, (0, 0))])
    except AssertionError:
        return
    raise AssertionError("the property test would not notice a misaligned write")


# -- the shell: any message gets exactly the reply the protocol prescribes ----------------


class RecordingDoorbell:
    """Collects the shell's replies in place of a socket."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[bytes], bytes]] = []

    def send(self, envelope: list[bytes], payload: bytes) -> bool:
        self.sent.append((envelope, payload))
        return True


def _shell(layout: Layout) -> tuple[HostShell, RecordingDoorbell]:
    mem = memoryview(bytearray(layout.mem_bytes))
    mem[: len(layout.header_bytes())] = layout.header_bytes()

    def discard(gpa: int, n: int) -> None:
        mem[gpa : gpa + n] = bytes(n)

    doorbell = RecordingDoorbell()
    shell = HostShell(Kvm(mem, layout), doorbell, "pvmmu-1-00000000", 1, discard, token="t", log=open(os.devnull, "w"))
    return shell, doorbell


value = st.one_of(
    st.integers(-(1 << 63), U64_MAX), st.booleans(), st.none(), st.text(max_size=8), st.binary(max_size=8), st.floats()
)
vcpu = st.integers(0, 2)  # the test guest has two vCPUs: 2 is one too many
request = st.one_of(
    st.binary(max_size=64),
    st.lists(value, max_size=9).map(msgpack.packb),
    st.tuples(st.sampled_from(range(1, 9)), st.lists(value, max_size=7)).map(lambda t: msgpack.packb([t[0], *t[1]])),
    st.builds(
        lambda v, s, nr, a0, a1, a2: m.pack_hypercall(v, s, nr, a0, a1, a2),
        vcpu,
        st.integers(0, 3),
        st.just(2),
        u64,
        u32,
        u32,
    ),  # fmt: skip
    st.builds(m.pack_hello, vcpu, st.sampled_from([0, os.getpid(), 1 << 40])),
    st.builds(m.pack_hello, vcpu, st.just(os.getpid())),
    st.builds(m.pack_bye, vcpu),
    st.builds(lambda tok: m.pack_control(tok, "stats"), st.text(max_size=8).filter(lambda t: t != "t")),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request, max_size=16))
def test_any_message_gets_exactly_one_reply_the_model_predicts(messages):
    layout = Layout(MEM, 2)
    shell, doorbell = _shell(layout)
    model = HostModel(layout, shell.kvm.host_limit)
    for data in messages:
        expect = model.message(data, ours=True, pid_alive=lambda pid: PidWatch(pid).alive())
        shell.handle([b"ours", b""], data)
        assert len(doorbell.sent) == 1
        reply = m.unpack(doorbell.sent.pop()[1])
        if expect.kind == "reject":
            assert type(reply) is m.Reject and reply.reason.startswith(expect.category), (reply, expect)
        elif expect.kind == "welcome":
            assert type(reply) is m.Welcome and reply.info["vcpu"] == expect.vcpu
        else:
            assert reply == m.Return(expect.seq, expect.ret)
    assert shell.rejected == model.rejected
    assert sorted(shell.vcpus) == sorted(model.seq)
    assert shell.kvm.mem == model.mem


def test_a_message_nested_deeper_than_pythons_recursion_limit_is_just_malformed():
    # Found by pvmmu fuzz: the error message's repr() of the nested list raised RecursionError.
    deep = b"\x91" * 900 + b"\xc0"  # [[[...[nil]...]]]: within msgpack's limit, past Python's repr
    for data in (deep, b"\x97\x03" + deep + b"\x00" * 5):
        try:
            m.unpack(data)
        except m.MessageError as exc:
            assert len(str(exc)) < 200
    shell, doorbell = _shell(Layout(MEM, 1))
    shell.handle([b"ours", b""], deep)
    reply = m.unpack(doorbell.sent.pop()[1])
    assert type(reply) is m.Reject and reply.reason.startswith(m.REJECT_MALFORMED)
    assert shell.rejected == {m.REJECT_MALFORMED: 1}


def test_a_guest_cycling_pids_cannot_grow_the_hosts_record_of_departed_vcpus(monkeypatch):
    monkeypatch.setattr(shell_module, "MAX_DEPARTED", 3)
    shell, doorbell = _shell(Layout(MEM, 1))
    pids = []
    for _ in range(5):
        p = subprocess.Popen(["sleep", "60"])
        shell.handle([b"ours", b""], m.pack_hello(0, p.pid))
        assert type(m.unpack(doorbell.sent.pop()[1])) is m.Welcome
        p.kill()
        p.wait()
        shell.housekeeping()  # notices through the pidfd that the vCPU's process is gone
        pids.append(p.pid)
    assert [d["pid"] for d in shell.stats()["departed"]] == pids[-3:]
    assert shell.stats()["attached"] == []
