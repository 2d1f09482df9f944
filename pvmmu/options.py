"""Command-line options that the CLI and both process shells share."""

from __future__ import annotations

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
