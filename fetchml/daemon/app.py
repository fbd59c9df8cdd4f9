"""create_app(settings): the aiohttp application, its routes, and the daemon's components.

Components (stores, scheduler, inventory) are opened in the app's cleanup context, so a test
can boot a complete daemon with ``create_app`` + an aiohttp runner and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from fetchml import __version__
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.config import DaemonSettings
from fetchml.daemon.cluster import membership as cluster
from fetchml.daemon.datasets import service as datasets
from fetchml.daemon.events import JobEvents
from fetchml.daemon.handlers import HANDLERS, Call, load_all
from fetchml.daemon.isolation import service as isolation
from fetchml.daemon.jobs.inventory import HostInventory, detect_inventory
from fetchml.daemon.jobs.model import Job, JobSpec
from fetchml.daemon.jobs.retention import GarbageCollector, Pins, SweepGate, periodic, prune_jobs
from fetchml.daemon.jobs.runner import Runner
from fetchml.daemon.jobs.scheduler import Capacity, Scheduler, never_fits
from fetchml.daemon.observe import training as jobmetrics
from fetchml.daemon.observe.prometheus import CONTENT_TYPE, DaemonMetrics
from fetchml.daemon.security.auth import Authenticator, Knock, SlowedRefusal, peer_credentials
from fetchml.daemon.session import Session
from fetchml.daemon.store import open_job_store
from fetchml.daemon.store.contract import JobStore
from fetchml.errors import (
    BadRequest,
    FetchmlError,
    IntegrityError,
    NotFound,
    RateLimited,
    Unavailable,
)
from fetchml.protocol import Limits

log = logging.getLogger(__name__)

MIN_PREFIX = 6  # shortest snapshot-id prefix accepted, as in `git` short ids
READY_TIMEOUT_S = 2.0  # /ready fails when the job store takes longer than this to answer


class DaemonCore:
    """Everything a handler may use; one per daemon."""

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
        self.auth: Authenticator
        self.sessions: set[Session] = set()
        self.started_at = time.time()
        self.inventory: HostInventory
        self.objects: ObjectStore
        self.snapshots: ObjectStore
        self._sweep_gate = SweepGate()
        self._stack = contextlib.AsyncExitStack()
        self.pins: Pins
        self.gc: GarbageCollector
        self.events = JobEvents()
        self.metrics = DaemonMetrics()
        self.events.listen(self._observe)
        self.listen_url: str | None = None  # the TCP listener's URL, set before open()
        self.cluster: cluster.Cluster | None = None  # with a Redis store
        self.jobs: JobStore = None  # type: ignore[assignment]
        self.runner: Runner = None  # type: ignore[assignment]
        self.scheduler: Scheduler = None  # type: ignore[assignment]
        self.handlers = load_all()

    async def open(self) -> None:
        s = self.settings
        self.auth = await asyncio.to_thread(Authenticator, s)
        self.objects = ObjectStore(s.state_dir / "objects")
        self.snapshots = ObjectStore(s.state_dir / "snapshots")
        for store in (self.objects, self.snapshots):
            removed = await asyncio.to_thread(store.remove_temp_files)
            if removed:
                log.info("removed %d unfinished uploads from %s", removed, store.root)
        self.inventory = await asyncio.to_thread(
            detect_inventory, s.name, gpus_override=s.gpus, cpus=s.cpus, memory=s.memory
        )
        inv = self.inventory
        log.info("host %s: %d CPUs, %d MiB memory, %d GPUs", inv.name, inv.cpus,
                 inv.memory // 2**20, len(inv.gpus))
        self.jobs = open_job_store(s)
        await self.jobs.open()
        total = Capacity(inv.cpus, inv.memory, tuple(g.index for g in inv.gpus))
        self.runner = Runner(
            state_dir=s.state_dir, host=s.name, store=self.jobs, objects=self.objects,
            snapshots=self.snapshots, inventory=inv, kill_grace=s.kill_grace,
            environ=os.environ, on_change=self.publish, on_end=self._attempt_ended)
        self.scheduler = Scheduler(self.jobs, s.name, total, s.aging_interval, self.runner.start,
                                   events=self.events)
        self.pins = await asyncio.to_thread(Pins, s.state_dir)
        self.gc = GarbageCollector(self.objects, self.snapshots, self.jobs, self.pins,
                                   self._sweep_gate)
        self.events.listen(lambda job: self.gc.protect_snapshot(job.snapshot))
        # first: its runner hook fetches a snapshot from other hosts before anything uses it
        self.cluster = await cluster.attach(self, self._stack)
        for feature in (isolation, datasets, jobmetrics):  # before any attempt starts
            await feature.attach(self, self._stack)
        await self.runner.open()
        adopted = await self.runner.adopt()
        for job in adopted:
            self.scheduler.started(job)
        if self.cluster is not None:
            await self.cluster.stop_orphaned_attempts(adopted)
        await self.scheduler.start()
        self.scheduler.wake()
        if s.retention_older_than is not None:
            await self._stack.enter_async_context(periodic(s.retention_interval,
                                                           self.apply_retention))

    async def apply_retention(self) -> None:
        """The configured retention policy: prune old finished jobs of everyone, then gc."""
        s = self.settings
        jobs, runs, _ = await prune_jobs(self.jobs, self.runner.runs_dir, owner=None,
                                         states=None, older_than=s.retention_older_than,
                                         keep=s.retention_keep, dry_run=False)
        objects, size, _ = await self.gc.collect(s.gc_grace)
        log.info("retention: pruned %d jobs (%d runs), collected %d objects (%d bytes)",
                 len(jobs), runs, objects, size)

    async def close(self) -> None:
        await self._stack.aclose()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.runner is not None:
            await self.runner.close()
        if self.jobs is not None:
            await self.jobs.close()

    def publish(self, job: Job) -> None:
        """Tell every stream that a job changed."""
        self.events.publish(job)

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

    def audit_call(self, call: Call[Any], result: Any) -> None:
        """Record a successful state-changing request, with a summary of what it did."""
        summary: dict[str, Any] = {}
        if isinstance(result, dict) and isinstance(result.get("jobs"), list):
            summary["jobs"] = [j.get("id") for j in result["jobs"] if isinstance(j, dict)]
            summary["names"] = [j.get("name") for j in result["jobs"] if isinstance(j, dict)]
        for key in ("name", "role", "reason", "snapshot"):
            if isinstance(call.args.get(key), str):
                summary[key] = call.args[key]
        self.auth.audit.record(call.op, user=call.identity.user, peer=call.identity.source,
                               **summary)

    def count_upload(self, objects: int, data_bytes: int) -> None:
        self.metrics.sync_received.inc(data_bytes)

    def count_deduplicated(self, data_bytes: int) -> None:
        self.metrics.sync_deduplicated.inc(max(0, data_bytes))

    async def ready(self) -> str | None:
        """Why the daemon cannot serve jobs right now, or None when it can."""
        try:
            await asyncio.wait_for(self.jobs.counts(), READY_TIMEOUT_S)
        except (FetchmlError, TimeoutError) as exc:
            return f"job store unreachable: {exc}"
        if not self.scheduler.alive():
            return "scheduler is not running"
        return None

    async def resolve_snapshot(self, text: str) -> str:
        """A full snapshot id from an id or a unique prefix of at least 6 hex digits.

        While a garbage collection runs, the snapshot is kept with everything it names, and
        one it already took objects from is refused: callers hold ``gc_guard``."""
        snapshot = await self._find_snapshot(text.strip().lower())
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

    async def _find_snapshot(self, text: str) -> str:
        if len(text) == 64 and await asyncio.to_thread(self.snapshots.contains, text):
            return text  # a full id names itself: one stat instead of a prefix search
        if len(text) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in text):
            raise BadRequest(f"{text[:80]!r} is not a snapshot id; give at least "
                             f"{MIN_PREFIX} hex digits")
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

    async def handle(self, call: Call[Any]) -> Any:
        return await HANDLERS[call.op](call)

    def observe_request(self, op: str, seconds: float) -> None:
        self.metrics.request_latency.labels(op).observe(seconds)


DAEMON_CORE = web.AppKey("fetchml_core", DaemonCore)


def _knock(request: web.Request) -> Knock:
    """What the connection presents: peer credentials or address, key, proxy and Origin."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    header = request.headers.get("Authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return Knock(unix=peer_credentials(sock), peer=None, key=key or None)
    return Knock(unix=None, peer=request.remote, key=key or None,
                 forwarded_for=request.headers.get("X-Forwarded-For"),
                 origin=request.headers.get("Origin"))


def _refusal(exc: FetchmlError) -> web.Response:
    status = {"unauthenticated": 401, "permission_denied": 403, "rate_limited": 429}.get(
        exc.code, 400)
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.json_response({"error": {"code": exc.code, "message": exc.message,
                                        "details": exc.details}},
                             status=status, headers=headers)


async def websocket_endpoint(request: web.Request) -> web.StreamResponse:
    core = request.app[DAEMON_CORE]
    knock = _knock(request)
    try:
        peer = core.cluster.admit_peer(knock) if core.cluster is not None else None
        identity = peer or core.auth.admit(knock)
    except SlowedRefusal as exc:
        log.info("refused connection: %s", exc.message)
        core.metrics.auth_failures.inc()
        await asyncio.sleep(exc.delay)
        return _refusal(exc)
    except FetchmlError as exc:
        log.info("refused connection: %s", exc.message)
        return _refusal(exc)
    ws = web.WebSocketResponse(
        compress=False,
        max_msg_size=core.limits.max_frame_bytes,
        autoping=True,
        heartbeat=None,
    )
    await ws.prepare(request)
    session = Session(core, ws, identity, identity.source)
    core.sessions.add(session)
    try:
        await session.run()
    finally:
        core.sessions.discard(session)
        if not ws.closed:
            await ws.close()
    return ws


async def ready(request: web.Request) -> web.Response:
    problem = await request.app[DAEMON_CORE].ready()
    if problem:
        return web.json_response({"status": "unavailable", "reason": problem}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    core = request.app[DAEMON_CORE]
    knock = _knock(request)
    if knock.unix is None:  # over TCP, metrics follow the same network policy as sessions
        address = core.auth.policy.client_address(knock.peer, knock.forwarded_for)
        if not core.auth.policy.allows(address):
            return web.json_response({"error": {"code": "permission_denied", "message":
                                                "address not allowed"}}, status=403)
    await core.metrics.refresh(core)
    return web.Response(body=core.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def health(request: web.Request) -> web.Response:
    core = request.app[DAEMON_CORE]
    return web.json_response({"status": "ok", "daemon": f"fetchml/{__version__}",
                              "uptime": round(time.time() - core.started_at, 3)})


async def _core_context(app: web.Application) -> AsyncIterator[None]:
    core = app[DAEMON_CORE]
    await core.open()
    try:
        yield
    finally:
        await core.close()


async def _close_sessions(app: web.Application) -> None:
    sessions = list(app[DAEMON_CORE].sessions)
    if sessions:
        await asyncio.gather(*(s.shutdown() for s in sessions), return_exceptions=True)


def create_metrics_app(core: DaemonCore) -> web.Application:
    """The app of --metrics-listen: metrics, health and readiness only, no sessions."""
    app = web.Application(client_max_size=1024)
    app[DAEMON_CORE] = core
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_open)
    return app


async def metrics_open(request: web.Request) -> web.Response:
    """/metrics on the dedicated metrics listener: whoever can reach it may scrape it."""
    core = request.app[DAEMON_CORE]
    await core.metrics.refresh(core)
    return web.Response(body=core.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def create_app(settings: DaemonSettings) -> web.Application:
    """A complete daemon application; nothing is opened until the app starts."""
    app = web.Application(client_max_size=64 * 1024)
    app[DAEMON_CORE] = DaemonCore(settings)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ws", websocket_endpoint)
    app.cleanup_ctx.append(_core_context)
    app.on_shutdown.append(_close_sessions)
    return app
