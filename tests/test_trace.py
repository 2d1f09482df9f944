"""Trace files in one process: record, replay in every mode to the same state, and no damage goes unnoticed."""

from __future__ import annotations

import zlib

import pytest

from guest_proc.pagetable import FrameAllocator
from guest_proc.paravirt import MODES, KvmParaState
from guest_proc.trace import Replay, TracedKvmParaState, TraceRecorder, load_trace, prepare_recorded
from guest_proc.workloads import GuestKernel, prepare, prepare_workload
from protocol.abi import FLUSH_TLB, RELEASE_PT, WRITE_PTE
from protocol.layout import PAGE_SIZE
from protocol.trace import (
    ENTER_RECORD,
    LEAVE_RECORD,
    TraceError,
    encode_chunk,
    encode_header,
    encode_trailer,
    read_trace,
)


def record(pair_factory, path, workload: str, size: int, mode: str = "multicall", seed: int = 3) -> dict:
    """Run ``workload`` on a recording guest; returns its final check."""
    pair = pair_factory(mode)
    recorder = TraceRecorder(str(path))
    pv = TracedKvmParaState(
        pair.mem, pair.pv.area, pair.pv.hypercall, mode, pair.pv.ring_port, spin_us=0, recorder=recorder
    )
    kernel = GuestKernel(pv, FrameAllocator(pv.area), pair.layout.mem_bytes // PAGE_SIZE)
    prepare_recorded(kernel, recorder, workload, size, seed).run()
    check = kernel.check()
    recorder.finish(check["digest"], check["entries"])
    return {"check": check, "ops": dict(pv.ops), "hypercalls": pv.hypercalls}


def replay(pair_factory, path, mode: str):
    pair = pair_factory(mode)
    trace = load_trace(str(path))
    work = prepare_workload(pair.kernel, Replay(pair.kernel, trace))
    pair.kvm.reset_counters()
    work.run()
    return pair, trace


@pytest.mark.parametrize("workload, size", [("writes", 200), ("fork", 200), ("exit", 200), ("mprotect", 200),
                                            ("munmap", 200), ("faults", 200), ("mixed", 100)])  # fmt: skip
def test_a_trace_replays_to_the_recorded_state_in_every_mode(pair_factory, tmp_path, workload, size):
    rec = record(pair_factory, tmp_path / "t", workload, size)
    states = set()
    for mode in MODES:
        pair, trace = replay(pair_factory, tmp_path / "t", mode)
        host, guest = pair.kvm.check(), pair.kernel.check()
        assert host.ok and guest["ok"], (host.examples, guest["examples"])
        assert guest["digest"] == host.digests["0"] == trace.trailer["digest"] == rec["check"]["digest"]
        assert pair.pv.ops == rec["ops"]
        # The replayed stream costs what the workload itself costs in that mode.
        fresh = pair_factory(mode)
        work = prepare(fresh.kernel, workload, size, 3)
        work.run()
        assert pair.pv.hypercalls == fresh.pv.hypercalls
        area = pair.pv.area  # the frame pool: every page table (the queue and stack pages differ by mode)
        pool = bytes(pair.mem[area.pool_gpa : area.pool_gpa + area.pool_bytes])
        states.add((guest["digest"], host.pages, host.entries, tuple(sorted(pair.kvm.shadow.spte.items())), pool))
    assert len(states) == 1  # byte-identical page tables, identical shadow


def test_the_trace_is_the_same_whichever_mode_recorded_it(pair_factory, tmp_path):
    for mode in MODES:
        record(pair_factory, tmp_path / mode, "mixed", 80, mode=mode)
    assert len({(tmp_path / m).read_bytes() for m in MODES}) == 1
    trace = read_trace((tmp_path / "direct").read_bytes())
    ops = sum(1 for s in trace.sections.values() for code, _, _ in s if code < 0x100)
    markers = trace.events - ops
    assert markers % 2 == 0 and markers > 0 and trace.header["workload"] == "mixed"


@pytest.fixture
def small_trace(pair_factory, tmp_path) -> bytes:
    record(pair_factory, tmp_path / "small", "exit", 20)
    return (tmp_path / "small").read_bytes()


def test_every_damaged_byte_is_caught(small_trace):
    read_trace(small_trace)
    for i in range(len(small_trace)):
        damaged = bytearray(small_trace)
        damaged[i] ^= 0x5A
        with pytest.raises(TraceError) as err:
            read_trace(bytes(damaged))
        assert 0 <= err.value.offset <= len(small_trace)


def test_every_truncation_is_caught_with_its_offset(small_trace):
    for n in range(len(small_trace)):
        with pytest.raises(TraceError) as err:
            read_trace(small_trace[:n])
        assert err.value.offset <= n
    with pytest.raises(TraceError, match=r"data after the trailer \(at byte offset"):
        read_trace(small_trace + small_trace[-20:])


def test_a_damaged_chunk_is_named_with_its_offset(pair_factory, tmp_path):
    record(pair_factory, tmp_path / "t", "fork", 3000)
    data = bytearray((tmp_path / "t").read_bytes())
    assert read_trace(bytes(data)).trailer["chunks"] > 2
    data[len(data) // 2] ^= 1
    with pytest.raises(TraceError, match=r"chunk \d+ is corrupt: its checksum does not match \(at byte offset (\d+)\)"):
        read_trace(bytes(data))


POOL = 0x400000


def craft(*chunks: tuple[str, bytes], header: dict | None = None, trailer_events: int = 0) -> bytes:
    """A trace with correct checksums around whatever records it is given."""
    fields = {"workload": "writes", "size": 1, "seed": 1, "source": "synthetic", "mem_bytes": 16 << 20, "vcpus": 1,
              "vcpu": 0, "pool_gpa": POOL, "pool_bytes": 1 << 20, "created_by": "test"}  # fmt: skip
    fields.update(header or {})
    out = encode_header(**fields)
    for i, (section, records) in enumerate(chunks):
        out += encode_chunk(section, i, records)
    return out + encode_trailer(trailer_events, len(chunks), "0" * 32, 0, zlib.crc32(out))


def w(gpa: int = POOL, val: int = 0x1003) -> bytes:
    return WRITE_PTE.pack(1, 0, gpa, val)


@pytest.mark.parametrize(
    "chunks, message",
    [
        ((("setup", w(POOL - 8)),), "not an entry of the vCPU's page-table pool"),
        ((("setup", w(POOL + 4)),), "not an entry of the vCPU's page-table pool"),
        ((("run", RELEASE_PT.pack(3, 0, 1 << 30)),), "outside the vCPU's page-table pool"),
        ((("run", ENTER_RECORD + ENTER_RECORD),), "enter_lazy_mmu inside a lazy MMU section"),
        ((("run", LEAVE_RECORD),), "leave_lazy_mmu outside a lazy MMU section"),
        ((("setup", ENTER_RECORD + w()), ("run", LEAVE_RECORD)), "'setup' section ends inside a lazy MMU section"),
        ((("run", ENTER_RECORD + w()),), "'run' section ends inside a lazy MMU section"),
        ((("run", w()), ("setup", w())), "a 'setup' chunk after the 'run' section began"),
        ((("run", FLUSH_TLB.pack(9, 0)),), "unknown record code 9"),
        ((("run", w()[:20]),), "truncated record (20 of 24 bytes)"),
    ],
)
def test_records_that_cannot_be_replayed_are_refused_with_their_offset(chunks, message):
    with pytest.raises(TraceError) as err:
        read_trace(craft(*chunks, trailer_events=99))
    assert message in str(err.value) and "at byte offset" in str(err.value)


def test_a_trailer_that_disagrees_with_the_file_is_refused():
    good = craft(("run", w() + w()), trailer_events=2)
    assert read_trace(good).events == 2
    with pytest.raises(TraceError, match="trailer counts 1 chunks and 3 events; the file holds 1 and 2"):
        read_trace(craft(("run", w() + w()), trailer_events=3))


def test_other_versions_and_other_files_are_refused():
    with pytest.raises(TraceError, match="trace format version 2; this pvmmu reads version 1"):
        read_trace(encode_header(**{"workload": "x", "size": 1, "seed": 1, "source": "s", "mem_bytes": 1 << 24,
                                    "vcpus": 1, "vcpu": 0, "pool_gpa": POOL, "pool_bytes": 4096,
                                    "created_by": "t"}).replace(b"\xa7version\x01", b"\xa7version\x02"))  # fmt: skip
    with pytest.raises(TraceError, match="not a pvmmu trace"):
        read_trace(b"\x93\x01\x02\x03")
    with pytest.raises(TraceError, match="empty file"):
        read_trace(b"")
    with pytest.raises(TraceError, match="not msgpack"):
        read_trace(b"\xc1" * 10)
    with pytest.raises(TraceError, match="header's frame pool does not lie in its guest memory"):
        read_trace(craft(("run", w()), header={"pool_bytes": 1 << 30}, trailer_events=1))


def test_load_trace_names_the_file(tmp_path):
    with pytest.raises(TraceError, match=r"^.*/none: no such file$"):
        load_trace(str(tmp_path / "none"))
    (tmp_path / "cut").write_bytes(craft(("run", w()), trailer_events=1)[:-5])
    with pytest.raises(TraceError, match=r"/cut: corrupt trace: truncated: .* \(at byte offset \d+\)$"):
        load_trace(str(tmp_path / "cut"))


def test_tracing_costs_an_untraced_guest_nothing():
    # The hooks live in a subclass: the state a normal run uses has none, not even a disabled check.
    for name in ("kvm_mmu_write", "kvm_flush_tlb", "kvm_release_pt", "kvm_enter_lazy_mmu", "kvm_leave_lazy_mmu"):
        assert getattr(TracedKvmParaState, name) is not getattr(KvmParaState, name)
        assert "recorder" not in getattr(KvmParaState, name).__code__.co_names
