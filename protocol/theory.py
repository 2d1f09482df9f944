"""What the patch should achieve on paper: hypercalls for an op stream, per mode.

The batched mode's cost per op is its per-op cost divided by the ops each
hypercall carries, so the theoretical switch reduction of ``multicall`` over
``direct`` is ``ops / hypercalls``. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.abi import WRITE_PTE

MODES = ("direct", "queued", "multicall", "ring")
RING_HOST_LIMIT = 1 << 62  # ring mode: a flush is one publish, whatever the host copies per pass

# An op stream's shape (what the guest records, a signed byte per event): the size of a
# deferrable op (24 write_pte, 8 flush_tlb), or one of these markers.
SHAPE_RELEASE_PT = -16  # never deferred
SHAPE_ENTER = 1  # kvm_enter_lazy_mmu
SHAPE_LEAVE = 2  # kvm_leave_lazy_mmu


def hypercalls_for_flush(op_sizes: Iterable[int], host_limit: int) -> int:
    """Hypercalls ``kvm_mmu_op()`` needs to hand one queued buffer to the host.

    The host copies at most ``host_limit`` bytes per call and processes the whole
    ops in them; the guest calls again with what is left.
    """
    sizes = list(op_sizes)
    calls = 0
    i = 0
    while i < len(sizes):
        room = host_limit
        took = 0
        while i < len(sizes) and sizes[i] <= room:
            room -= sizes[i]
            i += 1
            took += 1
        if took == 0:
            raise ValueError(f"an op of {sizes[i]} bytes never fits a host limit of {host_limit}")
        calls += 1
    return calls


def hypercalls_for_lazy_section(op_sizes: Iterable[int], mode: str, queue_bytes: int, host_limit: int) -> int:
    """Hypercalls for the deferrable ops of one lazy MMU section in ``mode``."""
    sizes = list(op_sizes)
    if mode in ("direct", "queued"):
        return len(sizes)
    if mode != "multicall":
        raise ValueError(f"no theory for mode {mode!r}")
    calls = 0
    queued: list[int] = []
    used = 0
    for size in sizes:
        if used + size > queue_bytes:  # kvm_deferred_mmu_op flushes first
            calls += hypercalls_for_flush(queued, host_limit)
            queued, used = [], 0
        queued.append(size)
        used += size
    return calls + hypercalls_for_flush(queued, host_limit)


def write_pte_hypercalls(n: int, mode: str, queue_bytes: int, host_limit: int) -> int:
    """Hypercalls for ``n`` write_pte in one lazy section (the ``writes`` workload)."""
    if mode in ("direct", "queued"):
        return n
    per_queue = queue_bytes // WRITE_PTE.size
    per_call = min(per_queue, host_limit // WRITE_PTE.size)
    if per_call == 0:
        raise ValueError("a write_pte never fits: queue or host limit below 24 bytes")
    full, rest = divmod(n, per_queue)
    return full * -(-per_queue // per_call) + -(-rest // per_call)


def ops_per_hypercall(queue_bytes: int, host_limit: int, op_size: int = WRITE_PTE.size) -> float:
    """Long-run ops per multicall hypercall for a stream of one op size.

    1024-byte queue, 512-byte host limit: 42 write_pte per flush in 2 calls = 21.
    """
    per_queue = queue_bytes // op_size
    per_call = min(per_queue, host_limit // op_size)
    if per_call == 0:
        raise ValueError(f"an op of {op_size} bytes never fits queue {queue_bytes} / limit {host_limit}")
    return per_queue / -(-per_queue // per_call)


def hypercalls_for_shape(shape: Iterable[int], mode: str, queue_bytes: int, host_limit: int) -> int:
    """Hypercalls an op stream of this shape needs in ``mode``, worked out on paper.

    direct and queued: one per op. multicall: ops outside lazy sections and every
    release_pt go one per call; inside a lazy section ops fill the queue, which is
    flushed when the next op would not fit and when the section ends, each flush
    taking ``hypercalls_for_flush`` calls.
    """
    if mode in ("direct", "queued"):
        return sum(1 for e in shape if e not in (SHAPE_ENTER, SHAPE_LEAVE))
    if mode == "ring":  # hypercalls are flushes: the same flush points, each one publish
        return hypercalls_for_shape(shape, "multicall", queue_bytes, RING_HOST_LIMIT)
    if mode != "multicall":
        raise ValueError(f"no theory for mode {mode!r}")
    calls = 0
    lazy = False
    queued: list[int] = []
    used = 0
    for e in shape:
        if e == SHAPE_ENTER:
            lazy = True
        elif e == SHAPE_LEAVE:
            calls += hypercalls_for_flush(queued, host_limit)
            queued, used, lazy = [], 0, False
        elif e == SHAPE_RELEASE_PT:
            calls += 1
        elif not lazy:
            calls += hypercalls_for_flush([e], host_limit)
        else:
            if used + e > queue_bytes:
                calls += hypercalls_for_flush(queued, host_limit)
                queued, used = [], 0
            queued.append(e)
            used += e
    return calls + hypercalls_for_flush(queued, host_limit)


def op_mix(shape: Iterable[int]) -> dict[str, int]:
    """How an op stream divides: ops inside lazy MMU sections, which a queue can batch, and the
    rest (outside any section, and every release_pt), which take one hypercall each in every mode."""
    sections = in_lazy = outside = 0
    lazy = False
    for e in shape:
        if e == SHAPE_ENTER:
            sections += 1
            lazy = True
        elif e == SHAPE_LEAVE:
            lazy = False
        elif lazy and e != SHAPE_RELEASE_PT:
            in_lazy += 1
        else:
            outside += 1
    return {"lazy_sections": sections, "in_lazy": in_lazy, "outside": outside}
