"""The daemon's services, built in order by ``DaemonCore.open()``, each with what it uses.

A service that needs another takes it as a constructor argument, so the order of ``open()``
is the order of dependencies: the stores, the runner and the scheduler, garbage collection,
the cluster (whose runner hook fetches a job's snapshot before any other hook uses it),
isolation, datasets, training metrics; then adopted attempts are taken back and scheduling
starts. ``close()`` stops them in the reverse order. Handlers reach the services through the
core's attributes (``call.core.datasets``); no service knows the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Collection
from typing import TYPE_CHECKING, Any, Protocol

from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.config import DaemonSettings
from fetchml.daemon.datasets.cache import DatasetCache
from fetchml.daemon.datasets.service import REFRESH_S, DatasetService, open_registry
from fetchml.daemon.events import JobEvents
from fetchml.daemon.isolation.service import Isolation, open_isolation
from fetchml.daemon.jobs.gc import GarbageCollector, SweepGate
from fetchml.daemon.jobs.inventory import HostInventory, detect_inventory
from fetchml.daemon.jobs.model import Job, JobSpec
from fetchml.daemon.jobs.outputs import PENDING_RETRY_S
from fetchml.daemon.jobs.retention import Pins, prune_jobs
from fetchml.daemon.jobs.runner import Runner
from fetchml.daemon.jobs.scheduler import Capacity, Scheduler, never_fits
from fetchml.daemon.observe.prometheus import DaemonMetrics
from fetchml.daemon.observe.training import MetricsTracker
from fetchml.daemon.security.auth import Authenticator, Identity, local_user_name
from fetchml.daemon.security.gate import ConnectionGate
from fetchml.daemon.security.job_identity import (
    JobIdentities,
    first_unsearchable,
    guard_state_dir,
    resolve_job_user,
)
from fetchml.daemon.security.ownership import SnapshotOwners
from fetchml.daemon.store import open_job_store
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.tasks import periodic
from fetchml.errors import BadRequest, FetchmlError, IntegrityError, NotFound, Unavailable
from fetchml.protocol import Limits

if TYPE_CHECKING:
    from fetchml.daemon.cluster.membership import Cluster

log = logging.getLogger(__name__)

MIN_PREFIX = 6  # shortest snapshot-id prefix accepted, as in `git` short ids
READY_TIMEOUT_S = 2.0  # /ready fails when the job store takes longer than this to answer


class Connection(Protocol):
    """An open client session, as the core sees it (counted, and ended on shutdown)."""

    async def shutdown(self) -> None: ...


class DaemonCore:
    """Every service of one daemon; what handlers reach through ``call.core``."""

    settings: DaemonSettings
    auth: Authenticator
    objects: ObjectStore  # file contents, by blake3 digest
    snapshots: ObjectStore  # snapshot manifests, by digest
    inventory: HostInventory
    jobs: JobStore
    runner: Runner
    scheduler: Scheduler
    pins: Pins
    snapshot_owners: SnapshotOwners  # who may read which snapshot
    gc: GarbageCollector
    cluster: Cluster | None  # with a Redis store
    isolation: Isolation
    datasets: DatasetService
    training_metrics: MetricsTracker

    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.limits = Limits(
            max_frame_bytes=settings.max_frame_bytes,
            max_bin_len=settings.max_frame_bytes,
            max_depth=settings.max_depth,
            max_in_flight=settings.max_in_flight,
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.idle_timeout,
        )
        self.sessions: set[Connection] = set()
        self.started_at = time.time()
        self.events = JobEvents()
        self.metrics = DaemonMetrics()
        self.events.listen(self._observe)
        self.listen_url: str | None = None  # the TCP listener's URL, set before open()
        self.connections: ConnectionGate | None = None  # the TCP listener's gate, if any
        self.cluster = None
        self._sweep_gate = SweepGate()
        self._stack = contextlib.AsyncExitStack()

    async def open(self) -> None:
        """Build and start every service; what was started is stopped again on failure."""
        try:
            await self._open(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        self.auth = await asyncio.to_thread(Authenticator, s)
        identities = JobIdentities(daemon_uid=os.geteuid(), root_name=local_user_name(0),
                                   mapped_uid=self.auth.registry.uid_of,
                                   job_user=resolve_job_user(s.job_user))
        log.info("jobs run %s", identities.describe())
        self.objects = ObjectStore(s.state_dir / "objects")
        self.snapshots = ObjectStore(s.state_dir / "snapshots")
        for store in (self.objects, self.snapshots):
            removed = await asyncio.to_thread(store.remove_temp_files)
            if removed:
                log.info("removed %d unfinished uploads from %s", removed, store.root)
        self.inventory = inv = await asyncio.to_thread(
            detect_inventory, s.name, gpus_override=s.gpus, cpus=s.cpus, memory=s.memory)
        log.info("host %s: %d CPUs, %d MiB memory, %d GPUs", inv.name, inv.cpus,
                 inv.memory // 2**20, len(inv.gpus))
        self.jobs = open_job_store(s)
        await self.jobs.open()
        stack.push_async_callback(self.jobs.close)

        # Attempts and scheduling; the scheduler starts last, once every hook is in place.
        self.runner = runner = Runner(
            state_dir=s.state_dir, host=s.name, store=self.jobs, objects=self.objects,
            snapshots=self.snapshots, inventory=inv, kill_grace=s.kill_grace,
            environ=os.environ, on_change=self.publish, on_end=self._attempt_ended,
            job_identity=identities.of)
        stack.push_async_callback(runner.close)
        total = Capacity(inv.cpus, inv.memory, tuple(g.index for g in inv.gpus))
        self.scheduler = Scheduler(self.jobs, s.name, total, s.aging_interval, runner.start,
                                   events=self.events)
        stack.push_async_callback(self.scheduler.stop)

        self.pins = await asyncio.to_thread(Pins, s.state_dir)
        self.snapshot_owners = owners = SnapshotOwners(s.state_dir)
        await asyncio.to_thread(owners.open)
        self.events.listen(self._own_outputs)
        self.gc = GarbageCollector(self.objects, self.snapshots, self.jobs, self.pins,
                                   self._sweep_gate)
        self.events.listen(lambda job: self.gc.protect_snapshot(job.snapshot))

        self.cluster = cluster = await self._join_cluster(stack)
        if cluster is not None:  # the first hook: a job's snapshot is here before any other
            runner.hooks.before_prepare.append(cluster.fetch_for_job)

        running = await self.jobs.running(s.name)  # attempts started before a restart
        self.isolation = await open_isolation(s, base_env=runner.base_env, running=running,
                                              run_dir_of=runner.run_dir)
        runner.hooks.spec.append(self.isolation.rewrite)
        self.events.listen(self.isolation.job_changed)
        stack.push_async_callback(self.isolation.close)

        registry = open_registry(s)
        await registry.open()
        stack.push_async_callback(registry.close)
        cache = DatasetCache(s.state_dir.absolute() / "datasets", self.objects)
        await asyncio.to_thread(cache.open)
        self.datasets = datasets = DatasetService(
            self.jobs, self.objects, self.snapshots, s.name, registry, cache,
            fetch=cluster.fetcher.ensure if cluster is not None else None)
        await datasets.open()
        self.gc.extra_roots = datasets.roots
        runner.hooks.before_prepare.append(datasets.before_prepare)
        runner.hooks.workspace.append(datasets.workspace)
        runner.hooks.environment.append(datasets.environment)
        if registry.shared:
            await stack.enter_async_context(periodic(REFRESH_S, datasets.follow_registry,
                                                     name="datasets-refresh"))

        self.training_metrics = tracker = MetricsTracker(s.name, s.metrics_max_points,
                                                         runner.run_dir)
        runner.hooks.workspace.append(tracker.create_file)
        runner.hooks.environment.append(tracker.environment)
        self.events.listen(tracker.job_changed)
        await stack.enter_async_context(tracker.running(running))

        if identities.switches:  # before any job runs as another user
            await asyncio.to_thread(guard_state_dir, s.state_dir)
            blocked = first_unsearchable(s.state_dir, identities.job_user)
            if blocked is not None:
                log.warning("%s does not let other users through: jobs of users other than "
                            "root will fail to start; give it o+x or move state_dir", blocked)
        await runner.open()
        adopted = await runner.adopt()
        for job in adopted:
            self.scheduler.started(job)
        if cluster is not None:
            await cluster.stop_orphaned_attempts(adopted)
        await self.scheduler.start()
        self.scheduler.wake()
        # Outputs that could not be stored before (a full disk) are tried now and then again.
        await stack.enter_async_context(periodic(PENDING_RETRY_S, runner.outputs.retry_pending,
                                                 name="outputs-pending", at_once=True))
        if s.retention_older_than is not None:
            await stack.enter_async_context(periodic(s.retention_interval, self.apply_retention,
                                                     name="retention"))

    async def _join_cluster(self, stack: contextlib.AsyncExitStack) -> Cluster | None:
        """Join the cluster when the job store is Redis; None for a standalone daemon."""
        if not self.jobs.shared:
            return None
        # imported here: they import redis, which a standalone daemon never loads
        from fetchml.daemon.cluster.membership import Cluster
        from fetchml.daemon.store.redis import RedisJobStore

        assert isinstance(self.jobs, RedisJobStore)
        cluster = Cluster(self.settings, self.jobs, listen_url=self.listen_url,
                          inventory=self.inventory, objects=self.objects,
                          snapshots=self.snapshots, gc=self.gc, events=self.events,
                          scheduler=self.scheduler, runner=self.runner, auth=self.auth)
        await cluster.start(stack)
        return cluster

    async def close(self) -> None:
        await self._stack.aclose()

    async def apply_retention(self) -> None:
        """The configured retention policy: prune old finished jobs of everyone, then gc."""
        s = self.settings
        await self.runner.outputs.retry_pending()
        jobs, runs, _ = await prune_jobs(self.jobs, self.runner.runs_dir, owner=None,
                                         states=None, older_than=s.retention_older_than,
                                         keep=s.retention_keep, dry_run=False)
        objects, size, _ = await self.gc.collect(s.gc_grace)
        log.info("retention: pruned %d jobs (%d runs), collected %d objects (%d bytes)",
                 len(jobs), runs, objects, size)

    def publish(self, job: Job) -> None:
        """Tell every stream that a job changed."""
        self.events.publish(job)

    def _own_outputs(self, job: Job) -> None:
        """A job's outputs belong to its owner."""
        if job.outputs:  # every host hears of every job: a pull may come through any of them
            self.snapshot_owners.record(job.outputs, job.owner)

    def _attempt_ended(self, job_id: int) -> None:
        self.scheduler.ended(job_id)

    def _observe(self, job: Job) -> None:
        if job.host in (None, self.settings.name):  # other hosts count their own jobs
            self.metrics.job_changed(job)

    def never_fits(self, spec: JobSpec) -> str | None:
        """Why ``spec`` could never start here (nor, in a cluster, on any host), or None."""
        if self.cluster is not None:
            return self.cluster.never_fits(spec)
        return never_fits(spec, self.scheduler.total)

    @contextlib.asynccontextmanager
    async def gc_guard(self) -> AsyncIterator[None]:
        """Held while a snapshot is being recorded, so garbage collection cannot interleave."""
        async with self._sweep_gate.shared():
            yield

    async def scrape_metrics(self) -> bytes:
        """The Prometheus exposition of this daemon, brought up to date."""
        await self.metrics.refresh(self.jobs, self.scheduler.running.values(),
                                   len(self.inventory.gpus), len(self.sessions), self.objects)
        return self.metrics.render()

    async def ready(self) -> str | None:
        """Why the daemon cannot serve jobs right now, or None when it can."""
        try:
            await asyncio.wait_for(self.jobs.counts(), READY_TIMEOUT_S)
        except (FetchmlError, TimeoutError) as exc:
            return f"job store unreachable: {exc}"
        if not self.scheduler.alive():
            return "scheduler is not running"
        return None

    def reads_everything(self, reader: Identity) -> bool:
        """Whether ``reader`` may read every snapshot and object (admins, analysts, peers)."""
        return reader.allows("jobs:read:all")

    def may_read_snapshot(self, reader: Identity, snapshot: str,
                          granted: Collection[str] = ()) -> bool:
        return (self.reads_everything(reader) or snapshot in granted or
                snapshot in self.snapshot_owners.owned_by(reader.user) or
                (reader.allows("datasets:read") and snapshot in self.datasets.roots()))

    async def resolve_snapshot(self, text: str, reader: Identity | None = None,
                               granted: Collection[str] = ()) -> str:
        """A full snapshot id from an id or a unique prefix of at least 6 hex digits.

        With a ``reader`` that may not read everything, only what it may read resolves (its
        uploads and jobs' outputs, ``granted`` to its connection, datasets it may read); any
        other snapshot is not found, exactly as one that is not stored.
        While a garbage collection runs, the snapshot is kept with everything it names, and
        one it already took objects from is refused: callers hold ``gc_guard``."""
        text = text.strip().lower()
        if reader is None or self.reads_everything(reader):
            snapshot = await self._find_snapshot(text)
        else:
            snapshot = await self._find_readable(text, reader, granted)
        if self.gc.running:
            self.gc.protect_snapshot(snapshot)
            data = await asyncio.to_thread(self.snapshots.read_bytes, snapshot)
            oids = sorted(SnapshotManifest.decode(data).oids())
            missing = await asyncio.to_thread(self.objects.missing, oids)
            if missing:
                raise IntegrityError(f"snapshot {snapshot[:12]} lost {len(missing)} objects to "
                                     "garbage collection; sync the project again")
            self.gc.protect_objects(oids)
        return snapshot

    async def _find_readable(self, text: str, reader: Identity, granted: Collection[str]
                             ) -> str:
        _check_snapshot_text(text)
        extra = set(granted)
        if reader.allows("datasets:read"):
            extra.update(self.datasets.roots())
        readable = self.snapshot_owners.readable(reader.user, extra)
        matches = [s for s in readable if s.startswith(text)][:2]
        if not matches or not await asyncio.to_thread(self.snapshots.contains, matches[0]):
            raise NotFound(f"no snapshot {text}; `fetchml sync` prints the ids it stores")
        if len(matches) > 1:
            raise BadRequest(f"snapshot prefix {text} is ambiguous; give more digits")
        return matches[0]

    async def _find_snapshot(self, text: str) -> str:
        if len(text) == 64 and await asyncio.to_thread(self.snapshots.contains, text):
            return text  # a full id names itself: one stat instead of a prefix search
        _check_snapshot_text(text)
        matches = await asyncio.to_thread(self.snapshots.find_prefix, text, 2)
        if not matches:
            raise NotFound(f"no snapshot {text}; `fetchml sync` prints the ids it stores")
        if len(matches) > 1:
            raise BadRequest(f"snapshot prefix {text} is ambiguous; give more digits")
        return matches[0]

    async def host_status(self) -> dict[str, Any]:
        """Free resources and job counts (the scheduler fills these in once it runs)."""
        free = self.scheduler.free()
        status: dict[str, Any] = {"free": {"cpus": free.cpus, "memory": free.memory,
                                           "gpus": list(free.gpus)}}
        try:
            counts = await self.jobs.counts()
        except Unavailable as exc:  # the host still answers for itself without its store
            return {**status, "jobs": {}, "store_error": exc.message}
        return {**status, "jobs": {state.value: n for state, n in counts.items() if n}}


def _check_snapshot_text(text: str) -> None:
    if len(text) < MIN_PREFIX or len(text) > 64 or any(c not in "0123456789abcdef" for c in text):
        raise BadRequest(f"{text[:80]!r} is not a snapshot id; give at least {MIN_PREFIX} hex "
                         "digits")
