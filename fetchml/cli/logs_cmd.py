"""fetchml logs: print or follow a job's output."""

from __future__ import annotations

import json
import sys

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.protocol import ops


def follow_logs(cli: CliContext, job: str, *, follow: bool, attempt: int | None = None) -> None:
    """Write the job's output to stdout as it arrives (JSON lines with --json)."""
    stream = cli.connect().stream(ops.JOBS_LOGS.name, {"job": job, "follow": follow,
                                                       "attempt": attempt})
    out = sys.stdout.buffer
    try:
        for event in stream.events():
            if event.event == "attempt":
                cli.note(f"-- attempt {event.data} --")
            elif cli.as_json:
                line = {"job": job, "text": event.data.decode("utf-8", "replace")}
                out.write(json.dumps(line).encode() + b"\n")
            else:
                out.write(event.data)
            out.flush()
    except KeyboardInterrupt:
        stream.cancel()
        raise


@click.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the job ends.")
@click.option("--attempt", type=click.IntRange(1, 10**6),
              help="Attempt number (default: the latest).")
@json_option
@pass_cli
def logs(cli: CliContext, job: str, follow: bool, attempt: int | None) -> None:
    """Print JOB's output (stdout and stderr, interleaved)."""
    follow_logs(cli, job, follow=follow, attempt=attempt)
