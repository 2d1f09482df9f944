"""``pvmmu fuzz``: a hostile guest against a live host, through its real doorbell and shared memory.

The fuzzer starts a host process exactly as ``pvmmu run`` does, says hello as
vCPU 0, maps guest memory, and then sends ``--cases`` messages: op buffers full of
wild addresses, unknown op codes and truncated ops; hypercalls with hostile
registers; mutated, truncated, oversized and nonsensical messages; hypercalls out
of sequence or for vCPUs that never said hello; bad handshakes, wrong tokens, and
messages from a second connection trying to use the first one's vCPU.

Every reply is compared with what ``pvmmu.fuzzmodel`` (the protocol, written down
independently of the host) says it must be. The model also keeps its own copy
of guest memory: every ``--check-every`` cases, and at the end, all of guest
memory is compared with it byte for byte, so any write outside the entries a
legal write_pte targets is an "out-of-bounds effect". At the end the host must be
alive, its shadow consistent with guest memory, and its counters (hypercalls,
ops, refusals per reason, rejected messages per category) equal to the model's.

``--flood N`` first sends N malformed messages (the hostile-volume check): all
must be rejected, the host's resident memory must grow by less than 10%, and a
valid hypercall must still be answered correctly afterwards.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import psutil
import zmq

from protocol.abi import KVM_HC_MMU_OP, PVMMU_HC_RING_SETUP, U64_MAX
from protocol.layout import MAX_QUEUE_BYTES, PAGE_SIZE, Layout
from protocol.messages import (
    MAX_MESSAGE_BYTES,
    MSG_BYE,
    MSG_CONTROL,
    MSG_CONTROL_REPLY,
    MSG_HELLO,
    MSG_HYPERCALL,
    MSG_REJECT,
    MSG_WELCOME,
    MessageError,
    Reject,
    Return,
    Welcome,
    pack_bye,
    pack_control,
    pack_hello,
    pack_hypercall,
    pack_return,
    pack_welcome,
    unpack,
)
from pvmmu.doorbell import DoorbellTimeout, ZmqCaller
from pvmmu.fuzzmodel import Expected, HostModel
from pvmmu.liveness import PeerGone, PidWatch
from pvmmu.progress import Progress
from pvmmu.shm import GuestMemory
from pvmmu.supervisor import HostedRun, RunConfig, RunError, hosted

PT_PAGES = 64  # the fuzzer's page tables: the first pages of vCPU 0's pool (op buffers never go there)
MEMORY_GROWTH_LIMIT = 0.10  # the flood may grow the host's resident memory by less than this
FLOOD_WARMUP = 2000  # malformed messages sent before the baseline is taken (allocator warm-up)

_WRITE = struct.Struct("<IIQQ")
_FLUSH = struct.Struct("<II")
_RELEASE = struct.Struct("<IIQ")


def _live(pid: int) -> bool:
    watch = PidWatch(pid)
    try:
        return watch.alive()
    finally:
        watch.close()


def _a_dead_pid() -> int:
    """The pid of a process that has exited (a hello naming it must be refused)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    )
    return int(proc.stdout)


@dataclass
class FuzzConfig:
    cases: int = 2000
    seed: int = 1
    vcpus: int = 2
    mem_mb: int = 8
    host_limit: int = 512
    flood: int = 0
    check_every: int = 100
    timeout: float = 10.0


@dataclass
class FuzzResult:
    config: dict[str, Any]
    host_pid: int = 0
    cases: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    wrong_replies: int = 0
    out_of_bounds: int = 0  # 8-byte entries of guest memory that differed from the model
    memory_compares: int = 0
    crashed: str | None = None  # how the host died, if it did
    counters: dict[str, Any] = field(default_factory=dict)  # the host's, at the end
    mismatched_counters: list[str] = field(default_factory=list)
    shadow: dict[str, Any] = field(default_factory=dict)
    flood: dict[str, Any] | None = None
    leaks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the first few, for a person
    failure_count: int = 0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure_count == 0 and self.crashed is None and not self.leaks

    def fail(self, text: str) -> None:
        self.failure_count += 1
        if len(self.failures) < 20:
            self.failures.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class LiveFuzzer:
    """Vcpu 0 of a guest that means harm, with the protocol model watching the host's every reply."""

    def __init__(self, cfg: FuzzConfig, run: HostedRun, result: FuzzResult) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.run = run
        self.result = result
        self.layout = Layout(cfg.mem_mb << 20, cfg.vcpus)
        self.mem_bytes = self.layout.mem_bytes
        self.model = HostModel(self.layout, cfg.host_limit)
        self.pid = os.getpid()
        self.dead_pid = _a_dead_pid()
        self.door = ZmqCaller(run.links.endpoint, cfg.timeout, run.host.pid)
        self.memory: GuestMemory | None = None
        area = self.layout.vcpu_area(0, MAX_QUEUE_BYTES)
        self.queue_gpa, self.stack_gpa = area.queue_gpa, area.stack_gpa
        self.pt_lo, self.pt_hi = area.pool_gpa, area.pool_gpa + PT_PAGES * PAGE_SIZE
        self.exchange(pack_hello(0, self.pid), "handshake")
        self.memory = GuestMemory.attach(run.shm_name)
        self.mem = self.memory.buf

    def close(self) -> None:
        self.__dict__.pop("mem", None)
        if self.memory is not None:
            self.memory.close()
        self.door.close()

    # -- one message -----------------------------------------------------------------

    def exchange(self, data: bytes, kind: str, ours: bool = True) -> Expected:
        """Send ``data``, check the reply against the model; raises PeerGone if the host died."""
        expect = self.model.message(data, ours, _live)
        if expect.kind == "none":  # ring mode's kick: must not be answered
            self.door.notify(data, f"fuzz case {self.result.cases} ({kind})")
            extra = self.door._recv(20)
            if extra is not None:
                self.result.fail(f"case {self.result.cases} ({kind}): a kick was answered with {extra[:64].hex()}")
            return expect
        if ours:
            raw = self.door.call(data, f"fuzz case {self.result.cases} ({kind})")
        else:
            intruder = ZmqCaller(self.run.links.endpoint, self.cfg.timeout, self.run.host.pid)
            try:
                raw = intruder.call(data, f"fuzz case {self.result.cases} ({kind})")
            finally:
                intruder.close()
        self._check_reply(raw, expect, data, kind)
        if expect.kind == "welcome":
            hello = unpack(data)
            if hello.pid != self.pid:  # a mutated hello attached a stranger's pid: take the vCPU back
                self.exchange(pack_hello(hello.vcpu, self.pid), "handshake")
        elif expect.outcome is not None and self.memory is not None:
            for pte_phys, _ in expect.outcome.writes:
                if self.mem[pte_phys : pte_phys + 8] != self.model.mem[pte_phys : pte_phys + 8]:
                    self.result.fail(
                        f"case {self.result.cases} ({kind}): entry {pte_phys:#x} does not hold what was written"
                    )
        return expect

    def _check_reply(self, raw: bytes, expect: Expected, data: bytes, kind: str) -> None:
        try:
            reply = unpack(raw)
        except MessageError as exc:
            reply = f"an invalid reply ({exc})"
        if expect.kind == "reject":
            ok = type(reply) is Reject and reply.reason.startswith(expect.category or "")
            want = f"REJECT '{expect.category}'"
        elif expect.kind == "welcome":
            ok = type(reply) is Welcome and reply.info.get("vcpu") == expect.vcpu
            want = f"WELCOME for vCPU {expect.vcpu}"
        else:
            ok = reply == Return(expect.seq or 0, expect.ret or 0)
            want = f"RETURN {expect.seq}, {expect.ret}"
        if not ok:
            self.result.wrong_replies += 1
            self.result.fail(
                f"case {self.result.cases} ({kind}): sent {data[:64].hex()}, expected {want}, got {reply!r:.200}"
            )

    # -- the cases -------------------------------------------------------------------

    def case(self) -> None:
        rng = self.rng
        kind = rng.choices(
            ["ops", "registers", "mutated", "garbage", "shape", "sequence", "handshake", "control", "oversize",
             "intruder"],
            weights=[52, 10, 10, 5, 8, 5, 4, 2, 2, 2],
        )[0]  # fmt: skip
        self.result.kinds[kind] = self.result.kinds.get(kind, 0) + 1
        getattr(self, f"_case_{kind}")()

    def _vcpu(self) -> int:
        """A vCPU this connection holds (saying hello again if a bye took the last one)."""
        if not self.model.seq:
            self.exchange(pack_hello(0, self.pid), "handshake")
        return self.rng.choice(sorted(self.model.seq))

    def _hypercall(self, vcpu: int, nr: int, a0: int, a1: int, a2: int) -> bytes:
        return pack_hypercall(vcpu, self.model.seq[vcpu] + 1, nr, a0, a1, a2)

    def _case_ops(self) -> None:
        rng = self.rng
        buf = self._op_buffer()
        where = rng.choices(
            [self.queue_gpa, self.stack_gpa, self._scratch_gpa(len(buf)), self.mem_bytes - rng.randrange(len(buf) + 1)],
            weights=[70, 10, 15, 5],
        )[0]
        fits = buf[: max(0, self.mem_bytes - where)]
        self.mem[where : where + len(fits)] = fits
        self.model.mem[where : where + len(fits)] = fits
        a0 = rng.choices(
            [len(buf), rng.randrange(len(buf) + 1), len(buf) + rng.randrange(1, 200), 0, rng.getrandbits(64)],
            weights=[70, 10, 10, 5, 5],
        )[0]
        vcpu = self._vcpu()
        self.exchange(self._hypercall(vcpu, KVM_HC_MMU_OP, a0, where & 0xFFFFFFFF, where >> 32), "ops")

    def _scratch_gpa(self, n: int) -> int:
        """Anywhere a guest may keep a buffer except the fuzzer's page tables (header page included)."""
        while True:
            gpa = self.rng.randrange(0, self.mem_bytes - n)
            if gpa + n <= self.pt_lo or gpa >= self.pt_hi:
                return gpa

    def _op_buffer(self) -> bytes:
        rng = self.rng
        parts = []
        for _ in range(rng.randrange(1, 46)):
            r = rng.random()
            if r < 0.50:  # a legal write to a page table
                pte_phys = self.pt_lo + 8 * rng.randrange(PT_PAGES * 512)
                val = rng.choice([rng.getrandbits(64), (rng.getrandbits(36) << 12) | 0x67, 0])
                parts.append(_WRITE.pack(1, rng.getrandbits(32), pte_phys, val))
            elif r < 0.58:
                parts.append(_FLUSH.pack(2, rng.getrandbits(32)))
            elif r < 0.65:
                pt = rng.choice([self.pt_lo + PAGE_SIZE * rng.randrange(PT_PAGES), rng.randrange(self.mem_bytes),
                                 self.mem_bytes + rng.randrange(1 << 20), rng.getrandbits(64)])  # fmt: skip
                parts.append(_RELEASE.pack(3, 0, pt))
            elif r < 0.77:  # a write the host must refuse
                bad = rng.choice([
                    self.pt_lo + 8 * rng.randrange(PT_PAGES * 512) + rng.randrange(1, 8),
                    self.mem_bytes, self.mem_bytes - 4, self.mem_bytes + 8 * rng.randrange(1 << 20),
                    U64_MAX - 7, U64_MAX, rng.getrandbits(64), 1 << 32,
                ])  # fmt: skip
                parts.append(_WRITE.pack(1, 0, bad, rng.getrandbits(64)))
            elif r < 0.82:  # legal, but anywhere in guest memory: headers, queues, other vCPUs' pools
                parts.append(_WRITE.pack(1, 0, 8 * rng.randrange(self.mem_bytes // 8), rng.getrandbits(64)))
            elif r < 0.90:  # an unknown op code, perhaps with a body
                code = rng.choice([0, 4, 255, 1 << 31, U64_MAX & 0xFFFFFFFF, rng.getrandbits(32)])
                parts.append(_FLUSH.pack(code, 0) + rng.randbytes(rng.choice([0, 8, 16])))
            else:
                parts.append(rng.randbytes(rng.randrange(1, 30)))
        buf = b"".join(parts)
        r = rng.random()
        if r < 0.15:  # truncated anywhere
            buf = buf[: rng.randrange(len(buf) + 1)]
        elif r < 0.25 and buf:  # a few bytes flipped
            b = bytearray(buf)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            buf = bytes(b)
        return buf

    def _case_registers(self) -> None:
        rng = self.rng
        nr = rng.choice([KVM_HC_MMU_OP, KVM_HC_MMU_OP, 0, 1, 3, 1000, rng.getrandbits(64)])
        if nr == PVMMU_HC_RING_SETUP:  # a registered ring is drained by the host on its own: not modelled
            nr = 1000
        a0 = rng.choice([0, 1, 7, 8, 24, 512, 513, 1 << 32, U64_MAX, rng.getrandbits(64)])
        gpa = rng.choice([
            self.mem_bytes, self.mem_bytes - rng.randrange(1, 32), (1 << 32) - 8, U64_MAX - 7, 1 << 63,
            rng.getrandbits(64), rng.randrange(self.mem_bytes), self.queue_gpa,
        ])  # fmt: skip
        # Junk in the high halves of a1 and a2: the host uses only the low 32 bits of each.
        a1 = (gpa & 0xFFFFFFFF) | (rng.choice([0, 0, rng.getrandbits(32)]) << 32)
        a2 = (gpa >> 32) | (rng.choice([0, 0, rng.getrandbits(32)]) << 32)
        self.exchange(self._hypercall(self._vcpu(), nr, a0, a1, a2), "registers")

    def _case_mutated(self) -> None:
        rng = self.rng
        vcpu = self._vcpu()
        data = bytearray(self._hypercall(vcpu, KVM_HC_MMU_OP, 24, self.stack_gpa, 0))
        how = rng.randrange(4)
        if how == 0:
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
        elif how == 1:
            del data[rng.randrange(len(data)) :]
        elif how == 2:
            data += rng.randbytes(rng.randrange(1, 16))
        else:
            pos = rng.randrange(len(data))
            data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        self.exchange(bytes(data), "mutated")

    def _case_garbage(self) -> None:
        self.exchange(self.rng.randbytes(self.rng.randrange(0, 300)), "garbage")

    def _case_shape(self) -> None:
        rng = self.rng
        odd = [None, True, False, -1, 1.5, "x", b"\x00", [], {}, U64_MAX, -(1 << 63), "é" * 3]
        kind = rng.choice([MSG_HELLO, MSG_HYPERCALL, MSG_BYE, MSG_CONTROL, 0, 9, 255, -1, True, "3", None])
        body = [rng.choice(odd + [rng.getrandbits(64), 0, 1, 2]) for _ in range(rng.randrange(0, 9))]
        choice = rng.randrange(5)
        if choice == 0:
            data = msgpack.packb([kind, *body])
        elif choice == 1:  # the right arity, one field of the wrong type
            fields = [0, self.model.seq.get(0, 0) + 1, KVM_HC_MMU_OP, 24, self.stack_gpa, 0]
            fields[rng.randrange(len(fields))] = rng.choice(odd)
            data = msgpack.packb([MSG_HYPERCALL, *fields])
        elif choice == 2:  # nested too deep for the unpacker
            data = b"\x91" * rng.randrange(100, 3000) + b"\xc0"
        elif choice == 3:  # a map, a bare int, an empty array, an ext type
            data = rng.choice([msgpack.packb({"a": 1}), msgpack.packb(3), msgpack.packb([]),
                               msgpack.packb(msgpack.ExtType(1, b"xx")), b"\xc1"])  # fmt: skip
        else:  # messages only the host sends
            data = rng.choice([pack_return(1, 0), pack_welcome({"vcpu": 0}), msgpack.packb([MSG_REJECT, None, "x"]),
                               msgpack.packb([MSG_CONTROL_REPLY, "stats", {}]), msgpack.packb([MSG_WELCOME, 1, {}])])  # fmt: skip
        self.exchange(data, "shape")

    def _case_sequence(self) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            vcpu = self._vcpu()
            last = self.model.seq[vcpu]
            seq = rng.choice([0, last, last + 2, last + 1000, U64_MAX, max(0, last - 1)])
            self.exchange(pack_hypercall(vcpu, seq, KVM_HC_MMU_OP, 8, self.stack_gpa, 0), "sequence")
        else:  # a vCPU this connection never said hello as, or one the guest does not have
            vcpu = rng.choice([v for v in range(self.cfg.vcpus) if v not in self.model.seq] + [31, 1 << 31])
            self.exchange(pack_hypercall(vcpu, 1, KVM_HC_MMU_OP, 8, self.stack_gpa, 0), "sequence")

    def _case_handshake(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.6:  # hellos that must be refused
            data = rng.choice([
                msgpack.packb([MSG_HELLO, 2, 0, self.pid]),
                pack_hello(self.cfg.vcpus + rng.randrange(32), self.pid),
                pack_hello(rng.randrange(self.cfg.vcpus), 0),
                pack_hello(rng.randrange(self.cfg.vcpus), self.dead_pid),
                pack_hello(rng.randrange(self.cfg.vcpus), 1 << 40),
                pack_hello(rng.randrange(self.cfg.vcpus), U64_MAX),
            ])  # fmt: skip
        elif r < 0.8:  # byes for vCPUs this connection does not hold
            data = pack_bye(rng.choice([v for v in range(self.cfg.vcpus) if v not in self.model.seq] + [77]))
        elif r < 0.93:  # a valid hello: attach another vCPU, or start one over (its pool is wiped)
            data = pack_hello(rng.randrange(self.cfg.vcpus), self.pid)
        else:  # a valid bye
            data = pack_bye(self._vcpu())
        self.exchange(data, "handshake")

    def _case_control(self) -> None:
        token = self.rng.choice(["", "x" * 32, "é", "\x00", "a" * 4000, self.rng.randbytes(16).hex()])
        self.exchange(pack_control(token, self.rng.choice(["stats", "check", "shutdown", "reset"])), "control")

    def _case_oversize(self) -> None:
        rng = self.rng
        if rng.random() < 0.7:  # over the protocol's cap, under libzmq's: refused with a REJECT
            n = rng.randrange(MAX_MESSAGE_BYTES + 1, 4 * MAX_MESSAGE_BYTES - 16)
            self.exchange(msgpack.packb([MSG_HYPERCALL, 0, 1, 2, 3, 4, "x" * n]), "oversize")
            return
        # Over libzmq's MAXMSGSIZE: the host's socket drops the connection; no reply, nothing changes.
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.run.links.endpoint)
            sock.send_multipart([b"", rng.randbytes(rng.randrange(4 * MAX_MESSAGE_BYTES + 1, 1 << 20))])
            if sock.poll(50, zmq.POLLIN):
                self.result.fail(f"case {self.result.cases} (oversize): the host answered a message over 16 KiB")
        finally:
            sock.close(linger=0)

    def _case_intruder(self) -> None:
        """A second connection tries to use, or take, a vCPU the first one holds."""
        vcpu = self._vcpu()
        if self.rng.random() < 0.5:
            self.exchange(self._hypercall(vcpu, KVM_HC_MMU_OP, 24, self.queue_gpa, 0), "intruder", ours=False)
        else:
            self.exchange(pack_hello(vcpu, self.pid), "intruder", ours=False)

    # -- the checks ------------------------------------------------------------------

    def compare_memory(self) -> None:
        """All of guest memory against the model, 64 KiB at a time; count differing 8-byte entries."""
        self.result.memory_compares += 1
        mem, want = self.mem, self.model.mem
        step = 1 << 16
        for off in range(0, self.mem_bytes, step):
            have = bytes(mem[off : off + step])
            if have == want[off : off + step]:
                continue
            for slot in range(off, off + step, 8):
                if have[slot - off : slot - off + 8] != want[slot : slot + 8]:
                    self.result.out_of_bounds += 1
                    self.result.fail(
                        f"by case {self.result.cases}: guest memory at {slot:#x} is "
                        f"{have[slot - off : slot - off + 8].hex()}, the model says {want[slot : slot + 8].hex()}"
                    )
            want[off : off + step] = have  # count each bad change once

    def finish(self) -> None:
        """Flush, release the pages that are not page tables, then compare shadow and counters."""
        model = self.model
        for vcpu in sorted(model.seq):
            self._apply_ops(vcpu, [_FLUSH.pack(2, 0)])
        others = sorted(p for p in model.pages if not self.pt_lo <= p < self.pt_hi)
        if others:
            self._apply_ops(self._vcpu(), [_RELEASE.pack(3, 0, p) for p in others])
        self.compare_memory()
        check = self.run.control("check")
        self.result.shadow = {k: check[k] for k in ("ok", "pages", "entries", "mismatches", "stale_tlb", "examples")}
        want_shadow = {
            "ok": True,
            "pages": len(model.pages),
            "entries": len(model.spte),
            "mismatches": 0,
            "stale_tlb": 0,
        }
        for k, v in want_shadow.items():
            if check[k] != v:
                self.result.fail(f"shadow: {k} is {check[k]}, the model says {v} ({check['examples'][:2]})")
        stats = self.run.control("stats")
        t = stats["totals"]
        have = {"hypercalls": t["hypercalls"], "bytes": t["bytes"], "partial": t["partial"],
                **{k: t["ops"][k] for k in ("write_pte", "flush_tlb", "release_pt")}}  # fmt: skip
        self.result.counters = {**have, "refused": t["refused"], "rejected": stats["rejected"]}
        for name, want in [*model.totals.items(), ("refused", model.refused), ("rejected", model.rejected)]:
            got = self.result.counters[name]
            if got != want:
                self.result.mismatched_counters.append(name)
                self.result.fail(f"host counts {name} = {got}, the model says {want}")

    def _apply_ops(self, vcpu: int, ops: list[bytes]) -> None:
        """Hand ``ops`` to the host from the stack page, calling again until all are applied."""
        buf = b"".join(ops)
        for start in range(0, len(buf), 4080):
            chunk = buf[start : start + 4080]
            self.mem[self.stack_gpa : self.stack_gpa + len(chunk)] = chunk
            self.model.mem[self.stack_gpa : self.stack_gpa + len(chunk)] = chunk
            gpa, left = self.stack_gpa, len(chunk)
            while left:
                ret = self.exchange(self._hypercall(vcpu, KVM_HC_MMU_OP, left, gpa, 0), "finish").ret or 0
                if ret <= 0:
                    self.result.fail(f"finish: the host applied {ret} bytes of a legal buffer")
                    return
                gpa, left = gpa + ret, left - ret

    def flood(self, n: int, progress: Progress) -> dict[str, Any]:
        """N malformed messages in a row; then the host's memory growth and a valid hypercall."""
        templates = [
            b"\xc1", b"", msgpack.packb([]), msgpack.packb({"a": 1}), msgpack.packb([99]),
            msgpack.packb([MSG_HYPERCALL, 0, 1, 2, -3, 4, 5]), msgpack.packb([MSG_HYPERCALL, "x"] * 3),
            pack_hypercall(5, 1, 2, 3, 4, 5), pack_hypercall(0, 10**9, 2, 24, 0, 0), pack_hello(0, 0),
            pack_hello(40, self.pid), pack_bye(1), pack_control("wrong", "stats"), pack_return(1, 0),
            b"\x91" * 2000 + b"\xc0", msgpack.packb(["y" * (MAX_MESSAGE_BYTES + 10)]),
        ]  # fmt: skip
        # Predict once per template (none of them changes the host's state), then count.
        expected = [self.model.message(t, True, _live) for t in templates]
        for t in expected:
            self.model.rejected[t.category or ""] -= 1
        host = psutil.Process(self.run.host.pid)
        rss_before = 0
        t0 = time.monotonic()
        for i in range(FLOOD_WARMUP + n):
            if i == FLOOD_WARMUP:
                rss_before = host.memory_info().rss
                t0 = time.monotonic()
            j = i % len(templates)
            raw = self.door.call(templates[j], f"flood message {i}")
            self.model.rejected[expected[j].category or ""] += 1
            self._check_reply(raw, expected[j], templates[j], "flood")
            if i % 1000 == 0:
                progress.update(f"fuzz: flood {i}/{FLOOD_WARMUP + n} malformed messages")
        wall = time.monotonic() - t0
        rss_after = host.memory_info().rss
        # And the host still does its job: one valid hypercall, checked entry by entry.
        vcpu = self._vcpu()
        pte = self.pt_lo + 8 * self.rng.randrange(PT_PAGES * 512)
        before = self.result.wrong_replies
        self._apply_ops(vcpu, [_WRITE.pack(1, 0, pte, 0xABC067)])
        answered = self.result.wrong_replies == before and bytes(self.mem[pte : pte + 8]) == struct.pack("<Q", 0xABC067)
        growth = (rss_after - rss_before) / rss_before if rss_before else 0.0
        if growth >= MEMORY_GROWTH_LIMIT:
            self.result.fail(f"flood: host memory grew {growth:.1%} ({rss_before} -> {rss_after} bytes)")
        if not answered:
            self.result.fail("flood: the host did not answer a valid hypercall correctly afterwards")
        return {"messages": n, "warmup": FLOOD_WARMUP, "wall_s": round(wall, 3), "rss_before": rss_before,
                "rss_after": rss_after, "growth": growth, "valid_hypercall_after": answered}  # fmt: skip


def run_fuzz(cfg: FuzzConfig, progress: Progress | None = None) -> FuzzResult:
    """Fuzz a live host; the result says what went wrong, if anything. RunError if it could not start."""
    progress = progress or Progress(enabled=False)
    result = FuzzResult(config=asdict(cfg))
    run_cfg = RunConfig(vcpus=cfg.vcpus, mem_mb=cfg.mem_mb, host_limit=cfg.host_limit, timeout=cfg.timeout)
    t0 = time.monotonic()
    shm_name = rundir = None
    with hosted(run_cfg) as run:
        shm_name, rundir, result.host_pid = run.shm_name, run.rundir, run.host.pid
        fuzzer = None
        try:
            fuzzer = LiveFuzzer(cfg, run, result)
            if cfg.flood:
                result.flood = fuzzer.flood(cfg.flood, progress)
            for i in range(cfg.cases):
                result.cases = i + 1
                fuzzer.case()
                if (i + 1) % cfg.check_every == 0:
                    fuzzer.compare_memory()
                progress.update(f"fuzz: {i + 1}/{cfg.cases} cases, {result.failure_count} failures")
            fuzzer.finish()
            if not run.host.watch.alive():
                raise PeerGone(f"host process {run.host.pid} died")
        except (PeerGone, DoorbellTimeout, RunError) as exc:
            host = run.host
            result.crashed = (
                host.describe_death(host, f"by case {result.cases}") if not host.watch.alive() else str(exc)
            )
            result.fail(f"case {result.cases}: {result.crashed}")
        finally:
            if fuzzer is not None:
                fuzzer.close()
        progress.done()
    result.wall_s = time.monotonic() - t0
    if shm_name and os.path.exists(f"/dev/shm/{shm_name}"):
        result.leaks.append(f"/dev/shm/{shm_name}")
    if rundir and os.path.exists(rundir):
        result.leaks.append(rundir)
    return result


def format_result(r: FuzzResult) -> str:
    c = r.config
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.kinds.items(), key=lambda kv: -kv[1]))
    lines = [
        f"pvmmu fuzz: {r.cases} cases (seed {c['seed']}) against host {r.host_pid} "
        f"({c['vcpus']} vCPUs, {c['mem_mb']} MiB, host limit {c['host_limit']} B), {r.wall_s:.1f} s",
        f"  cases      {kinds}",
    ]
    if r.counters:
        t = r.counters
        refused = ", ".join(f"{k} {v}" for k, v in sorted(t["refused"].items()))
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(t["rejected"].items()))
        lines += [
            f"  host       {'died: ' + r.crashed if r.crashed else 'alive'}; {t['hypercalls']} hypercalls served, "
            f"{t['write_pte'] + t['flush_tlb'] + t['release_pt']} ops applied",
            f"  refused    {refused or 'nothing'}",
            f"  rejected   {rejected or 'nothing'}",
            f"  counters   {'all equal to the model' if not r.mismatched_counters else 'DIFFER: ' + ', '.join(r.mismatched_counters)}",
        ]
    elif r.crashed:
        lines.append(f"  host       died: {r.crashed}")
    lines.append(f"  replies    {r.wrong_replies} differed from the protocol's")
    lines.append(
        f"  memory     {r.memory_compares} full comparisons with the model: {r.out_of_bounds} out-of-bounds changes"
    )
    if r.shadow:
        s = r.shadow
        lines.append(
            f"  shadow     {'consistent' if s['ok'] else 'INCONSISTENT'}: {s['entries']} entries on {s['pages']} pages, "
            f"{s['mismatches']} mismatches, {s['stale_tlb']} stale TLB entries"
        )
    if r.flood:
        f = r.flood
        lines.append(
            f"  flood      {f['messages']} malformed messages in {f['wall_s']:.1f} s, all rejected; host RSS "
            f"{f['rss_before'] / 2**20:.1f} -> {f['rss_after'] / 2**20:.1f} MiB ({f['growth']:+.2%}); "
            f"valid hypercall after: {'answered correctly' if f['valid_hypercall_after'] else 'WRONG'}"
        )
    lines.append(f"  leaks      {', '.join(r.leaks) if r.leaks else 'none'}")
    lines += [f"  ! {f}" for f in r.failures]
    if r.failure_count > len(r.failures):
        lines.append(f"  ! ... and {r.failure_count - len(r.failures)} more")
    lines.append(f"  result     {'PASS' if r.ok else 'FAIL'}")
    return "\n".join(lines)
