"""``python -m host_proc``: the host process (KVM's side of the pair).

It creates guest memory (``/dev/shm/pvmmu-*``, 0600), binds the doorbell, prints
one JSON line ``{"event": "ready", ...}`` on stdout, and serves hypercalls until
told to shut down, its supervisor dies, or a signal arrives. It unlinks guest
memory on every one of those paths.

Exit status: 0 after a shutdown request; 1 when its supervisor vanished or
start-up failed; 128 + N after signal N (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP,
which is also what it gets when its supervisor dies).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import click
import zmq

from host_proc.kvm import Kvm
from host_proc.shell import HostShell
from protocol.abi import KVM_PV_MMU_OP_BUFFER
from protocol.layout import MAX_VCPUS, Layout, LayoutError
from protocol.messages import MAX_STATUS_HOST_LIMIT, status_limit_error
from pvmmu.doorbell import host_for
from pvmmu.liveness import (
    PARENT_DEATH_SIGNAL,
    PidWatch,
    Terminated,
    die_with_parent,
    install_signal_handlers,
    parent_gone,
)
from pvmmu.options import cpus_option, io_thread_option, parent_pid_option, pin_to
from pvmmu.rundir import run_dir_owner
from pvmmu.shm import GuestMemory, SharedMemoryError

_TERMINATING = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--endpoint",
    required=True,
    help="ZeroMQ endpoint to bind (ipc:///tmp/pvmmu-x/doorbell), or fd:R:W,R:W,... for inherited pipe pairs.",
)
@click.option("--vcpus", type=click.IntRange(1, MAX_VCPUS), default=1, show_default=True, help="vCPUs the guest has.")
@click.option("--mem-mb", type=click.IntRange(8, 65536), default=256, show_default=True, help="Guest memory, MiB.")
@click.option(
    "--host-limit",
    type=click.IntRange(8, 1 << 20),
    default=KVM_PV_MMU_OP_BUFFER,
    show_default=True,
    help="Bytes of op buffer the host copies per hypercall (2.6.26: 512).",
)
@io_thread_option
@click.option("--phases", is_flag=True, help="Stamp every hypercall (received, applied, answered) in its reply.")
@click.option(
    "--status",
    is_flag=True,
    help="Report each op's status in the reply to KVM_HC_MMU_OP (0 applied, -KVM_E* refused), "
    f"as the patch's v1 did; needs --host-limit {MAX_STATUS_HOST_LIMIT} or less.",
)
@click.option(
    "--poll-us",
    type=click.FloatRange(0),
    default=500.0,
    show_default=True,
    help="Ring mode: keep polling the rings this long after the last work before sleeping on the doorbell.",
)
@cpus_option
@parent_pid_option
@click.option("--token-stdin", is_flag=True, help="Read the supervisor's control token from the first stdin line.")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    help="The supervisor's run directory (pvmmu-<parent pid>-*): removed on exit if the supervisor "
    "(--parent-pid) has died, so a SIGKILLed supervisor leaves nothing behind.",
)
def main(
    endpoint: str,
    vcpus: int,
    mem_mb: int,
    host_limit: int,
    io_thread: str,
    phases: bool,
    status: bool,
    poll_us: float,
    cpus: str | None,
    parent_pid: int | None,
    token_stdin: bool,
    run_dir: str | None,
) -> None:
    """Run the host: guest memory, shadow MMU, KVM_HC_MMU_OP handler."""
    pin_to(cpus)  # first, so every thread started later inherits it
    install_signal_handlers()
    code = 1
    memory = None
    signum = None
    try:
        die_with_parent(parent_pid)  # inside the try: a supervisor already gone still gets the cleanup below
        if status and host_limit > MAX_STATUS_HOST_LIMIT:
            raise ValueError(status_limit_error(host_limit))
        token = sys.stdin.readline().strip() if token_stdin else None
        layout = Layout(mem_mb << 20, vcpus)
        memory = GuestMemory.create(layout.mem_bytes)
        header = layout.header_bytes()
        memory.buf[: len(header)] = header
        kvm = Kvm(memory.buf, layout, host_limit)
        doorbell = host_for(endpoint, batch_io=io_thread == "batch")
        try:
            shell = HostShell(
                kvm,
                doorbell,
                memory.name,
                os.getpid(),
                memory.discard,
                token=token,
                parent=PidWatch(parent_pid) if parent_pid else None,
                phases=phases,
                poll_us=poll_us,
                status=status,
            )
            _emit(
                {
                    "event": "ready",
                    "pid": os.getpid(),
                    "shm": memory.name,
                    "endpoint": endpoint,
                    "mem_bytes": layout.mem_bytes,
                    "vcpus": vcpus,
                    "host_limit": host_limit,
                }
            )
            shell.serve()
            code = 0 if shell.exit_reason == "shutdown" else 1
            signum = PARENT_DEATH_SIGNAL if shell.exit_reason == "parent gone" else None
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATING)  # tear down without interruption
            doorbell.close()
    except Terminated as t:
        code, signum = t.exit_code, t.signum
    except (LayoutError, SharedMemoryError, ValueError, OSError) as exc:
        print(f"pvmmu host: {exc}", file=sys.stderr)
        code = 1
    except zmq.ZMQError as exc:  # e.g. the endpoint is taken or its directory is missing
        print(f"pvmmu host: cannot bind {endpoint}: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATING)
        if memory is not None:
            memory.unlink()
        # After the parent-death signal (or a pidfd that saw the supervisor go) give its other threads a
        # moment to finish dying; after a plain SIGTERM from a live supervisor, do not wait.
        _remove_orphaned_run_dir(run_dir, parent_pid, 2.0 if signum == PARENT_DEATH_SIGNAL else 0.0)
    sys.exit(code)


def _remove_orphaned_run_dir(run_dir: str | None, parent_pid: int | None, wait_s: float) -> None:
    """The supervisor normally removes its run directory; if it was SIGKILLed, the host does."""
    if not run_dir or parent_pid is None or run_dir_owner(run_dir) != parent_pid:
        return  # never remove a directory that is not that supervisor's
    if parent_gone(parent_pid, wait_s):
        shutil.rmtree(run_dir, ignore_errors=True)


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
