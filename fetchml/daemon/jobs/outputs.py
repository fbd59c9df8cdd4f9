"""A job's outputs: stored as a snapshot when its attempt ends, exactly as the job wrote them,
or kept in the run directory with the reason, to be stored later.

Nothing in ``$FETCHML_OUTPUT_DIR`` is ignored: the project's ignore rules are for syncing
code, not for what a job produces (``.git/``, ``__pycache__/``, ``*~`` are kept). What a
snapshot cannot hold faithfully (a symlink whose target is absolute or leaves the outputs, a
name that is not UTF-8, a FIFO, a file that cannot be read) is left out and said in the job's
``warnings``; symlinks that stay inside are kept as links.

When the outputs cannot be stored (the disk is full, the object store cannot be written), the
attempt ends ``failed`` (unless it already failed on its own) with ``outputs_error`` saying
why, its files stay in ``runs/<job>/<attempt>/outputs/``, and a marker
``<state>/outputs-pending/<job>.<attempt>`` remembers them. ``retry_pending`` (when the
daemon starts, after a prune, on each retention pass and every few minutes) and
``fetchml outputs store JOB``
store them once they can; the job keeps its state and its reason says they came late.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fetchml.cas.objects import ObjectStore
from fetchml.cas.scan import scan_tree
from fetchml.daemon.jobs.model import TERMINAL_STATES, Job, JobState
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.supervise.records import read_status
from fetchml.daemon.supervise.rundir import RunDir
from fetchml.errors import Conflict, FetchmlError, NotFound, Unavailable

log = logging.getLogger(__name__)

# Outputs may be large checkpoints: they are never refused for size.
OUTPUT_MAX_FILE = 1 << 50
# Warnings kept on a job: a job that makes a million bad links gets a count, not a million.
MAX_WARNINGS = 20
PENDING_DIR = "outputs-pending"
PENDING_RETRY_S = 300.0  # how often outputs waiting for space are tried again
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_BELOW_BYTES = 64 * 1024  # less free space than a status file may need
NOT_STORED = "outputs not stored: "  # how a job that succeeded otherwise says it failed
STORED_LATE = "outputs stored after the job ended (they could not be stored then)"
OVER_LIMIT = "they went over the output limit, so they stay in the run directory, not stored"


@dataclass(frozen=True)
class Ingested:
    snapshot: str | None  # None: the job wrote nothing
    warnings: tuple[str, ...] = ()


def is_empty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return True


def capped(warnings: Sequence[str]) -> tuple[str, ...]:
    if len(warnings) <= MAX_WARNINGS:
        return tuple(warnings)
    more = len(warnings) - MAX_WARNINGS + 1
    return (*warnings[:MAX_WARNINGS - 1], f"{more} more entries were left out")


def ingest(objects: ObjectStore, snapshots: ObjectStore, outputs: Path,
           owner: int | None = None) -> Ingested:
    """Store the outputs directory as a snapshot (blocking); raises when it cannot.

    ``owner``: the uid the job ran as, when not the daemon's; files of anyone else (a hard
    link to what only the daemon could read) are left out with a warning.
    """
    if not outputs.is_dir() or is_empty_dir(outputs):
        return Ingested(None)
    dropped: list[str] = []
    scan = scan_tree(outputs, rules=None, cache=None, max_file_size=OUTPUT_MAX_FILE,
                     owner=owner, dropped=dropped)
    stored = dict(objects.put_files(scan.sources.values()))
    if set(stored) != set(scan.sources):
        raise Conflict("outputs changed while they were being stored; the job's processes "
                       "must stop writing them before they exit")
    manifest = scan.manifest
    if not snapshots.contains(manifest.snapshot_id):
        snapshots.put_bytes(manifest.encode())
    warnings = capped(dropped)
    for warning in warnings:
        log.warning("outputs of %s: %s", outputs.parent, warning)
    return Ingested(manifest.snapshot_id, warnings)


def disk_full(exc: BaseException) -> bool:
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    return isinstance(cause, OSError) and cause.errno in DISK_FULL


def disk_full_at(path: Path) -> bool:
    """Whether the filesystem holding ``path`` has (next to) no space left for anyone."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    # f_files is 0 where a filesystem has no inode count (btrfs): no inodes to run out of
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES or (st.f_files > 0 and st.f_favail == 0)


def not_stored(job_id: int, exc: BaseException) -> str:
    """``outputs_error`` for outputs that ``exc`` kept from being stored: why, and what to do."""
    if disk_full(exc):
        return ("the disk is full; they stay in the run directory — free space, then "
                f"`fetchml outputs store {job_id}`")
    why = exc.message if isinstance(exc, FetchmlError) else (
        exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
    return (f"{why.split('; ')[0]}; they stay in the run directory — fix that, then "
            f"`fetchml outputs store {job_id}`")


def lost_outputs(job_id: int) -> str:
    return ("the attempt ended without a status, before they were stored; they stay in the "
            f"run directory — `fetchml outputs store {job_id}` stores them")


class PendingOutputs:
    """Outputs left in run directories because they could not be stored, and storing them."""

    def __init__(self, *, state_dir: Path, host: str, store: JobStore, objects: ObjectStore,
                 snapshots: ObjectStore, run_dir_of: Callable[[int, int], Path],
                 on_change: Callable[[Job], None],
                 job_uid: Callable[[Job, Path], int | None] | None = None) -> None:
        self.dir = state_dir / PENDING_DIR
        self.job_uid = job_uid  # the uid an attempt ran as, when not the daemon's
        self.host, self.store = host, store
        self.objects, self.snapshots = objects, snapshots
        self.run_dir_of, self._on_change = run_dir_of, on_change
        self._busy: dict[int, asyncio.Lock] = {}

    def _marker(self, job_id: int, attempt: int) -> Path:
        return self.dir / f"{job_id}.{attempt}"

    def mark(self, job_id: int, attempt: int) -> None:
        """Remember outputs waiting to be stored (blocking; best effort on a full disk)."""
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            self._marker(job_id, attempt).touch()
        except OSError as exc:
            log.warning("job %d: cannot remember its outputs for later (%s); "
                        "`fetchml outputs store %d` stores them", job_id, exc, job_id)

    def clear(self, job_id: int, attempt: int) -> None:
        with contextlib.suppress(OSError):
            self._marker(job_id, attempt).unlink()

    def pending(self) -> list[tuple[int, int]]:
        """(job id, attempt) of every marker, oldest job first."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        found = []
        for name in names:
            job, _, attempt = name.partition(".")
            if job.isdigit() and attempt.isdigit():
                found.append((int(job), int(attempt)))
        return sorted(found)

    async def store_now(self, job: Job) -> Job:
        """Store the outputs ``job``'s last attempt left in its run directory; the job after.

        A job whose outputs are stored already is returned as it is.
        """
        lock = self._busy.setdefault(job.id, asyncio.Lock())
        try:
            async with lock:
                return await self._store(job)
        finally:
            if not lock.locked():
                self._busy.pop(job.id, None)

    async def _store(self, job: Job) -> Job:
        current = await self.store.get(job.id)
        if current is None:
            raise NotFound(f"no job {job.id}; run `fetchml status --all` to see the job ids")
        job = current
        if job.state not in TERMINAL_STATES:
            raise Conflict(f"job {job.id} is {job.state}; its outputs are stored when it ends")
        if job.outputs is not None:
            return job
        if job.host is not None and job.host != self.host:
            raise Conflict(f"job {job.id} ran on host {job.host}; run `fetchml outputs store "
                           f"{job.id}` against that host's daemon")
        run_dir = self.run_dir_of(job.id, job.attempt)
        status = await asyncio.to_thread(read_status, run_dir)
        if status is not None and status.limit == "output":
            raise Conflict(f"job {job.id}'s outputs went over the output limit; they stay in "
                           f"{RunDir(run_dir).outputs} and are not stored")
        outputs_dir = RunDir(run_dir).outputs
        if job.attempt == 0 or await asyncio.to_thread(is_empty_dir, outputs_dir):
            await asyncio.to_thread(self.clear, job.id, job.attempt)
            raise NotFound(f"job {job.id} has no outputs to store: its run directory holds none")
        job_uid = self.job_uid
        owner = None if job_uid is None else await asyncio.to_thread(job_uid, job, run_dir)
        try:
            ingested = await asyncio.to_thread(ingest, self.objects, self.snapshots,
                                               outputs_dir, owner)
        except (FetchmlError, OSError) as exc:
            if disk_full(exc):
                raise Unavailable(f"job {job.id}'s outputs are still not stored: the disk is "
                                  f"full; free space, then `fetchml outputs store {job.id}` "
                                  "again") from exc
            raise Unavailable(f"job {job.id}'s outputs are still not stored: "
                              f"{not_stored(job.id, exc)}") from exc
        assert ingested.snapshot is not None
        reason = job.reason
        if job.outputs_error is not None and reason == NOT_STORED + job.outputs_error:
            reason = STORED_LATE
        elif job.state is JobState.LOST or job.outputs_error is not None:
            reason = f"{reason}; {STORED_LATE}" if reason else STORED_LATE
        try:
            updated = await self.store.store_outputs(job.id, job.attempt, ingested.snapshot,
                                                     (*job.warnings, *ingested.warnings),
                                                     reason)
        except Conflict:
            again = await self.store.get(job.id)
            if again is None or again.outputs is None:
                raise
            updated = again
        await asyncio.to_thread(self.clear, job.id, job.attempt)
        log.info("job %d: outputs stored (%s)", job.id, ingested.snapshot[:12])
        self._on_change(updated)
        return updated

    async def retry_pending(self) -> int:
        """Store what waits for space, where it can now be stored; how many jobs were."""
        stored = 0
        for job_id, attempt in await asyncio.to_thread(self.pending):
            try:
                job = await self.store.get(job_id)
            except Unavailable:
                return stored
            if job is None or job.attempt != attempt or job.outputs is not None:
                await asyncio.to_thread(self.clear, job_id, attempt)
                continue
            if job.state not in TERMINAL_STATES:
                continue  # its result is being recorded
            try:
                await self.store_now(job)
            except (NotFound, Conflict) as exc:
                log.info("job %d: outputs not kept for later: %s", job_id, exc)
                await asyncio.to_thread(self.clear, job_id, attempt)
            except FetchmlError as exc:
                log.info("%s", exc)
                if isinstance(exc.__cause__, BaseException) and disk_full(exc.__cause__):
                    break  # no use trying the others while the disk is full
            else:
                stored += 1
        return stored
