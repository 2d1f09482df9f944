"""A shared-memory op ring with doorbell suppression: beyond the patch (pvmmu's ``ring`` mode).

virtio's VRING_USED_F_NO_NOTIFY and io_uring's IORING_SQ_NEED_WAKEUP, applied to
paravirtual MMU ops. Each vCPU's queue becomes a single-producer (guest),
single-consumer (host) byte ring in its vCPU slot. The guest appends ops in the
same KVM_HC_MMU_OP layout and *publishes* them by advancing ``prod``; it rings the
doorbell only if the host has said it is going to sleep (``NEED_WAKEUP``). The
host drains what is published, advances ``cons``, keeps polling for a while
after its last work, then sets ``NEED_WAKEUP``, looks once more, and only then
sleeps on the doorbell. A guest that must wait (leaving lazy mode; ring full)
spins briefly, then sets ``WAITING`` with the position it waits for, looks once
more, and sleeps on a completion message the host sends when it sees the flag.

Layout at the ring's gpa (8-byte words, native little-endian)::

    word 0  prod         bytes ever published (written by the guest only)
    word 1  cons         bytes ever consumed (written by the host only)
    word 2  host_flags   NEED_WAKEUP in bit 0, the sleep's sequence number above it (host only)
    word 3  guest_flags  WAITING (guest only)
    word 4  wait_target  the cons value the waiting guest needs
    word 5  error        0, or -KVM_E* for the op the host refused (host only)
    word 6  error_at     the refused op's position (prod space)
    word 7  (reserved)
    +64     data[capacity]   ops, back to back; an op may wrap around the end

Each party writes only its own words, so no update is lost. Words are read and
written through a ``memoryview`` of native 64-bit items, one aligned 8-byte load
or store each (struct's "<Q" would write byte by byte and could be seen torn).
Ordering relies on x86-64's total store order: op bytes are stored before the
``prod`` that publishes them, and the host loads ``prod`` before the op bytes.

Pure: no I/O; both sides are plain objects over guest memory.
"""

from __future__ import annotations

from protocol.layout import MAX_QUEUE_BYTES

HEADER_BYTES = 64
PROD, CONS, HOST_FLAGS, GUEST_FLAGS, WAIT_TARGET, ERROR, ERROR_AT = range(7)
NEED_WAKEUP = 1
WAITING = 1
MAX_RING_BYTES = MAX_QUEUE_BYTES - HEADER_BYTES
_U64 = 1 << 64


class RingError(ValueError):
    """A ring that cannot be laid out where it was asked to be."""


def check_capacity(capacity: int) -> None:
    if capacity % 8 or not 24 <= capacity <= MAX_RING_BYTES:
        raise RingError(f"ring capacity must be a multiple of 8 in 24..{MAX_RING_BYTES}, not {capacity}")


class Ring:
    """The ring's words and data in guest memory, and the byte copies both sides need."""

    def __init__(self, mem: memoryview, gpa: int, capacity: int) -> None:
        check_capacity(capacity)
        if gpa % 64 or gpa < 0 or gpa + HEADER_BYTES + capacity > len(mem):
            raise RingError(f"a ring of {capacity} bytes does not fit at gpa {gpa:#x}")
        self.mem = mem
        self.gpa = gpa
        self.capacity = capacity
        self.data = gpa + HEADER_BYTES
        self.words = mem[gpa : gpa + HEADER_BYTES].cast("Q")

    def release(self) -> None:
        self.words.release()

    # words
    @property
    def prod(self) -> int:
        return self.words[PROD]

    @property
    def cons(self) -> int:
        return self.words[CONS]

    @property
    def error(self) -> int:
        e = self.words[ERROR]
        return e - _U64 if e >= 1 << 63 else e

    def write(self, pos: int, blob: bytes) -> None:
        """Copy ``blob`` into the data area at ring position ``pos`` (wrapping)."""
        at = pos % self.capacity
        first = min(len(blob), self.capacity - at)
        self.mem[self.data + at : self.data + at + first] = blob[:first]
        if first < len(blob):
            self.mem[self.data : self.data + len(blob) - first] = blob[first:]

    def read(self, pos: int, n: int) -> bytes:
        """Copy ``n`` bytes from ring position ``pos`` (wrapping) out of guest memory."""
        at = pos % self.capacity
        first = min(n, self.capacity - at)
        head = bytes(self.mem[self.data + at : self.data + at + first])
        if first == n:
            return head
        return head + bytes(self.mem[self.data : self.data + n - first])


class RingProducer:
    """The guest's end: append, publish, and decide whether the doorbell must ring."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.tail = ring.prod  # appended but maybe not yet published
        self.kicked = 0  # the host_flags value of the sleep this guest already rang for

    def free(self) -> int:
        return self.ring.capacity - (self.tail - self.ring.cons)

    def unpublished(self) -> int:
        return self.tail - self.ring.prod

    def append(self, blob: bytes) -> bool:
        """Append one op; False (nothing written) if the ring has no room for it."""
        if len(blob) > self.free():
            return False
        self.ring.write(self.tail, blob)
        self.tail += len(blob)
        return True

    def publish(self) -> bool:
        """Make appended ops visible to the host; True if it is asleep and must be woken.

        Once per sleep: the host numbers its sleeps, and a host that was woken
        drains everything published before it can sleep again, so a second
        doorbell for the same sleep would only cost switches (virtio's event
        index does the same).
        """
        self.ring.words[PROD] = self.tail
        flags = self.ring.words[HOST_FLAGS]
        if flags & NEED_WAKEUP and flags != self.kicked:
            self.kicked = flags
            return True
        return False

    def consumed(self, target: int) -> bool:
        return self.ring.words[CONS] >= target

    def prepare_to_wait(self, target: int) -> bool:
        """Say the guest is going to sleep until ``cons >= target``; False if it need not after all.

        The flag is set first and the ring looked at again afterwards: a host that
        consumed in between either sees the flag (and sends a completion) or is
        seen here to have finished. Checking before setting would lose that wake-up.
        """
        words = self.ring.words
        words[WAIT_TARGET] = target
        words[GUEST_FLAGS] = WAITING
        if words[CONS] >= target or words[ERROR]:
            words[GUEST_FLAGS] = 0
            return False
        return True

    def done_waiting(self) -> None:
        self.ring.words[GUEST_FLAGS] = 0


class RingConsumer:
    """The host's end: take published bytes, advance, sleep only when nothing can be missed."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.notified = -1  # the wait target the last completion answered
        self.sleeps = 0  # numbers each sleep in host_flags, so a guest rings once per sleep

    def available(self) -> int:
        return self.ring.words[PROD] - self.ring.words[CONS]

    def take(self, limit: int) -> tuple[int, bytes]:
        """Copy up to ``limit`` published bytes out of the ring: (start position, bytes)."""
        words = self.ring.words
        cons = words[CONS]
        prod = words[PROD]  # loaded before the data it covers (x86 TSO)
        n = min(max(0, prod - cons), limit, self.ring.capacity)
        return cons, self.ring.read(cons, n)

    def advance(self, n: int) -> None:
        self.ring.words[CONS] = self.ring.words[CONS] + n

    def fail(self, code: int, at: int) -> None:
        """The op at position ``at`` was refused: record why, and stop consuming there."""
        self.ring.words[ERROR_AT] = at
        self.ring.words[ERROR] = code % _U64

    def completion_due(self) -> int | None:
        """The target of a wait that is over and not yet answered: send a completion, then ``completed``.

        The target is read once and used both for the check and as the answer's
        key. Reading it again afterwards could pick up the guest's *next* target
        (it moves on as soon as its own re-check succeeds) and mark that one
        answered without an answer ever being sent: the guest would sleep forever.
        """
        words = self.ring.words
        if not words[GUEST_FLAGS] & WAITING:
            return None
        target = words[WAIT_TARGET]
        if target == self.notified or (words[CONS] < target and not words[ERROR]):
            return None
        return target

    def completed(self, target: int) -> None:
        self.notified = target

    def prepare_to_sleep(self) -> bool:
        """Set NEED_WAKEUP, then look again; True only if it is safe to sleep on the doorbell.

        The re-check closes the classic race: a guest that published after the
        host last looked, but before the flag was set, read the flag clear and
        did not ring. Without the second look the host would sleep on that work.
        """
        self.sleeps += 1
        self.ring.words[HOST_FLAGS] = (self.sleeps << 1) | NEED_WAKEUP
        if self.available() or self.completion_due() is not None:
            self.ring.words[HOST_FLAGS] = 0
            return False
        return True

    def wake(self) -> None:
        self.ring.words[HOST_FLAGS] = 0
