"""What the patch should achieve on paper: hypercalls for an op stream, per mode.

The batched mode's cost per op is its per-op cost divided by the ops each
hypercall carries, so the theoretical switch reduction of ``multicall`` over
``direct`` is ``ops / hypercalls``. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.abi import WRITE_PTE

MODES = ("direct", "queued", "multicall")


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
