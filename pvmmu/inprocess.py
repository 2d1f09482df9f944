"""A guest core wired straight to a host core in one process: no sockets, no processes.

The h11 way of testing a protocol, and what the tests and the measuring scripts
use when they need exact counts rather than timings: the same op stream goes
through the same ``KvmParaState`` and ``Kvm`` code as in a real pair.
"""

from __future__ import annotations

from guest_proc.pagetable import FrameAllocator
from guest_proc.paravirt import Hypercall, KvmParaState, StatusHypercall
from guest_proc.workloads import GuestKernel
from host_proc.kvm import Kvm
from protocol.layout import PAGE_SIZE, Layout


class InlineHost:
    """Ring mode in one process: when the guest sleeps, the host drains its ring right there."""

    def __init__(self, kvm: Kvm, vcpu: int) -> None:
        self.kvm, self.vcpu = kvm, vcpu
        self.kicks = self.sleeps = 0

    def kick(self) -> None:
        self.kicks += 1

    def sleep(self) -> None:
        self.sleeps += 1
        while self.kvm.kvm_pv_ring_drain(self.vcpu):
            pass


class InProcessPair:
    """``vcpus`` guest kernels and one host over a bytearray of guest memory.

    ``coalesce`` and ``status`` are the guest's and host's options of the same
    names; ``calls`` lists every hypercall as (vcpu, nr, len, gpa), and with
    ``status`` ``replies`` lists each KVM_HC_MMU_OP's (ret, statuses).
    """

    def __init__(self, mode: str = "multicall", queue_bytes: int = 1024, host_limit: int = 512,
                 mem_mb: int = 16, vcpus: int = 1, coalesce: bool = False, status: bool = False) -> None:  # fmt: skip
        self.layout = Layout(mem_mb << 20, vcpus)
        self.mem = memoryview(bytearray(self.layout.mem_bytes))
        header = self.layout.header_bytes()
        self.mem[: len(header)] = header
        self.kvm = Kvm(self.mem, self.layout, host_limit)
        self.calls: list[tuple[int, int, int, int]] = []  # (vcpu, nr, len, gpa) of every hypercall
        self.replies: list[tuple[int, bytes]] = []  # with status: (ret, statuses) of every hypercall
        self.kernels = []
        for v in range(vcpus):
            area = self.layout.vcpu_area(v, queue_bytes)
            pv = KvmParaState(self.mem, area, self._hypercall_for(v), mode, InlineHost(self.kvm, v), spin_us=0,
                              coalesce=coalesce, status_hypercall=self._status_hypercall_for(v) if status else None)  # fmt: skip
            self.kernels.append(GuestKernel(pv, FrameAllocator(area), self.layout.mem_bytes // PAGE_SIZE))
        self.kernel = self.kernels[0]
        self.pv = self.kernel.pv

    def _hypercall_for(self, vcpu: int) -> Hypercall:
        def hypercall(nr: int, a0: int, a1: int, a2: int) -> int:
            self.calls.append((vcpu, nr, a0, a1 | (a2 << 32)))
            return self.kvm.kvm_emulate_hypercall(vcpu, nr, a0, a1, a2)

        return hypercall

    def _status_hypercall_for(self, vcpu: int) -> StatusHypercall:
        def hypercall(nr: int, a0: int, a1: int, a2: int) -> tuple[int, bytes]:
            self.calls.append((vcpu, nr, a0, a1 | (a2 << 32)))
            statuses = bytearray()
            ret = self.kvm.kvm_emulate_hypercall(vcpu, nr, a0, a1, a2, statuses)
            self.replies.append((ret, bytes(statuses)))
            return ret, bytes(statuses)

        return hypercall


__all__ = ["InProcessPair", "InlineHost"]
