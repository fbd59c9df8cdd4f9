"""Several daemons, one queue: what a daemon does as a host of a cluster sharing a Redis store.

- It registers its name, address, resources and free resources, and renews them with a
  heartbeat every ``heartbeat_interval``; the heartbeat (and each claim) is the lease on the
  jobs it runs.
- Every daemon reaps: a running job whose host has been silent longer than ``lease_timeout``
  is recorded as lost (``mark_lost_or_retry``, fenced by attempt), so it runs again elsewhere
  when it has attempts left. A daemon reaps only after it has itself reached Redis for a full
  lease period, so a Redis outage, during which every host is silent, reaps nothing.
- A host whose attempt no longer holds its job (reaped while it was away, or cancelled
  through another daemon) stops it; the attempt's result is then rejected by fencing.
- Job changes of other hosts arrive through ``EventBridge``; snapshots a job needs, and
  outputs a user pulls, are fetched from the hosts that have them (``SnapshotFetcher``).
- Daemons authenticate each other with the cluster secret, presented as a Bearer key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fetchml.cas.objects import ObjectStore
from fetchml.config import DaemonSettings
from fetchml.daemon.cluster.fetch import FetchReport, Peer, SnapshotFetcher
from fetchml.daemon.cluster.peers import PeerConnection, PeerPool
from fetchml.daemon.events import JobEvents
from fetchml.daemon.jobs.gc import GarbageCollector
from fetchml.daemon.jobs.inventory import HostInventory
from fetchml.daemon.jobs.model import Job, JobSpec, JobState
from fetchml.daemon.jobs.runner import Runner
from fetchml.daemon.jobs.scheduler import Scheduler, never_fits
from fetchml.daemon.security.auth import Authenticator, Identity, Knock
from fetchml.daemon.supervise.processes import process_matches, signal_supervisor
from fetchml.daemon.supervise.records import read_supervisor_info
from fetchml.daemon.supervise.rundir import RunDir
from fetchml.daemon.tasks import cancel_and_wait, periodic
from fetchml.errors import ConfigError, Conflict, FetchmlError, NotFound, Unavailable

if TYPE_CHECKING:
    from fetchml.daemon.cluster.registry import HostRecord
    from fetchml.daemon.store.redis import RedisJobStore

log = logging.getLogger(__name__)

PEER_USER = PEER_ROLE = "cluster"
# What another daemon of the cluster may do here: read objects, manifests and logs of any job
# (to run jobs queued elsewhere, and to serve pulls and `logs` for any job), and list hosts.
PEER_PERMISSIONS = frozenset({"cluster:peer", "cas:read", "jobs:read", "jobs:read:all",
                              "host:read"})
# How long the start waits for the event subscription before scheduling anyway.
SUBSCRIBE_WAIT_S = 5.0


def advertised_address(advertise: str | None, listen_url: str | None) -> str | None:
    """The URL peers reach this daemon at: ``advertise``, else the TCP listener's URL (a
    wildcard listen address is replaced by this host's name)."""
    if advertise:
        parts = urlsplit(advertise)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ConfigError(f"advertise {advertise!r} must be a ws:// or wss:// URL, such "
                              "as ws://gpu-box-1:9101/ws")
        return advertise if parts.path not in ("", "/") else advertise.rstrip("/") + "/ws"
    if not listen_url:
        return None
    parts = urlsplit(listen_url)
    with contextlib.suppress(ValueError):
        if parts.hostname and ipaddress.ip_address(parts.hostname).is_unspecified:
            return listen_url.replace(parts.netloc, f"{socket.getfqdn()}:{parts.port}", 1)
    return listen_url


def _fits(host: HostRecord, spec: JobSpec) -> bool:
    r, res = spec.resources, host.resources
    return (r.cpus <= int(res.get("cpus", 0)) and r.memory <= int(res.get("memory", 0))
            and r.gpus <= host.gpu_count())


def _live_supervisors(runs_dir: Path) -> list[tuple[int, int, int, float]]:
    """(job, attempt, supervisor pid, its create time) of every attempt still supervised."""
    found = []
    with contextlib.suppress(OSError):
        for job_dir in runs_dir.iterdir():
            if not job_dir.name.isdigit():
                continue
            for run_dir in job_dir.iterdir():
                if not run_dir.name.isdigit() or RunDir(run_dir).status.exists():
                    continue
                info = read_supervisor_info(run_dir)
                if info is not None and process_matches(info.pid, info.create_time):
                    found.append((int(job_dir.name), int(run_dir.name), info.pid,
                                  info.create_time))
    return found


class Cluster:
    """This daemon's membership of a cluster, while the job store is Redis.

    It renews this host's lease and reaps others (``store``, the ``scheduler``'s free
    resources, the ``runner``'s attempts, changes published on ``events``), fetches snapshots
    for jobs from other hosts (into ``objects`` and ``snapshots``, under ``gc``), and admits
    other daemons (``auth``'s network policy and audit log). ``listen_url`` is this daemon's
    TCP listener, the address peers reach it at unless ``advertise`` says otherwise.
    """

    def __init__(self, settings: DaemonSettings, store: RedisJobStore, *,
                 listen_url: str | None, inventory: HostInventory, objects: ObjectStore,
                 snapshots: ObjectStore, gc: GarbageCollector, events: JobEvents,
                 scheduler: Scheduler, runner: Runner, auth: Authenticator) -> None:
        # here, not at the top: they import redis, which only a cluster's daemon loads
        from fetchml.daemon.cluster.events import EventBridge
        from fetchml.daemon.cluster.registry import HostRegistry

        s = settings
        self.store, self.inventory, self.events = store, inventory, events
        self.scheduler, self.runner, self.auth = scheduler, runner, auth
        self.name = s.name
        self.secret = s.cluster_secret or ""
        self.heartbeat_interval, self.lease_timeout = s.heartbeat_interval, s.lease_timeout
        self.instance = secrets.token_hex(8)
        store.origin = self.instance  # our own changes come back tagged with it: skipped
        self.address = advertised_address(s.advertise, listen_url)
        self.started_at = time.time()
        self.registry = HostRegistry(store)
        self.pool = PeerPool(self.secret)
        self.fetcher = SnapshotFetcher(objects, snapshots, gc, self.pool,
                                       self.peers)
        self.hosts: dict[str, HostRecord] = {}
        self.server_now = 0.0  # Redis time at the last heartbeat
        self._healthy_since: float | None = None  # monotonic; None while Redis is away
        self._full_check_at = 0.0  # monotonic time of the next look at every running job
        self._stopping: set[tuple[int, int]] = set()  # attempts already told to stop
        self._unheld: set[tuple[int, int]] = set()  # running here per the store, not held
        self.bridge = EventBridge(store, events, self.instance,
                                  on_remote=self._remote_change,
                                  on_gap=scheduler.request_resync)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        if not self.secret:
            log.warning("no cluster_secret: other hosts cannot fetch snapshots, outputs or "
                        "logs from this one; set FETCHML_CLUSTER_SECRET on every host")
        if self.address is None:
            log.warning("this daemon has no address for its peers; set --listen or advertise")
        self.server_now = await self.registry.register(self.record(), self.lease_timeout)
        self._healthy_since = time.monotonic()
        await self.refresh_hosts()
        stack.push_async_callback(self.pool.close)
        bridge = asyncio.create_task(self.bridge.run(), name="cluster-events")
        stack.push_async_callback(cancel_and_wait, bridge)
        await stack.enter_async_context(periodic(self.heartbeat_interval, self._beat,
                                                 name="heartbeat"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.bridge.connected.wait(), SUBSCRIBE_WAIT_S)
        log.info("host %s joined the cluster at %s (%d hosts known)", self.name,
                 self.address or "no address", len(self.hosts))

    def record(self) -> HostRecord:
        from fetchml.daemon.cluster.registry import HostRecord

        inventory = self.inventory.to_dict()
        del inventory["name"]
        free = self.scheduler.free()
        return HostRecord(name=self.name, address=self.address, resources=inventory,
                          free={"cpus": free.cpus, "memory": free.memory,
                                "gpus": list(free.gpus)},
                          instance=self.instance, started_at=self.started_at)

    async def _beat(self) -> None:
        """One heartbeat; any other failure is logged by ``periodic``, which beats on."""
        try:
            await self.beat_once()
        except FetchmlError as exc:
            if self._healthy_since is not None:
                log.warning("heartbeat failed (%s); jobs keep running, retrying", exc)
            self._healthy_since = None

    async def beat_once(self) -> None:
        """Renew the lease, then reap silent hosts and stop attempts this host lost."""
        self.server_now = await self.registry.heartbeat(self.record())
        if self._healthy_since is None:
            log.info("heartbeat back; reaping resumes after %g s", self.lease_timeout)
            self._healthy_since = time.monotonic()
        await self.refresh_hosts()
        await self.reap()
        await self.stop_stale_attempts()
        await self.release_unheld_jobs()

    async def refresh_hosts(self) -> None:
        self.hosts = {host.name: host for host in await self.registry.hosts()}

    def alive(self, host: HostRecord) -> bool:
        return host.name == self.name or self.server_now - host.last_seen <= self.lease_timeout

    # -- leases -----------------------------------------------------------------------------
    async def reap(self) -> list[Job]:
        """Record as lost the running jobs of hosts silent longer than the lease timeout."""
        if (self._healthy_since is None
                or time.monotonic() - self._healthy_since < self.lease_timeout):
            return []  # we may have been away ourselves: give everyone a full lease first
        silent = [h for h in self.hosts.values() if not self.alive(h)]
        if not silent and time.monotonic() < self._full_check_at:
            return []
        self._full_check_at = time.monotonic() + self.lease_timeout
        running = [job for job in await self.store.running() if job.host != self.name]
        if not running:
            return []
        # Hosts are read after the jobs: a host registers before it claims, and each claim
        # renews its lease, so a job read above cannot belong to a host missing from these.
        await self.refresh_hosts()
        now = await self.registry.server_time()
        reaped = []
        for job in running:
            host = self.hosts.get(job.host or "")
            if host is not None and now - host.last_seen <= self.lease_timeout:
                continue
            why = (f"its host {job.host} stopped answering" if host is not None
                   else f"its host {job.host} is not part of the cluster")
            try:
                updated = await self.store.mark_lost_or_retry(job.id, job.attempt, why,
                                                              time.time())
            except (Conflict, NotFound):
                continue  # it ended meanwhile, or another daemon reaped it first
            log.warning("job %d attempt %d: %s (silent %.0f s); %s", job.id, job.attempt, why,
                        now - host.last_seen if host else 0.0, updated.state.value)
            self.events.publish(updated)
            reaped.append(updated)
        if reaped:
            self.scheduler.wake()
        return reaped

    async def release_unheld_jobs(self) -> list[Job]:
        """Record as lost the jobs the store says run here that nothing here runs.

        That happens when a claim was committed but its answer lost (Redis went away at that
        moment): the runner then never started the attempt, and the lease this host keeps
        renewing would hold the job forever. A job must be seen so on two heartbeats in a
        row, so an attempt that is just starting or ending is never taken for one.
        """
        runner = self.runner
        unheld = {(job.id, job.attempt): job for job in await self.store.running(self.name)
                  if not runner.holds(job.id)}
        suspects, self._unheld = self._unheld, set(unheld)
        released = []
        for key in sorted(suspects & set(unheld)):
            job = unheld[key]
            try:
                updated = await self.store.mark_lost_or_retry(
                    job.id, job.attempt, f"host {self.name} claimed it but never started it",
                    time.time())
            except (Conflict, NotFound):
                continue
            log.warning("job %d attempt %d was claimed here but never started; %s", job.id,
                        job.attempt, updated.state.value)
            self.events.publish(updated)
            released.append(updated)
        if released:
            self.scheduler.wake()
        return released

    async def stop_stale_attempts(self) -> None:
        """Stop the attempts running here that no longer hold their job."""
        held = list(self.runner.attempts.values())
        if not held:
            return
        current = {job.id: job for job in
                   await self.store.get_many([attempt.job.id for attempt in held])}
        for attempt in held:
            job = current.get(attempt.job.id)
            if job is None:
                self._stop(attempt.job.id, attempt.job.attempt, "the job was deleted")
            else:
                self._check(job, attempt.job.attempt)

    def _check(self, job: Job, mine: int) -> None:
        """React to the stored ``job`` while attempt ``mine`` of it runs here."""
        if job.attempt < mine:
            return  # a late copy of a change from before our claim
        if job.attempt == mine and job.state is JobState.RUNNING and job.host == self.name:
            if job.cancel_requested:
                self._stop(job.id, mine, "cancelled through another host")
            return
        self._stop(job.id, mine, f"the job is now {job.state.value} at attempt {job.attempt}"
                   + (f" on {job.host}" if job.host else ""))

    def _stop(self, job_id: int, attempt: int, why: str) -> None:
        if (job_id, attempt) in self._stopping:
            return
        self._stopping.add((job_id, attempt))
        log.warning("job %d attempt %d: %s; stopping it", job_id, attempt, why)
        self.runner.cancel(job_id)

    def _remote_change(self, job: Job) -> None:
        attempt = self.runner.attempts.get(job.id)
        if attempt is not None:
            self._check(job, attempt.job.attempt)

    async def stop_orphaned_attempts(self, held: Iterable[Job]) -> int:
        """At start, after adoption: stop attempts still running here that the store gave to
        another host while this daemon was away. Returns how many were stopped."""
        kept = {(job.id, job.attempt) for job in held}
        stopped = 0
        for job_id, attempt, pid, created in await asyncio.to_thread(
                _live_supervisors, self.runner.runs_dir):
            if (job_id, attempt) in kept:
                continue
            log.warning("job %d attempt %d no longer runs on this host; stopping it", job_id,
                        attempt)
            stopped += signal_supervisor(pid, created, signal.SIGTERM)
        return stopped

    # -- peers --------------------------------------------------------------------------------
    async def peers(self, prefer: Sequence[str] = ()) -> list[Peer]:
        """Hosts to ask for objects: the named ones first, then the others alive."""
        with contextlib.suppress(Unavailable):  # a host may have joined since the heartbeat
            await self.refresh_hosts()
        others = sorted((h for h in self.hosts.values() if h.name != self.name and h.address
                         and (h.name in prefer or self.alive(h))),
                        key=lambda h: -h.last_seen)
        ranked = sorted(others, key=lambda h: prefer.index(h.name) if h.name in prefer
                        else len(prefer))
        return [Peer(h.name, h.address) for h in ranked if h.address]

    async def address_of(self, name: str) -> str | None:
        """Where host ``name`` is reached, or None when it has no address (or is unknown)."""
        if name not in self.hosts:
            with contextlib.suppress(Unavailable):
                await self.refresh_hosts()
        host = self.hosts.get(name)
        return host.address if host is not None else None

    async def peer(self, name: str) -> PeerConnection:
        address = await self.address_of(name)
        if address is None:
            raise Unavailable(f"host {name} has no address this daemon can reach; ask "
                              f"through the daemon on {name}, or give it --listen")
        return await self.pool.get(name, address)

    async def fetch_for_job(self, job: Job) -> None:
        """The runner's ``before_prepare`` hook: the job's snapshot, from another host if
        this one lacks it."""
        await self.fetcher.ensure(job.snapshot)

    async def fetch_outputs(self, job: Job) -> FetchReport:
        if job.outputs is None:
            raise NotFound(f"job {job.id} has no outputs")
        return await self.fetcher.ensure(job.outputs, prefer=[job.host] if job.host else [])

    def never_fits(self, spec: JobSpec) -> str | None:
        """Why no host of the cluster could ever run ``spec``, or None."""
        why = never_fits(spec, self.scheduler.total)
        if why is None or any(_fits(h, spec) for h in self.hosts.values()
                              if h.name != self.name and self.alive(h)):
            return None
        return f"{why}, and no other host of the cluster has room for it"

    def describe_hosts(self) -> list[dict[str, Any]]:
        return [{"name": h.name, "address": h.address, "resources": h.resources,
                 "free": h.free, "last_seen": h.last_seen,
                 "age": round(max(0.0, self.server_now - h.last_seen), 3),
                 "alive": self.alive(h), "started_at": h.started_at}
                for h in sorted(self.hosts.values(), key=lambda h: h.name)]

    # -- admission ----------------------------------------------------------------------------
    def admit_peer(self, knock: Knock) -> Identity | None:
        """The cluster identity, for a connection presenting the cluster secret; else None."""
        if not self.secret or not knock.key:
            return None
        if not hmac.compare_digest(knock.key.encode(), self.secret.encode()):
            return None
        if knock.unix is None:
            address = self.auth.policy.client_address(knock.peer, knock.forwarded_for)
            if not self.auth.policy.allows(address):
                return None  # the regular admission refuses it, with its reason
            source = f"peer {address}"
        else:
            source = f"peer uid {knock.unix.uid}"
        self.auth.audit.record("auth.success", user=PEER_USER, peer=source,
                                    role=PEER_ROLE, method="cluster_secret")
        # A peer acts as a daemon of this cluster: it stays valid for its whole session.
        return Identity(PEER_USER, PEER_ROLE, PEER_PERMISSIONS, via="uid", uid=os.geteuid(),
                        source=source)


def is_peer(identity: Identity) -> bool:
    """Whether a session is another daemon of the cluster (it is served locally, never
    proxied on, so a request cannot bounce between hosts)."""
    return identity.role == PEER_ROLE and identity.allows("cluster:peer")
