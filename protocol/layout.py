"""Guest physical memory layout: where everything lives in the shared segment.

A guest-physical address (gpa) is an offset into the one shared-memory segment the
host creates. The layout is fixed so that host, guests and tools agree on it::

    0x000000  header page            magic, layout version, size, vCPU count
    0x010000  vCPU slot 0            64 KiB each, MAX_VCPUS of them
    0x010000 + i*0x10000  vCPU slot i
    0x400000  frame pool             4 KiB page frames, split evenly between vCPUs

A vCPU slot holds that vCPU's ``struct kvm_para_state`` (the patch's per-CPU
``mmu_queue[MMU_QUEUE_SIZE]``, ``int mmu_queue_len``, ``enum mode``) at its start
and, in its last page, the vCPU's "kernel stack": the 64 bytes where an op that
is not deferred is built before ``kvm_mmu_op(&op, sizeof op)``. Page-table pages
are allocated by each vCPU from its own part of the pool, so no two vCPUs ever get
the same page.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE_SIZE = 4096
PAGE_SHIFT = 12

MAGIC = b"PVMMU\x00\x00\x01"
LAYOUT_VERSION = 1
# magic, layout version, memory bytes, vCPUs
HEADER = struct.Struct("<8sIQI")

VCPU_BASE = 0x10000
VCPU_SLOT_BYTES = 0x10000
MAX_VCPUS = 32
POOL_BASE = 0x400000
STACK_OFFSET = VCPU_SLOT_BYTES - PAGE_SIZE  # the slot's last page
STACK_BYTES = 64
# struct kvm_para_state = mmu_queue[Q], then int mmu_queue_len, enum mode.
PARA_STATE_TAIL = struct.Struct("<iI")
MAX_QUEUE_BYTES = STACK_OFFSET - PARA_STATE_TAIL.size
MIN_MEM_BYTES = POOL_BASE + 64 * PAGE_SIZE

assert VCPU_BASE + MAX_VCPUS * VCPU_SLOT_BYTES <= POOL_BASE


class LayoutError(ValueError):
    """A memory size, vCPU count or queue size the layout cannot hold."""


@dataclass(frozen=True)
class VcpuArea:
    """Where one vCPU's state lives (all guest-physical addresses)."""

    vcpu: int
    queue_gpa: int  # &para_state.mmu_queue[0]
    queue_bytes: int
    stack_gpa: int  # the buffer a direct op is built in
    pool_gpa: int  # this vCPU's page frames: [pool_gpa, pool_gpa + pool_bytes)
    pool_bytes: int

    @property
    def queue_len_gpa(self) -> int:
        """&para_state.mmu_queue_len (the int after the queue; mode follows it)."""
        return self.queue_gpa + self.queue_bytes


@dataclass(frozen=True)
class Layout:
    """The whole of guest memory for ``vcpus`` vCPUs in ``mem_bytes``."""

    mem_bytes: int
    vcpus: int

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise LayoutError(f"vcpus must be 1..{MAX_VCPUS}, not {self.vcpus}")
        if self.mem_bytes % PAGE_SIZE:
            raise LayoutError(f"guest memory ({self.mem_bytes} bytes) must be whole 4 KiB pages")
        if self.mem_bytes < MIN_MEM_BYTES:
            raise LayoutError(f"guest memory must be at least {MIN_MEM_BYTES // 1024} KiB, not {self.mem_bytes} bytes")

    @property
    def pool_pages_per_vcpu(self) -> int:
        return (self.mem_bytes - POOL_BASE) // PAGE_SIZE // self.vcpus

    def vcpu_area(self, vcpu: int, queue_bytes: int) -> VcpuArea:
        if not 0 <= vcpu < self.vcpus:
            raise LayoutError(f"vCPU {vcpu} is not one of 0..{self.vcpus - 1}")
        check_queue_bytes(queue_bytes)
        slot = VCPU_BASE + vcpu * VCPU_SLOT_BYTES
        pool_bytes = self.pool_pages_per_vcpu * PAGE_SIZE
        return VcpuArea(
            vcpu=vcpu,
            queue_gpa=slot,
            queue_bytes=queue_bytes,
            stack_gpa=slot + STACK_OFFSET,
            pool_gpa=POOL_BASE + vcpu * pool_bytes,
            pool_bytes=pool_bytes,
        )

    def pool_owner(self, gpa: int) -> int | None:
        """The vCPU whose frame pool holds ``gpa`` (None outside every pool)."""
        if gpa < POOL_BASE or gpa >= self.mem_bytes:
            return None
        vcpu = (gpa - POOL_BASE) // (self.pool_pages_per_vcpu * PAGE_SIZE)
        return vcpu if vcpu < self.vcpus else None

    def header_bytes(self) -> bytes:
        return HEADER.pack(MAGIC, LAYOUT_VERSION, self.mem_bytes, self.vcpus)

    @classmethod
    def from_header(cls, buf: bytes | memoryview) -> Layout:
        """Read the header page a host wrote; LayoutError if it is not one."""
        magic, version, mem_bytes, vcpus = HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise LayoutError("guest memory does not start with a pvmmu header of this version")
        return cls(mem_bytes, vcpus)


def check_queue_bytes(queue_bytes: int) -> None:
    """A queue must hold at least one op of every kind and fit its vCPU slot."""
    if not 24 <= queue_bytes <= MAX_QUEUE_BYTES:
        raise LayoutError(f"queue size must be 24..{MAX_QUEUE_BYTES} bytes, not {queue_bytes}")
