"""``python -m pvmmu.benchpeer``: one side of a raw doorbell round trip, for ``pvmmu bench``.

Two fresh processes ping-pong a hypercall-sized message, with none of pvmmu
around it: over a pair of ``os.pipe`` (inherited file descriptors), or over a
pyzmq REQ/REP pair on ``ipc://`` with the same I/O-thread scheduling pvmmu
uses. It speaks the supervisor's event protocol (JSON lines on stdout: ``ready``,
``done``; words on stdin: ``go``, ``quit``) so ``supervisor.Child`` can drive
it and count the switches of exactly the measured round trips.

The server answers until the client says stop (pipe: EOF; zmq: an empty
message); every wait is bounded by ``--timeout`` and the supervisor's life.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from array import array

import click
import zmq

from guest_proc.shell import percentile
from protocol.messages import pack_hypercall, pack_return
from pvmmu.doorbell import _context, _tids, batch_threads
from pvmmu.liveness import Terminated, die_with_parent, install_signal_handlers
from pvmmu.options import io_thread_option, parent_pid_option

# The same bytes a pvmmu hypercall and its answer carry: a full queue's flush and its return.
REQUEST = pack_hypercall(0, 1, 2, 1008, 0x10000, 0)
REPLY = pack_return(1, 504)
EXIT_FAILED = 3


class PeerError(RuntimeError):
    pass


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _await(word: str, timeout_s: float) -> None:
    """Wait for one line on stdin, which must be ``word``."""
    r, _, _ = select.select([0], [], [], timeout_s)
    if not r:
        raise PeerError(f"supervisor did not say {word!r} within {timeout_s:g}s")
    said = sys.stdin.readline().strip()
    if said != word:
        raise PeerError(f"supervisor said {said!r}, expected {word!r}")


def _read_exact(fd: int, n: int, timeout_s: float) -> bytes:
    """``n`` bytes from a readable pipe; b"" on EOF."""
    buf = os.read(fd, n)
    while buf and len(buf) < n:
        r, _, _ = select.select([fd], [], [], timeout_s)
        if not r:
            raise PeerError(f"peer went silent for {timeout_s:g}s in the middle of a message")
        more = os.read(fd, n - len(buf))
        if not more:
            break
        buf += more
    return buf


class PipeEnd:
    def __init__(self, rfd: int, wfd: int, timeout_s: float) -> None:
        self.rfd, self.wfd, self.timeout_s = rfd, wfd, timeout_s

    def wait_readable(self) -> None:
        r, _, _ = select.select([self.rfd], [], [], self.timeout_s)
        if not r:
            raise PeerError(f"peer said nothing for {self.timeout_s:g}s")

    def call(self, payload: bytes) -> bytes:
        os.write(self.wfd, payload)
        self.wait_readable()  # blocks here, bounded, instead of in read(): the same one switch
        reply = _read_exact(self.rfd, len(REPLY), self.timeout_s)
        if len(reply) != len(REPLY):
            raise PeerError("server closed the pipe")
        return reply

    def serve(self) -> int:
        served = 0
        while True:
            self.wait_readable()
            request = _read_exact(self.rfd, len(REQUEST), self.timeout_s)
            if not request:
                return served  # EOF: the client is done
            os.write(self.wfd, REPLY)
            served += 1

    def stop(self) -> None:
        os.close(self.wfd)  # EOF is the server's stop signal


class ZmqEnd:
    def __init__(self, endpoint: str, server: bool, timeout_s: float, batch_io: bool) -> None:
        self.ctx, before = _context(batch_io)
        self.sock = self.ctx.socket(zmq.REP if server else zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self.timeout_s = timeout_s
        if server:
            self.sock.bind(endpoint)
        else:
            self.sock.connect(endpoint)
        if batch_io:
            batch_threads(_tids() - before)

    def _recv(self) -> bytes:
        try:
            return self.sock.recv()
        except zmq.Again:
            raise PeerError(f"peer said nothing for {self.timeout_s:g}s") from None

    def call(self, payload: bytes) -> bytes:
        self.sock.send(payload)
        return self._recv()

    def serve(self) -> int:
        served = 0
        while True:
            request = self._recv()
            self.sock.send(REPLY)
            if not request:
                return served
            served += 1

    def stop(self) -> None:
        self.call(b"")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--transport", type=click.Choice(["pipe", "zmq"]), required=True, help="os.pipe or pyzmq REQ/REP.")
@click.option("--role", type=click.Choice(["server", "client"]), required=True, help="Who answers, who asks.")
@click.option("--rfd", type=int, help="pipe: the inherited descriptor to read from.")
@click.option("--wfd", type=int, help="pipe: the inherited descriptor to write to.")
@click.option("--endpoint", help="zmq: the ipc:// endpoint the server binds.")
@click.option("--round-trips", type=click.IntRange(1), default=10000, show_default=True, help="client: how many.")
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds any wait may last.")  # fmt: skip
@io_thread_option
@parent_pid_option
def main(transport: str, role: str, rfd: int | None, wfd: int | None, endpoint: str | None, round_trips: int,
         timeout: float, io_thread: str, parent_pid: int | None) -> None:  # fmt: skip
    """One side of a raw doorbell ping-pong (driven by ``pvmmu bench``)."""
    install_signal_handlers()
    die_with_parent(parent_pid)
    end: PipeEnd | ZmqEnd | None = None
    code = 0
    try:
        if transport == "pipe":
            if rfd is None or wfd is None:
                raise PeerError("--transport pipe needs --rfd and --wfd")
            end = PipeEnd(rfd, wfd, timeout)
        else:
            if not endpoint:
                raise PeerError("--transport zmq needs --endpoint")
            end = ZmqEnd(endpoint, role == "server", timeout, io_thread == "batch")
        if role == "server":
            _emit({"event": "ready", "pid": os.getpid()})
            _emit({"event": "done", "served": end.serve()})
        else:
            end.call(REQUEST)  # connects, and wakes the server once before counting starts
            _emit({"event": "ready", "pid": os.getpid()})
            _await("go", max(timeout, 60.0))
            lat = array("q")
            t0 = time.perf_counter()
            for _ in range(round_trips):
                t = time.perf_counter_ns()
                end.call(REQUEST)
                lat.append(time.perf_counter_ns() - t)
            wall = time.perf_counter() - t0
            ordered = sorted(lat)
            _emit({"event": "done", "round_trips": round_trips, "wall_s": wall,
                   "latency_us": {"p50": percentile(ordered, 50) / 1000, "p99": percentile(ordered, 99) / 1000}})  # fmt: skip
            _await("quit", max(timeout, 60.0))
            end.stop()
    except Terminated as t:
        code = t.exit_code
    except (PeerError, OSError, zmq.ZMQError) as exc:
        print(f"pvmmu benchpeer: {exc}", file=sys.stderr)
        try:
            _emit({"event": "error", "phase": role, "message": str(exc)})
        except OSError:
            pass
        code = EXIT_FAILED
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        if isinstance(end, ZmqEnd):
            end.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
