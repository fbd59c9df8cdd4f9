"""fetchml wait: block until jobs end; exit 0 only if every one succeeded."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.cli.jobs_view import job_json, outcome
from fetchml.config import parse_duration
from fetchml.protocol import ops


def wait_for(cli: CliContext, jobs: list[str], *, timeout: float | None = None,
             quiet: bool = False) -> int:
    """Wait; returns the exit status (0 all succeeded, 1 otherwise, 124 timed out)."""
    stream = cli.connect().stream(ops.JOBS_WAIT.name, {"jobs": jobs, "timeout": timeout})
    for event in stream.events():
        job = event.data
        if not cli.as_json and not quiet:
            reason = f" ({job['reason']})" if job.get("reason") else ""
            cli.say(f"job {job['id']} {job['state']}, {outcome(job)}{reason}")
    final = stream.final
    if cli.as_json:
        cli.emit_json({"jobs": [job_json(j) for j in final["jobs"]],
                       "timed_out": final["timed_out"]})
    if final["timed_out"]:
        return 124
    return 0 if all(j["state"] == "succeeded" for j in final["jobs"]) else 1


@click.command()
@click.argument("jobs", nargs=-1, required=True)
@click.option("--timeout", help="Give up after this long (exit 124), e.g. 30m.")
@json_option
@pass_cli
def wait(cli: CliContext, jobs: tuple[str, ...], timeout: str | None) -> None:
    """Wait until JOBS end; exit 0 only if all succeeded."""
    try:
        seconds = parse_duration(timeout) if timeout else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from exc
    raise SystemExit(wait_for(cli, list(jobs), timeout=seconds))
