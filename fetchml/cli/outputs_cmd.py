"""fetchml outputs store: store the outputs a job left in its run directory."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.cli.jobs_view import job_json
from fetchml.protocol import ops


@click.group()
def outputs() -> None:
    """A job's outputs."""


@outputs.command()
@click.argument("job")
@json_option
@pass_cli
def store(cli: CliContext, job: str) -> None:
    """Store the outputs JOB left in its run directory when they could not be stored (the
    disk was full, the attempt was lost); `fetchml pull JOB` fetches them afterwards."""
    result = cli.connect().call(ops.OUTPUTS_STORE.name, {"job": job})
    stored = result["job"]
    if cli.as_json:
        cli.emit_json({"job": job_json(stored), "stored": result["stored"]})
        return
    verb = "stored" if result["stored"] else "were already stored"
    cli.say(f"job {stored['id']}'s outputs {verb} ({(stored.get('outputs') or '-')[:12]}); "
            f"`fetchml pull {stored['id']}` fetches them")
