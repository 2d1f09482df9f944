"""Per-op status (--status): the host's reply names each op's fate, and a refused op is named at once."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from guest_proc.paravirt import MODES, HypercallError
from guest_proc.shell import GuestError, GuestSession
from guest_proc.workloads import prepare
from protocol import messages as m
from protocol.abi import (
    KVM_EFAULT,
    KVM_EINVAL,
    KVM_EOPNOTSUPP,
    KVM_HC_MMU_OP,
    FlushTlb,
    ReleasePt,
    WritePte,
    encode,
)
from protocol.layout import POOL_BASE
from pvmmu.supervisor import RunConfig, hosted, run_pair

PT = POOL_BASE
MEM = 16 << 20


def test_return_forms_round_trip_and_combine():
    plain, stamped = m.pack_return(5, 48), m.pack_return_stamped(5, 48, 10, 20, 30)
    status = m.pack_return_status(5, 48, b"\0\0\xea")
    both = m.pack_return_status(5, 48, b"\0\0\xea", (10, 20, 30))
    assert m.unpack(plain) == m.Return(5, 48)
    assert m.unpack(stamped) == m.Return(5, 48, (10, 20, 30))
    assert m.unpack(status) == m.Return(5, 48, None, b"\0\0\xea")
    assert m.unpack(both) == m.Return(5, 48, (10, 20, 30), b"\0\0\xea")
    # what the statuses cost on the wire: a bin header and one byte per op, nothing else
    assert len(status) - len(plain) == len(both) - len(stamped) == 2 + 3
    assert len(m.pack_return_status(5, 504, bytes(21))) == len(m.pack_return(5, 504)) + 2 + 21
    assert [m.op_status(b) for b in b"\0\xea\xf2\xa1"] == [0, -KVM_EINVAL, -KVM_EFAULT, -KVM_EOPNOTSUPP]


@pytest.mark.parametrize(
    "msg, problem",
    [
        ([m.MSG_RETURN, 5, 48, 10, 20], "has 5 elements, expected 3, 4 (--status), 6 (--phases) or 7"),
        ([m.MSG_RETURN, 5, 48, [0, 0]], "statuses must be a bin"),
        ([m.MSG_RETURN, 5, 48, "\0"], "statuses must be a bin"),
        ([m.MSG_RETURN, 5, 48, 1, 2, 3, 7], "statuses must be a bin"),
        ([m.MSG_RETURN, 5, 48, bytes(m.MAX_STATUSES + 1)], f"at most {m.MAX_STATUSES} bytes"),
    ],
)
def test_malformed_statuses_are_refused(msg, problem):
    with pytest.raises(m.MessageError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        m.unpack(msgpack.packb(msg, use_bin_type=True))


def host_call(pair, buf: bytes, at: int = PT + 0x8000) -> tuple[int, bytes]:
    """Put ``buf`` in guest memory and hand it to the host with a statuses buffer."""
    pair.mem[at : at + len(buf)] = buf
    statuses = bytearray()
    ret = pair.kvm.kvm_emulate_hypercall(0, KVM_HC_MMU_OP, len(buf), at, 0, statuses)
    return ret, bytes(statuses)


@pytest.mark.parametrize(
    "bad, code",
    [
        (WritePte(PT + 4, 0x1067), -KVM_EINVAL),
        (WritePte(MEM, 0x1067), -KVM_EFAULT),
        (ReleasePt(MEM + 4096), -KVM_EFAULT),
        (None, -KVM_EOPNOTSUPP),
    ],
)
def test_the_host_reports_a_zero_per_applied_op_then_the_refused_ops_code(pair_factory, bad, code):
    pair = pair_factory()
    head = encode([WritePte(PT, 0x1067), FlushTlb()])
    bad_bytes = bad.encode() if bad is not None else (77).to_bytes(4, "little") + bytes(12)
    ret, statuses = host_call(pair, head + bad_bytes + encode([WritePte(PT + 8, 0x2067)]))
    assert ret == len(head)
    assert [m.op_status(b) for b in statuses] == [0, 0, code]
    assert sum(pair.kvm.counters[0].refused.values()) == 1


def test_statuses_cover_applied_ops_only_when_the_copy_cuts_one_off_and_none_for_a_bad_buffer(pair_factory):
    pair = pair_factory(host_limit=512)
    ret, statuses = host_call(pair, encode([WritePte(PT + 8 * i, 0x1067) for i in range(30)]))
    assert ret == 504 and statuses == bytes(21)  # the 22nd is cut off at 512 bytes: no status, call again
    statuses = bytearray()
    assert pair.kvm.kvm_emulate_hypercall(0, KVM_HC_MMU_OP, 24, MEM, 0, statuses) == -KVM_EFAULT
    assert statuses == b""


def test_the_walk_is_the_same_with_or_without_statuses(pair_factory):
    buf = encode([WritePte(PT + 8 * i, 0x1067 + i) for i in range(10)] + [FlushTlb(), WritePte(PT + 3, 1)])
    a, b = pair_factory(), pair_factory()
    a.mem[PT + 0x8000 : PT + 0x8000 + len(buf)] = buf
    ret_a = a.kvm.kvm_emulate_hypercall(0, KVM_HC_MMU_OP, len(buf), PT + 0x8000, 0)
    ret_b, _ = host_call(b, buf)
    assert ret_a == ret_b and a.kvm.counters == b.kvm.counters and a.mem == b.mem


@pytest.mark.parametrize(
    "dest, expect",
    [
        (PT + 4, "host refused write_pte(pte_phys=0x400004, pte_val=0x2067) at offset 24 of the 72-byte buffer "
                 "at gpa 0x10000: -KVM_EINVAL (misaligned pte_phys)"),
        (MEM, "host refused write_pte(pte_phys=0x1000000, pte_val=0x2067) at offset 24 of the 72-byte buffer "
              "at gpa 0x10000: -KVM_EFAULT (pte_phys outside guest memory)"),
    ],
)  # fmt: skip
def test_the_guest_names_the_refused_op_and_why_from_the_first_reply(pair_factory, dest, expect):
    calls = {}
    for status in (False, True):
        pair = pair_factory("multicall", status=status)
        pv = pair.pv
        pv.kvm_enter_lazy_mmu()
        pv.kvm_mmu_write(PT, 0x1067)
        pv.kvm_mmu_write(dest, 0x2067)
        pv.kvm_mmu_write(PT + 16, 0x3067)
        with pytest.raises(HypercallError) as err:
            pv.kvm_leave_lazy_mmu()
        calls[status] = (len(pair.calls), sum(pair.kvm.counters[0].refused.values()))
        if status:
            assert str(err.value) == expect and err.value.gpa == pv.queue_gpa + 24
            assert pair.replies == [(24, b"\0" + bytes([err.value.ret & 0xFF]))]
    assert calls == {False: (2, 2), True: (1, 1)}  # without: a second call makes no progress, refused again


def test_release_pt_and_an_unknown_op_are_named_too(pair_factory):
    pair = pair_factory("multicall", status=True)
    with pytest.raises(HypercallError, match=r"release_pt\(pt_phys=0x1001000\) at offset 0 .*-KVM_EFAULT \(pt_phys"):
        pair.pv.kvm_release_pt(MEM + 4096)
    at = pair.pv.stack_gpa
    pair.mem[at : at + 16] = encode([FlushTlb()]) + (9).to_bytes(4, "little") + bytes(4)
    with pytest.raises(HypercallError, match=r"unknown op code 9 at offset 8.*-KVM_EOPNOTSUPP \(unknown op code\)"):
        pair.pv.kvm_mmu_op(at, 16)


def test_statuses_that_disagree_with_the_return_value_are_not_believed(pair_factory):
    pair = pair_factory("multicall", status=True)
    pv = pair.pv
    pv.status_hypercall = lambda *regs: (24, b"\0\0\xea")  # two applied, says the host; 24 bytes is one op
    pv.kvm_enter_lazy_mmu()
    for i in range(3):
        pv.kvm_mmu_write(PT + 8 * i, 0x1067)
    with pytest.raises(HypercallError, match=r"statuses \(2 applied, then -22\) disagree with its return value 24"):
        pv.kvm_leave_lazy_mmu()


@pytest.mark.parametrize("workload, size", [("writes", 500), ("fork", 150)])
def test_status_changes_no_count_and_no_state(pair_factory, workload, size):
    for mode in MODES:
        runs = []
        for status in (False, True):
            pair = pair_factory(mode, status=status)
            work = prepare(pair.kernel, workload, size, 3)
            pair.replies.clear()
            work.run()
            runs.append((pair.kernel.check()["digest"], pair.pv.hypercalls, dict(pair.pv.ops)))
            if status and mode != "ring":  # ring mode makes no KVM_HC_MMU_OP: nothing carries a status
                assert len(pair.replies) == pair.pv.status_replies == pair.pv.hypercalls
                assert sum(len(s) for _, s in pair.replies) == pair.pv.statuses == pair.pv.ops_total
                assert not any(any(s) for _, s in pair.replies)
        assert runs[0] == runs[1]


def test_a_real_host_names_the_refused_op_in_its_first_reply():
    with hosted(RunConfig(mem_mb=16, status=True)) as run:
        session = GuestSession(run.links.endpoint, 0, 1024, "multicall", 5.0, run.host.pid, status=True)
        try:
            pv = session.pv
            pv.kvm_enter_lazy_mmu()
            pv.kvm_mmu_write(pv.area.pool_gpa, 0x1067)
            pv.kvm_mmu_write(pv.area.pool_gpa + 12, 0x2067)
            with pytest.raises(HypercallError, match=r"at offset 24 of .*: -KVM_EINVAL \(misaligned pte_phys\)"):
                pv.kvm_leave_lazy_mmu()
            assert session.seq == 1  # one hypercall, the one that was refused
            assert run.control("stats")["totals"]["refused"] == {"misaligned pte_phys": 1}
            session.bye()
        finally:
            session.close()


def test_a_status_guest_refuses_a_host_without_status_at_the_handshake():
    with hosted(RunConfig(mem_mb=16)) as run:
        with pytest.raises(GuestError, match="the host does not report per-op status: start it with --status too"):
            GuestSession(run.links.endpoint, 0, 1024, "multicall", 5.0, run.host.pid, status=True)


@pytest.mark.parametrize("phases", [False, True])
def test_a_real_pair_with_status_counts_every_applied_op_and_combines_with_phases(phases):
    r = run_pair(RunConfig(workload="fork", ops=300, status=True, phases=phases, mem_mb=16))
    assert r["consistent"], r["problems"]
    assert r["status"] is True and r["op_status"] == {"replies": r["hypercalls"], "statuses": r["ops"]["total"]}
    assert ("phases" in r) == phases


def test_too_large_a_host_limit_for_status_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "pvmmu", "run", "--status", "--host-limit", "65536", "--ops", "10"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "pvmmu: --status sends one status byte per op, at most 2048 in a reply: "
        "a host limit of 65536 bytes needs 16384 or less"
    ]
    host = subprocess.run([sys.executable, "-m", "host_proc", "--endpoint", "ipc:///nonexistent/x", "--status",
                           "--host-limit", "16392"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert host.returncode == 1 and "Traceback" not in host.stderr and "needs 16384 or less" in host.stderr


def test_the_options_are_documented():
    commands = (["pvmmu", "run"], ["pvmmu", "compare"], ["pvmmu", "sweep"], ["pvmmu", "record"], ["pvmmu", "replay"],
                ["host_proc"], ["guest_proc"])  # fmt: skip
    for argv in commands:
        out = subprocess.run([sys.executable, "-m", *argv, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0
        assert "--status" in out.stdout, argv
        assert ("--coalesce" in out.stdout) == (argv[0] != "host_proc"), argv  # a guest-side option
