"""What a pvmmu host must do with any input: an executable copy of docs/protocol.md.

The fuzzers (``tests/test_hostile.py`` over the pure core, ``pvmmu fuzz`` over a
live host) compare the host with this model. It is written from the protocol
document on purpose, not from ``host_proc``: it unpacks op buffers with ``struct``
itself rather than ``protocol.peek_op``, and keeps its own copy of guest memory
and of the shadow's contents, so a mistake in the host is a disagreement here
rather than the same mistake twice. Message *syntax* is the one thing it takes
from ``protocol.messages.unpack``; which messages the host serves, and with what
effect, it models itself.

Pure: no sockets, no processes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.abi import KVM_EFAULT, KVM_EINVAL, KVM_ENOSYS, KVM_HC_MMU_OP, PVMMU_HC_RING_SETUP
from protocol.layout import PAGE_SIZE, Layout
from protocol.messages import (
    PROTOCOL_VERSION,
    REJECT_ATTACHED,
    REJECT_BYE,
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
    unpack,
)
from protocol.ring import HEADER_BYTES as RING_HEADER_BYTES
from protocol.ring import MAX_RING_BYTES

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# docs/protocol.md section 3: op code -> size
_OP_BYTES = {1: 24, 2: 8, 3: 16}


@dataclass
class Outcome:
    """What one hypercall must do: its return value and every effect, in order."""

    ret: int
    # (op code, address, value) of each applied op, in order: (1, pte_phys, pte_val), (2, 0, 0), (3, pt_phys, 0)
    effects: list[tuple[int, int, int]] = field(default_factory=list)
    refusal: str | None = None  # the reason the host counts, if it refused something
    partial: bool = False  # the guest offered more than the host copies

    @property
    def writes(self) -> list[tuple[int, int]]:
        return [(gpa, val) for code, gpa, val in self.effects if code == 1]


def expected_hypercall(
    mem: bytes | bytearray | memoryview,
    host_limit: int,
    nr: int,
    a0: int,
    a1: int,
    a2: int,
    ring_slot: int | None = None,
) -> Outcome:
    """The result the protocol prescribes for hypercall ``nr(a0, a1, a2)`` over guest memory ``mem``.

    ``ring_slot``: the gpa where the calling vCPU's op ring may be registered.
    """
    mem_bytes = len(mem)
    if nr == PVMMU_HC_RING_SETUP:
        gpa = (a1 & 0xFFFFFFFF) | ((a2 & 0xFFFFFFFF) << 32)
        if ring_slot is None or gpa != ring_slot:
            return Outcome(-KVM_EINVAL, refusal="ring outside the vCPU's slot")
        if a0 % 8 or not 24 <= a0 <= MAX_RING_BYTES or gpa + RING_HEADER_BYTES + a0 > mem_bytes:
            return Outcome(-KVM_EINVAL, refusal="ring that does not fit")
        # Registered: by itself that changes no memory. The host drains a registered ring on its
        # own from then on, which this model does not follow: the live fuzzer never registers one.
        return Outcome(0)
    if nr != KVM_HC_MMU_OP:
        return Outcome(-KVM_ENOSYS, refusal="unknown hypercall")
    gpa = (a1 & 0xFFFFFFFF) | ((a2 & 0xFFFFFFFF) << 32)  # low 32 bits of each register
    n = min(a0, host_limit)
    if gpa + n > mem_bytes:
        return Outcome(-KVM_EFAULT, refusal="buffer outside guest memory")
    out = Outcome(0, partial=n < a0)
    buf = bytes(mem[gpa : gpa + n])  # the host's copy: later writes to memory do not change it
    off = 0
    while n - off >= 8:
        code = _U32.unpack_from(buf, off)[0]
        size = _OP_BYTES.get(code)
        if size is None:
            out.refusal = "unknown op code"
            break
        if n - off < size:
            break  # cut off at the end of the copy: not a refusal, the guest calls again
        if code == 1:
            pte_phys, pte_val = struct.unpack_from("<QQ", buf, off + 8)
            if pte_phys % 8:
                out.refusal = "misaligned pte_phys"
                break
            if pte_phys + 8 > mem_bytes:
                out.refusal = "pte_phys outside guest memory"
                break
            out.effects.append((1, pte_phys, pte_val))
        elif code == 2:
            out.effects.append((2, 0, 0))
        else:
            pt_phys = _U64.unpack_from(buf, off + 8)[0]
            if pt_phys >= mem_bytes:
                out.refusal = "pt_phys outside guest memory"
                break
            out.effects.append((3, pt_phys, 0))
        off += size
    out.ret = off
    return out


def _page(gpa: int) -> int:
    return gpa & ~(PAGE_SIZE - 1)


@dataclass
class Expected:
    """The reply a message must get: ``kind`` is return, welcome, reject or none (no reply at all)."""

    kind: str
    seq: int | None = None
    ret: int | None = None
    category: str | None = None
    outcome: Outcome | None = None
    vcpu: int | None = None  # for a welcome: the vCPU attached


class HostModel:
    """A host as the protocol describes it, seen from one guest connection ("ours").

    ``mem`` is what guest memory must hold; ``spte`` the present entries the
    shadow must have (entry gpa -> guest value), ``pages`` the shadowed pages;
    ``totals``, ``refused`` and ``rejected`` what the host's stats must say.
    """

    def __init__(self, layout: Layout, host_limit: int) -> None:
        self.layout = layout
        self.host_limit = host_limit
        self.mem = bytearray(layout.mem_bytes)
        header = layout.header_bytes()
        self.mem[: len(header)] = header
        self.spte: dict[int, int] = {}
        self.pages: set[int] = set()
        self.seq: dict[int, int] = {}  # vCPU -> last seq served, for the vCPUs our connection holds
        self.used: set[int] = set()
        self.totals = {"hypercalls": 0, "bytes": 0, "write_pte": 0, "flush_tlb": 0, "release_pt": 0, "partial": 0}
        self.refused: dict[str, int] = {}
        self.rejected: dict[str, int] = {}

    # -- effects ---------------------------------------------------------------------

    def apply(self, out: Outcome) -> None:
        mem, spte, t = self.mem, self.spte, self.totals
        for code, gpa, val in out.effects:
            if code == 1:
                _U64.pack_into(mem, gpa, val)
                page = _page(gpa)
                if page not in self.pages:  # a page starts being shadowed with every present entry it holds
                    self.pages.add(page)
                    for entry in range(page, page + PAGE_SIZE, 8):
                        gpte = _U64.unpack_from(mem, entry)[0]
                        if gpte & 1:
                            spte[entry] = gpte
                if val & 1:
                    spte[gpa] = val
                else:
                    spte.pop(gpa, None)
                t["write_pte"] += 1
            elif code == 2:
                t["flush_tlb"] += 1
            else:
                self._unshadow(_page(gpa))
                t["release_pt"] += 1
        t["hypercalls"] += 1
        if out.ret > 0:
            t["bytes"] += out.ret
        if out.partial and out.ret >= 0:
            t["partial"] += 1
        if out.refusal:
            self.refused[out.refusal] = self.refused.get(out.refusal, 0) + 1

    def _unshadow(self, page: int) -> None:
        if page in self.pages:
            self.pages.discard(page)
            for gpa in range(page, page + PAGE_SIZE, 8):
                self.spte.pop(gpa, None)

    def _attach(self, vcpu: int) -> None:
        if vcpu in self.used:  # a slot used before: its pool is wiped and its shadow dropped
            area = self.layout.vcpu_area(vcpu, 24)
            lo, hi = area.pool_gpa, area.pool_gpa + area.pool_bytes
            self.mem[lo:hi] = bytes(hi - lo)
            for page in [p for p in self.pages if lo <= p < hi]:
                self._unshadow(page)
        self.used.add(vcpu)
        self.seq[vcpu] = 0

    # -- messages --------------------------------------------------------------------

    def message(self, data: bytes, ours: bool = True, pid_alive: Callable[[int], bool] = lambda pid: False) -> Expected:
        """Predict the reply to ``data`` and make its effects on the model.

        ``ours``: it comes from the connection that holds the model's vCPUs (else
        from a fresh connection that holds none). ``pid_alive`` answers for the pid
        of a hello.
        """
        try:
            msg = unpack(data)
        except MessageError:
            return self._reject(REJECT_MALFORMED)
        if type(msg) is Hypercall:
            if not ours or msg.vcpu not in self.seq:
                return self._reject(REJECT_NOT_ATTACHED)
            if msg.seq != self.seq[msg.vcpu] + 1:
                return self._reject(REJECT_SEQUENCE)
            self.seq[msg.vcpu] = msg.seq
            slot = self.layout.vcpu_area(msg.vcpu, 24).queue_gpa
            out = expected_hypercall(self.mem, self.host_limit, msg.nr, msg.a0, msg.a1, msg.a2, slot)
            self.apply(out)
            return Expected("return", msg.seq, out.ret, outcome=out)
        if type(msg) is Hello:
            if msg.version != PROTOCOL_VERSION:
                return self._reject(REJECT_VERSION)
            if msg.vcpu >= self.layout.vcpus:
                return self._reject(REJECT_NO_VCPU)
            if not ours and msg.vcpu in self.seq:
                return self._reject(REJECT_ATTACHED)
            if not pid_alive(msg.pid):
                return self._reject(REJECT_NO_PROCESS)
            if not ours:
                raise ValueError("the model only lets its own connection attach vCPUs")
            self._attach(msg.vcpu)
            return Expected("welcome", vcpu=msg.vcpu)
        if type(msg) is Bye:
            if not ours or msg.vcpu not in self.seq:
                return self._reject(REJECT_BYE)
            del self.seq[msg.vcpu]
            return Expected("return", 0, 0)
        if type(msg) is Kick:  # ring mode's doorbell: no answer, if the vCPU is attached here
            if not ours or msg.vcpu not in self.seq:
                return self._reject(REJECT_KICK)
            return Expected("none")
        if type(msg) is Control:
            return self._reject(REJECT_TOKEN)  # the model never holds the token
        return self._reject(REJECT_NOT_REQUEST)

    def _reject(self, category: str) -> Expected:
        self.rejected[category] = self.rejected.get(category, 0) + 1
        return Expected("reject", category=category)
