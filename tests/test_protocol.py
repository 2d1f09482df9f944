"""protocol/: golden bytes worked out by hand from the C structs, round trips, strict decoding."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from protocol import FlushTlb, ProtocolError, ReleasePt, WritePte
from protocol import messages as m
from protocol.layout import MAX_VCPUS, POOL_BASE, Layout, LayoutError

# struct kvm_mmu_op_write_pte { {u32 op=1; u32 pad=0}; u64 pte_phys; u64 pte_val; }, little-endian
GOLDEN_WRITE_PTE = bytes.fromhex(
    "01000000"
    "00000000"  # header: op = KVM_MMU_OP_WRITE_PTE, pad
    "8877665544332211"  # pte_phys = 0x1122334455667788
    "6700000000000080"  # pte_val  = 0x8000000000000067 (NX | D | A | U | RW | P)
)
GOLDEN_FLUSH_TLB = bytes.fromhex("0200000000000000")
GOLDEN_RELEASE_PT = bytes.fromhex("030000000000000000c0ab0000000000")  # pt_phys = 0xabc000


def test_golden_bytes_of_each_op():
    assert WritePte(0x1122334455667788, 0x8000000000000067).encode() == GOLDEN_WRITE_PTE
    assert FlushTlb().encode() == GOLDEN_FLUSH_TLB
    assert ReleasePt(0xABC000).encode() == GOLDEN_RELEASE_PT
    assert [len(GOLDEN_WRITE_PTE), len(GOLDEN_FLUSH_TLB), len(GOLDEN_RELEASE_PT)] == [24, 8, 16]
    assert protocol.OP_SIZE == {1: 24, 2: 8, 3: 16}


def test_encode_concatenates_in_order_and_decode_inverts_it():
    ops = [WritePte(0x1122334455667788, 0x8000000000000067), FlushTlb(), ReleasePt(0xABC000)]
    buf = protocol.encode(ops)
    assert buf == GOLDEN_WRITE_PTE + GOLDEN_FLUSH_TLB + GOLDEN_RELEASE_PT
    assert protocol.decode(buf) == ops


def test_constants_match_linux_headers():
    assert protocol.KVM_HC_MMU_OP == 2
    assert (protocol.KVM_MMU_OP_WRITE_PTE, protocol.KVM_MMU_OP_FLUSH_TLB, protocol.KVM_MMU_OP_RELEASE_PT) == (1, 2, 3)
    assert (protocol.KVM_ENOSYS, protocol.KVM_EFAULT, protocol.KVM_E2BIG, protocol.KVM_EPERM) == (1000, 14, 7, 1)
    assert protocol.MMU_QUEUE_SIZE == 1024 and protocol.KVM_PV_MMU_OP_BUFFER == 512


@pytest.mark.parametrize(
    "buf, offset, op, text",
    [
        (GOLDEN_FLUSH_TLB + b"\x01\x00\x00", 8, None, "truncated op header at offset 8"),
        (GOLDEN_FLUSH_TLB + bytes.fromhex("0900000000000000"), 8, 9, "unknown op code 9 at offset 8"),
        (GOLDEN_WRITE_PTE[:20], 0, 1, "truncated write_pte (op code 1) at offset 0: 20 of 24 bytes"),
        (GOLDEN_WRITE_PTE + GOLDEN_RELEASE_PT[:15], 24, 3, "truncated release_pt (op code 3) at offset 24"),
    ],
)
def test_decode_is_strict_and_names_offset_and_op(buf, offset, op, text):
    with pytest.raises(ProtocolError) as err:
        protocol.decode(buf)
    assert err.value.offset == offset
    assert err.value.op == op
    assert text in str(err.value)


def test_fields_out_of_u64_range_are_refused():
    with pytest.raises(ProtocolError):
        WritePte(-1, 0)
    with pytest.raises(ProtocolError):
        WritePte(0, 1 << 64)
    with pytest.raises(ProtocolError):
        ReleasePt(1 << 64)


u64 = st.integers(0, (1 << 64) - 1)
ops_strategy = st.lists(
    st.one_of(st.builds(WritePte, u64, u64), st.just(FlushTlb()), st.builds(ReleasePt, u64)), max_size=60
)


@given(ops_strategy)
def test_round_trip_any_op_list(ops):
    buf = protocol.encode(ops)
    assert len(buf) == sum(op.size for op in ops)
    assert protocol.decode(buf) == ops


@given(st.binary(max_size=200))
def test_decode_any_bytes_is_ops_or_a_protocol_error(data):
    try:
        ops = protocol.decode(data)
    except ProtocolError as exc:
        assert 0 <= exc.offset < len(data)
        return
    # Whole known ops: re-encoding gives the same bytes except the ignored pad words.
    again = protocol.encode(ops)
    assert len(again) == len(data)
    off = 0
    for op in ops:
        assert again[off : off + 4] == data[off : off + 4]
        assert again[off + 8 : off + op.size] == data[off + 8 : off + op.size]
        off += op.size


def test_peek_op_stops_where_the_kernel_stops():
    buf = GOLDEN_WRITE_PTE + GOLDEN_FLUSH_TLB
    assert protocol.peek_op(buf, 0, len(buf)) == (1, 24)
    assert protocol.peek_op(buf, 24, len(buf)) == (2, 8)
    assert protocol.peek_op(buf, 0, 23) == (1, 0)  # cut at the end of a host copy
    assert protocol.peek_op(buf, 24, 30) == (None, 0)


# -- doorbell messages -------------------------------------------------------------


def test_message_round_trips():
    assert m.unpack(m.pack_hello(3, 1234)) == m.Hello(m.PROTOCOL_VERSION, 3, 1234)
    assert m.unpack(m.pack_hypercall(0, 7, 2, 1008, 0x10000, 0)) == m.Hypercall(0, 7, 2, 1008, 0x10000, 0)
    assert m.unpack(m.pack_return(7, -14)) == m.Return(7, -14)
    assert m.unpack(m.pack_bye(1)) == m.Bye(1)
    assert m.unpack(m.pack_reject(None, "no")) == m.Reject(None, "no")
    assert m.unpack(m.pack_control("t", "stats")) == m.Control("t", "stats", {})
    assert m.unpack(m.pack_control_reply("stats", {"a": 1})) == m.ControlReply("stats", {"a": 1})
    info = {f: 1 for f in m.WELCOME_FIELDS}
    assert m.unpack(m.pack_welcome(info)) == m.Welcome(m.PROTOCOL_VERSION, info)


def test_hypercall_message_is_a_plain_msgpack_array():
    # Someone writing a guest in another language needs exactly this.
    assert msgpack.unpackb(m.pack_hypercall(1, 2, 2, 24, 0x1000, 0)) == [m.MSG_HYPERCALL, 1, 2, 2, 24, 0x1000, 0]
    assert m.gpa_args(0x1_2345_6000) == (0x2345_6000, 1)
    assert m.hc_gpa(0x2345_6000, 1) == 0x1_2345_6000


@pytest.mark.parametrize(
    "data, text",
    [
        (b"\xc1", "not a msgpack message"),
        (msgpack.packb({"a": 1}), "non-empty msgpack array"),
        (msgpack.packb([]), "non-empty msgpack array"),
        (msgpack.packb([99]), "unknown message type 99"),
        (msgpack.packb([m.MSG_HYPERCALL, 0, 1, 2, 3, 4]), "has 6 elements, expected 7"),
        (msgpack.packb([m.MSG_HYPERCALL, 0, 1, 2, -3, 4, 5]), "a0 must be an integer"),
        (msgpack.packb([m.MSG_HYPERCALL, 0, 1, 2, True, 4, 5]), "a0 must be an integer"),
        (msgpack.packb([m.MSG_HYPERCALL, 0, 1, 2, "x", 4, 5]), "a0 must be an integer"),
        (msgpack.packb([m.MSG_HYPERCALL, -1, 1, 2, 3, 4, 5]), "vcpu must be an integer"),
        (msgpack.packb([m.MSG_HELLO, 1, 0]), "has 3 elements"),
        (msgpack.packb([m.MSG_WELCOME, 1, {"shm": "x"}]), "welcome lacks"),
        (msgpack.packb([m.MSG_CONTROL, 5, "stats", {}]), "token must be a string"),
        (msgpack.packb([True, 0, 1, 2, 3, 4, 5]), "unknown message type True"),
        (b"\x91" + b"\x00" * 5000, "exceeds 4096"),
    ],
)
def test_malformed_messages_get_a_clear_error(data, text):
    with pytest.raises(m.MessageError) as err:
        m.unpack(data)
    assert text in str(err.value)


@given(st.binary(max_size=300))
def test_any_bytes_are_a_message_or_a_message_error(data):
    try:
        m.unpack(data)
    except m.MessageError:
        pass


@given(st.lists(st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=5), st.none(), st.booleans()), max_size=9))
def test_any_msgpack_array_is_a_message_or_a_message_error(items):
    try:
        data = msgpack.packb(items)
    except (OverflowError, ValueError):
        return
    try:
        msg = m.unpack(data)
    except m.MessageError:
        return
    assert isinstance(msg, m.Message)


# -- layout ------------------------------------------------------------------------


def test_layout_areas_and_pools_never_overlap():
    layout = Layout(64 << 20, 4)
    areas = [layout.vcpu_area(v, 4096) for v in range(4)]
    spans = sorted(
        [(a.queue_gpa, a.stack_gpa + 64) for a in areas] + [(a.pool_gpa, a.pool_gpa + a.pool_bytes) for a in areas]
    )
    for (_, hi1), (lo2, _) in zip(spans, spans[1:], strict=False):
        assert hi1 <= lo2
    assert areas[-1].pool_gpa + areas[-1].pool_bytes <= layout.mem_bytes
    assert [layout.pool_owner(a.pool_gpa) for a in areas] == [0, 1, 2, 3]
    assert layout.pool_owner(POOL_BASE - 8) is None
    assert Layout.from_header(layout.header_bytes() + bytes(100)) == layout


@pytest.mark.parametrize("mem, vcpus", [(1 << 20, 1), ((64 << 20) + 1, 1), (64 << 20, 0), (64 << 20, MAX_VCPUS + 1)])
def test_layout_refuses_what_it_cannot_hold(mem, vcpus):
    with pytest.raises(LayoutError):
        Layout(mem, vcpus)


def test_layout_refuses_queue_sizes_that_do_not_fit():
    layout = Layout(64 << 20, 1)
    with pytest.raises(LayoutError):
        layout.vcpu_area(0, 16)
    with pytest.raises(LayoutError):
        layout.vcpu_area(0, 1 << 20)
    with pytest.raises(LayoutError):
        layout.vcpu_area(1, 1024)
