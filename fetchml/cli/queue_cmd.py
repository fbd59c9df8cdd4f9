"""fetchml queue: sync the project and submit a command (or a sweep) as jobs."""

from __future__ import annotations

import itertools
import re
from typing import Any

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.cli.sync_cmd import describe, project_root, run_sync
from fetchml.config import parse_bytes, parse_duration
from fetchml.protocol import ops
from fetchml.protocol.job import JobSubmission

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--env")
        env[name] = value
    return env


def parse_grid(specs: tuple[str, ...]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not values:
            raise click.BadParameter(f"{spec!r} is not KEY=V1,V2,...", param_hint="--grid")
        if key in grid:
            raise click.BadParameter(f"{key} is given twice", param_hint="--grid")
        grid[key] = values.split(",")
    return grid


def _fill(arg: str, chosen: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: chosen.get(m.group(1), m.group(0)), arg)


def expand_grid(argv: list[str], grid: dict[str, list[str]]) -> list[tuple[list[str], str]]:
    """Every combination of the grid's values, with ``{key}`` replaced in the command."""
    if not grid:
        return [(argv, "")]
    used = {m for arg in argv for m in _PLACEHOLDER.findall(arg)}
    unused = sorted(set(grid) - used)
    if unused:
        raise click.BadParameter(f"the command has no {{{unused[0]}}} to fill in",
                                 param_hint="--grid")
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        chosen = dict(zip(keys, values, strict=True))
        filled = [_fill(arg, chosen) for arg in argv]
        out.append((filled, " ".join(f"{k}={v}" for k, v in chosen.items())))
    return out


def build_jobs(command: list[str], *, name: str | None, priority: int | None,
               cpus: int | None, memory: str | None, gpus: int | None, timeout: str | None,
               retries: int | None, after: tuple[str, ...], env: tuple[str, ...],
               workdir: str | None, grid: tuple[str, ...], dataset: tuple[str, ...] = (),
               isolation: str | None = None, network: bool = False,
               labels: dict[str, str] | None = None) -> list[JobSubmission]:
    if not command:
        raise click.UsageError("give the command to run after --, e.g. "
                               "fetchml queue -- python train.py")
    base: JobSubmission = {"env": parse_env(env), "after": list(after)}
    if priority is not None:
        base["priority"] = priority
    if cpus is not None:
        base["cpus"] = cpus
    if gpus is not None:
        base["gpus"] = gpus
    if retries is not None:
        base["retries"] = retries
    if workdir is not None:
        base["workdir"] = workdir
    if isolation is not None:
        base["isolation"] = isolation
    if network:
        base["network"] = True
    try:
        if memory is not None:
            base["memory"] = parse_bytes(memory)
        if timeout is not None:
            base["timeout"] = parse_duration(timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if labels:
        base["labels"] = labels
    if dataset:
        base["datasets"] = list(dataset)  # resolved by the daemon to exact versions
    jobs: list[JobSubmission] = []
    for argv, suffix in expand_grid(command, parse_grid(grid)):
        # unnamed sweep jobs are named by their own command, so tables tell them apart
        job_name = " ".join(filter(None, [name, suffix])) if name else " ".join(argv)[:80]
        jobs.append({**base, "argv": argv, "name": job_name})
    return jobs


def queue_options(fn: Any) -> Any:
    """The options `queue` and `watch` share."""
    options = [
        click.option("--name", help="Job name (default: the command)."),
        click.option("--priority", type=click.IntRange(1, 10), help="1-10, higher runs first."),
        click.option("--cpus", type=click.IntRange(1, 65536), help="CPU slots (default 1)."),
        click.option("--memory", help="Memory, e.g. 16G."),
        click.option("--gpus", type=click.IntRange(0, 1024), help="Whole GPUs (default 0)."),
        click.option("--timeout", help="Wall-clock limit, e.g. 2h."),
        click.option("--retries", type=click.IntRange(0, 1000),
                     help="Attempts after a failure."),
        click.option("--after", multiple=True, metavar="JOB", help="Start after JOB succeeds."),
        click.option("--env", multiple=True, metavar="K=V", help="Extra environment variable."),
        click.option("--workdir", help="Directory inside the snapshot to run in."),
        click.option("--grid", multiple=True, metavar="K=V1,V2",
                     help="Sweep: one job per combination, {K} replaced in the command."),
        click.option("--network", is_flag=True,
                     help="Give the job the network inside its sandbox (bwrap, podman), where "
                          "the daemon allows it (job_network)."),
        click.option("--isolation", type=click.Choice(["none", "bwrap", "podman"]),
                     help="Run in this sandbox, if the daemon allows it (default: its own)."),
        click.option("--dataset", multiple=True, metavar="NAME[@V][:MOUNT]",
                     help="Read a dataset version (default the latest), read-only at "
                          "$FETCHML_DATA_DIR/NAME or at MOUNT in the workspace."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command(context_settings={"ignore_unknown_options": True})
@queue_options
@click.option("--snapshot", metavar="ID", help="Run on a stored snapshot instead of syncing.")
@click.option("--follow", "-f", is_flag=True, help="Follow the job's output, then wait.")
@click.option("--dry-run", is_flag=True, help="Show what would be queued; queue nothing.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@json_option
@pass_cli
def queue(cli: CliContext, /, command: tuple[str, ...], snapshot: str | None,
          follow: bool, dry_run: bool, **options: Any) -> None:
    """Sync the project and queue COMMAND (after --) as a job."""
    jobs = build_jobs(list(command), **options)
    if snapshot is None:
        report = run_sync(cli, project_root(cli, None), dry_run=dry_run)
        snapshot = report.snapshot
        if not cli.as_json:
            cli.note(describe(report, dry_run))
    if dry_run:
        if cli.as_json:
            cli.emit_json({"snapshot": snapshot, "jobs": jobs, "dry_run": True})
        else:
            for job in jobs:
                cli.say(f"would queue: {job['name']}  ({' '.join(job['argv'])})")
        return
    submitted = cli.connect().call(ops.JOBS_SUBMIT.name,
                                   {"snapshot": snapshot, "jobs": jobs})["jobs"]
    if cli.as_json:
        cli.emit_json({"snapshot": submitted[0]["snapshot"],
                       "jobs": [{"id": j["id"], "name": j["name"], "state": j["state"]}
                                for j in submitted]})
    else:
        for job in submitted:
            cli.say(f"queued job {job['id']}  {job['name']}  ({job['state']})")
    if follow:
        from fetchml.cli.logs_cmd import follow_logs
        from fetchml.cli.wait_cmd import wait_for

        follow_logs(cli, str(submitted[0]["id"]), follow=True)
        raise SystemExit(wait_for(cli, [str(j["id"]) for j in submitted], quiet=True))
