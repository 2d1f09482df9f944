"""Recording a guest's paravirt op stream to a trace file, and replaying one (format: ``protocol.trace``).

Recording uses ``TracedKvmParaState``, a subclass that notes each paravirt call
before doing it; a guest that does not record uses ``KvmParaState`` itself, so
its hot path pays nothing for tracing. Replaying is a workload, ``Replay``,
that makes the same calls from the file: the same stream, whatever the mode.
"""

from __future__ import annotations

import zlib
from typing import Any, BinaryIO

from guest_proc.pagetable import Vma
from guest_proc.paravirt import KvmParaState
from guest_proc.workloads import GuestKernel, Workload, prepare
from protocol.abi import (
    FLUSH_TLB,
    KVM_MMU_OP_FLUSH_TLB,
    KVM_MMU_OP_RELEASE_PT,
    KVM_MMU_OP_WRITE_PTE,
    RELEASE_PT,
    WRITE_PTE,
)
from protocol.layout import PAGE_SIZE
from protocol.trace import (
    CHUNK_BYTES,
    ENTER_RECORD,
    LAZY_ENTER,
    LEAVE_RECORD,
    Trace,
    TraceError,
    encode_chunk,
    encode_header,
    encode_trailer,
    read_trace,
)
from pvmmu import __version__

MAX_TRACE_BYTES = 1 << 30
_FLUSH_RECORD = FLUSH_TLB.pack(KVM_MMU_OP_FLUSH_TLB, 0)


class TraceRecorder:
    """Writes a trace file: header, chunks of records per section, trailer."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: BinaryIO | None = open(path, "wb")
        self.section = "setup"
        self.buf = bytearray()
        self.chunks = 0
        self.events = 0
        self.crc = 0  # of every byte written, for the trailer

    def begin(self, **header: Any) -> None:
        self._write(encode_header(**header))

    def add(self, record: bytes) -> None:
        self.buf += record
        self.events += 1
        if len(self.buf) >= CHUNK_BYTES:
            self._flush()

    def start_section(self, name: str) -> None:
        self._flush()
        self.section = name

    def finish(self, digest: str, entries: int) -> None:
        self._flush()
        self._write(encode_trailer(self.events, self.chunks, digest, entries, self.crc))
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _flush(self) -> None:
        if self.buf:
            self._write(encode_chunk(self.section, self.chunks, bytes(self.buf)))
            self.chunks += 1
            self.buf.clear()

    def _write(self, data: bytes) -> None:
        assert self.file is not None
        self.file.write(data)
        self.crc = zlib.crc32(data, self.crc)


class TracedKvmParaState(KvmParaState):
    """``KvmParaState`` that records each paravirt call, in the kernel's op layout, before making it."""

    def __init__(self, *args: Any, recorder: TraceRecorder, **kwargs: Any) -> None:
        self.recorder = recorder
        super().__init__(*args, **kwargs)

    def kvm_mmu_write(self, dest: int, val: int) -> None:
        self.recorder.add(WRITE_PTE.pack(KVM_MMU_OP_WRITE_PTE, 0, dest, val))
        super().kvm_mmu_write(dest, val)

    def kvm_flush_tlb(self) -> None:
        self.recorder.add(_FLUSH_RECORD)
        super().kvm_flush_tlb()

    def kvm_release_pt(self, pt_phys: int) -> None:
        self.recorder.add(RELEASE_PT.pack(KVM_MMU_OP_RELEASE_PT, 0, pt_phys))
        super().kvm_release_pt(pt_phys)

    def kvm_enter_lazy_mmu(self) -> None:
        self.recorder.add(ENTER_RECORD)
        super().kvm_enter_lazy_mmu()

    def kvm_leave_lazy_mmu(self) -> None:
        self.recorder.add(LEAVE_RECORD)
        super().kvm_leave_lazy_mmu()


def prepare_recorded(
    kernel: GuestKernel,
    recorder: TraceRecorder,
    name: str,
    size: int,
    seed: int,
    vmas: list[Vma] | None = None,
    source: str = "synthetic",
    vcpus: int = 1,
) -> Workload:
    """``prepare()`` under a recorder (whose state is ``kernel.pv``): header, setup section, then the run's."""
    area = kernel.pv.area
    recorder.begin(workload=name, size=size, seed=seed, source=source, mem_bytes=kernel.mem_pages * PAGE_SIZE,
                   vcpus=vcpus, vcpu=area.vcpu, pool_gpa=area.pool_gpa, pool_bytes=area.pool_bytes,
                   created_by=f"pvmmu {__version__}")  # fmt: skip
    work = prepare(kernel, name, size, seed, vmas)
    recorder.start_section("run")
    return work


def load_trace(path: str) -> Trace:
    """Read and check a whole trace file; TraceError (message starts with the path) if it is not sound."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TRACE_BYTES + 1)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file", None) from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a trace", None) from None
    except PermissionError:
        raise TraceError(f"{path}: permission denied", None) from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}", None) from None
    if len(data) > MAX_TRACE_BYTES:
        raise TraceError(f"{path}: larger than {MAX_TRACE_BYTES >> 30} GiB, not a trace", None)
    try:
        return read_trace(data)
    except TraceError as exc:
        raise TraceError(f"{path}: corrupt trace: {exc.problem}", exc.offset) from None


class Replay(Workload):
    """A recorded op stream, replayed: the setup section unmeasured, the run section measured."""

    name = "replay"
    batched_setup = False  # the trace's setup section has its own lazy section

    def __init__(self, kernel: GuestKernel, trace: Trace) -> None:
        super().__init__(kernel, max(1, trace.header["size"]), trace.header["seed"])
        self.trace = trace

    def setup(self) -> None:
        self._apply(self.trace.sections["setup"])

    def run(self) -> None:
        self._apply(self.trace.sections["run"])

    def _apply(self, events: list[tuple[int, int, int]]) -> None:
        pv = self.kernel.pv
        tables = self.kernel.extra_table_pages  # so the final check looks at every page table
        write, flush, release = pv.kvm_mmu_write, pv.kvm_flush_tlb, pv.kvm_release_pt
        enter, leave = pv.kvm_enter_lazy_mmu, pv.kvm_leave_lazy_mmu
        mask = ~(PAGE_SIZE - 1)
        for code, a, b in events:
            if code == KVM_MMU_OP_WRITE_PTE:
                write(a, b)
                tables.add(a & mask)
            elif code == KVM_MMU_OP_FLUSH_TLB:
                flush()
            elif code == KVM_MMU_OP_RELEASE_PT:
                release(a)
                tables.discard(a & mask)
            elif code == LAZY_ENTER:
                enter()
            else:
                leave()


__all__ = ["Replay", "TraceRecorder", "TracedKvmParaState", "load_trace", "prepare_recorded"]
