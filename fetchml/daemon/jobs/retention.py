"""Pruning finished jobs, pins, and garbage collection of the store from live roots.

Live roots: the snapshot and outputs of every job still recorded (queued, running or kept),
pinned snapshots, dataset versions, manifests younger than the grace period, and whatever an
open session touched while a collection runs (objects a sync was told it need not upload,
snapshots it stored or resolved). Objects younger than the grace period are never deleted.
Deletion runs in small batches under the lock that snapshot.put also takes, so a collection
never holds up a submit or a sync for more than a few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetchml.cas import gc
from fetchml.cas.objects import ObjectStore
from fetchml.daemon.jobs.model import TERMINAL_STATES, Job, JobState
from fetchml.daemon.store.contract import JobStore
from fetchml.errors import IntegrityError, InternalError, NotFound

log = logging.getLogger(__name__)

PINS_NAME = "pins.json"


@dataclass(frozen=True)
class PruneReport:
    jobs: int = 0
    runs: int = 0
    objects: int = 0
    bytes: int = 0
    snapshots: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "runs": self.runs, "objects": self.objects,
                "bytes": self.bytes, "snapshots": self.snapshots, "dry_run": self.dry_run}


class Pins:
    """Snapshot ids kept from garbage collection, in ``<state>/pins.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PINS_NAME
        try:
            self.ids: dict[str, str] = dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            self.ids = {}
        except (OSError, ValueError) as exc:
            raise InternalError(f"{self.path} is unreadable ({exc}); fix or remove it") from exc

    def _save(self) -> None:
        tmp = self.path.with_name(f".{PINS_NAME}.tmp")
        tmp.write_text(json.dumps(self.ids, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def pin(self, snapshot: str, by: str) -> None:
        self.ids[snapshot] = by
        self._save()

    def unpin(self, snapshot: str) -> None:
        if self.ids.pop(snapshot, None) is None:
            raise NotFound(f"snapshot {snapshot[:12]} is not pinned; `fetchml pin --list` "
                           "shows the pins")
        self._save()


class SweepGate:
    """Many requests that rely on stored objects (syncs, submits) may hold it at once; a sweep
    batch holds it alone. A waiting sweep stops new holders, so collections never starve."""

    def __init__(self) -> None:
        self._holders = 0
        self._sweeping = False
        self._sweep_waiting = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._sweeping and not self._sweep_waiting)
            self._holders += 1
        try:
            yield
        finally:
            async with self._changed:
                self._holders -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._sweep_waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._sweeping and not self._holders)
            finally:
                self._sweep_waiting -= 1
            self._sweeping = True
        try:
            yield
        finally:
            async with self._changed:
                self._sweeping = False
                self._changed.notify_all()


class GarbageCollector:
    """One collection at a time; remembers what sessions touch while it runs."""

    def __init__(self, objects: ObjectStore, snapshots: ObjectStore, store: JobStore,
                 pins: Pins, gate: SweepGate,
                 extra_roots: Callable[[], Iterable[str]] = tuple) -> None:
        self.objects, self.snapshots, self.store, self.pins = objects, snapshots, store, pins
        self.gate = gate  # requests that rely on stored objects share it; sweeps take it alone
        self.extra_roots = extra_roots
        self._running = asyncio.Lock()
        self._fresh_objects: set[str] | None = None  # set only while a collection runs
        self._fresh_snapshots: set[str] = set()
        self._expanded: set[str] = set()  # fresh snapshots whose objects are protected too

    @property
    def running(self) -> bool:
        return self._fresh_objects is not None

    # -- hooks for sessions ------------------------------------------------------------------
    def protect_objects(self, oids: Iterable[str]) -> None:
        """A session relies on these objects staying (cas.missing said they are stored)."""
        if self._fresh_objects is not None:
            self._fresh_objects.update(oids)

    def protect_snapshot(self, snapshot: str, oids: Iterable[str] = ()) -> None:
        """A snapshot was just stored or named by a request; keep it and what it names."""
        if self._fresh_objects is not None:
            self._fresh_snapshots.add(snapshot)
            self._fresh_objects.update(oids)

    # -- collection ---------------------------------------------------------------------------
    async def roots(self, grace_s: float, now: float, ignore_jobs: Collection[int] = ()
                    ) -> set[str]:
        jobs = [job for job in await self.store.list() if job.id not in ignore_jobs]
        roots = {job.snapshot for job in jobs} | {job.outputs for job in jobs if job.outputs}
        roots |= set(self.pins.ids) | set(self.extra_roots())
        young = await asyncio.to_thread(gc.young_entries, self.snapshots,
                                        newer_than=now - grace_s)
        return roots | set(young)

    async def collect(self, grace_s: float, *, dry_run: bool = False,
                      ignore_jobs: Collection[int] = ()) -> tuple[int, int, int]:
        """(objects, bytes, manifests) deleted, or that would be with ``dry_run``; a dry run
        counts ``ignore_jobs`` (the ones a prune would delete) as gone already."""
        async with self._running:
            self._fresh_objects, self._fresh_snapshots, self._expanded = set(), set(), set()
            try:
                return await self._collect(grace_s, dry_run, ignore_jobs)
            finally:
                self._fresh_objects, self._fresh_snapshots = None, set()

    async def _expand_fresh_snapshots(self) -> None:
        """Protect the objects of snapshots that requests named since the collection began."""
        for snapshot in self._fresh_snapshots - self._expanded:
            self._expanded.add(snapshot)
            marks = await asyncio.to_thread(gc.mark, self.snapshots, [snapshot])
            if self._fresh_objects is not None:
                self._fresh_objects.update(raw.hex() for raw in marks.live)

    async def _collect(self, grace_s: float, dry_run: bool, ignore_jobs: Collection[int]
                       ) -> tuple[int, int, int]:
        now = time.time()
        roots = await self.roots(grace_s, now, ignore_jobs)
        marks = await asyncio.to_thread(gc.mark, self.snapshots, roots)
        if marks.unreadable:
            raise IntegrityError(
                f"gc deleted nothing: live snapshot {marks.unreadable[0][:12]} cannot be read, so "
                "the objects it needs are unknown; run `fetchml fsck` and prune the jobs that "
                "use it")
        cutoff = now - grace_s
        manifests = 0
        for batch in await asyncio.to_thread(
                lambda: list(gc.find_garbage(self.snapshots, gc.MarkResult(), older_than=cutoff))):
            async with self.gate.exclusive():
                doomed = [g for g in batch if g.oid not in roots
                          and g.oid not in self._fresh_snapshots]
                if not dry_run:
                    manifests += (await asyncio.to_thread(gc.delete, self.snapshots, doomed))[0]
                else:
                    manifests += len(doomed)
        count = size = 0
        batches = gc.find_garbage(self.objects, marks, older_than=cutoff)
        while (chunk := await asyncio.to_thread(_next_batch, batches)) is not None:
            async with self.gate.exclusive():  # a sync or submit waits at most one batch
                await self._expand_fresh_snapshots()
                fresh = self._fresh_objects or set()
                doomed = [g for g in chunk if g.oid not in fresh]
                if dry_run:
                    count += len(doomed)
                    size += sum(g.size for g in doomed)
                else:
                    removed, freed = await asyncio.to_thread(gc.delete, self.objects, doomed)
                    count, size = count + removed, size + freed
        log.info("gc %s %d objects (%d bytes) and %d manifests", "would delete" if dry_run
                 else "deleted", count, size, manifests)
        return count, size, manifests


def _next_batch(batches: Iterator[list[gc.Garbage]]) -> list[gc.Garbage] | None:
    return next(batches, None)


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def select_for_prune(jobs: list[Job], *, older_than: float | None, keep: int | None,
                     now: float) -> list[Job]:
    """Finished jobs older than ``older_than``, minus the ``keep`` newest of the selection."""
    chosen = [j for j in jobs if j.state in TERMINAL_STATES and
              (older_than is None or (j.finished_at or j.created_at) <= now - older_than)]
    chosen.sort(key=lambda j: (j.finished_at or j.created_at, j.id), reverse=True)
    return chosen[keep:] if keep else chosen


async def prune_jobs(store: JobStore, runs_dir: Path, *, owner: str | None,
                     states: set[JobState] | None, older_than: float | None,
                     keep: int | None, dry_run: bool) -> tuple[list[int], int, int]:
    """Delete finished jobs' run directories and records: (job ids, runs, bytes)."""
    wanted = (states or set(TERMINAL_STATES)) & set(TERMINAL_STATES)
    jobs = await store.list(states=wanted, owner=owner)
    doomed = select_for_prune(jobs, older_than=older_than, keep=keep, now=time.time())
    runs = size = 0
    for job in doomed:
        job_dir = runs_dir / str(job.id)
        if not job_dir.is_dir():
            continue
        attempts = [p for p in job_dir.iterdir() if p.is_dir()]
        runs += len(attempts)
        size += await asyncio.to_thread(_tree_size, job_dir)
        if not dry_run:
            await asyncio.to_thread(shutil.rmtree, job_dir, True)
    ids = [j.id for j in doomed]
    if not dry_run:
        await store.delete(ids)
    return ids, runs, size


@contextlib.asynccontextmanager
async def periodic(interval: float, work: Callable[[], Any]) -> AsyncIterator[None]:
    """Run ``await work()`` every ``interval`` seconds while the context is open."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the retention policy failed; it runs again in %g s", interval)

    task = asyncio.create_task(loop(), name="retention")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
