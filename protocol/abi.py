"""The KVM_HC_MMU_OP guest/host ABI of Linux 2.6.25/26, byte for byte.

These are the C layouts of ``<asm/kvm_para.h>`` (x86, little-endian)::

    struct kvm_mmu_op_header     { __u32 op; __u32 pad; };                 /*  8 bytes */
    struct kvm_mmu_op_write_pte  { struct kvm_mmu_op_header header;
                                   __u64 pte_phys; __u64 pte_val; };        /* 24 bytes */
    struct kvm_mmu_op_flush_tlb  { struct kvm_mmu_op_header header; };      /*  8 bytes */
    struct kvm_mmu_op_release_pt { struct kvm_mmu_op_header header;
                                   __u64 pt_phys; };                        /* 16 bytes */

Pure: no I/O. ``encode`` and ``decode`` are strict; ``peek_op`` is the host's
non-raising walk that stops where ``kvm_pv_mmu_op_one()`` stopped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# <linux/kvm_para.h>
KVM_HC_MMU_OP = 2
KVM_ENOSYS = 1000
KVM_EFAULT = 14  # EFAULT
KVM_EINVAL = 22  # EINVAL
KVM_E2BIG = 7  # E2BIG
KVM_EPERM = 1  # EPERM
KVM_EOPNOTSUPP = 95  # <linux/kvm_para.h>: an op the host does not know

# pvmmu's own hypercall, beyond the patch: register a vCPU's op ring (protocol.ring).
# a0 = ring capacity in bytes, a1/a2 = the ring's gpa. Returns 0 or -KVM_E*.
PVMMU_HC_RING_SETUP = 0x100

# <asm/kvm_para.h>
KVM_MMU_OP_WRITE_PTE = 1
KVM_MMU_OP_FLUSH_TLB = 2
KVM_MMU_OP_RELEASE_PT = 3

# The patch's per-CPU queue (MMU_QUEUE_SIZE) and 2.6.26's on-stack host buffer
# (struct kvm_pv_mmu_op_buffer.buf[512]).
MMU_QUEUE_SIZE = 1024
KVM_PV_MMU_OP_BUFFER = 512

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

# Precompiled layouts: the hot paths of host and guest pack and unpack with these.
HEADER = struct.Struct("<II")
WRITE_PTE = struct.Struct("<IIQQ")
FLUSH_TLB = struct.Struct("<II")
RELEASE_PT = struct.Struct("<IIQ")

PTE_VAL_OFFSET = 16  # where pte_val sits in a write_pte (coalescing rewrites it in place)

OP_SIZE = {
    KVM_MMU_OP_WRITE_PTE: WRITE_PTE.size,  # 24
    KVM_MMU_OP_FLUSH_TLB: FLUSH_TLB.size,  # 8
    KVM_MMU_OP_RELEASE_PT: RELEASE_PT.size,  # 16
}
OP_NAME = {
    KVM_MMU_OP_WRITE_PTE: "write_pte",
    KVM_MMU_OP_FLUSH_TLB: "flush_tlb",
    KVM_MMU_OP_RELEASE_PT: "release_pt",
}
ERRNO_NAME = {
    KVM_ENOSYS: "KVM_ENOSYS",
    KVM_EFAULT: "KVM_EFAULT",
    KVM_EINVAL: "KVM_EINVAL",
    KVM_E2BIG: "KVM_E2BIG",
    KVM_EPERM: "KVM_EPERM",
    KVM_EOPNOTSUPP: "KVM_EOPNOTSUPP",
}


# Why the host refuses an op it looked at, by (op code, KVM_E* code): the reasons it counts
# (control "stats": "refused") and the ones a guest names when the host reports per-op status.
OP_REFUSALS = {
    (KVM_MMU_OP_WRITE_PTE, KVM_EINVAL): "misaligned pte_phys",
    (KVM_MMU_OP_WRITE_PTE, KVM_EFAULT): "pte_phys outside guest memory",
    (KVM_MMU_OP_RELEASE_PT, KVM_EFAULT): "pt_phys outside guest memory",
}
UNKNOWN_OP = "unknown op code"  # KVM_EOPNOTSUPP, whatever the op code
TOO_BIG = "op longer than the host copies at once"  # KVM_E2BIG (ring mode)


def refusal_reason(op: int | None, code: int) -> str:
    """Why the host refused op ``op`` with ``-code``, in the host's own words ("misaligned pte_phys")."""
    if code == KVM_EOPNOTSUPP:
        return UNKNOWN_OP
    if code == KVM_E2BIG:
        return TOO_BIG
    return OP_REFUSALS.get((op, code), "refused")  # type: ignore[arg-type]


class ProtocolError(ValueError):
    """An op buffer that is not a sequence of whole, known ops.

    ``offset`` is the byte offset of the offending op in the buffer, ``op`` its
    op code (``None`` when not even the 8-byte header was there).
    """

    def __init__(self, message: str, offset: int, op: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.op = op


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ProtocolError(f"{name}={value!r} is not a __u64", offset=0)


@dataclass(frozen=True, slots=True)
class WritePte:
    """``struct kvm_mmu_op_write_pte``: write ``pte_val`` at guest-physical ``pte_phys``."""

    pte_phys: int
    pte_val: int
    op = KVM_MMU_OP_WRITE_PTE
    size = WRITE_PTE.size

    def __post_init__(self) -> None:
        _check_u64("pte_phys", self.pte_phys)
        _check_u64("pte_val", self.pte_val)

    def encode(self) -> bytes:
        return WRITE_PTE.pack(self.op, 0, self.pte_phys, self.pte_val)


@dataclass(frozen=True, slots=True)
class FlushTlb:
    """``struct kvm_mmu_op_flush_tlb``: flush the vCPU's TLB."""

    op = KVM_MMU_OP_FLUSH_TLB
    size = FLUSH_TLB.size

    def encode(self) -> bytes:
        return FLUSH_TLB.pack(self.op, 0)


@dataclass(frozen=True, slots=True)
class ReleasePt:
    """``struct kvm_mmu_op_release_pt``: the page table at ``pt_phys`` is no longer one."""

    pt_phys: int
    op = KVM_MMU_OP_RELEASE_PT
    size = RELEASE_PT.size

    def __post_init__(self) -> None:
        _check_u64("pt_phys", self.pt_phys)

    def encode(self) -> bytes:
        return RELEASE_PT.pack(self.op, 0, self.pt_phys)


Op = WritePte | FlushTlb | ReleasePt


def encode(ops: Iterable[Op]) -> bytes:
    """The op buffer a guest would hand to KVM_HC_MMU_OP for ``ops``, in order."""
    return b"".join(op.encode() for op in ops)


def peek_op(buf: bytes | memoryview, offset: int, end: int) -> tuple[int | None, int]:
    """Look at the op starting at ``offset`` without raising.

    Returns ``(op_code, size)``: ``size`` is the op's full length when the op is
    known and whole before ``end``; 0 means the walk stops here, as
    ``kvm_pv_mmu_op_one()`` returned 0 (header truncated: ``op_code`` None; op
    unknown or body truncated: ``op_code`` set).
    """
    if end - offset < HEADER.size:
        return None, 0
    code = HEADER.unpack_from(buf, offset)[0]
    size = OP_SIZE.get(code, 0)
    if size == 0 or end - offset < size:
        return code, 0
    return code, size


def count_ops(buf: bytes | memoryview, offset: int, end: int) -> int:
    """How many whole ops lie in ``buf[offset:end]`` (the bytes a host applied)."""
    n = 0
    while offset < end:
        size = peek_op(buf, offset, end)[1]
        if size == 0:
            break
        offset += size
        n += 1
    return n


def iter_ops(buf: bytes | memoryview) -> Iterator[tuple[int, Op]]:
    """Yield ``(offset, op)`` for each op in ``buf``; raise ProtocolError at the first bad one."""
    end = len(buf)
    offset = 0
    while offset < end:
        code, size = peek_op(buf, offset, end)
        if size == 0:
            raise _bad_op(code, offset, end)
        if code == KVM_MMU_OP_WRITE_PTE:
            _, _, pte_phys, pte_val = WRITE_PTE.unpack_from(buf, offset)
            yield offset, WritePte(pte_phys, pte_val)
        elif code == KVM_MMU_OP_FLUSH_TLB:
            yield offset, FlushTlb()
        else:
            _, _, pt_phys = RELEASE_PT.unpack_from(buf, offset)
            yield offset, ReleasePt(pt_phys)
        offset += size


def decode(buf: bytes | memoryview) -> list[Op]:
    """The ops in ``buf``. Strict: a truncated or unknown op raises ProtocolError."""
    return [op for _, op in iter_ops(buf)]


def describe_op(buf: bytes | memoryview, offset: int, end: int | None = None) -> str:
    """A one-line description of the op at ``offset`` (for error messages)."""
    end = len(buf) if end is None else end
    code, size = peek_op(buf, offset, end)
    if size == 0:
        return str(_bad_op(code, offset, end))
    if code == KVM_MMU_OP_WRITE_PTE:
        _, _, pte_phys, pte_val = WRITE_PTE.unpack_from(buf, offset)
        return f"write_pte(pte_phys={pte_phys:#x}, pte_val={pte_val:#x}) at offset {offset}"
    if code == KVM_MMU_OP_RELEASE_PT:
        _, _, pt_phys = RELEASE_PT.unpack_from(buf, offset)
        return f"release_pt(pt_phys={pt_phys:#x}) at offset {offset}"
    return f"flush_tlb() at offset {offset}"


def _bad_op(code: int | None, offset: int, end: int) -> ProtocolError:
    if code is None:
        return ProtocolError(
            f"truncated op header at offset {offset}: {end - offset} of {HEADER.size} bytes",
            offset,
        )
    if code not in OP_SIZE:
        return ProtocolError(f"unknown op code {code} at offset {offset}", offset, code)
    return ProtocolError(
        f"truncated {OP_NAME[code]} (op code {code}) at offset {offset}: {end - offset} of {OP_SIZE[code]} bytes",
        offset,
        code,
    )


def errno_name(ret: int) -> str:
    """``-14`` -> ``"-KVM_EFAULT"``; other values as numbers."""
    if ret < 0 and -ret in ERRNO_NAME:
        return f"-{ERRNO_NAME[-ret]}"
    return str(ret)
