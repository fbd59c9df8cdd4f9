"""Datasets in the daemon: the registry, the per-host cache, and what jobs see.

A job queued with ``--dataset NAME[@V][:MOUNT]`` stores the resolved ``NAME@V[:MOUNT]``. When
an attempt starts, the version's tree is materialised once on this host (``dataset_cache``) and
exposed to the job as a symlink: ``$FETCHML_DATA_DIR/NAME`` (``run/data/NAME``), or ``MOUNT``
inside the workspace. Under ``--isolation bwrap`` the sandbox binds ``<state>/datasets/``
read-only, so writing, deleting or chmod-ing a dataset file fails with EROFS. Without
isolation a job runs as the daemon's user and could alter the cache; the stored objects stay
safe all the same (the cache holds copies, never hard links), and an altered cache is found by
its seal and replaced before the next job uses it.

Dataset versions are garbage-collection roots. Removing a version is refused while a held,
queued or running job uses it: the version is first marked ``removing`` (so no new job can take
it), then the jobs are checked, then it is removed or put back. A submit that raced past the
mark finds it on its own second look and withdraws its jobs, so no job is ever left naming a
removed version, even with several daemons sharing a Redis registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path

from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.cas.paths import validate_path
from fetchml.config import DaemonSettings
from fetchml.daemon.datasets.cache import DatasetCache
from fetchml.daemon.datasets.registry import (
    READY,
    REGISTRY_FILE,
    REMOVED,
    REMOVING,
    DatasetRegistry,
    DatasetVersion,
    SqliteDatasetRegistry,
)
from fetchml.daemon.jobs.model import ACTIVE_STATES, Job
from fetchml.daemon.store import is_redis_url
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.supervise.rundir import DATA_DIR, RunDir
from fetchml.errors import BadRequest, Conflict, FetchmlError, NotFound
from fetchml.protocol.ops_datasets import DatasetRef, parse_ref

log = logging.getLogger(__name__)

MAX_DATASETS_PER_JOB = 32
# Shared registries: how often a daemon looks for changes made by the others (one GET).
REFRESH_S = 1.0


def open_registry(settings: DaemonSettings) -> DatasetRegistry:
    """The registry beside the job store: shared in Redis, else a file in the state dir."""
    if is_redis_url(settings.store):
        from fetchml.daemon.datasets.registry_redis import RedisDatasetRegistry

        return RedisDatasetRegistry(settings.store)
    return SqliteDatasetRegistry(settings.state_dir / REGISTRY_FILE)


def stored_ref(text: str) -> DatasetRef:
    """A job's stored ``NAME@V[:MOUNT]``."""
    ref = parse_ref(text)
    if ref.version is None:
        raise BadRequest(f"dataset reference {text!r} has no version; queue the job again")
    return ref


def label_of(text: str) -> str | None:
    """``NAME@V`` of a job's stored reference; None for one that was never resolved."""
    try:
        return stored_ref(text).label
    except FetchmlError:
        return None


def pick_version(versions: Sequence[DatasetVersion], ref: DatasetRef) -> DatasetVersion:
    """The version ``ref`` names that a new job may use (the latest ready one by default)."""
    if not any(v.state != REMOVED for v in versions):
        raise NotFound(f"there is no dataset {ref.name}; `fetchml dataset list` shows them")
    if ref.version is None:
        ready = [v for v in versions if v.state == READY]
        if not ready:
            raise Conflict(f"every version of dataset {ref.name} is being removed; push a new "
                           "version or wait")
        return ready[-1]
    found = next((v for v in versions if v.version == ref.version), None)
    if found is None or found.state == REMOVED:
        raise NotFound(f"dataset {ref.name} has no version {ref.version}; `fetchml dataset info "
                       f"{ref.name}` lists its versions")
    if found.state == REMOVING:
        raise Conflict(f"dataset {found.ref} is being removed; use another version")
    return found


class DatasetService:
    """One per daemon: resolves references, keeps GC roots, and prepares jobs' data.

    ``fetch(snapshot)``, in a cluster, brings a whole snapshot (manifest and objects) from
    whichever host has it, before a job here uses a dataset this host lacks.
    """

    def __init__(self, jobs: JobStore, objects: ObjectStore, snapshots: ObjectStore, host: str,
                 registry: DatasetRegistry, cache: DatasetCache,
                 fetch: Callable[[str], Awaitable[object]] | None = None) -> None:
        self.jobs, self.objects, self.snapshots, self.host = jobs, objects, snapshots, host
        self.registry, self.cache, self.fetch = registry, cache, fetch
        self._live: frozenset[str] = frozenset()  # snapshots of versions not removed
        self._known: dict[str, DatasetVersion] = {}  # "NAME@V" -> version, as last read
        self._generation: int | None = None
        self._materialising: dict[str, asyncio.Task[Path]] = {}  # snapshot -> the one writer

    async def open(self) -> None:
        """Read the registry, and remove the caches no version still needs."""
        await self.refresh_if_changed()
        started = time.monotonic()
        removed = await asyncio.to_thread(self.cache.sweep, await self.snapshots_in_use())
        if removed:
            log.info("removed %d dataset caches no longer needed in %.2f s", len(removed),
                     time.monotonic() - started)

    async def follow_registry(self) -> None:
        """Shared registries: pick up other daemons' pushes and removals (every REFRESH_S)."""
        try:
            if await self.refresh_if_changed():
                await asyncio.to_thread(self.cache.sweep, await self.snapshots_in_use())
        except FetchmlError as exc:
            log.warning("dataset registry not refreshed: %s", exc.message)

    # -- registry view ------------------------------------------------------------------------
    async def reload(self) -> None:
        """Re-read every version: GC roots and known versions follow the registry."""
        versions = await self.registry.all_versions()
        self._known = {v.ref: v for v in versions}
        self._live = frozenset(v.snapshot for v in versions if v.state != REMOVED)

    def roots(self) -> list[str]:
        """GC roots: snapshots of every version not removed that this host stores."""
        return [s for s in self._live if self.snapshots.contains(s)]

    async def refresh_if_changed(self) -> bool:
        generation = await self.registry.generation()
        if generation == self._generation:
            return False
        await self.reload()
        self._generation = generation
        return True

    async def version(self, name: str, number: int) -> DatasetVersion:
        """A recorded version, removed ones included (job records name those too)."""
        known = self._known.get(f"{name}@{number}")
        if known is not None and known.state == READY:
            return known
        for version in await self.registry.versions(name):
            self._known[version.ref] = version
        found = self._known.get(f"{name}@{number}")
        if found is None:
            raise NotFound(f"dataset {name} has no version {number}; `fetchml dataset info "
                           f"{name}` lists its versions")
        return found

    # -- submit -------------------------------------------------------------------------------
    async def resolve(self, texts: Iterable[str]) -> tuple[str, ...]:
        """A job's ``datasets`` as stored: each ``NAME[@V][:MOUNT]`` as ``NAME@V[:MOUNT]``."""
        refs = [parse_ref(text) for text in texts]
        if len(refs) > MAX_DATASETS_PER_JOB:
            raise BadRequest(f"a job may use at most {MAX_DATASETS_PER_JOB} datasets")
        places: list[str] = []
        resolved = []
        for ref in refs:
            place = validate_path(ref.mount) if ref.mount else f"${DATA_DIR}/{ref.name}"
            for other in places:
                if place == other or place.startswith(other + "/") or \
                        other.startswith(place + "/"):
                    raise BadRequest(f"two datasets of the job would appear at {place}; give "
                                     "each its own NAME or :MOUNT")
            places.append(place)
            version = pick_version(await self.registry.versions(ref.name), ref)
            self._known[version.ref] = version
            resolved.append(ref.resolved(version.version))
        return tuple(resolved)

    async def record(self, draft: DatasetVersion) -> tuple[DatasetVersion, bool]:
        """Record the next version of a dataset (see DatasetRegistry.record); a GC root at once."""
        version, created = await self.registry.record(draft)
        self._known[version.ref] = version
        self._live |= {version.snapshot}
        return version, created

    async def withdrawn(self, resolved: Iterable[str]) -> list[str]:
        """Of these stored references, the versions no longer ready (a removal raced)."""
        gone = []
        for ref in {stored_ref(text).label for text in resolved}:
            name, _, number = ref.partition("@")
            current = next((v for v in await self.registry.versions(name)
                            if v.version == int(number)), None)
            if current is None or current.state != READY:
                gone.append(ref)
        return sorted(gone)

    # -- removal ------------------------------------------------------------------------------
    async def users(self, refs: set[str]) -> list[Job]:
        """Held, queued or running jobs that use any of these ``NAME@V``."""
        jobs = await self.jobs.list(states=ACTIVE_STATES)
        return [job for job in jobs if any(label_of(text) in refs for text in job.datasets)]

    async def remove(self, versions: Sequence[DatasetVersion]) -> list[Job]:
        """Remove these versions, or return the active jobs that use them (nothing removed)."""
        marked = []
        try:
            for version in versions:
                marked.append(await self.registry.set_state(
                    version.name, version.version, REMOVING, expect=(READY, REMOVING)))
            users = await self.users({v.ref for v in versions})
        except BaseException:
            await self._unmark(marked)
            raise
        if users:
            await self._unmark(marked)
            return users
        for version in marked:
            await self.registry.set_state(version.name, version.version, REMOVED,
                                          expect=(REMOVING,))
        await self.reload()
        await asyncio.to_thread(self.cache.sweep, await self.snapshots_in_use())
        return []

    async def _unmark(self, marked: Sequence[DatasetVersion]) -> None:
        for version in marked:
            with contextlib.suppress(FetchmlError):
                await self.registry.set_state(version.name, version.version, READY,
                                              expect=(REMOVING,))
        await self.reload()

    async def snapshots_in_use(self) -> set[str]:
        """What this host's cache must keep: live versions, and those its jobs run on."""
        keep = set(self._live)
        for job in await self.jobs.running(self.host):
            for text in job.datasets:
                with contextlib.suppress(FetchmlError):
                    ref = stored_ref(text)
                    assert ref.version is not None
                    keep.add((await self.version(ref.name, ref.version)).snapshot)
        return keep

    # -- cluster ------------------------------------------------------------------------------
    async def snapshots_for(self, job: Job) -> list[str]:
        """The snapshot ids of the dataset versions ``job`` reads (to fetch from a peer)."""
        snapshots = []
        for text in job.datasets:
            ref = stored_ref(text)
            assert ref.version is not None
            snapshots.append((await self.version(ref.name, ref.version)).snapshot)
        return list(dict.fromkeys(snapshots))

    async def objects_for(self, job: Job) -> list[str]:
        """The objects of ``job``'s datasets that this host lacks (manifests must be here)."""
        oids: set[str] = set()
        for snapshot in await self.snapshots_for(job):
            data = await asyncio.to_thread(self.snapshots.read_bytes, snapshot)
            oids |= SnapshotManifest.decode(data).oids()
        return await asyncio.to_thread(self.objects.missing, sorted(oids))

    # -- runner hooks -------------------------------------------------------------------------
    async def before_prepare(self, job: Job) -> None:
        """Check that every version the job names still exists, fetch it in a cluster when
        this host lacks it, and make sure it is materialised here."""
        for text in job.datasets:
            ref = stored_ref(text)
            assert ref.version is not None
            version = await self.version(ref.name, ref.version)
            if version.state == REMOVED:
                raise NotFound(f"dataset {version.ref} was removed after the job was "
                               "queued; queue it again with another version")
            if self.fetch is not None:
                await self.fetch(version.snapshot)
            await self._cached(version)

    async def _cached(self, version: DatasetVersion) -> Path:
        """The version's cache: one thread writes or checks it, other starts wait without
        holding a thread (a large dataset takes minutes to copy)."""
        snapshot = version.snapshot
        task = self._materialising.get(snapshot)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(self._materialise, version),
                                       name=f"dataset-{version.ref}")
            self._materialising[snapshot] = task

            def done(finished: asyncio.Task[Path]) -> None:
                self._materialising.pop(snapshot, None)
                if not finished.cancelled():
                    finished.exception()  # retrieved: every waiter may have gone

            task.add_done_callback(done)
        return await asyncio.shield(task)

    def _materialise(self, version: DatasetVersion) -> Path:
        try:
            data = self.snapshots.read_bytes(version.snapshot)
        except NotFound:
            raise NotFound(f"dataset {version.ref} is not stored on this host; push it to "
                           "this daemon again") from None
        return self.cache.ensure(version.snapshot, SnapshotManifest.decode(data), version.ref)

    def environment(self, job: Job, run_dir: Path) -> Mapping[str, str]:
        return {"FETCHML_DATA_DIR": str(RunDir(run_dir).data)} if job.datasets else {}

    def workspace(self, job: Job, run_dir: Path) -> None:
        """Link each dataset's cache into the attempt (blocking)."""
        if not job.datasets:
            return
        os.mkdir(RunDir(run_dir).data, 0o755)
        for text in job.datasets:
            ref = stored_ref(text)
            version = self._known.get(ref.label)
            if version is None:
                raise NotFound(f"dataset {ref.label} is unknown to this daemon; queue the "
                               "job again")
            cache = self.cache.path(version.snapshot)
            if not self.cache.is_cached(version.snapshot):  # removed since before_prepare
                cache = self._materialise(version)
            if ref.mount is None:
                os.symlink(cache, RunDir(run_dir).data / ref.name)
            else:
                link_into_workspace(RunDir(run_dir).work, ref.mount, cache, version.ref)


def link_into_workspace(work: Path, mount: str, target: Path, what: str) -> None:
    """A symlink at ``work/mount`` to ``target``, creating parent directories, never following
    a link of the snapshot and never replacing one of its entries."""
    *parents, name = validate_path(mount).split("/")
    here = work
    for part in parents:
        here = here / part
        try:
            os.mkdir(here, 0o755)
        except FileExistsError:
            if here.is_symlink() or not here.is_dir():
                raise BadRequest(f"dataset {what} cannot be mounted at {mount}: "
                                 f"{here.relative_to(work)} is not a directory of the "
                                 "snapshot; choose another mount point") from None
    try:
        os.symlink(target, here / name)
    except FileExistsError:
        raise BadRequest(f"dataset {what} cannot be mounted at {mount}: the snapshot has "
                         "that path already; choose another mount point") from None

