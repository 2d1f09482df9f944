"""Knowing when a peer is gone, from the operating system rather than from silence.

- ``PidWatch`` holds a pidfd (Linux 5.3+): it becomes readable the moment the
  process exits, so "is the host still there?" is one non-blocking poll, and a
  dead peer is told apart from a slow one.
- ``die_with_parent`` asks the kernel for SIGHUP when the supervisor dies
  (PR_SET_PDEATHSIG), so host and guest tear down instead of lingering.
- ``install_signal_handlers`` turns SIGTERM/SIGINT/SIGHUP into a ``Terminated``
  exception, so every process unwinds through its ``finally`` blocks and exits
  with 128 + the signal number.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal

PR_SET_PDEATHSIG = 1
PID_MAX = 1 << 22  # the kernel's ceiling for /proc/sys/kernel/pid_max


class Terminated(BaseException):
    """A terminating signal arrived; unwind and exit with ``exit_code``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PeerGone(RuntimeError):
    """A process this one depends on has exited."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def install_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)


PARENT_DEATH_SIGNAL = signal.SIGHUP


def die_with_parent(parent_pid: int | None) -> None:
    """SIGHUP this process when its parent dies; at once if it already has.

    SIGHUP rather than SIGTERM, so the process can tell its supervisor's death
    from an ordinary request to stop. The kernel sends it when the *thread* that
    forked us exits, which may be a moment before the rest of the supervisor:
    ``parent_gone`` waits for the whole process.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the pidfd watch below still notices
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), PARENT_DEATH_SIGNAL)


def parent_gone(parent_pid: int, wait_s: float = 0.0) -> bool:
    """Whether process ``parent_pid`` has exited, waiting up to ``wait_s`` for it to finish dying."""
    watch = PidWatch(parent_pid)
    try:
        if watch.fd is not None and wait_s > 0:
            select.select([watch.fd], [], [], wait_s)
        return not watch.alive()
    finally:
        watch.close()


class PidWatch:
    """Watch one process through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        if not 0 < pid <= PID_MAX:
            return  # pid 0 or one no kernel can have: nothing to watch, so never alive
        try:
            self.fd = os.pidfd_open(pid)
        except OSError:
            pass  # gone already (ESRCH), or not a process leader (EINVAL): not a live peer

    def alive(self) -> bool:
        if self.fd is None:
            return False
        r, _, _ = select.select([self.fd], [], [], 0)
        return not r

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
