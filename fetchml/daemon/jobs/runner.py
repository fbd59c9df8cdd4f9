"""One attempt of one job: workspace, supervisor, outputs, result; and re-adoption on start.

An attempt lives in ``runs/<job>/<attempt>/``: ``work/`` (an exact copy of the snapshot, the
job's cwd), ``outputs/`` ($FETCHML_OUTPUT_DIR, stored as a snapshot when the job ends),
``output.log``, and the supervisor's files (spec.json, supervisor.json, status.json). The job
runs under a per-job supervisor in its own session, so it outlives the daemon; the daemon only
watches the supervisor's pid and reads status.json when it is gone.

Restarting after a crash, each attempt the store says runs here is in one of these states:
ended (status.json: record it), running (a live supervisor: watch it again), never launched
(no spec.json, or nobody took it within a grace period: launch it now, same attempt), or gone
(its supervisor died without a status: lost, or retried when attempts are left).

When ``job_identity`` names credentials for a job's owner (a root daemon, a job of anyone but
local root), the job runs as them: its workspace, outputs and metrics file are handed to that
uid, the path to its run directory is made traversable (search, never listing: 0711) and
everything else of the run directory stays the daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.materialize import materialize
from fetchml.cas.objects import ObjectStore
from fetchml.daemon.jobs.inventory import HostInventory
from fetchml.daemon.jobs.model import AttemptResult, Job, JobState
from fetchml.daemon.jobs.outputs import (
    NOT_STORED,
    OVER_LIMIT,
    Ingested,
    PendingOutputs,
    disk_full_at,
    ingest,
    is_empty_dir,
    lost_outputs,
    not_stored,
)
from fetchml.daemon.security.job_identity import JobCredentials, hand_over_job_files, home_of
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.supervise.launcher import SupervisorLauncher
from fetchml.daemon.supervise.processes import (
    kill_orphaned_job,
    process_matches,
    signal_supervisor,
    wait_process_exit,
)
from fetchml.daemon.supervise.records import (
    RunSpec,
    RunStatus,
    read_status,
    read_supervisor_info,
    write_json_atomic,
)
from fetchml.daemon.supervise.rundir import RunDir
from fetchml.daemon.tasks import cancel_and_wait
from fetchml.errors import BadRequest, Conflict, FetchmlError, NotFound, Unavailable

log = logging.getLogger(__name__)

# Variables of the daemon's own environment that never reach a job.
PRIVATE_ENV_PREFIXES = ("FETCHML_",)
PRIVATE_ENV = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                         "LISTEN_PID", "LISTEN_FDNAMES", "CUDA_VISIBLE_DEVICES",
                         "NVIDIA_VISIBLE_DEVICES", "INVOCATION_ID", "JOURNAL_STREAM"})
# After a crash, how long an attempt with a spec but no supervisor may take to show one: a
# supervisor handed its run directory locks spec.json within milliseconds.
ADOPT_GRACE_S = 2.0
ADOPT_POLL_S = 0.02
# While the job store is unavailable (locked, disk full, Redis restarting) a result is retried
# until it is stored, waiting a little longer each time up to the cap.
RECORD_RETRY_S, RECORD_RETRY_MAX_S = 0.5, 5.0
MANIFEST_CACHE = 64  # snapshots kept decoded: sweeps reuse one
PRIVATE_DIR_MODE = 0o700
# A run directory and its parents when the job runs as another user: it may pass through them
# to what it owns, never list them (other runs stay out of sight).
TRAVERSE_MODE = 0o711


def base_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment minus its own settings, secrets and service plumbing."""
    return {k: v for k, v in environ.items()
            if k not in PRIVATE_ENV and not k.startswith(PRIVATE_ENV_PREFIXES)}


@dataclass
class Attempt:
    job: Job
    run_dir: Path
    pid: int
    create_time: float


def result_from_status(job: Job, status: RunStatus, outputs: str | None,
                       outputs_error: str | None = None,
                       warnings: tuple[str, ...] = ()) -> AttemptResult:
    """How the supervisor's status.json reads as an attempt's result.

    Outputs that could not be stored (``outputs_error``) fail an attempt that would otherwise
    have succeeded, with that reason.
    """
    common = {"exit_code": status.exit_code, "signal": status.signal,
              "peak_rss": status.peak_rss, "cpu_time": status.cpu_time, "outputs": outputs,
              "outputs_error": outputs_error, "warnings": warnings}
    if status.reason == "cancelled":  # the store keeps the reason given with the cancel
        return AttemptResult(JobState.CANCELLED, **common)  # type: ignore[arg-type]
    if status.reason == "timeout":
        reason = f"timed out after {job.timeout:g} s"
        return AttemptResult(JobState.FAILED, **common, reason=reason)  # type: ignore[arg-type]
    if status.reason == "limit":  # the error names the limit: "memory limit 200M exceeded"
        return AttemptResult(JobState.FAILED, **common,  # type: ignore[arg-type]
                             reason=status.error or "stopped by a resource limit")
    if status.reason == "spawn_failed":
        return AttemptResult(JobState.FAILED, **common,  # type: ignore[arg-type]
                             reason=status.error or "the command could not be started")
    if status.exit_code == 0 and outputs_error is not None:
        return AttemptResult(JobState.FAILED, **common,  # type: ignore[arg-type]
                             reason=NOT_STORED + outputs_error)
    if status.exit_code == 0:
        return AttemptResult(JobState.SUCCEEDED, **common)  # type: ignore[arg-type]
    if status.error:  # e.g. the disk was full when the supervisor recorded the end
        how = (f": killed by signal {status.signal}" if status.signal is not None
               else f": exit {status.exit_code}" if status.exit_code is not None else "")
        return AttemptResult(JobState.FAILED, **common,  # type: ignore[arg-type]
                             reason=f"attempt {job.attempt} failed{how}; {status.error}")
    return AttemptResult(JobState.FAILED, **common)  # type: ignore[arg-type]


def lock_holder(path: Path) -> int | None:
    """The pid holding a flock on ``path`` (the supervisor locks its spec.json), or None."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii") as locks:
            lines = locks.readlines()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            pid = int(fields[4]) if fields[4].isdigit() else 0
            if pid > 0:
                return pid
    return None


@dataclass
class RunnerHooks:
    """Where features plug into starting an attempt, in this order:

    ``before_prepare`` (async, e.g. fetch a snapshot's objects from a peer), ``workspace``
    (blocking, once the snapshot is materialised: e.g. expose datasets), ``environment`` (extra
    variables), ``spec`` (rewrite how the job is started: e.g. a sandbox, resource limits).
    """

    before_prepare: list[Callable[[Job], Awaitable[None]]] = field(default_factory=list)
    workspace: list[Callable[[Job, Path], None]] = field(default_factory=list)
    environment: list[Callable[[Job, Path], Mapping[str, str]]] = field(default_factory=list)
    spec: list[Callable[[RunSpec, Job, Path], RunSpec]] = field(default_factory=list)


class Runner:
    """Starts attempts the scheduler claimed, watches them, and records how they end.

    ``on_change(job)`` is called with every change it makes to a job (once durable);
    ``on_end(job_id)`` as soon as an attempt's processes are gone, so their resources are free.
    """

    def __init__(self, *, state_dir: Path, host: str, store: JobStore, objects: ObjectStore,
                 snapshots: ObjectStore, inventory: HostInventory, kill_grace: float,
                 environ: Mapping[str, str], on_change: Callable[[Job], None],
                 on_end: Callable[[int], None], hooks: RunnerHooks | None = None,
                 job_identity: Callable[[str], JobCredentials | None] | None = None) -> None:
        self.runs_dir = state_dir / "runs"
        # owner -> who the job runs as (None: the daemon's user); None: always the daemon's.
        self.job_identity = job_identity
        self.host, self.store = host, store
        self.objects, self.snapshots = objects, snapshots
        self.inventory, self.kill_grace = inventory, kill_grace
        self.base_env = base_environment(environ)
        self._on_change, self._on_end = on_change, on_end
        self.launcher = SupervisorLauncher(environ=self.base_env)
        self.attempts: dict[int, Attempt] = {}
        self._starting: dict[int, bool] = {}  # job id -> whether a cancel came meanwhile
        self._settling: set[int] = set()  # attempts ended whose result is being recorded
        self._tasks: set[asyncio.Task[None]] = set()
        self._manifests: dict[str, SnapshotManifest] = {}
        self.hooks = hooks or RunnerHooks()
        self.outputs = PendingOutputs(state_dir=state_dir, host=host, store=store,
                                      objects=objects, snapshots=snapshots,
                                      run_dir_of=self.run_dir, on_change=on_change,
                                      job_uid=self._job_uid)

    async def open(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        if self.job_identity is not None and os.geteuid() == 0:
            os.chmod(self.runs_dir, TRAVERSE_MODE)  # jobs of other users pass through it
        await self.launcher.start()

    async def close(self) -> None:
        """Stop watching; the jobs themselves keep running and are re-adopted on start."""
        await cancel_and_wait(*self._tasks)
        await self.launcher.close()

    def retry_outputs_soon(self) -> None:
        """Try outputs kept back by a full disk again, in the background (space was freed)."""
        if self.outputs.pending():
            self._spawn(self.outputs.retry_pending(), "outputs-pending")

    def run_dir(self, job_id: int, attempt: int) -> Path:
        return RunDir.of(self.runs_dir, job_id, attempt).path

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- starting ---------------------------------------------------------------------------
    def _manifest(self, snapshot: str) -> SnapshotManifest:
        manifest = self._manifests.get(snapshot)
        if manifest is None:
            manifest = SnapshotManifest.decode(self.snapshots.read_bytes(snapshot))
            if len(self._manifests) >= MANIFEST_CACHE:
                self._manifests.clear()
            self._manifests[snapshot] = manifest
        return manifest

    def _environment(self, job: Job, run_dir: Path,
                     user: JobCredentials | None = None) -> dict[str, str]:
        env = dict(self.base_env)
        if user is not None:  # not the daemon's user: not its name and home either
            name = user.name or str(user.uid)
            env.update(USER=name, LOGNAME=name, HOME=home_of(user, RunDir(run_dir).work))
        env.update(job.env)
        gpus = [g for g in self.inventory.gpus if g.index in job.gpu_ids]
        # UUIDs, not indices, for real GPUs: CUDA's own device order can differ from
        # nvidia-smi's. GPUs declared through FETCHML_GPUS have no UUID CUDA would know.
        visible = ",".join(g.uuid if g.uuid.startswith(("GPU-", "MIG-")) else str(g.index)
                           for g in gpus)
        env.update({
            "FETCHML_JOB_ID": str(job.id),
            "FETCHML_ATTEMPT": str(job.attempt),
            "FETCHML_SNAPSHOT": job.snapshot,
            "FETCHML_OUTPUT_DIR": str(RunDir(run_dir).outputs),
            "FETCHML_RUN_DIR": str(run_dir),
            "FETCHML_GPU_IDS": ",".join(str(g) for g in job.gpu_ids),
            "CUDA_VISIBLE_DEVICES": visible,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "NVIDIA_VISIBLE_DEVICES": visible or "none",
        })
        for extra in self.hooks.environment:
            env.update(extra(job, run_dir))
        return env

    def _prepare(self, job: Job, run_dir: Path) -> None:
        """Materialise the snapshot and write the supervisor's spec (blocking)."""
        manifest = self._manifest(job.snapshot)
        user = self.job_identity(job.owner) if self.job_identity is not None else None
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a half-prepared attempt from before a crash
        with contextlib.suppress(FileExistsError):
            os.mkdir(run_dir.parent, PRIVATE_DIR_MODE)
        os.mkdir(run_dir, PRIVATE_DIR_MODE)
        if user is not None:
            os.chmod(run_dir.parent, TRAVERSE_MODE)
            os.chmod(run_dir, TRAVERSE_MODE)
        os.mkdir(RunDir(run_dir).outputs)
        work = RunDir(run_dir).work
        materialize(manifest, self.objects, work)
        cwd = work / job.workdir if job.workdir else work
        if job.workdir and (not cwd.is_dir() or cwd.is_symlink()):
            raise BadRequest(f"workdir {job.workdir!r} is not a directory of the snapshot; "
                             "queue the job with a --workdir that exists")
        for expose in self.hooks.workspace:
            expose(job, run_dir)
        if user is not None:
            hand_over_job_files(run_dir, user)
        spec = RunSpec(argv=tuple(job.argv), env=self._environment(job, run_dir, user),
                       cwd=str(cwd), timeout=job.timeout, kill_grace=self.kill_grace)
        if user is not None:
            spec = replace(spec, uid=user.uid, gid=user.gid, groups=user.groups)
        for rewrite in self.hooks.spec:
            spec = rewrite(spec, job, run_dir)
        write_json_atomic(RunDir(run_dir).spec, spec.to_dict())

    async def start(self, job: Job, claimed: Awaitable[Job | None] | None = None) -> None:
        """Start attempt ``job.attempt`` of ``job``; never raises (a failure is recorded).

        With ``claimed``, ``job`` is what the job will be once a claim being committed now
        succeeds: the workspace is prepared meanwhile, and the attempt launched only if the
        claim comes back (as the job it returns); otherwise the workspace is removed.
        """
        run_dir = self.run_dir(job.id, job.attempt)
        self._starting[job.id] = False
        failure: str | None = None
        try:
            try:
                for fetch in self.hooks.before_prepare:
                    await fetch(job)
                await asyncio.to_thread(self._prepare, job, run_dir)
            except (FetchmlError, OSError) as exc:
                failure = exc.message if isinstance(exc, FetchmlError) else str(exc)
            except Exception:
                log.exception("job %d attempt %d could not be prepared", job.id, job.attempt)
                failure = "the daemon failed to prepare it; see its log"
            if claimed is not None:
                confirmed = await claimed
                if confirmed is None or confirmed.attempt != job.attempt:
                    await asyncio.to_thread(shutil.rmtree, run_dir, True)
                    return
                job = confirmed
            if failure is None:
                try:
                    handle = await self.launcher.launch(run_dir)
                except FetchmlError as exc:
                    failure = exc.message
        finally:
            cancelled = self._starting.pop(job.id, False)
        if failure is not None:
            log.warning("job %d attempt %d could not start: %s", job.id, job.attempt, failure)
            self._ended(job.id)
            await self._record(job, AttemptResult(JobState.FAILED,
                                                  reason=f"could not start: {failure}"))
            return
        self._watch(Attempt(job, run_dir, handle.pid, handle.create_time))
        if cancelled:
            self.cancel(job.id)

    def _watch(self, attempt: Attempt) -> None:
        self.attempts[attempt.job.id] = attempt
        self._spawn(self._follow(attempt), f"job-{attempt.job.id}")

    async def _follow(self, attempt: Attempt) -> None:
        await wait_process_exit(attempt.pid, attempt.create_time)
        await self._conclude(attempt.job, attempt.run_dir)

    # -- ending -----------------------------------------------------------------------------
    async def _conclude(self, job: Job, run_dir: Path) -> None:
        """Record how the attempt ended; its supervisor is gone."""
        status = read_status(run_dir)
        if status is None:
            await self._lost(job, run_dir, "its supervisor vanished without a status")
            return
        self._ended(job.id)  # the tree is gone (status.json is written last): free its share
        # One turn of the loop lets the woken scheduler queue its claim of the next job before
        # this result: the claim is what a waiting job's start hangs on, and both then go to
        # the store together, in one commit.
        await asyncio.sleep(0)
        ingested, error = Ingested(None), None
        # Outputs over their limit stay in the run directory: storing them is what it prevents.
        outputs_dir = RunDir(run_dir).outputs
        if not is_empty_dir(outputs_dir):
            if status.limit == "output":
                error = OVER_LIMIT
            else:
                try:
                    ingested = await asyncio.to_thread(self._ingest, job, run_dir)
                except (FetchmlError, OSError) as exc:
                    log.warning("job %d: outputs not stored: %s", job.id, exc)
                    error = not_stored(job.id, exc)
                    await asyncio.to_thread(self.outputs.mark, job.id, job.attempt)
        result = result_from_status(job, status, ingested.snapshot, error, ingested.warnings)
        # finished when its processes ended, not when the daemon got round to recording it
        await self._record(job, result, status.finished_at)

    def _ingest(self, job: Job, run_dir: Path) -> Ingested:
        """Store the attempt's outputs (blocking); only files of the uid it ran as are read."""
        return ingest(self.objects, self.snapshots, RunDir(run_dir).outputs,
                      owner=self._job_uid(job, run_dir))

    def _job_uid(self, job: Job, run_dir: Path) -> int | None:
        """The uid the attempt ran as when not the daemon's: from its spec, else (a podman
        container, started by the daemon's user) from its owner."""
        try:
            uid = RunSpec.from_dict(json.loads(RunDir(run_dir).spec.read_bytes())).uid
        except (OSError, ValueError, BadRequest):
            uid = None
        if uid is None and self.job_identity is not None:
            user = self.job_identity(job.owner)
            uid = None if user is None else user.uid
        return uid

    async def _lost(self, job: Job, run_dir: Path, why: str) -> None:
        info = read_supervisor_info(run_dir)
        if info is not None and await asyncio.to_thread(kill_orphaned_job, info):
            log.warning("job %d: killed its orphaned process group", job.id)
        log.warning("job %d attempt %d: %s", job.id, job.attempt, why)
        self._ended(job.id)
        error = None
        if not is_empty_dir(RunDir(run_dir).outputs):
            error = lost_outputs(job.id)
            await asyncio.to_thread(self.outputs.mark, job.id, job.attempt)
        state = JobState.LOST
        if disk_full_at(run_dir):  # what kept its supervisor from writing how it ended
            state, why = JobState.FAILED, f"{why}: the disk of its run directory is full"
        await self._record(job, AttemptResult(state, reason=why, outputs_error=error))

    async def _record(self, job: Job, result: AttemptResult, ended: float | None = None) -> None:
        """Store ``result`` for the attempt ``job`` holds (fenced by its attempt number)."""
        updated = None
        delay = RECORD_RETRY_S
        try:
            while True:
                try:
                    updated = await self.store.finish(job.id, job.attempt, result,
                                                      time.time() if ended is None else ended)
                except (Conflict, NotFound) as exc:  # fencing: this attempt no longer holds it
                    log.warning("job %d: result of attempt %d rejected: %s", job.id,
                                job.attempt, exc)
                    with contextlib.suppress(FetchmlError):
                        current = await self.store.get(job.id)
                        if current is not None and current.attempt == job.attempt and (
                                current.state is not JobState.RUNNING):
                            updated = current  # an earlier try was stored, its answer lost
                except Unavailable as exc:
                    if delay == RECORD_RETRY_S:
                        log.warning("job %d: result not stored yet (%s); retrying", job.id,
                                    exc)
                    await asyncio.sleep(delay)
                    delay = min(RECORD_RETRY_MAX_S, delay * 2)
                    continue
                break
        finally:
            self._settling.discard(job.id)
        if updated is not None:
            self._on_change(updated)

    def _ended(self, job_id: int) -> None:
        self.attempts.pop(job_id, None)
        self._settling.add(job_id)  # until _record, which always follows
        self._on_end(job_id)

    def holds(self, job_id: int) -> bool:
        """Whether an attempt of ``job_id`` is being started, runs, or is being recorded here."""
        return job_id in self.attempts or job_id in self._starting or job_id in self._settling

    # -- cancel and adoption ----------------------------------------------------------------
    def cancel(self, job_id: int) -> bool:
        """Ask the supervisor of a running attempt to stop it (TERM, grace, KILL)."""
        if job_id in self._starting:
            self._starting[job_id] = True  # signalled as soon as its supervisor exists
            return True
        attempt = self.attempts.get(job_id)
        if attempt is None:
            return False
        return signal_supervisor(attempt.pid, attempt.create_time, signal.SIGTERM)

    def _supervisor_of(self, run_dir: Path) -> tuple[int, float] | None:
        info = read_supervisor_info(run_dir)
        if info is not None:
            return info.pid, info.create_time
        # Before it writes supervisor.json, a supervisor is the one holding spec.json locked.
        holder = lock_holder(RunDir(run_dir).spec)
        if holder is not None:
            try:
                return holder, psutil.Process(holder).create_time()
            except psutil.Error:
                return None
        return None

    async def adopt(self) -> list[Job]:
        """Take over the attempts this host was running before a restart.

        Returns the jobs whose attempts still hold resources here (watched again, or being
        started or looked after); the others are recorded as ended, lost or retried.
        """
        held = []
        for job in await self.store.running(self.host):
            run_dir = self.run_dir(job.id, job.attempt)
            if read_status(run_dir) is not None:
                log.info("job %d ended while the daemon was away", job.id)
                await self._conclude(job, run_dir)
                continue
            supervisor = self._supervisor_of(run_dir)
            if supervisor is not None and process_matches(*supervisor):
                log.info("re-adopting job %d (supervisor pid %d)", job.id, supervisor[0])
                self._watch(Attempt(job, run_dir, *supervisor))
                if job.cancel_requested:
                    self.cancel(job.id)
            elif supervisor is not None:
                if read_status(run_dir) is not None:  # it ended just now
                    log.info("job %d ended while the daemon was away", job.id)
                    await self._conclude(job, run_dir)
                else:
                    await self._lost(job, run_dir, "its supervisor is gone (daemon or host "
                                     "crash)")
                continue
            else:
                self._starting[job.id] = job.cancel_requested
                self._spawn(self._resume(job, run_dir), f"resume-{job.id}")
            held.append(job)
        return held

    async def _resume(self, job: Job, run_dir: Path) -> None:
        """An attempt with no supervisor on record: find the one starting, or start it."""
        deadline = time.monotonic() + ADOPT_GRACE_S
        while RunDir(run_dir).spec.exists() and time.monotonic() < deadline:
            supervisor = self._supervisor_of(run_dir)
            if supervisor is not None and process_matches(*supervisor):
                cancelled = self._starting.pop(job.id, False)
                log.info("re-adopting job %d (supervisor pid %d)", job.id, supervisor[0])
                self._watch(Attempt(job, run_dir, *supervisor))
                if cancelled:
                    self.cancel(job.id)
                return
            if read_status(run_dir) is not None:
                self._starting.pop(job.id, None)
                log.info("job %d ended while the daemon was away", job.id)
                await self._conclude(job, run_dir)
                return
            await asyncio.sleep(ADOPT_POLL_S)
        cancelled = self._starting.pop(job.id, False)
        if cancelled:
            self._ended(job.id)
            await self._record(job, AttemptResult(JobState.CANCELLED))
            return
        log.info("job %d attempt %d was never launched; launching it now", job.id, job.attempt)
        await self.start(job)
