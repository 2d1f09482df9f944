"""Command-line options that the CLI and both process shells share."""

from __future__ import annotations

import os

import click

io_thread_option = click.option(
    "--io-thread",
    type=click.Choice(["batch", "normal"]),
    default="batch",
    show_default=True,
    help="ZeroMQ I/O threads in SCHED_BATCH (batch), so a send does not preempt the sender's main thread; "
    "normal leaves that artefact of the transport in the counts.",
)

parent_pid_option = click.option("--parent-pid", type=int, help="Exit when this process (the supervisor) dies.")

cpus_option = click.option(
    "--cpus", metavar="LIST", help="Pin this process (and every thread it starts) to these CPUs, e.g. 0 or 0,1."
)


def pin_to(cpus: str | None) -> None:
    """Apply ``--cpus`` before any thread exists: threads inherit the affinity they are born with."""
    if not cpus:
        return
    try:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    except (ValueError, OSError) as exc:
        raise click.BadParameter(f"cannot pin to CPUs {cpus!r}: {exc}", param_hint="--cpus") from None
