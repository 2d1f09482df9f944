"""protocol.ring: the shared-memory op ring, its wrap-around, and the lost-wake-up races."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from protocol import FlushTlb, WritePte
from protocol.ring import (
    GUEST_FLAGS,
    HOST_FLAGS,
    NEED_WAKEUP,
    WAIT_TARGET,
    WAITING,
    Ring,
    RingConsumer,
    RingError,
    RingProducer,
)

GPA = 0x10000


def ring(capacity: int = 96) -> Ring:
    return Ring(memoryview(bytearray(0x20000)), GPA, capacity)


def test_ops_wrap_around_the_end_and_come_out_whole():
    r = ring(96)  # four write_pte
    p, c = RingProducer(r), RingConsumer(r)
    ops = [WritePte(0x1000 + 8 * i, i) for i in range(10)]
    got = []
    for op in ops:
        if not p.append(op.encode()):
            p.publish()
            start, blob = c.take(4096)
            c.advance(len(blob))
            got += protocol.decode(blob)
            assert p.append(op.encode())
    p.publish()
    got += protocol.decode(c.take(4096)[1])
    assert got == ops
    assert r.prod == 240 and r.prod > r.capacity  # positions are monotonic, the data area wraps


def test_a_full_ring_refuses_and_writes_nothing():
    r = ring(48)
    p = RingProducer(r)
    assert p.append(WritePte(1 << 12, 1).encode()) and p.append(FlushTlb().encode())
    before = bytes(r.mem[r.data : r.data + 48])
    assert not p.append(WritePte(2 << 12, 2).encode())  # 24 > 16 free
    assert bytes(r.mem[r.data : r.data + 48]) == before and p.free() == 16


def test_unpublished_ops_are_invisible_to_the_host():
    r = ring()
    p, c = RingProducer(r), RingConsumer(r)
    p.append(FlushTlb().encode())
    assert c.available() == 0 and p.unpublished() == 8
    p.publish()
    assert c.available() == 8 and c.take(4) == (0, b"\x02\x00\x00\x00")


def test_doorbell_is_needed_only_when_the_host_said_it_sleeps():
    r = ring()
    p, c = RingProducer(r), RingConsumer(r)
    p.append(FlushTlb().encode())
    assert p.publish() is False  # host awake: no doorbell
    c.advance(c.available())
    assert c.prepare_to_sleep() is True and r.words[HOST_FLAGS] & NEED_WAKEUP
    p.append(FlushTlb().encode())
    assert p.publish() is True  # host asleep: ring it
    c.wake()
    assert r.words[HOST_FLAGS] == 0


def test_the_host_lost_wakeup_race_is_closed_by_the_recheck():
    """Guest publishes after the host's last look but before it sets NEED_WAKEUP.

    The guest reads the flag clear and does not ring; only the host's second look
    after setting the flag can find that work. Remove it and this test fails.
    """
    r = ring()
    p, c = RingProducer(r), RingConsumer(r)
    assert c.available() == 0  # the host's last look: nothing, so it decides to sleep
    p.append(WritePte(0x1000, 7).encode())
    assert p.publish() is False  # flag not yet set: the guest does not ring
    assert c.prepare_to_sleep() is False  # ... so the host must not sleep
    assert r.words[HOST_FLAGS] == 0 and c.available() == 24


def test_the_guest_lost_wakeup_race_is_closed_by_the_recheck():
    """Host consumes after the guest's last look but before it sets WAITING: no completion is sent."""
    r = ring()
    p, c = RingProducer(r), RingConsumer(r)
    p.append(WritePte(0x1000, 7).encode())
    p.publish()
    assert not p.consumed(24)  # the guest's last look: not yet
    c.advance(c.available())  # the host finishes; WAITING is not set, so it sends nothing
    assert not c.completion_due() is not None
    assert p.prepare_to_wait(24) is False  # the guest's second look sees it done
    assert r.words[GUEST_FLAGS] == 0


def test_a_waiting_guest_is_seen_by_the_host():
    r = ring()
    p, c = RingProducer(r), RingConsumer(r)
    p.append(FlushTlb().encode())
    p.publish()
    assert p.prepare_to_wait(8) is True and r.words[GUEST_FLAGS] == WAITING
    assert not c.completion_due() is not None
    c.advance(8)
    assert c.completion_due() is not None
    p.done_waiting()
    assert not c.completion_due() is not None


def test_a_refused_op_is_recorded_and_wakes_the_waiter():
    r = ring()
    p, c = RingProducer(r), RingConsumer(r)
    p.append(WritePte(0x1004, 7).encode())
    p.publish()
    assert p.prepare_to_wait(24)
    c.fail(-protocol.KVM_EINVAL, 0)
    assert r.error == -protocol.KVM_EINVAL and r.words[6] == 0
    assert c.completion_due() is not None
    assert p.prepare_to_wait(24) is False  # an error ends the wait too


@pytest.mark.parametrize("capacity, gpa", [(20, GPA), (100, GPA), (1 << 20, GPA), (96, GPA + 8), (96, 0x1FFF0)])
def test_rings_that_do_not_fit_are_refused(capacity, gpa):
    with pytest.raises(RingError):
        Ring(memoryview(bytearray(0x20000)), gpa, capacity)


@given(st.lists(st.sampled_from([8, 16, 24]), max_size=200), st.sampled_from([24, 48, 96, 200, 1024]))
def test_any_stream_through_any_ring_comes_out_in_order(sizes, capacity):
    r = ring(capacity)
    p, c = RingProducer(r), RingConsumer(r)
    sent, got = [], b""
    for i, size in enumerate(sizes):
        blob = bytes([i % 251]) * size
        while not p.append(blob):
            p.publish()
            start, chunk = c.take(capacity)
            assert start == r.cons
            c.advance(len(chunk))
            got += chunk
        sent.append(blob)
    p.publish()
    got += c.take(capacity)[1]
    assert got == b"".join(sent)


def test_the_host_answers_the_target_it_checked_not_the_guests_next_one():
    """The guest finishes one wait by its re-check and starts the next while the host looks.

    The host checked target A (reached) and must answer A. Had it re-read the target it would
    have marked B answered without sending anything for B, and the guest would sleep forever.
    """
    r = ring()
    p, c = RingProducer(r), RingConsumer(r)
    p.append(FlushTlb().encode())
    p.publish()
    r.words[WAIT_TARGET], r.words[GUEST_FLAGS] = 8, WAITING  # the guest waits for A = 8 ...
    c.advance(8)
    due = c.completion_due()  # ... the host sees A reached
    assert due == 8
    # ... meanwhile the guest's re-check saw A done, it published more and now waits for B = 16
    p.append(FlushTlb().encode())
    p.publish()
    assert p.prepare_to_wait(16)
    c.completed(due)  # the host sends the completion for A (stale for the guest: harmless)
    assert c.completion_due() is None  # B not reached yet
    c.advance(8)
    assert c.completion_due() == 16  # B reached: B gets its own answer
    c.completed(16)
    assert c.completion_due() is None  # answered once, not again


def test_the_guest_rings_once_per_host_sleep():
    r = ring()
    p, c = RingProducer(r), RingConsumer(r)
    assert c.prepare_to_sleep()
    p.append(FlushTlb().encode())
    assert p.publish() is True  # the host sleeps: ring
    p.append(FlushTlb().encode())
    assert p.publish() is False  # still the same sleep: the first doorbell will wake it
    c.wake()
    c.advance(c.available())  # awake, it drains everything published
    assert c.prepare_to_sleep()  # a new sleep, with a new number
    p.append(FlushTlb().encode())
    assert p.publish() is True
