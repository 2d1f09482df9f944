"""Trace files: a guest's paravirt op stream with its lazy MMU sections, to replay in any mode.

A trace is a stream of msgpack objects::

    header   {"format": "pvmmu-trace", "version": 1, "workload", "size", "seed", "source",
              "mem_bytes", "vcpus", "vcpu", "pool_gpa", "pool_bytes", "created_by"}
    chunk    ["setup" | "run", index, crc32, events]     (any number; setup chunks first)
    trailer  {"end": {"events", "chunks", "digest", "entries", "crc32"}}

``events`` (msgpack bin) holds records back to back: the ops in the exact C
layout of ``<asm/kvm_para.h>`` (write_pte 24 bytes, flush_tlb 8, release_pt 16)
and two 8-byte markers with the same header layout, op ``0x100`` for
``kvm_enter_lazy_mmu`` and ``0x101`` for ``kvm_leave_lazy_mmu``. It is what the
guest *asked for*, before any queueing, so it is the same whichever mode
recorded it, and can be replayed in every mode. ``index`` counts chunks from 0
and a chunk's ``crc32`` (zlib) covers its ``events``, so a damaged chunk is
found with its offset. The trailer carries the digest of the page tables the
stream leaves (``protocol.x86.table_digest``) and a ``crc32`` of every byte
before the trailer followed by msgpack ``[events, chunks, digest, entries]``:
no byte of the file can change unnoticed.

``read_trace`` checks everything before anything is applied: a corrupt,
truncated or inconsistent file raises ``TraceError`` naming the byte offset.
Pure: bytes in, events out.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol.abi import (
    FLUSH_TLB,
    HEADER,
    KVM_MMU_OP_FLUSH_TLB,
    KVM_MMU_OP_RELEASE_PT,
    KVM_MMU_OP_WRITE_PTE,
    RELEASE_PT,
    WRITE_PTE,
)
from protocol.layout import PAGE_SIZE

FORMAT = "pvmmu-trace"
VERSION = 1
SECTIONS = ("setup", "run")
LAZY_ENTER = 0x100
LAZY_LEAVE = 0x101
CHUNK_BYTES = 1 << 16  # a writer cuts chunks near this size, at record boundaries
MAX_CHUNK_BYTES = 1 << 20
HEADER_FIELDS = {
    "workload": str, "size": int, "seed": int, "source": str, "mem_bytes": int, "vcpus": int, "vcpu": int,
    "pool_gpa": int, "pool_bytes": int, "created_by": str,
}  # fmt: skip

ENTER_RECORD = HEADER.pack(LAZY_ENTER, 0)
LEAVE_RECORD = HEADER.pack(LAZY_LEAVE, 0)
_RECORD_SIZE = {
    KVM_MMU_OP_WRITE_PTE: WRITE_PTE.size,
    KVM_MMU_OP_FLUSH_TLB: FLUSH_TLB.size,
    KVM_MMU_OP_RELEASE_PT: RELEASE_PT.size,
    LAZY_ENTER: HEADER.size,
    LAZY_LEAVE: HEADER.size,
}

# A decoded event: (code, a, b): write_pte (1, pte_phys, pte_val), flush_tlb (2, 0, 0),
# release_pt (3, pt_phys, 0), enter (0x100, 0, 0), leave (0x101, 0, 0).
Event = tuple[int, int, int]


class TraceError(ValueError):
    """A trace that cannot be replayed; ``offset`` is the byte where the problem is (None: not about content)."""

    def __init__(self, message: str, offset: int | None) -> None:
        super().__init__(message if offset is None else f"{message} (at byte offset {offset})")
        self.problem = message
        self.offset = offset


@dataclass
class Trace:
    header: dict[str, Any]
    sections: dict[str, list[Event]] = field(default_factory=lambda: {s: [] for s in SECTIONS})
    trailer: dict[str, Any] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return sum(len(v) for v in self.sections.values())


_pack = msgpack.Packer(use_bin_type=True).pack


def encode_header(**fields: Any) -> bytes:
    for key, kind in HEADER_FIELDS.items():
        if not isinstance(fields.get(key), kind):
            raise ValueError(f"trace header field {key!r} must be {kind.__name__}")
    return _pack({"format": FORMAT, "version": VERSION, **fields})


def encode_chunk(section: str, index: int, events: bytes) -> bytes:
    if section not in SECTIONS:
        raise ValueError(f"trace section must be one of {SECTIONS}, not {section!r}")
    return _pack([section, index, zlib.crc32(events), events])


def encode_trailer(events: int, chunks: int, digest: str, entries: int, crc_before: int) -> bytes:
    """The trailer; ``crc_before`` is zlib.crc32 of every byte written before it."""
    crc = zlib.crc32(_pack([events, chunks, digest, entries]), crc_before)
    end = {"events": events, "chunks": chunks, "digest": digest, "entries": entries, "crc32": crc}
    return _pack({"end": end})


def read_trace(data: bytes) -> Trace:
    """Decode and check a whole trace; raise TraceError (with the offset) at the first problem."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    objects = _objects(unpacker, len(data))
    if not objects:
        raise TraceError("empty file: not a pvmmu trace", 0)
    start, header = objects[0]
    trace = Trace(_check_header(header, start))
    pool_lo = trace.header["pool_gpa"]
    pool_hi = pool_lo + trace.header["pool_bytes"]
    section_at = 0
    index = 0
    for pos, (start, obj) in enumerate(objects[1:], 1):
        if isinstance(obj, dict):
            end = obj.get("end")
            if not isinstance(end, dict):
                raise TraceError("a map that is not the trailer in the middle of the trace", start)
            if pos != len(objects) - 1:
                raise TraceError("data after the trailer", objects[pos + 1][0])
            _check_trailer(end, trace, index, start, data)
            trace.trailer = end
            return trace
        if not (isinstance(obj, list) and len(obj) == 4):
            raise TraceError("expected a chunk [section, index, crc32, events]", start)
        section, n, crc, events = obj
        if section not in SECTIONS:
            raise TraceError(f"unknown section {section!r}", start)
        if SECTIONS.index(section) < section_at:
            raise TraceError(f"a {section!r} chunk after the {SECTIONS[section_at]!r} section began", start)
        if SECTIONS.index(section) > section_at:
            _section_ends(trace, SECTIONS[section_at], start)
        section_at = SECTIONS.index(section)
        if n != index:
            raise TraceError(f"chunk {n} where chunk {index} should be (a chunk lost or repeated)", start)
        if not isinstance(events, bytes) or not isinstance(crc, int) or len(events) > MAX_CHUNK_BYTES:
            raise TraceError(f"chunk {index} is malformed", start)
        end_of_chunk = objects[pos + 1][0] if pos + 1 < len(objects) else len(data)
        body = end_of_chunk - len(events)  # the events bin is the chunk's last element
        if zlib.crc32(events) != crc:
            raise TraceError(f"chunk {index} is corrupt: its checksum does not match", body)
        _decode_events(events, body, trace.sections[section], pool_lo, pool_hi)
        index += 1
    raise TraceError(f"truncated: the trace ends after {index} chunks without its trailer", len(data))


def _objects(unpacker: msgpack.Unpacker, size: int) -> list[tuple[int, Any]]:
    """Every msgpack object with its start offset; a cut or garbled object raises TraceError."""
    objects = []
    start = 0
    while True:
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData:
            if start < size:
                raise TraceError(f"truncated: an incomplete msgpack object ({size - start} bytes)", start) from None
            return objects
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise TraceError(f"not msgpack: {type(exc).__name__}: {exc}", start) from None
        objects.append((start, obj))
        start = unpacker.tell()


def _check_header(header: Any, start: int) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TraceError("not a pvmmu trace: no pvmmu-trace header", start)
    if header.get("version") != VERSION:
        raise TraceError(f"trace format version {header.get('version')!r}; this pvmmu reads version {VERSION}", start)
    for key, kind in HEADER_FIELDS.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise TraceError(f"header field {key!r} is missing or not {kind.__name__}", start)
    lo, n = header["pool_gpa"], header["pool_bytes"]
    if lo % PAGE_SIZE or n <= 0 or lo + n > header["mem_bytes"]:
        raise TraceError("header's frame pool does not lie in its guest memory", start)
    return header


def _decode_events(buf: bytes, base: int, out: list[Event], pool_lo: int, pool_hi: int) -> None:
    """Append the records of one chunk to ``out``; ``base`` is the chunk's offset in the file."""
    lazy = bool(out) and _lazy_after(out)
    off, end = 0, len(buf)
    while off < end:
        where = base + off
        if end - off < HEADER.size:
            raise TraceError(f"truncated record header ({end - off} of 8 bytes)", where)
        code = HEADER.unpack_from(buf, off)[0]
        size = _RECORD_SIZE.get(code)
        if size is None:
            raise TraceError(f"unknown record code {code}", where)
        if end - off < size:
            raise TraceError(f"truncated record ({end - off} of {size} bytes)", where)
        if code == KVM_MMU_OP_WRITE_PTE:
            _, _, pte_phys, pte_val = WRITE_PTE.unpack_from(buf, off)
            if pte_phys % 8 or not pool_lo <= pte_phys < pool_hi:
                raise TraceError(f"write_pte to {pte_phys:#x}, not an entry of the vCPU's page-table pool", where)
            out.append((code, pte_phys, pte_val))
        elif code == KVM_MMU_OP_RELEASE_PT:
            pt_phys = RELEASE_PT.unpack_from(buf, off)[2]
            if not pool_lo <= pt_phys < pool_hi:
                raise TraceError(f"release_pt of {pt_phys:#x}, outside the vCPU's page-table pool", where)
            out.append((code, pt_phys, 0))
        else:
            if code == LAZY_ENTER and lazy:
                raise TraceError("enter_lazy_mmu inside a lazy MMU section", where)
            if code == LAZY_LEAVE and not lazy:
                raise TraceError("leave_lazy_mmu outside a lazy MMU section", where)
            lazy = code == LAZY_ENTER if code in (LAZY_ENTER, LAZY_LEAVE) else lazy
            out.append((code, 0, 0))
        off += size


def _lazy_after(events: list[Event]) -> bool:
    for code, _, _ in reversed(events):
        if code in (LAZY_ENTER, LAZY_LEAVE):
            return code == LAZY_ENTER
    return False


def _section_ends(trace: Trace, section: str, offset: int) -> None:
    if _lazy_after(trace.sections[section]):
        raise TraceError(f"the {section!r} section ends inside a lazy MMU section", offset)


def _check_trailer(end: dict[str, Any], trace: Trace, chunks: int, start: int, data: bytes) -> None:
    for section in SECTIONS:
        _section_ends(trace, section, start)
    if not isinstance(end.get("digest"), str) or not isinstance(end.get("entries"), int):
        raise TraceError("trailer lacks the final digest", start)
    fields = [end.get("events"), end.get("chunks"), end["digest"], end["entries"]]
    if end.get("crc32") != zlib.crc32(_pack(fields), zlib.crc32(data[:start])):
        raise TraceError("the file's checksum does not match: something before the trailer, or in it, changed", start)
    if end.get("chunks") != chunks or end.get("events") != trace.events:
        raise TraceError(
            f"trailer counts {end.get('chunks')} chunks and {end.get('events')} events; "
            f"the file holds {chunks} and {trace.events} (chunks lost?)",
            start,
        )


__all__ = [
    "ENTER_RECORD",
    "LAZY_ENTER",
    "LAZY_LEAVE",
    "LEAVE_RECORD",
    "Event",
    "Trace",
    "TraceError",
    "encode_chunk",
    "encode_header",
    "encode_trailer",
    "read_trace",
]
