"""The vCPU process around the guest core: doorbell, guest memory, the hypercall callable.

``GuestSession`` says hello, maps guest memory where the host says it is, and
gives ``KvmParaState`` its ``hypercall`` function: pack the registers, ring the
doorbell, block for the reply, time the round trip.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Callable
from typing import Any

from guest_proc.pagetable import FrameAllocator
from guest_proc.paravirt import KvmParaState
from guest_proc.workloads import GuestKernel
from protocol.layout import PAGE_SIZE, Layout
from protocol.messages import (
    PROTOCOL_VERSION,
    Complete,
    Message,
    Reject,
    Return,
    Welcome,
    pack_bye,
    pack_hello,
    pack_hypercall,
    pack_kick,
    unpack,
)
from protocol.theory import hypercalls_for_shape, op_mix
from pvmmu import phases
from pvmmu.doorbell import caller_for
from pvmmu.latency import histogram, percentile
from pvmmu.shm import GuestMemory


class GuestError(RuntimeError):
    """The host refused a message, or answered with something that is not the answer."""


class GuestSession:
    """One vCPU attached to a host."""

    def __init__(
        self,
        endpoint: str,
        vcpu: int,
        queue_bytes: int,
        mode: str,
        timeout_s: float,
        host_pid: int | None = None,
        batch_io: bool = False,
        phases: bool = False,
        timeline_max: int = 0,
        pv_factory: Callable[..., KvmParaState] = KvmParaState,
        spin_us: float = 50.0,
        coalesce: bool = False,
        status: bool = False,
    ) -> None:
        self.vcpu = vcpu
        self.coalesce = coalesce  # fold rewrites of a queued entry (KvmParaState)
        self.status = status  # the host reports each op's status; it must have been started with --status
        self.pv_factory = pv_factory  # TracedKvmParaState when recording a trace
        self.spin_us = spin_us  # ring mode: how long a waiting vCPU spins before it sleeps
        self.doorbell = caller_for(endpoint, timeout_s, host_pid, batch_io=batch_io)
        self.memory: GuestMemory | None = None
        self.seq = 0
        self.latencies_ns = array("q")
        # --phases: six CLOCK_MONOTONIC stamps per hypercall, on a separate code path so
        # the default one carries no stamping at all.
        self.phases = phases
        self.timeline_max = timeline_max
        self.stamps = array("q")
        self.doorbell.stamping = phases
        try:
            self._attach(vcpu, queue_bytes, mode)
        except BaseException:
            self.close()
            raise

    def _attach(self, vcpu: int, queue_bytes: int, mode: str) -> None:
        info = self._hello()
        self.welcome = info
        self.host_pid = int(info["host_pid"])
        self.doorbell.watch_peer(self.host_pid)
        self.memory = GuestMemory.attach(info["shm"])
        layout = Layout.from_header(self.memory.buf)
        area = layout.vcpu_area(vcpu, queue_bytes)
        if (area.queue_gpa, area.stack_gpa, area.pool_gpa) != (info["queue_gpa"], info["stack_gpa"], info["pool_gpa"]):
            raise GuestError("host's welcome and guest memory's layout disagree")
        self.layout = layout
        if self.status and not info.get("op_status"):
            raise GuestError("the host does not report per-op status: start it with --status too")
        hypercall = self.hypercall_stamped if self.phases else self.hypercall
        self.pv = self.pv_factory(self.memory.buf, area, hypercall, mode, self, spin_us=self.spin_us,
                                  coalesce=self.coalesce,
                                  status_hypercall=self.hypercall_status if self.status else None)  # fmt: skip
        self.kernel = GuestKernel(self.pv, FrameAllocator(area), layout.mem_bytes // PAGE_SIZE)

    def _hello(self) -> dict[str, Any]:
        reply = unpack(self.doorbell.call(pack_hello(self.vcpu, os.getpid()), "the handshake"))
        if isinstance(reply, Reject):
            raise GuestError(f"host refused vCPU {self.vcpu}: {reply.reason}")
        if not isinstance(reply, Welcome) or reply.version != PROTOCOL_VERSION:
            raise GuestError(f"host answered the handshake with {reply!r}")
        return reply.info

    def hypercall(self, nr: int, a0: int, a1: int, a2: int) -> int:
        """The vmcall: registers out, RAX back. Blocks until the host answers."""
        self.seq = seq = self.seq + 1
        t0 = time.perf_counter_ns()
        raw = self.doorbell.call(pack_hypercall(self.vcpu, seq, nr, a0, a1, a2), "hypercall", seq)
        self.latencies_ns.append(time.perf_counter_ns() - t0)
        reply = unpack(raw)
        if type(reply) is Complete:  # a ring completion that arrived late: not our answer
            reply = self._answer(seq)
        if type(reply) is Return and reply.seq == seq:
            return reply.ret
        raise self._bad_reply(seq, reply)

    def hypercall_stamped(self, nr: int, a0: int, a1: int, a2: int) -> int:
        """The vmcall with the --phases stamps: t0, sent, the host's three, resumed."""
        return self._exchange(nr, a0, a1, a2).ret

    def hypercall_status(self, nr: int, a0: int, a1: int, a2: int) -> tuple[int, bytes]:
        """The vmcall to a host started with --status: RAX and one status byte per op it looked at."""
        reply = self._exchange(nr, a0, a1, a2)
        if reply.statuses is None:
            raise self._bad_reply(reply.seq, reply)
        return reply.ret, reply.statuses

    def _exchange(self, nr: int, a0: int, a1: int, a2: int) -> Return:
        """A vmcall off the default path (--phases, --status): the whole reply, with the stamps kept if --phases."""
        self.seq = seq = self.seq + 1
        t0 = time.monotonic_ns()
        raw = self.doorbell.call(pack_hypercall(self.vcpu, seq, nr, a0, a1, a2), "hypercall", seq)
        t_resume = time.monotonic_ns()
        self.latencies_ns.append(t_resume - t0)
        reply = unpack(raw)
        if type(reply) is Complete:
            reply = self._answer(seq)
        if type(reply) is not Return or reply.seq != seq or (self.phases and reply.stamps is None):
            raise self._bad_reply(seq, reply)
        if self.phases:
            self.stamps.extend((t0, self.doorbell.sent_ns, *reply.stamps, t_resume))
        return reply

    def _answer(self, seq: int | None) -> Message:
        """Wait for the answer to a call, skipping ring completions that were already in flight."""
        while True:
            reply = unpack(self.doorbell.wait_message("hypercall" if seq else "bye", seq))
            if type(reply) is not Complete:
                return reply

    # ring mode's doorbells (guest_proc.paravirt.RingPort)
    def kick(self) -> None:
        self.doorbell.notify(pack_kick(self.vcpu), "a ring kick")

    def sleep(self) -> None:
        reply = unpack(self.doorbell.wait_message("a ring completion"))
        if isinstance(reply, Reject):
            raise GuestError(f"host rejected the ring: {reply.reason}")

    @staticmethod
    def _bad_reply(seq: int, reply: object) -> GuestError:
        if isinstance(reply, Reject):
            return GuestError(f"host rejected hypercall {seq}: {reply.reason}")
        return GuestError(f"host answered hypercall {seq} with {reply!r} (a host without --phases or --status?)")

    def start_measuring(self) -> None:
        self.kernel.reset_counters()
        self.latencies_ns = array("q")
        self.stamps = array("q")
        self.doorbell.rung = 0

    def measured(self, wall_s: float) -> dict[str, Any]:
        pv = self.pv
        lat = sorted(self.latencies_ns)
        total = pv.ops_total
        limit = self.welcome["host_limit"]
        # The shape is what was queued: coalesced writes are not in it, but they were lazy-section ops
        # of the kernel's stream, which is what op_mix describes.
        theory = hypercalls_for_shape(pv.shape, pv.mode, pv.queue_bytes, limit)
        mix = op_mix(pv.shape)
        mix["in_lazy"] += pv.coalesced
        return {
            "vcpu": self.vcpu,
            "ops": {**pv.ops, "total": total},
            "coalesced": pv.coalesced,
            "theory_hypercalls": theory,
            # What batching could do with this stream: the patch's hypercalls for it, on paper.
            "op_mix": {
                **mix,
                "multicall_hypercalls": hypercalls_for_shape(pv.shape, "multicall", pv.queue_bytes, limit),
            },
            "op_status": {"replies": pv.status_replies, "statuses": pv.statuses} if self.status else None,
            "paths": self.kernel.path_counts(),
            "hypercalls": pv.hypercalls,
            "doorbells": self.doorbell.rung,
            "flushes": pv.flushes,
            "ring": {"waits": pv.ring_waits, "sleeps": pv.ring_sleeps} if pv.ring is not None else None,
            "wall_s": wall_s,
            "ops_per_s": total / wall_s if wall_s > 0 else 0.0,
            "hypercall_latency_us": {
                "p50": percentile(lat, 50) / 1000,
                "p99": percentile(lat, 99) / 1000,
                "mean": (sum(lat) / len(lat) / 1000) if lat else 0.0,
            },
            "latency_hist": histogram(lat),  # mergeable across vCPUs
            **self._phase_report(),
        }

    def _phase_report(self) -> dict[str, Any]:
        if not self.phases:
            return {}
        report: dict[str, Any] = {"phases": phases.digest(self.stamps), "stamp_cost_ns": phases.stamp_cost_ns()}
        if self.timeline_max:
            report["timeline"] = list(self.stamps[: self.timeline_max * phases.STAMPS_PER_HYPERCALL])
            report["timeline_total"] = len(self.stamps) // phases.STAMPS_PER_HYPERCALL
        return report

    def bye(self) -> None:
        reply = unpack(self.doorbell.call(pack_bye(self.vcpu), "bye"))
        if type(reply) is Complete:
            self._answer(None)

    def close(self) -> None:
        # Drop every view of guest memory before unmapping it; never unlink it.
        if self.memory is not None:
            self.__dict__.pop("pv", None)
            self.__dict__.pop("kernel", None)
            self.memory.close()
            self.memory = None
        self.doorbell.close()
