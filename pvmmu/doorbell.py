"""The doorbell: the stand-in for the hypercall instruction and the VM exit.

A vCPU (or the supervisor) *calls*: it sends one msgpack message and blocks until
the host answers, as a vCPU is stopped while KVM handles its exit. The host
*serves* every caller from one loop. Two transports carry the same messages:

- ``zmq`` (the default): a REQ socket per caller, one ROUTER socket in the host,
  over ``ipc://`` in a per-run directory (mode 0700). ZeroMQ does its socket work
  in a background I/O thread, which costs switches of its own.
- ``pipe``: a pair of OS pipes per caller, created by the supervisor and
  inherited by host and guest; frames are a 4-byte little-endian length and the
  message. No helper thread: the floor of what a blocking doorbell costs.

Addresses name the transport: ``ipc://...`` (or any ZeroMQ endpoint) for zmq;
``fd:R:W`` for a caller's pipe pair, ``fd:R:W,R:W,...`` for the host's side.

Every wait is bounded: a blocked ``call`` wakes every ``POLL_MS`` to ask the
operating system whether the host still exists (pidfd) and gives up after the
timeout, so a dead or silent host is reported, never waited on forever.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections import deque

import zmq

from protocol.messages import MAX_MESSAGE_BYTES
from pvmmu.liveness import PeerGone, PidWatch

POLL_MS = 100
MAX_FRAME_BYTES = 4 * MAX_MESSAGE_BYTES  # larger frames close the connection (ZeroMQ: MAXMSGSIZE)
_FRAME = struct.Struct("<I")


class DoorbellTimeout(RuntimeError):
    """The peer is alive but did not answer in time."""


class _Closed(Exception):
    """The other end of a pipe went away."""


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


def is_pipe_address(address: str) -> bool:
    return address.startswith("fd:")


def pipe_address(pairs: list[tuple[int, int]]) -> str:
    """``fd:R:W,R:W``: the (read fd, write fd) pairs a process inherited."""
    return "fd:" + ",".join(f"{r}:{w}" for r, w in pairs)


def parse_pipe_address(address: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in part.split(":")) for part in address[3:].split(",")]
    except ValueError:
        raise ValueError(f"{address!r} is not fd:R:W[,R:W...]") from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{address!r} is not fd:R:W[,R:W...]")
    return pairs  # type: ignore[return-value]


# -- ZeroMQ's background threads -----------------------------------------------------


def _tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def batch_threads(tids: set[int]) -> int:
    """Put threads ``tids`` (ZeroMQ's background threads) in SCHED_BATCH; returns how many.

    A send wakes the process's own ZeroMQ I/O thread, and the kernel lets the
    woken thread preempt the sender at once: one involuntary switch of the main
    thread per message, the likelier the longer it had been computing, so it
    taxes the batched modes most. A real VM exit has no helper thread.
    SCHED_BATCH threads do not preempt on wake-up; they run as soon as the
    sender blocks for its reply.
    """
    n = 0
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
            n += 1
        except (OSError, AttributeError):
            continue
    return n


def _context(batch_io: bool) -> tuple[zmq.Context, set[int]]:
    """A one-I/O-thread context, and the tids that existed before it (its threads are the new ones)."""
    before = _tids() if batch_io else set()
    return zmq.Context(io_threads=1), before


# -- the calling side -----------------------------------------------------------------


class Caller:
    """Request, then wait for the reply: bounded, and watching the host through a pidfd."""

    def __init__(self, timeout_s: float, peer_pid: int | None) -> None:
        self.timeout_s = timeout_s
        self.peer = PidWatch(peer_pid) if peer_pid else None
        self.rung = 0  # messages sent: the doorbells actually rung
        self.stamping = False  # record sent_ns after each send (the --phases breakdown)
        self.sent_ns = 0

    def watch_peer(self, pid: int) -> None:
        if self.peer is None or self.peer.pid != pid:
            self.peer = PidWatch(pid)

    def call(self, payload: bytes, what: str = "a request", n: int | None = None) -> bytes:
        """Send ``payload``, return the reply; PeerGone or DoorbellTimeout instead of a hang.

        ``what`` (and ``n``, e.g. a hypercall number) name the request in errors.
        """
        self.notify(payload, what, n)
        return self.wait_message(what, n)

    def notify(self, payload: bytes, what: str = "a doorbell", n: int | None = None) -> None:
        """Send ``payload`` and do not wait (ring mode's kick)."""
        try:
            self._send(payload)
        except _Closed:
            raise self._gone(what, n) from None
        if self.stamping:
            self.sent_ns = time.monotonic_ns()
        self.rung += 1

    def wait_message(self, what: str = "a reply", n: int | None = None) -> bytes:
        """The next message from the host, waited for boundedly (PeerGone, DoorbellTimeout)."""
        try:
            reply = self._recv(POLL_MS)  # the fast path: the host answers within POLL_MS
            if reply is not None:
                return reply
            deadline = time.monotonic() + self.timeout_s - POLL_MS / 1000
            while True:
                if self.peer is not None and not self.peer.alive():
                    raise _Closed
                if time.monotonic() > deadline:
                    what = what if n is None else f"{what} {n}"
                    raise DoorbellTimeout(f"host did not answer {what} within {self.timeout_s:g}s")
                reply = self._recv(POLL_MS)
                if reply is not None:
                    return reply
        except _Closed:
            raise self._gone(what, n) from None

    def _gone(self, what: str, n: int | None) -> PeerGone:
        what = what if n is None else f"{what} {n}"
        pid = self.peer.pid if self.peer is not None else "?"
        return PeerGone(f"host process {pid} died during {what}")

    def _send(self, payload: bytes) -> None:
        raise NotImplementedError

    def _recv(self, timeout_ms: int) -> bytes | None:
        raise NotImplementedError

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()


class ZmqCaller(Caller):
    """A DEALER socket that speaks the REQ envelope (an empty first frame): it can call like REQ,
    and also send without waiting and receive what it did not ask for (ring mode)."""

    def __init__(self, endpoint: str, timeout_s: float, peer_pid: int | None = None, batch_io: bool = False) -> None:
        super().__init__(timeout_s, peer_pid)
        self.endpoint = endpoint
        self.ctx, before = _context(batch_io)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, POLL_MS)
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self.sock.connect(endpoint)
        if batch_io:
            batch_threads(_tids() - before)

    def _send(self, payload: bytes) -> None:
        try:
            self.sock.send_multipart((b"", payload))
        except zmq.Again:
            raise DoorbellTimeout(f"could not reach the host within {self.timeout_s:g}s") from None

    def _recv(self, timeout_ms: int) -> bytes | None:
        try:
            return self.sock.recv_multipart()[-1]  # RCVTIMEO is POLL_MS
        except zmq.Again:
            return None

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        super().close()


class PipeCaller(Caller):
    def __init__(self, read_fd: int, write_fd: int, timeout_s: float, peer_pid: int | None = None) -> None:
        super().__init__(timeout_s, peer_pid)
        self.r, self.w = read_fd, write_fd
        self._poll = select.poll()
        self._poll.register(read_fd, select.POLLIN)
        self._buf = b""

    def _send(self, payload: bytes) -> None:
        try:
            os.write(self.w, _FRAME.pack(len(payload)) + payload)
        except BrokenPipeError:
            raise _Closed from None

    def _recv(self, timeout_ms: int) -> bytes | None:
        while True:
            if len(self._buf) >= 4:
                (size,) = _FRAME.unpack_from(self._buf)
                if size > MAX_FRAME_BYTES:
                    raise DoorbellTimeout(f"host sent a {size}-byte frame; the limit is {MAX_FRAME_BYTES}")
                if len(self._buf) >= 4 + size:
                    frame, self._buf = self._buf[4 : 4 + size], self._buf[4 + size :]
                    return frame
            if not self._poll.poll(timeout_ms):
                return None
            chunk = os.read(self.r, 65536)
            if not chunk:
                raise _Closed
            self._buf += chunk

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
        super().close()


def caller_for(address: str, timeout_s: float, peer_pid: int | None = None, batch_io: bool = False) -> Caller:
    """The calling end of the doorbell at ``address`` (a ZeroMQ endpoint, or ``fd:R:W``)."""
    if is_pipe_address(address):
        pairs = parse_pipe_address(address)
        if len(pairs) != 1:
            raise ValueError(f"a caller has one pipe pair, not {len(pairs)}: {address!r}")
        return PipeCaller(*pairs[0], timeout_s, peer_pid)
    return ZmqCaller(address, timeout_s, peer_pid, batch_io)


# -- the serving side -----------------------------------------------------------------


class ZmqHost:
    """One ROUTER socket, every caller's requests on it."""

    def __init__(self, endpoint: str, batch_io: bool = False) -> None:
        self.endpoint = endpoint
        self.ctx, before = _context(batch_io)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, POLL_MS)
        self.sock.setsockopt(zmq.SNDTIMEO, 1000)
        # A peer that sends more than this is disconnected by libzmq before we see it.
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(endpoint)
        if batch_io:
            batch_threads(_tids() - before)

    def recv(self, block: bool = True) -> tuple[list[bytes], bytes] | None:
        """(envelope, payload) of the next request, or None after POLL_MS of quiet (at once if not ``block``)."""
        try:
            frames = self.sock.recv_multipart(0 if block else zmq.NOBLOCK)
        except zmq.Again:
            return None
        return frames[:-1], frames[-1]

    def send(self, envelope: list[bytes], payload: bytes) -> bool:
        """Answer a request; False if its sender is gone."""
        try:
            self.sock.send_multipart([*envelope, payload])
            return True
        except (zmq.Again, zmq.ZMQError):
            return False

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        path = ipc_path(self.endpoint)
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class PipeHost:
    """Pipe pairs, one per caller, served from one poll loop.

    Reads and writes never block: a caller that sends an oversized frame, or does
    not read its replies until its pipe is full, is cut off, as libzmq drops such
    a peer; the other callers are not held up by it.
    """

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self._poll = select.poll()
        self._conns: dict[int, tuple[int, bytearray]] = {}  # read fd -> (write fd, buffer)
        for r, w in pairs:
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._conns[r] = (w, bytearray())
            self._poll.register(r, select.POLLIN)
        self._ready: deque[tuple[list[bytes], bytes]] = deque()

    def recv(self, block: bool = True) -> tuple[list[bytes], bytes] | None:
        if not self._ready:
            for fd, _ in self._poll.poll(POLL_MS if block else 0):
                self._read(fd)
        return self._ready.popleft() if self._ready else None

    def _read(self, fd: int) -> None:
        conn = self._conns.get(fd)
        if conn is None:
            return
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._drop(fd)
            return
        buf = conn[1]
        buf += chunk
        while len(buf) >= 4:
            (size,) = _FRAME.unpack_from(buf)
            if size > MAX_FRAME_BYTES:
                self._drop(fd)
                return
            if len(buf) < 4 + size:
                break
            self._ready.append(([b"%d" % fd], bytes(buf[4 : 4 + size])))
            del buf[: 4 + size]

    def send(self, envelope: list[bytes], payload: bytes) -> bool:
        fd = int(envelope[0]) if envelope else -1
        conn = self._conns.get(fd)
        if conn is None:
            return False
        frame = _FRAME.pack(len(payload)) + payload
        try:
            if os.write(conn[0], frame) == len(frame):
                return True
        except (BlockingIOError, BrokenPipeError):
            pass
        self._drop(fd)
        return False

    def _drop(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is None:
            return
        self._poll.unregister(fd)
        for x in (fd, conn[0]):
            try:
                os.close(x)
            except OSError:
                pass

    def close(self) -> None:
        for fd in list(self._conns):
            self._drop(fd)


Host = ZmqHost | PipeHost


def host_for(address: str, batch_io: bool = False) -> Host:
    """The serving end of the doorbell at ``address`` (a ZeroMQ endpoint, or ``fd:R:W,...``)."""
    if is_pipe_address(address):
        return PipeHost(parse_pipe_address(address))
    return ZmqHost(address, batch_io)
