"""The host process around the ``Kvm`` core: guest memory, the doorbell loop, vCPU liveness.

Thin on purpose: it owns the shared-memory segment and the ROUTER socket, turns
doorbell messages into ``Kvm.kvm_emulate_hypercall`` calls and back, and watches
its peers through pidfds. Everything a guest sends is hostile input: a message
that is not valid gets a REJECT reply, is counted, is logged the first time its
reason is seen, and the loop goes on.
"""

from __future__ import annotations

import hmac
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from host_proc.kvm import Kvm
from protocol.layout import MAX_QUEUE_BYTES
from protocol.messages import (
    PROTOCOL_VERSION,
    REJECT_ATTACHED,
    REJECT_BYE,
    REJECT_COMMAND,
    REJECT_INTERNAL,
    REJECT_KICK,
    REJECT_MALFORMED,
    REJECT_NO_PROCESS,
    REJECT_NO_VCPU,
    REJECT_NOT_ATTACHED,
    REJECT_NOT_REQUEST,
    REJECT_SEQUENCE,
    REJECT_TOKEN,
    REJECT_VERSION,
    Bye,
    Control,
    Hello,
    Hypercall,
    Kick,
    MessageError,
    pack_complete,
    pack_control_reply,
    pack_reject,
    pack_return,
    pack_return_stamped,
    pack_return_status,
    pack_welcome,
    unpack,
)
from pvmmu.doorbell import Host
from pvmmu.liveness import PidWatch

HOUSEKEEPING_S = 0.1
MAX_DEPARTED = 256


@dataclass
class VcpuPeer:
    """A vCPU that said hello: where its replies go and how to tell it died."""

    vcpu: int
    identity: bytes
    pid: int
    watch: PidWatch
    envelope: list[bytes]  # how to reach it unasked (ring mode's completions)
    seq: int = 0  # the last hypercall sequence number served


class HostShell:
    def __init__(
        self,
        kvm: Kvm,
        doorbell: Host,
        shm_name: str,
        host_pid: int,
        discard: Callable[[int, int], None],
        token: str | None = None,
        parent: PidWatch | None = None,
        phases: bool = False,
        poll_us: float = 500.0,
        log: TextIO = sys.stderr,
        status: bool = False,
    ) -> None:
        self.kvm = kvm
        self.doorbell = doorbell
        self.shm_name = shm_name
        self.discard = discard  # zero a range of guest memory
        self.used: set[int] = set()  # vCPU slots that have been attached at some point
        self.host_pid = host_pid
        self.token = token
        self.parent = parent
        self.phases = phases  # stamp every hypercall's receipt, completion and reply
        self.status = status  # report each op's status in the reply (--status)
        self.log = log
        self.vcpus: dict[int, VcpuPeer] = {}
        self.rejected: dict[str, int] = {}
        # vCPUs that died without saying bye: the latest few, so a guest cycling pids cannot grow the host
        self.departed: deque[dict[str, Any]] = deque(maxlen=MAX_DEPARTED)
        self.running = True
        self.exit_reason = "shutdown"
        self._logged_refusals = 0
        # Ring mode: how long to keep polling the rings after the last work, and what it cost.
        self.poll_s = poll_us / 1e6
        self.ring_stats = {"kicks": 0, "completions": 0, "sleeps": 0, "polls": 0}

    # -- the loop ----------------------------------------------------------------

    def serve(self) -> None:
        next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        recv, handle = self.doorbell.recv, self.handle
        while self.running:
            if self.kvm.rings:
                self.serve_rings()
                continue
            item = recv()
            if item is not None:
                try:
                    handle(*item)
                except Exception as exc:  # a host bug must not let one message take the guest down
                    self._reject(item[0], None, REJECT_INTERNAL, f"{type(exc).__name__}: {exc}")
            now = time.monotonic()
            if item is None or now >= next_housekeeping:
                self.housekeeping()
                next_housekeeping = now + HOUSEKEEPING_S

    def serve_rings(self) -> None:
        """Ring mode: drain the rings; keep polling ``poll_us`` after the last work; then sleep.

        Before sleeping the host sets NEED_WAKEUP on every ring and looks at each
        once more (RingConsumer.prepare_to_sleep): a guest that published in
        between saw the flag clear and did not ring, so only that look finds its work.
        """
        kvm, recv = self.kvm, self.doorbell.recv
        stats = self.ring_stats
        last_work = time.monotonic()
        next_housekeeping = last_work + HOUSEKEEPING_S
        while self.running and kvm.rings:
            stats["polls"] += 1
            worked = self._drain_rings()
            item = recv(block=False)
            if item is not None:
                self.handle(*item)
                worked = True
            now = time.monotonic()
            if now >= next_housekeeping:
                self.housekeeping()
                next_housekeeping = now + HOUSEKEEPING_S
            if worked or now - last_work < self.poll_s:
                if worked:
                    last_work = now
                continue
            if not all(c.prepare_to_sleep() for c in list(kvm.rings.values())):
                for c in kvm.rings.values():
                    c.wake()
                continue
            stats["sleeps"] += 1
            item = recv()  # blocks until a doorbell (or POLL_MS, for housekeeping)
            for c in kvm.rings.values():
                c.wake()
            if item is not None:
                self.handle(*item)
            last_work = time.monotonic()

    def _drain_rings(self) -> bool:
        """One pass over every ring (at most host_limit bytes each, so vCPUs take turns)."""
        worked = False
        kvm = self.kvm
        for vcpu, consumer in list(kvm.rings.items()):
            if consumer.available() and kvm.kvm_pv_ring_drain(vcpu):
                worked = True
            target = consumer.completion_due()
            peer = self.vcpus.get(vcpu)
            if target is not None and peer is not None:
                consumer.completed(target)
                self.ring_stats["completions"] += 1
                self.doorbell.send(peer.envelope, pack_complete(vcpu, consumer.ring.cons))
        return worked

    def housekeeping(self) -> None:
        refusals = self.kvm.first_refusals
        while self._logged_refusals < len(refusals):
            self._say(f"refused an op: {refusals[self._logged_refusals]} (more like it are counted)")
            self._logged_refusals += 1
        if self.parent is not None and not self.parent.alive():
            self._say(f"supervisor (pid {self.parent.pid}) is gone; shutting down")
            self.exit_reason = "parent gone"
            self.running = False
        for peer in list(self.vcpus.values()):
            if not peer.watch.alive():
                self._say(f"vCPU {peer.vcpu} (pid {peer.pid}) died; freeing its state")
                self.departed.append({"vcpu": peer.vcpu, "pid": peer.pid, "last_seq": peer.seq})
                self._drop(peer)

    def handle(self, envelope: list[bytes], payload: bytes) -> None:
        t_recv = time.monotonic_ns() if self.phases else 0
        identity = envelope[0] if envelope else b""
        try:
            msg = unpack(payload)
        except MessageError as exc:
            self._reject(envelope, None, REJECT_MALFORMED, str(exc))
            return
        kind = type(msg)
        if kind is Hypercall:
            peer = self.vcpus.get(msg.vcpu)
            if peer is None or peer.identity != identity:
                self._reject(envelope, msg.seq, REJECT_NOT_ATTACHED, f"vCPU {msg.vcpu}")
                return
            if msg.seq != peer.seq + 1:
                self._reject(envelope, msg.seq, REJECT_SEQUENCE, f"vCPU {msg.vcpu}: {msg.seq} after {peer.seq}")
                return
            peer.seq = msg.seq
            if self.status:
                self._hypercall_status(envelope, msg, t_recv)
                return
            ret = self.kvm.kvm_emulate_hypercall(msg.vcpu, msg.nr, msg.a0, msg.a1, msg.a2)
            if self.phases:
                t_applied = time.monotonic_ns()
                reply = pack_return_stamped(msg.seq, ret, t_recv, t_applied, time.monotonic_ns())
            else:
                reply = pack_return(msg.seq, ret)
            self.doorbell.send(envelope, reply)
        elif kind is Kick:
            peer = self.vcpus.get(msg.vcpu)
            if peer is None or peer.identity != identity:
                self._reject(envelope, None, REJECT_KICK, f"vCPU {msg.vcpu}")
                return
            self.ring_stats["kicks"] += 1  # no answer: the loop is awake now, which is the point
        elif kind is Hello:
            self._hello(envelope, identity, msg)
        elif kind is Bye:
            peer = self.vcpus.get(msg.vcpu)
            if peer is None or peer.identity != identity:
                self._reject(envelope, None, REJECT_BYE, f"vCPU {msg.vcpu}")
                return
            self._drop(peer)
            self.doorbell.send(envelope, pack_return(0, 0))
        elif kind is Control:
            self._control(envelope, msg)
        else:
            self._reject(envelope, None, REJECT_NOT_REQUEST, kind.__name__)

    # -- messages ------------------------------------------------------------------

    def _hypercall_status(self, envelope: list[bytes], msg: Hypercall, t_recv: int) -> None:
        """A hypercall served with --status: the reply also carries each op's status (and stamps, with --phases)."""
        statuses = bytearray()
        ret = self.kvm.kvm_emulate_hypercall(msg.vcpu, msg.nr, msg.a0, msg.a1, msg.a2, statuses)
        stamps = (t_recv, time.monotonic_ns(), time.monotonic_ns()) if self.phases else None
        self.doorbell.send(envelope, pack_return_status(msg.seq, ret, bytes(statuses), stamps))

    def _hello(self, envelope: list[bytes], identity: bytes, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            self._reject(envelope, None, REJECT_VERSION, f"{msg.version}, host speaks {PROTOCOL_VERSION}")
            return
        layout = self.kvm.layout
        if msg.vcpu >= layout.vcpus:
            self._reject(envelope, None, REJECT_NO_VCPU, f"vCPU {msg.vcpu} (guest has {layout.vcpus})")
            return
        old = self.vcpus.get(msg.vcpu)
        if old is not None and old.watch.alive() and old.identity != identity:
            self._reject(envelope, None, REJECT_ATTACHED, f"vCPU {msg.vcpu} (pid {old.pid})")
            return
        watch = PidWatch(msg.pid)
        if not watch.alive():  # checked before anything changes: a refused hello leaves no trace
            self._reject(envelope, None, REJECT_NO_PROCESS, f"pid {msg.pid}")
            return
        if old is not None:
            self._drop(old)
        if msg.vcpu in self.used:
            # The slot ran a vCPU before: give the new one blank memory, as a fresh guest has.
            gpa, nbytes = self.kvm.reset_vcpu_pool(msg.vcpu)
            self.discard(gpa, nbytes)
        self.used.add(msg.vcpu)
        self.vcpus[msg.vcpu] = VcpuPeer(msg.vcpu, identity, msg.pid, watch, list(envelope))
        area = layout.vcpu_area(msg.vcpu, 24)
        self.doorbell.send(
            envelope,
            pack_welcome(
                {
                    "shm": self.shm_name,
                    "mem_bytes": layout.mem_bytes,
                    "vcpus": layout.vcpus,
                    "vcpu": msg.vcpu,
                    "queue_gpa": area.queue_gpa,
                    "max_queue_bytes": MAX_QUEUE_BYTES,
                    "stack_gpa": area.stack_gpa,
                    "pool_gpa": area.pool_gpa,
                    "pool_bytes": area.pool_bytes,
                    "host_limit": self.kvm.host_limit,
                    "host_pid": self.host_pid,
                    "op_status": self.status,
                }
            ),
        )

    def _control(self, envelope: list[bytes], msg: Control) -> None:
        # Compare bytes: compare_digest refuses non-ASCII str, and a hostile token may be anything.
        if self.token is None or not hmac.compare_digest(msg.token.encode(), self.token.encode()):
            self._reject(envelope, None, REJECT_TOKEN)
            return
        result: dict[str, Any]
        if msg.command == "reset":
            self.kvm.reset_counters()
            for key in self.ring_stats:  # in place: the ring loop holds this dict
                self.ring_stats[key] = 0
            self._logged_refusals = 0
            result = {}
        elif msg.command == "stats":
            result = self.stats()
        elif msg.command == "check":
            c = self.kvm.check()
            result = {
                "ok": c.ok,
                "pages": c.pages,
                "entries": c.entries,
                "mismatches": c.mismatches,
                "stale_tlb": c.stale_tlb,
                "examples": c.examples,
                "digests": c.digests,
            }
        elif msg.command == "shutdown":
            self.running = False
            result = {}
        else:
            self._reject(envelope, None, REJECT_COMMAND, repr(msg.command)[:40])
            return
        self.doorbell.send(envelope, pack_control_reply(msg.command, result))

    def stats(self) -> dict[str, Any]:
        return {
            "totals": self.kvm.totals().as_dict(),
            "per_vcpu": {str(v): c.as_dict() for v, c in sorted(self.kvm.counters.items())},
            "tlb_flushes": self.kvm.shadow.tlb_flushes,
            "refusals": list(self.kvm.first_refusals),
            "rejected": dict(self.rejected),
            "attached": sorted(self.vcpus),
            "departed": list(self.departed),
            "ring": dict(self.ring_stats),
        }

    # -- helpers -------------------------------------------------------------------

    def _reject(self, envelope: list[bytes], seq: int | None, category: str, detail: str = "") -> None:
        """Refuse a message: count it under a fixed category, log the first of each, answer."""
        reason = f"{category}: {detail}"[:200] if detail else category
        n = self.rejected.get(category, 0)
        self.rejected[category] = n + 1
        if n == 0:
            self._say(f"rejected a message: {reason} (more like it are counted, not logged)")
        if envelope:
            self.doorbell.send(envelope, pack_reject(seq, reason))

    def _drop(self, peer: VcpuPeer) -> None:
        self.vcpus.pop(peer.vcpu, None)
        peer.watch.close()
        self.kvm.forget_vcpu(peer.vcpu)

    def _say(self, text: str) -> None:
        print(f"pvmmu host[{self.host_pid}]: {text}", file=self.log, flush=True)
