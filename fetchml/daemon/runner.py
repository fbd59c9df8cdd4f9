"""One attempt of one job: workspace, supervisor, outputs, result; and re-adoption on start.

An attempt lives in ``runs/<job>/<attempt>/``: ``work/`` (an exact copy of the snapshot, the
job's cwd), ``outputs/`` ($FETCHML_OUTPUT_DIR, stored as a snapshot when the job ends),
``output.log``, and the supervisor's files (spec.json, supervisor.json, status.json). The job
runs under a per-job supervisor in its own session, so it outlives the daemon; the daemon only
watches the supervisor's pid and reads status.json when it is gone.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.materialize import materialize
from fetchml.cas.objects import ObjectStore
from fetchml.cas.scan import scan_tree
from fetchml.daemon.launcher import SupervisorLauncher
from fetchml.daemon.processes import (
    RunSpec,
    RunStatus,
    SupervisorInfo,
    kill_orphaned_job,
    process_matches,
    read_status,
    read_supervisor_info,
    signal_supervisor,
    wait_process_exit,
    write_json_atomic,
)
from fetchml.daemon.resources import HostInventory
from fetchml.daemon.store.base import AttemptResult, Job, JobState, JobStore
from fetchml.errors import Conflict, FetchmlError

log = logging.getLogger(__name__)

LAUNCH_FILE = "launch.json"  # the supervisor's pid, written by the daemon right after launch
# Variables of the daemon's own environment that never reach a job.
PRIVATE_ENV_PREFIXES = ("FETCHML_",)
PRIVATE_ENV = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                         "LISTEN_PID", "LISTEN_FDNAMES", "CUDA_VISIBLE_DEVICES",
                         "NVIDIA_VISIBLE_DEVICES", "INVOCATION_ID", "JOURNAL_STREAM"})
# Outputs may be large checkpoints: they are never refused for size.
OUTPUT_MAX_FILE = 1 << 50


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


def _result_from_status(job: Job, status: RunStatus, outputs: str | None) -> AttemptResult:
    common = {"exit_code": status.exit_code, "signal": status.signal,
              "peak_rss": status.peak_rss, "cpu_time": status.cpu_time, "outputs": outputs}
    if status.reason == "cancelled":
        return AttemptResult(JobState.CANCELLED, **common, reason=job.reason)  # type: ignore[arg-type]
    if status.reason == "timeout":
        reason = f"timed out after {job.timeout:g} s"
        return AttemptResult(JobState.FAILED, **common, reason=reason)  # type: ignore[arg-type]
    if status.reason == "spawn_failed":
        return AttemptResult(JobState.FAILED, **common,  # type: ignore[arg-type]
                             reason=status.error or "the command could not be started")
    if status.exit_code == 0:
        return AttemptResult(JobState.SUCCEEDED, **common)  # type: ignore[arg-type]
    return AttemptResult(JobState.FAILED, **common)  # type: ignore[arg-type]


class Runner:
    """Starts attempts the scheduler claimed, watches them, and records how they end."""

    def __init__(self, *, state_dir: Path, host: str, store: JobStore, objects: ObjectStore,
                 snapshots: ObjectStore, inventory: HostInventory, kill_grace: float,
                 environ: Mapping[str, str], on_change: Callable[[Job], None],
                 on_end: Callable[[int], None]) -> None:
        self.runs_dir = state_dir / "runs"
        self.host, self.store = host, store
        self.objects, self.snapshots = objects, snapshots
        self.inventory, self.kill_grace = inventory, kill_grace
        self.base_env = base_environment(environ)
        self._on_change, self._on_end = on_change, on_end
        self.launcher = SupervisorLauncher()
        self.attempts: dict[int, Attempt] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._manifests: dict[str, SnapshotManifest] = {}

    async def open(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.launcher.start()

    async def close(self) -> None:
        """Stop watching; the jobs themselves keep running and are re-adopted on start."""
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self.launcher.close()

    def run_dir(self, job_id: int, attempt: int) -> Path:
        return self.runs_dir / str(job_id) / str(attempt)

    # -- starting ---------------------------------------------------------------------------
    def _manifest(self, snapshot: str) -> SnapshotManifest:
        manifest = self._manifests.get(snapshot)
        if manifest is None:
            manifest = SnapshotManifest.decode(self.snapshots.read_bytes(snapshot))
            if len(self._manifests) > 64:  # a small cache: sweeps reuse one snapshot
                self._manifests.clear()
            self._manifests[snapshot] = manifest
        return manifest

    def _environment(self, job: Job, run_dir: Path) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(job.env)
        gpus = [g for g in self.inventory.gpus if g.index in job.gpu_ids]
        visible = ",".join(g.uuid if g.uuid else str(g.index) for g in gpus)
        env.update({
            "FETCHML_JOB_ID": str(job.id),
            "FETCHML_ATTEMPT": str(job.attempt),
            "FETCHML_SNAPSHOT": job.snapshot,
            "FETCHML_OUTPUT_DIR": str(run_dir / "outputs"),
            "FETCHML_RUN_DIR": str(run_dir),
            "FETCHML_GPU_IDS": ",".join(str(g) for g in job.gpu_ids),
            # UUIDs, not indices: CUDA's own device order can differ from nvidia-smi's.
            "CUDA_VISIBLE_DEVICES": visible,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "NVIDIA_VISIBLE_DEVICES": visible or "none",
        })
        return env

    def _prepare(self, job: Job, run_dir: Path) -> None:
        """Materialise the snapshot and write the supervisor's spec (blocking)."""
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a half-prepared attempt from before a crash
        run_dir.mkdir(parents=True, mode=0o700)
        (run_dir / "outputs").mkdir()
        work = run_dir / "work"
        materialize(self._manifest(job.snapshot), self.objects, work)
        cwd = work / job.workdir if job.workdir else work
        if not cwd.is_dir() or cwd.is_symlink():
            raise FetchmlError(f"workdir {job.workdir!r} is not a directory of the snapshot")
        spec = RunSpec(argv=tuple(job.argv), env=self._environment(job, run_dir),
                       cwd=str(cwd), timeout=job.timeout, kill_grace=self.kill_grace)
        write_json_atomic(run_dir / "spec.json", spec.to_dict())

    async def start(self, job: Job) -> None:
        run_dir = self.run_dir(job.id, job.attempt)
        try:
            await asyncio.to_thread(self._prepare, job, run_dir)
            handle = await self.launcher.launch(run_dir)
        except FetchmlError as exc:
            log.warning("job %d attempt %d could not start: %s", job.id, job.attempt, exc)
            await self._record(job, AttemptResult(JobState.FAILED,
                                                  reason=f"could not start: {exc.message}"))
            return
        await asyncio.to_thread(write_json_atomic, run_dir / LAUNCH_FILE,
                                {"pid": handle.pid, "create_time": handle.create_time})
        self._watch(Attempt(job, run_dir, handle.pid, handle.create_time))

    def _watch(self, attempt: Attempt) -> None:
        self.attempts[attempt.job.id] = attempt
        task = asyncio.create_task(self._follow(attempt), name=f"job-{attempt.job.id}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _follow(self, attempt: Attempt) -> None:
        await wait_process_exit(attempt.pid, attempt.create_time)
        await self._conclude(attempt.job, attempt.run_dir)

    # -- ending -----------------------------------------------------------------------------
    def _ingest_outputs(self, outputs: Path) -> str | None:
        """Store the outputs directory as a snapshot; None when the job wrote nothing."""
        if not outputs.is_dir() or not any(outputs.iterdir()):
            return None
        scan = scan_tree(outputs, rules=IgnoreRules.load(outputs), cache=None,
                         max_file_size=OUTPUT_MAX_FILE)
        stored = dict(self.objects.put_files(scan.sources.values()))
        if set(stored) != set(scan.sources):
            raise FetchmlError("outputs changed while they were being stored")
        manifest = scan.manifest
        if not self.snapshots.contains(manifest.snapshot_id):
            self.snapshots.put_bytes(manifest.encode())
        return manifest.snapshot_id

    async def _conclude(self, job: Job, run_dir: Path) -> None:
        status = await asyncio.to_thread(read_status, run_dir)
        if status is None:
            await self._lost(job, run_dir, "its supervisor vanished without a status")
            return
        try:
            outputs = await asyncio.to_thread(self._ingest_outputs, run_dir / "outputs")
        except FetchmlError as exc:
            log.warning("job %d: outputs not stored: %s", job.id, exc)
            outputs = None
        current = await self.store.get(job.id)
        await self._record(current or job, _result_from_status(current or job, status, outputs))

    async def _lost(self, job: Job, run_dir: Path, why: str) -> None:
        info = await asyncio.to_thread(read_supervisor_info, run_dir)
        if info is not None and await asyncio.to_thread(kill_orphaned_job, info):
            log.warning("job %d: killed its orphaned process group", job.id)
        log.warning("job %d attempt %d: %s", job.id, job.attempt, why)
        try:
            updated = await self.store.mark_lost_or_retry(job.id, job.attempt, why, time.time())
        except Conflict:
            updated = None
        self._finished(job.id, updated)

    async def _record(self, job: Job, result: AttemptResult) -> None:
        try:
            updated = await self.store.finish(job.id, job.attempt, result, time.time())
        except Conflict as exc:  # fencing: this attempt no longer holds the job
            log.warning("job %d: result of attempt %d rejected: %s", job.id, job.attempt, exc)
            updated = None
        self._finished(job.id, updated)

    def _finished(self, job_id: int, updated: Job | None) -> None:
        self.attempts.pop(job_id, None)
        if updated is not None:
            self._on_change(updated)
        self._on_end(job_id)

    # -- cancel and adoption ----------------------------------------------------------------
    def cancel(self, job_id: int) -> bool:
        """Ask the supervisor of a running attempt to stop it (TERM, grace, KILL)."""
        attempt = self.attempts.get(job_id)
        if attempt is None:
            return False
        return signal_supervisor(attempt.pid, attempt.create_time, signal.SIGTERM)

    def _supervisor_of(self, run_dir: Path) -> tuple[int, float] | None:
        info: SupervisorInfo | None = read_supervisor_info(run_dir)
        if info is not None:
            return info.pid, info.create_time
        try:
            import json

            launch = json.loads((run_dir / LAUNCH_FILE).read_text())
            return int(launch["pid"]), float(launch["create_time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def adopt(self) -> list[Job]:
        """Take over the attempts this host was running before a restart; returns them."""
        adopted = []
        for job in await self.store.running(self.host):
            run_dir = self.run_dir(job.id, job.attempt)
            status = await asyncio.to_thread(read_status, run_dir)
            supervisor = await asyncio.to_thread(self._supervisor_of, run_dir)
            if status is not None:
                log.info("job %d ended while the daemon was away", job.id)
                await self._conclude(job, run_dir)
            elif supervisor is not None and process_matches(*supervisor):
                log.info("re-adopting job %d (supervisor pid %d)", job.id, supervisor[0])
                self._watch(Attempt(job, run_dir, *supervisor))
                adopted.append(job)
                if job.cancel_requested:
                    self.cancel(job.id)
            else:
                await self._lost(job, run_dir, "its supervisor is gone (daemon or host crash)")
        return adopted


def logs_path(run_dir: Path) -> Path:
    return run_dir / "output.log"


def attempt_dirs(runs_dir: Path, job_id: int) -> list[Path]:
    base = runs_dir / str(job_id)
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))

