"""fetchml prune: delete old finished runs and garbage-collect the store."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.config import parse_duration
from fetchml.protocol import ops
from fetchml.units import human_bytes

FINAL_STATES = ("succeeded", "failed", "cancelled", "lost")


def _duration(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from exc


@click.command()
@click.option("--older-than", default="7d", show_default=True,
              help="Only jobs finished at least this long ago (0 for all).")
@click.option("--keep", type=click.IntRange(0, 10**9),
              help="Keep the N newest of the selected jobs.")
@click.option("--state", "states", help="Only these final states, e.g. failed,cancelled.")
@click.option("--user", help="Only this user's jobs (others' need the right role).")
@click.option("--all", "all_users", is_flag=True, help="Everyone's jobs (needs the right role).")
@click.option("--gc-grace", help="Collect objects older than this (admin), e.g. 10m.")
@click.option("--no-gc", is_flag=True, help="Only prune jobs; leave the object store alone.")
@click.option("--dry-run", is_flag=True, help="Say what would be freed; delete nothing.")
@json_option
@pass_cli
def prune(cli: CliContext, older_than: str, keep: int | None, states: str | None,
          user: str | None, all_users: bool, gc_grace: str | None, no_gc: bool,
          dry_run: bool) -> None:
    """Delete finished jobs' runs and records, then unreferenced objects."""
    state_list = [s.strip() for s in states.split(",") if s.strip()] if states else None
    for state in state_list or []:
        if state not in FINAL_STATES:
            raise click.BadParameter(f"{state!r} is not one of {', '.join(FINAL_STATES)}",
                                     param_hint="--state")
    report = cli.connect().call(ops.ADMIN_PRUNE.name, {
        "older_than": _duration(older_than, "--older-than"), "keep": keep,
        "states": state_list, "user": user, "all_users": all_users,
        "gc_grace": _duration(gc_grace, "--gc-grace"), "collect": not no_gc,
        "dry_run": dry_run})
    if cli.as_json:
        cli.emit_json(report)
        return
    verb = "would free" if dry_run else "freed"
    cli.say(f"{verb} {human_bytes(report['bytes'])}: {report['jobs']} jobs, {report['runs']} "
            f"run directories, {report['objects']} objects, {report['snapshots']} snapshots")
