"""Prometheus metrics: one registry per daemon, gauges refreshed from the store at scrape time."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fetchml.daemon.jobs.model import TERMINAL_STATES, Job, JobState

if TYPE_CHECKING:
    from fetchml.daemon.app import DaemonCore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Job durations span seconds to days.
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 7 * 86400)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
# Counting the store's objects walks the whole store: at most this often.
STORE_STATS_MAX_AGE_S = 60.0


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge("fetchml_jobs", "Jobs by state", ["state"], registry=r)
        self.queue_depth = Gauge("fetchml_queue_depth", "Queued jobs by priority", ["priority"],
                                 registry=r)
        self.run_time = Histogram("fetchml_job_run_seconds", "Run time of finished attempts",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.wait_time = Histogram("fetchml_job_wait_seconds", "Time from queued to started",
                                   buckets=DURATION_BUCKETS, registry=r)
        self.gpus_allocated = Gauge("fetchml_gpus_allocated", "GPUs held by running jobs",
                                    registry=r)
        self.gpus_total = Gauge("fetchml_gpus", "GPUs on this host", registry=r)
        self.sync_received = Counter("fetchml_sync_received_bytes",
                                     "Object bytes uploaded by clients", registry=r)
        self.sync_deduplicated = Counter("fetchml_sync_deduplicated_bytes",
                                         "Snapshot bytes that did not need uploading", registry=r)
        self.store_objects = Gauge("fetchml_store_objects", "Objects in the store", registry=r)
        self.store_bytes = Gauge("fetchml_store_bytes", "Bytes of objects in the store",
                                 registry=r)
        self.sessions = Gauge("fetchml_sessions", "Open protocol sessions", registry=r)
        self.request_latency = Histogram("fetchml_request_seconds", "Request latency by op",
                                         ["op"], buckets=REQUEST_BUCKETS, registry=r)
        self.auth_failures = Counter("fetchml_auth_failures", "Refused authentications",
                                     registry=r)
        self._store_stats_at = 0.0
        for state in JobState:
            self.jobs.labels(state.value)

    def job_changed(self, job: Job) -> None:
        """Observe wait time when an attempt starts and run time when it ends."""
        if job.state == JobState.RUNNING and job.started_at and job.queued_at:
            self.wait_time.observe(max(0.0, job.started_at - job.queued_at))
        elif job.state in TERMINAL_STATES and job.started_at and job.finished_at:
            self.run_time.observe(max(0.0, job.finished_at - job.started_at))

    async def refresh(self, core: DaemonCore) -> None:
        """Bring the gauges up to date (called by /metrics before rendering)."""
        import asyncio

        counts = await core.jobs.counts()
        for state in JobState:
            self.jobs.labels(state.value).set(counts.get(state, 0))
        self.queue_depth.clear()
        for job in await core.jobs.queued():
            self.queue_depth.labels(str(job.priority)).inc()
        running = list(core.scheduler.running.values())
        self.gpus_allocated.set(sum(len(job.gpu_ids) for job in running))
        self.gpus_total.set(len(core.inventory.gpus))
        self.sessions.set(len(core.sessions))
        if time.monotonic() - self._store_stats_at > STORE_STATS_MAX_AGE_S:
            self._store_stats_at = time.monotonic()
            objects, size = await asyncio.to_thread(core.objects.stats)
            self.store_objects.set(objects)
            self.store_bytes.set(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
