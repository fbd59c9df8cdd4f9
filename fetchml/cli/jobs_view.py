"""How jobs look on the CLI: JSON documents (RFC 3339 times) and table rows.

Jobs arrive as ``fetchml.protocol.job.WireJob`` (``read_job`` accepts an older daemon's
spelling too). The ``--json`` documents keep the keys scripts rely on, in protocol 1's
spelling: ``gpus`` the GPU indices, ``gpus_requested`` the count, ``max_attempts``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fetchml.cli.context import printable
from fetchml.protocol.job import job_v1, read_job
from fetchml.units import human_bytes

TIME_KEYS = ("created_at", "queued_at", "started_at", "finished_at")


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def job_json(job: Mapping[str, Any]) -> dict[str, Any]:
    """The job with RFC 3339 UTC times, as `--json` prints it (protocol 1's spelling)."""
    spelled = job_v1(read_job(job))
    return {**spelled, **{key: rfc3339(spelled.get(key)) for key in TIME_KEYS}}


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def elapsed(job: Mapping[str, Any], now: float | None = None) -> str:
    now = now or time.time()
    if job.get("started_at"):
        return _duration((job.get("finished_at") or now) - job["started_at"])
    if job.get("finished_at"):
        return "-"  # ended without running (cancelled while it waited)
    return "waiting " + _duration(now - job["created_at"])


def outcome(job: Mapping[str, Any]) -> str:
    if job.get("signal"):
        return f"signal {job['signal']}"
    if job.get("exit_code") is not None:
        return f"exit {job['exit_code']}"
    return "-"


TABLE_HEADERS = ["id", "name", "owner", "state", "pri", "gpus", "time", "result"]


def gpus_cell(job: Mapping[str, Any]) -> str:
    """The GPUs a job was given, or how many it asks for in parentheses, or "-"."""
    wire = read_job(job)
    return ",".join(str(g) for g in wire["gpu_ids"]) or (
        f"({wire['gpus']})" if wire["gpus"] else "-")


def table_row(job: Mapping[str, Any]) -> list[str]:
    gpus = gpus_cell(job)
    return [str(job["id"]), job["name"][:40], job["owner"], job["state"], str(job["priority"]),
            gpus, elapsed(job), outcome(job)]


LastMetrics = dict[str, tuple[float, float]]  # series name -> its last (step, value)
METRICS_SHOWN = 8  # metrics listed in a job's details; the rest are counted


def last_metrics(entry: dict[str, Any]) -> LastMetrics:
    """The last point of each series of a ``jobs.metrics`` entry."""
    return {name: (points[-1][0], points[-1][1])
            for name, points in sorted(entry["series"].items()) if points}


def metrics_json(last: LastMetrics) -> dict[str, dict[str, float | None]]:
    """``{name: {"step", "value"}}``; a value that is not finite is null."""
    return {name: {"step": step, "value": value if math.isfinite(value) else None}
            for name, (step, value) in last.items()}


def metrics_line(last: LastMetrics) -> str:
    shown = [f"{name} {value:.6g}" for name, (_, value) in list(last.items())[:METRICS_SHOWN]]
    more = len(last) - METRICS_SHOWN
    step = max(at for at, _ in last.values())
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "") + f"  at step {step:g}"


def detail_lines(raw: Mapping[str, Any], metrics: LastMetrics | None = None) -> list[str]:
    job = read_job(raw)
    rows = [
        ("job", f"{job['id']}  {job['name']}"),
        ("state", job["state"] + (f" ({job['reason']})" if job.get("reason") else "")),
        ("owner", job["owner"]),
        ("command", " ".join(job["argv"])),
        ("snapshot", job["snapshot"][:12] + (f"  workdir {job['workdir']}" if job["workdir"]
                                              else "")),
        ("priority", str(job["priority"])),
        ("resources", f"{job['cpus']} CPUs, "
                      f"{human_bytes(job['memory']) if job['memory'] else 'any'} memory, "
                      f"{job['gpus']} GPUs"),
        ("attempt", f"{job['attempt']} of {job['retries'] + 1}"),
        ("host", job.get("host") or "-"),
        ("gpus", ",".join(str(g) for g in job["gpu_ids"]) or "-"),
        ("created", rfc3339(job["created_at"]) or "-"),
        ("started", rfc3339(job.get("started_at")) or "-"),
        ("finished", rfc3339(job.get("finished_at")) or "-"),
        ("run time", elapsed(job) if job.get("started_at") else "-"),
        ("result", outcome(job)),
        ("peak memory", human_bytes(job.get("peak_rss"))
         + (" (all its processes, shared pages once)" if job.get("peak_rss") else "")),
        ("cpu time", f"{job['cpu_time']:.2f}s" if job.get("cpu_time") is not None else "-"),
        ("outputs", (job.get("outputs") or "-")[:12]),
    ]
    error = job.get("outputs_error")
    if error:  # said once: in the state's reason when that is why the job failed
        said = error in (job.get("reason") or "")
        rows[-1] = ("outputs", "not stored (see state)" if said else f"not stored: {error}")
    rows += [("warning", warning) for warning in job.get("warnings") or ()]
    if metrics:
        rows.append(("metrics", metrics_line(metrics)))
    if job.get("datasets"):
        rows.insert(5, ("datasets", ", ".join(job["datasets"])))
    if job.get("after"):
        rows.insert(7, ("after", ", ".join(str(a) for a in job["after"])))
    return [f"{key:<12} {printable(value)}" for key, value in rows]
