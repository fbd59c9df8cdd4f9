"""Training metrics jobs write: ``$FETCHML_METRICS_FILE`` followed while the attempt runs.

Every attempt gets ``$FETCHML_METRICS_FILE`` (``<run_dir>/metrics.jsonl``, created empty
before the job starts so that a sandbox can mount it writable; format in ``metric_series``).
The daemon tails the file of each attempt running here every POLL_S and once more when the
attempt ends; the series are then written to ``<run_dir>/metrics.msgpack`` and dropped from
memory, so memory holds only running attempts' series, each bounded by ``metrics_max_points``.
Finished jobs are served from the kept copy (made from the file on first use when the daemon
was away as the job ended). Followers (``jobs.metrics`` with follow) get each batch of new
points through a bounded feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetchml.daemon.jobs.model import TERMINAL_STATES, Job, JobState
from fetchml.daemon.observe.series import (
    MIN_POINTS,
    AttemptMetrics,
    Point,
    StoredMetrics,
    TailState,
    evenly,
    metrics_of_file,
    read_new_lines,
    read_series_file,
    write_series_file,
)
from fetchml.daemon.supervise.rundir import RunDir
from fetchml.daemon.tasks import cancel_and_wait, periodic

log = logging.getLogger(__name__)

METRICS_ENV = "FETCHML_METRICS_FILE"
POLL_S = 0.2  # how often running attempts' files are looked at: new points show within this
FEED_BACKLOG = 256  # batches a follower may lag behind before it is sent the whole series again


# -- following running attempts ---------------------------------------------------------------
@dataclass
class FeedItem:
    """A change of one job's series: ``points`` (new ones), ``reset`` (an attempt began or
    its file was rewritten: start over) or ``end`` (the attempt's file was read to its end)."""

    job_id: int
    attempt: int
    kind: str
    points: dict[str, list[Point]] = field(default_factory=dict)
    records: int = 0
    malformed: int = 0


class MetricsFeed:
    """The changes one follower receives, for the jobs it follows; bounded."""

    def __init__(self, job_ids: frozenset[int]) -> None:
        self.job_ids = job_ids
        self.queue: asyncio.Queue[FeedItem] = asyncio.Queue(FEED_BACKLOG)
        self.lagged = False  # fell behind: it gets nothing more until it starts over

    def put(self, item: FeedItem) -> None:
        if self.lagged:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.lagged = True

    def start_over(self) -> None:
        self.queue = asyncio.Queue(FEED_BACKLOG)
        self.lagged = False


@dataclass
class AttemptTail:
    """A running attempt whose metrics file is being followed."""

    metrics: AttemptMetrics
    path: Path
    state: TailState = field(default_factory=TailState)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ending: bool = False


def thin(points: dict[str, list[Point]], wanted: int) -> dict[str, list[Point]]:
    """At most ``wanted`` points per series, evenly spread, the last included."""
    return {name: [pts[i] for i in evenly(len(pts), wanted)] for name, pts in points.items()}


class MetricsTracker:
    """Follows the metrics files of the attempts running on ``host``; ``run_dir_of(job id,
    attempt)`` is where an attempt runs, and ``capacity`` the points kept per series."""

    def __init__(self, host: str, capacity: int, run_dir_of: Callable[[int, int], Path]
                 ) -> None:
        self.host = host
        self.capacity = max(MIN_POINTS, capacity)
        self.run_dir_of = run_dir_of
        self.active: dict[int, AttemptTail] = {}
        self.feeds: set[MetricsFeed] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def create_file(self, job: Job, run_dir: Path) -> None:
        """Create the attempt's metrics file empty, so that a sandbox can mount it writable
        (blocking; the run directory was just made)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(RunDir(run_dir).metrics, flags, 0o644))

    def environment(self, job: Job, run_dir: Path) -> Mapping[str, str]:
        return {METRICS_ENV: str(RunDir(run_dir).metrics)}

    # -- job changes ------------------------------------------------------------------------
    def job_changed(self, job: Job) -> None:
        """Listener of every job change: start following an attempt, or finish it."""
        tail = self.active.get(job.id)
        same_attempt = tail is not None and tail.metrics.attempt == job.attempt
        if tail is not None and not tail.ending and (
                not same_attempt or job.state is not JobState.RUNNING):
            tail.ending = True
            self._spawn(self._finish(tail), f"metrics-end-{job.id}")
        if job.state is JobState.RUNNING and job.host == self.host and not same_attempt:
            self.follow(job)
        elif job.state in TERMINAL_STATES and tail is None:
            self._spawn(self._settle(job), f"metrics-settle-{job.id}")

    def follow(self, job: Job) -> AttemptTail:
        run_dir = self.run_dir_of(job.id, job.attempt)
        tail = AttemptTail(AttemptMetrics(job.id, job.attempt, self.capacity),
                           RunDir(run_dir).metrics)
        self.active[job.id] = tail
        self._publish(FeedItem(job.id, job.attempt, "reset"))
        return tail

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _advance(self, tail: AttemptTail, *, final: bool) -> None:
        """Take in everything appended to the file so far (caller holds ``tail.lock``)."""
        metrics = tail.metrics
        while True:
            batch = await asyncio.to_thread(read_new_lines, tail.path, tail.state, final=final)
            if batch.restarted:
                metrics = tail.metrics = AttemptMetrics(metrics.job_id, metrics.attempt,
                                                        self.capacity)
                self._publish(FeedItem(metrics.job_id, metrics.attempt, "reset"))
            metrics.malformed += batch.malformed
            new: dict[str, list[Point]] = {}
            for step, values in batch.records:
                metrics.add(step, values, new)
            if new or batch.malformed:
                self._publish(FeedItem(metrics.job_id, metrics.attempt, "points",
                                       thin(new, self.capacity), metrics.records,
                                       metrics.malformed))
            if not batch.more:
                return

    async def _finish(self, tail: AttemptTail) -> None:
        """The attempt ended: read the file to its end, keep the series on disk, forget it."""
        metrics = tail.metrics
        try:
            async with tail.lock:
                await self._advance(tail, final=True)
                if metrics.records or metrics.malformed:
                    path = RunDir(tail.path.parent).series
                    await asyncio.to_thread(write_series_file, path, tail.metrics)
        except OSError as exc:
            log.warning("job %d: metrics not kept: %s", metrics.job_id, exc)
        finally:
            if self.active.get(metrics.job_id) is tail:
                del self.active[metrics.job_id]
            self._publish(FeedItem(metrics.job_id, metrics.attempt, "end",
                                   records=metrics.records, malformed=metrics.malformed))

    async def _settle(self, job: Job) -> None:
        """A job ended that was not followed (it ended while the daemon was away): keep its
        series from the file now, so that it is read once."""
        try:
            if job.host == self.host and job.attempt:
                await self.load(job)
        except OSError as exc:
            log.warning("job %d: metrics not kept: %s", job.id, exc)
        finally:
            self._publish(FeedItem(job.id, job.attempt, "end"))

    def _publish(self, item: FeedItem) -> None:
        for feed in self.feeds:
            if item.job_id in feed.job_ids:
                feed.put(item)

    @contextlib.contextmanager
    def feed(self, job_ids: frozenset[int]) -> Iterator[MetricsFeed]:
        feed = MetricsFeed(job_ids)
        self.feeds.add(feed)
        try:
            yield feed
        finally:
            self.feeds.discard(feed)

    # -- reading ----------------------------------------------------------------------------
    def current(self, job_id: int) -> StoredMetrics | None:
        """The series of a followed attempt as they are now, or None when not followed."""
        tail = self.active.get(job_id)
        return None if tail is None else StoredMetrics.of(tail.metrics)

    async def load(self, job: Job) -> StoredMetrics:
        """The series of the job's latest attempt: followed, kept on disk, or read now."""
        if job.attempt == 0:
            return StoredMetrics.empty(0)
        tail = self.active.get(job.id)
        if tail is None and job.state is JobState.RUNNING and job.host == self.host:
            tail = self.follow(job)  # not seen starting (the daemon just started): catch up
            async with tail.lock:
                await self._advance(tail, final=False)
        if tail is not None:
            return StoredMetrics.of(tail.metrics)
        run_dir = self.run_dir_of(job.id, job.attempt)
        stored = await asyncio.to_thread(read_series_file, RunDir(run_dir).series,
                                         self.capacity)
        if stored is not None and stored.attempt == job.attempt:
            return stored
        raw = RunDir(run_dir).metrics
        if job.state is JobState.RUNNING or not await asyncio.to_thread(raw.is_file):
            return StoredMetrics.empty(job.attempt)  # running on another host, or none
        metrics = await asyncio.to_thread(metrics_of_file, raw, job.id, job.attempt,
                                          self.capacity)
        if job.state in TERMINAL_STATES and (metrics.records or metrics.malformed):
            await asyncio.to_thread(write_series_file, RunDir(run_dir).series, metrics)
        return StoredMetrics.of(metrics)

    # -- the poll loop ----------------------------------------------------------------------
    async def poll(self) -> None:
        """Take in what running attempts appended to their files since the last poll."""
        for tail in list(self.active.values()):
            if tail.ending or tail.lock.locked():
                continue
            try:
                async with tail.lock:
                    if not tail.ending:
                        await self._advance(tail, final=False)
            except OSError as exc:
                log.warning("job %d: metrics file unreadable: %s", tail.metrics.job_id, exc)

    @contextlib.asynccontextmanager
    async def running(self, running: Iterable[Job]) -> AsyncIterator[None]:
        """Follow ``running`` (attempts started before a restart) and poll every POLL_S."""
        for job in running:
            self.follow(job)
        try:
            async with periodic(POLL_S, self.poll, name="metrics-poll", at_once=True):
                yield
        finally:
            await cancel_and_wait(*self._tasks)

