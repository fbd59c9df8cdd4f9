"""Ops of job metrics: the series jobs write (see ops.py for the rest).

A job appends JSON lines (``{"step": 100, "loss": 0.31}``) to ``$FETCHML_METRICS_FILE``; each
numeric key but ``step`` is a series of ``[step, value]`` points, evenly thinned past the
daemon's ``metrics_max_points`` (the latest point always kept). Series are those of the job's
latest attempt.
"""

from __future__ import annotations

from typing import Any, TypedDict

from fetchml.protocol.schema import Arg, OpSpec, in_range

MAX_JOBS = 100  # jobs one request may ask about: a large sweep, side by side

METRICS_ENTRY_DOC = (
    '{"job", "attempt", "state", "records" (valid lines), "malformed" (lines skipped), '
    '"dropped" (values past the series limit), "counts": {name: points written}, '
    '"series": {name: [[step, value]]}}'
)

class JobsMetricsArgs(TypedDict):
    jobs: list[str]
    follow: bool
    max_points: int | None
    names: list[str] | None


JOBS_METRICS = OpSpec(
    "jobs.metrics",
    "The metric series of jobs. Without follow, one reply; series are thinned further so that "
    "it fits one frame. With follow, an event per job with its series so far (reset true), "
    "then an event whenever new points are written (each a batch, evenly thinned when larger "
    "than max_points; reset true when a new attempt starts over), until every job has ended; "
    "the final reply then carries no series.",
    args=(
        Arg("jobs", list, f"job ids (at most {MAX_JOBS})", required=True, items=str),
        Arg("follow", bool, "stream new points until the jobs end", default=False),
        Arg("max_points", int, "at most this many points per series (default: all kept)",
            default=None, nullable=True, check=in_range(1, 10_000_000)),
        Arg("names", list, "only these series", default=None, items=str, nullable=True),
    ),
    stream=True,
    events='"metrics": {"job", "attempt", "reset": bool, "records", "malformed", '
    '"series": {name: [[step, value]]}}',
    result=f'{{"jobs": [{METRICS_ENTRY_DOC}]}}',
    params=JobsMetricsArgs, permissions=("jobs:read",),
)

OPS: tuple[OpSpec[Any], ...] = (JOBS_METRICS,)
