"""fetchml cancel: cancel queued, held or running jobs."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.cli.jobs_view import job_json
from fetchml.protocol import ops


@click.command()
@click.argument("jobs", nargs=-1, required=True)
@click.option("--reason", default="", help="Recorded with the jobs.")
@json_option
@pass_cli
def cancel(cli: CliContext, jobs: tuple[str, ...], reason: str) -> None:
    """Cancel JOBS (running ones get TERM, a grace period, then KILL)."""
    result = cli.connect().call(ops.JOBS_CANCEL.name, {"jobs": list(jobs), "reason": reason})
    if cli.as_json:
        cli.emit_json({"jobs": [job_json(j) for j in result["jobs"]]})
        return
    for job in result["jobs"]:
        stopping = " (stopping)" if job["state"] == "running" else ""
        cli.say(f"job {job['id']} {job['state']}{stopping}")
