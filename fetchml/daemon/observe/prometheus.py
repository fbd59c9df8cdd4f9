"""Prometheus metrics: one registry per daemon, gauges refreshed from the store at scrape time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fetchml.cas.objects import ObjectStore
from fetchml.daemon.jobs.model import TERMINAL_STATES, Job, JobState
from fetchml.daemon.store.contract import JobStore

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
        self.connections_refused = Counter(
            "fetchml_connections_refused", "TCP connections closed before their hello, by reason "
            "(address: outside ip_allowlist; full: too many pending; deadline: too slow)",
            ["reason"], registry=r)
        for reason in ("address", "full", "deadline"):
            self.connections_refused.labels(reason)
        self._store_stats_at = 0.0
        for state in JobState:
            self.jobs.labels(state.value)

    def job_changed(self, job: Job) -> None:
        """Observe wait time when an attempt starts and run time when it ends."""
        if job.state == JobState.RUNNING and job.started_at and job.queued_at:
            self.wait_time.observe(max(0.0, job.started_at - job.queued_at))
        elif job.state in TERMINAL_STATES and job.started_at and job.finished_at:
            self.run_time.observe(max(0.0, job.finished_at - job.started_at))

    def count_upload(self, data_bytes: int) -> None:
        """Object bytes a client sent (cas.put)."""
        self.sync_received.inc(data_bytes)

    def count_deduplicated(self, data_bytes: int) -> None:
        """Bytes of a stored snapshot that its client did not have to send."""
        self.sync_deduplicated.inc(max(0, data_bytes))

    def observe_request(self, op: str, seconds: float) -> None:
        self.request_latency.labels(op).observe(seconds)

    async def refresh(self, jobs: JobStore, running: Iterable[Job], gpus: int, sessions: int,
                      objects: ObjectStore) -> None:
        """Bring the gauges up to date (called by /metrics before rendering): job counts and
        the queue from ``jobs``, the attempts ``running`` here, this host's ``gpus``, the
        open ``sessions``, and what the object store holds (at most every minute)."""
        counts = await jobs.counts()
        for state in JobState:
            self.jobs.labels(state.value).set(counts.get(state, 0))
        self.queue_depth.clear()
        for job in await jobs.queued():
            self.queue_depth.labels(str(job.priority)).inc()
        self.gpus_allocated.set(sum(len(job.gpu_ids) for job in running))
        self.gpus_total.set(gpus)
        self.sessions.set(sessions)
        if time.monotonic() - self._store_stats_at > STORE_STATS_MAX_AGE_S:
            self._store_stats_at = time.monotonic()
            count, size = await asyncio.to_thread(objects.stats)
            self.store_objects.set(count)
            self.store_bytes.set(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
