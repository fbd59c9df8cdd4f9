"""jobs.metrics: the series jobs write, once or followed as they are written.

Who may see a job's metrics is who may see the job (``visible_jobs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from typing import Any

from fetchml.daemon.handlers import Call, handles
from fetchml.daemon.handlers.jobs import get_many, visible_jobs
from fetchml.daemon.jobs.model import TERMINAL_STATES, Job
from fetchml.daemon.observe.series import StoredMetrics, wire_point
from fetchml.daemon.observe.training import FeedItem, MetricsTracker, thin
from fetchml.errors import BadRequest
from fetchml.protocol import ops_training
from fetchml.protocol.ops_training import MAX_JOBS

# Points in one reply or event, all series together: ~20 bytes each in msgpack, so a reply
# stays near 4 MiB, well inside the 8 MiB frame limit.
REPLY_POINTS = 200_000
# A follower re-reads its jobs this often, should an end be missed (a job on another host).
REFRESH_S = 1.0


def points_per_series(stored: Collection[StoredMetrics], wanted: int,
                      names: set[str] | None) -> int:
    """``wanted``, or fewer so that every series of ``stored`` fits one reply."""
    series = sum(len([n for n in s.points if names is None or n in names]) for s in stored)
    return max(1, min(wanted, REPLY_POINTS // max(1, series)))


def entry(job: Job, stored: StoredMetrics, per_series: int,
          names: set[str] | None) -> dict[str, Any]:
    return {"job": job.id, "state": job.state.value, **stored.to_wire(per_series, names)}


@handles(ops_training.JOBS_METRICS)
async def jobs_metrics(call: Call[ops_training.JobsMetricsArgs]) -> dict[str, Any]:
    refs: list[str] = call.args["jobs"]
    if not refs or len(refs) > MAX_JOBS:
        raise BadRequest(f"ask for the metrics of between 1 and {MAX_JOBS} jobs at once")
    found = await visible_jobs(call, refs)
    jobs = list({job.id: job for job in found}.values())
    tracker = call.core.training_metrics
    wanted = min(call.args["max_points"] or tracker.capacity, tracker.capacity)
    names = set(call.args["names"]) if call.args["names"] else None
    if call.args["follow"]:
        return await _follow(call, tracker, jobs, wanted, names)
    stored = [await tracker.load(job) for job in jobs]
    per_series = points_per_series(stored, wanted, names)
    return {"jobs": [entry(job, s, per_series, names)
                     for job, s in zip(jobs, stored, strict=True)]}


async def _send_all(call: Call[Any], tracker: MetricsTracker, jobs: dict[int, Job], wanted: int,
                    names: set[str] | None) -> None:
    """Each job's series so far, as a reset event."""
    # Taken in one step with the feed already open: no batch can be both in a snapshot of a
    # followed attempt and in the feed. Others are read from disk; an attempt that starts
    # meanwhile sends a reset through the feed first.
    current = {job_id: tracker.current(job_id) for job_id in jobs}
    for job_id, job in jobs.items():
        stored = current[job_id] or await tracker.load(job)
        per_series = points_per_series([stored], wanted, names)
        await call.emit("metrics", {**entry(job, stored, per_series, names), "reset": True})


async def _send_item(call: Call[Any], item: FeedItem, wanted: int, names: set[str] | None) -> None:
    if item.kind == "end":
        return
    chosen = {n: p for n, p in item.points.items() if names is None or n in names}
    series = {name: [wire_point(*point) for point in points]
              for name, points in thin(chosen, wanted).items()}
    if item.kind == "points" and not series and not item.malformed:
        return
    await call.emit("metrics", {"job": item.job_id, "attempt": item.attempt,
                                "reset": item.kind == "reset", "records": item.records,
                                "malformed": item.malformed, "series": series})


async def _follow(call: Call[Any], tracker: MetricsTracker, found: list[Job], wanted: int,
                  names: set[str] | None) -> dict[str, Any]:
    jobs = {job.id: job for job in found}
    done: set[int] = set()
    with tracker.feed(frozenset(jobs)) as feed:
        await _send_all(call, tracker, jobs, wanted, names)
        refresh_at = time.monotonic() + REFRESH_S
        while len(done) < len(jobs):
            if feed.lagged:
                feed.start_over()
                await _send_all(call, tracker, jobs, wanted, names)
                continue
            item: FeedItem | None = None
            with contextlib.suppress(TimeoutError):
                item = await asyncio.wait_for(feed.queue.get(),
                                              max(0.0, refresh_at - time.monotonic()))
            if item is not None:
                await _send_item(call, item, wanted, names)
                if item.kind != "end":
                    continue
            for job in await get_many(call, [i for i in jobs if i not in done]):
                jobs[job.id] = job
                if job.state in TERMINAL_STATES and job.id not in tracker.active:
                    done.add(job.id)
            refresh_at = time.monotonic() + REFRESH_S
    final = [(job, await tracker.load(job)) for job in jobs.values()]
    return {"jobs": [{**entry(job, stored, 1, names), "series": {}} for job, stored in final]}
