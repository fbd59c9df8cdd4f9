"""fetchml metrics: the series jobs wrote to $FETCHML_METRICS_FILE; several jobs side by side.

``--json`` prints, for one job, ``{"job", "series": {name: [[step, value], ...]}, ...}``, and
for several ``{"jobs": [that object, ...]}``. Values that are not finite (a diverging loss)
print as null in JSON and as nan/inf in tables.
"""

from __future__ import annotations

import math
from typing import Any

import click

from fetchml.cli.context import CliContext, json_option, pass_cli, render_table
from fetchml.protocol import ops, ops_training

SPARK = "▁▂▃▄▅▆▇█"
TREND_WIDTH = 16  # characters of the sparkline of one series
NAME_WIDTH = 32  # characters of a job's name in the comparison table


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def sparkline(values: list[float], width: int = TREND_WIDTH) -> str:
    """The shape of a series in ``width`` characters (bucket means; non-finite skipped)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    count = len(finite)
    width = min(width, count)  # so that no bucket is empty
    means = []
    for i in range(width):
        bucket = finite[i * count // width:(i + 1) * count // width]
        means.append(sum(bucket) / len(bucket))
    low, high = min(means), max(means)
    span = high - low or 1.0
    return "".join(SPARK[round((m - low) / span * (len(SPARK) - 1))] for m in means)


def json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def metrics_json(job: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """One job's metrics as ``--json`` prints them."""
    return {"job": entry["job"], "name": job.get("name"), "state": entry["state"],
            "attempt": entry["attempt"], "records": entry["records"],
            "malformed": entry["malformed"], "counts": entry["counts"],
            "series": {name: [[step, json_value(value)] for step, value in points]
                       for name, points in entry["series"].items()}}


def final_values(entry: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each series' last (step, value)."""
    return {name: (points[-1][0], points[-1][1])
            for name, points in entry["series"].items() if points}


def one_job_lines(job: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    lines = [f"job {job['id']}  {job['name']}  ({entry['state']}, attempt {entry['attempt']})"]
    rows = []
    for name, points in sorted(entry["series"].items()):
        values = [value for _, value in points]
        finite = [v for v in values if math.isfinite(v)]
        rows.append([name, str(entry["counts"].get(name, len(points))),
                     str(points[-1][0]) if points else "-",
                     format_value(values[-1] if values else None),
                     format_value(min(finite) if finite else None),
                     format_value(max(finite) if finite else None), sparkline(values)])
    if rows:
        lines.append(render_table(["metric", "points", "step", "last", "min", "max", "trend"],
                                  rows))
    else:
        lines.append("no metrics yet: the job writes JSON lines such as "
                     '{"step": 1, "loss": 0.5} to $FETCHML_METRICS_FILE')
    if entry["malformed"]:
        count = entry["malformed"]
        lines.append(f"{count} malformed line{'s' if count > 1 else ''} skipped")
    return lines


def comparison_table(jobs: list[dict[str, Any]], entries: list[dict[str, Any]]) -> str:
    """Jobs as rows, the final value of every metric as columns."""
    finals = [final_values(entry) for entry in entries]
    names = sorted({name for final in finals for name in final})
    rows = []
    for job, entry, final in zip(jobs, entries, finals, strict=True):
        step = max((at for at, _ in final.values()), default=None)
        rows.append([str(job["id"]), job["name"][:NAME_WIDTH], entry["state"],
                     "-" if step is None else str(step),
                     *(format_value(final[n][1]) if n in final else "-" for n in names)])
    return render_table(["job", "name", "state", "step", *names], rows)


@click.command()
@click.argument("jobs", nargs=-1, required=True)
@click.option("--max-points", type=click.IntRange(1, 10**7), help="At most this many points per "
              "series (evenly spread, the last included).")
@json_option
@pass_cli
def metrics(cli: CliContext, jobs: tuple[str, ...], max_points: int | None) -> None:
    """Training metrics of JOBS; several jobs are compared by their final values."""
    conn = cli.connect()
    found = [conn.send(ops.JOBS_GET.name, {"job": ref}) for ref in jobs]
    details = [pending.result() for pending in found]
    several = len(details) > 1
    # Only the final values are shown when comparing jobs: ask for the last point alone.
    wanted = 1 if several and not cli.as_json else max_points
    reply = conn.call(ops_training.JOBS_METRICS.name,
                      {"jobs": [str(job["id"]) for job in details], "max_points": wanted})
    by_id = {entry["job"]: entry for entry in reply["jobs"]}
    entries = [by_id[job["id"]] for job in details]
    if cli.as_json:
        documents = [metrics_json(job, e) for job, e in zip(details, entries, strict=True)]
        cli.emit_json({"jobs": documents} if several else documents[0])
    elif several:
        cli.say(comparison_table(details, entries))
    else:
        cli.say("\n".join(one_job_lines(details[0], entries[0])))
