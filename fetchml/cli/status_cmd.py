"""fetchml status: the jobs table, or one job in detail."""

from __future__ import annotations

import sys

import click

from fetchml.cli.context import CliContext, json_option, pass_cli, render_table
from fetchml.cli.jobs_view import (
    TABLE_HEADERS,
    detail_lines,
    job_json,
    last_metrics,
    metrics_json,
    table_row,
)
from fetchml.protocol import ops, ops_training

STATES = ["held", "queued", "running", "succeeded", "failed", "cancelled", "lost"]


def _list_args(all_users: bool, state: tuple[str, ...], user: str | None, limit: int
               ) -> dict[str, object]:
    return {"all_users": all_users, "states": list(state) or None, "owner": user,
            "limit": limit}


@click.command()
@click.argument("job", required=False)
@click.option("--all", "all_users", is_flag=True, help="Everyone's jobs (needs the right role).")
@click.option("--state", multiple=True, type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--user", help="Only this user's jobs.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000),
              help="At most this many jobs.")
@click.option("--watch", is_flag=True, help="Keep the table up to date until Ctrl-C.")
@json_option
@pass_cli
def status(cli: CliContext, job: str | None, all_users: bool, state: tuple[str, ...],
           user: str | None, limit: int, watch: bool) -> None:
    """Show jobs (active ones and the latest finished), or JOB in detail."""
    conn = cli.connect()
    if job is not None:
        # pipelined; max_points 1 is the last point of each series
        asked = conn.send(ops.JOBS_GET.name, {"job": job})
        metrics = conn.send(ops_training.JOBS_METRICS.name, {"jobs": [job], "max_points": 1})
        found = asked.result()
        last = last_metrics(metrics.result()["jobs"][0])
        if cli.as_json:
            cli.emit_json({**job_json(found), "metrics": metrics_json(last)})
        else:
            cli.say("\n".join(detail_lines(found, last)))
        return
    args = _list_args(all_users, state, user, limit)

    def show() -> None:
        jobs = conn.call(ops.JOBS_LIST.name, args)["jobs"]
        if cli.as_json:
            cli.emit_json({"jobs": [job_json(j) for j in jobs]})
        elif jobs:
            cli.say(render_table(TABLE_HEADERS, [table_row(j) for j in jobs]))
        else:
            cli.say("no jobs; queue one with `fetchml queue -- python train.py`")

    if not watch:
        show()
        return
    events = conn.stream(ops.JOBS_EVENTS.name, {})
    try:
        while True:
            if not cli.as_json:
                sys.stdout.write("\033[H\033[2J")
            show()
            next(iter(events.events()))  # redraw on the next change
    except KeyboardInterrupt:
        pass
