"""The doorbell over ZeroMQ: the stand-in for the hypercall instruction and the VM exit.

A vCPU (or the supervisor) holds a REQ socket: it sends one msgpack message and
blocks until the host answers, as a vCPU is stopped while KVM handles its exit.
The host holds one ROUTER socket that serves every vCPU. Transport is ``ipc://``
in a per-run directory (mode 0700) that the supervisor creates.

Every wait is bounded: a blocked ``call`` wakes every ``POLL_MS`` to ask the
operating system whether the host still exists (pidfd) and gives up after the
timeout, so a dead or silent host is reported, never waited on forever.
"""

from __future__ import annotations

import os
import time

import zmq

from protocol.messages import MAX_MESSAGE_BYTES
from pvmmu.liveness import PeerGone, PidWatch

POLL_MS = 100


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
    """A one-I/O-thread context, and the tids of the threads it started (once a socket exists)."""
    before = _tids() if batch_io else set()
    return zmq.Context(io_threads=1), before


class DoorbellTimeout(RuntimeError):
    """The peer is alive but did not answer in time."""


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


class CallerDoorbell:
    """The ringing side (a vCPU, or the supervisor's control line): request, then wait."""

    def __init__(self, endpoint: str, timeout_s: float, peer_pid: int | None = None, batch_io: bool = False) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.ctx, before = _context(batch_io)
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, POLL_MS)
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self.sock.connect(endpoint)
        if batch_io:
            batch_threads(_tids() - before)
        self.peer = PidWatch(peer_pid) if peer_pid else None
        self.rung = 0  # messages sent: the doorbells actually rung

    def watch_peer(self, pid: int) -> None:
        if self.peer is None or self.peer.pid != pid:
            self.peer = PidWatch(pid)

    def call(self, payload: bytes, what: str = "a request", n: int | None = None) -> bytes:
        """Send ``payload``, return the reply; PeerGone or DoorbellTimeout instead of a hang.

        ``what`` (and ``n``, e.g. a hypercall number) name the request in errors.
        """
        sock = self.sock
        try:
            sock.send(payload)
        except zmq.Again:
            what = what if n is None else f"{what} {n}"
            raise DoorbellTimeout(f"could not reach the host within {self.timeout_s:g}s for {what}") from None
        self.rung += 1
        try:
            return sock.recv()  # the fast path: the host answers within POLL_MS
        except zmq.Again:
            pass
        deadline = time.monotonic() + self.timeout_s - POLL_MS / 1000
        what = what if n is None else f"{what} {n}"
        while True:
            if self.peer is not None and not self.peer.alive():
                raise PeerGone(f"host process {self.peer.pid} died during {what}")
            if time.monotonic() > deadline:
                raise DoorbellTimeout(f"host did not answer {what} within {self.timeout_s:g}s")
            try:
                return sock.recv()
            except zmq.Again:
                continue

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        if self.peer is not None:
            self.peer.close()


class HostDoorbell:
    """The host's side: one ROUTER socket, every vCPU's requests on it."""

    def __init__(self, endpoint: str, batch_io: bool = False) -> None:
        self.endpoint = endpoint
        self.ctx, before = _context(batch_io)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, POLL_MS)
        self.sock.setsockopt(zmq.SNDTIMEO, 1000)
        # A peer that sends more than this is disconnected by libzmq before we see it.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(endpoint)
        if batch_io:
            batch_threads(_tids() - before)

    def recv(self) -> tuple[list[bytes], bytes] | None:
        """(envelope, payload) of the next request, or None after POLL_MS of quiet."""
        try:
            frames = self.sock.recv_multipart()
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
