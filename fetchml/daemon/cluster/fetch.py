"""Fetching a snapshot and its objects from other hosts of the cluster.

A job queued through one daemon may run on another, and a job's outputs are stored where it
ran; whichever daemon needs them asks its peers over the ordinary protocol (``snapshot.get``,
then one ``cas.get`` stream per missing object). Everything fetched is verified: the manifest
must hash to the snapshot id, and each object is written through ``ObjectStore.begin``/
``commit``, which refuses bytes that do not hash to the object's name. Objects are made
durable before the manifest is stored, as for an upload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.objects import ObjectStore, PendingObject
from fetchml.daemon.cluster.peers import PeerConnection, PeerPool
from fetchml.daemon.jobs.gc import GarbageCollector
from fetchml.daemon.tasks import cancel_and_wait
from fetchml.errors import BadRequest, FetchmlError, IntegrityError, NotFound, Unavailable
from fetchml.protocol import ops

log = logging.getLogger(__name__)

# Object downloads in flight at once on one peer connection: enough to hide the round trips
# of small files, few enough that a large snapshot does not queue thousands of streams.
PARALLEL_OBJECTS = 16
# Fetched objects are committed (one sync for the batch) every this many.
COMMIT_BATCH = 256


@dataclass(frozen=True)
class Peer:
    name: str
    address: str


@dataclass
class FetchReport:
    snapshot: str
    objects: int = 0  # objects fetched
    bytes: int = 0
    source: str | None = None  # the host the manifest came from; None: it was here


class SnapshotFetcher:
    """Makes this daemon hold whole snapshots, fetching what it lacks from its peers."""

    def __init__(self, objects: ObjectStore, snapshots: ObjectStore, gc: GarbageCollector,
                 pool: PeerPool, peers: Callable[[Sequence[str]], Awaitable[list[Peer]]]
                 ) -> None:
        self.objects, self.snapshots, self.gc = objects, snapshots, gc
        self.pool = pool
        self.peers = peers  # the peers to ask, the named ones first
        self._inflight: dict[str, asyncio.Task[FetchReport]] = {}

    async def ensure(self, snapshot: str, prefer: Sequence[str] = ()) -> FetchReport:
        """Fetch ``snapshot`` unless it is here; one fetch per snapshot at a time."""
        if await asyncio.to_thread(self.snapshots.contains, snapshot):
            return FetchReport(snapshot)
        task = self._inflight.get(snapshot)
        if task is None:
            task = asyncio.create_task(self._fetch(snapshot, prefer), name=f"fetch-{snapshot[:12]}")
            self._inflight[snapshot] = task
            task.add_done_callback(lambda _: self._inflight.pop(snapshot, None))
        return await asyncio.shield(task)

    async def _fetch(self, snapshot: str, prefer: Sequence[str]) -> FetchReport:
        peers = await self.peers(prefer)
        if not peers:
            raise Unavailable(f"snapshot {snapshot[:12]} is not on this host and no other host "
                              "of the cluster is reachable; sync the project to this daemon")
        report = FetchReport(snapshot)
        data: bytes | None = None
        manifest: SnapshotManifest | None = None
        problems: list[str] = []
        for peer in peers:
            try:
                conn = await self.pool.get(peer.name, peer.address)
                if data is None or manifest is None:
                    data = await self._manifest(conn, snapshot)
                    manifest = await asyncio.to_thread(SnapshotManifest.decode, data)
                    report.source = peer.name
                sizes = {e.oid: e.size for e in manifest if e.oid is not None}
                missing = await asyncio.to_thread(self.objects.missing, sorted(sizes))
                self.gc.protect_objects(o for o in sizes if o not in set(missing))
                got, size = await self._objects(conn, [(o, sizes[o]) for o in missing])
                report.objects, report.bytes = report.objects + got, report.bytes + size
            except NotFound:
                continue  # this peer does not have the snapshot
            except FetchmlError as exc:
                problems.append(f"{peer.name}: {exc.message}")
                log.warning("fetching snapshot %s from host %s: %s", snapshot[:12], peer.name,
                            exc.message)
                continue
            if not await asyncio.to_thread(self.objects.missing, sorted(sizes)):
                break
        if data is None:
            raise Unavailable(f"no reachable host of the cluster has snapshot {snapshot[:12]}"
                              f"{' (' + '; '.join(problems) + ')' if problems else ''}; "
                              "sync the project again")
        assert manifest is not None
        oids = sorted(manifest.oids())
        left = await asyncio.to_thread(self.objects.missing, oids)
        if left:
            raise Unavailable(f"{len(left)} objects of snapshot {snapshot[:12]} are on no "
                              "reachable host of the cluster; sync the project again")
        await asyncio.to_thread(self._store_manifest, data)
        self.gc.protect_snapshot(snapshot, oids)
        log.info("fetched snapshot %s from %s: %d objects, %d bytes", snapshot[:12],
                 report.source, report.objects, report.bytes)
        return report

    async def _manifest(self, conn: PeerConnection, snapshot: str) -> bytes:
        reply = await conn.call(ops.SNAPSHOT_GET.name, {"snapshot": snapshot})
        data = reply.get("manifest") if isinstance(reply, dict) else None
        if not isinstance(data, bytes) or hash_bytes(data) != snapshot:
            raise IntegrityError(f"host {conn.name} sent a manifest that is not snapshot "
                                 f"{snapshot[:12]}; check that host's store with fetchml fsck")
        return data

    def _store_manifest(self, data: bytes) -> None:
        self.objects.flush()  # every object it names is durable before the manifest exists
        self.snapshots.put_bytes(data)

    async def _objects(self, conn: PeerConnection, wanted: list[tuple[str, int]]
                       ) -> tuple[int, int]:
        """Fetch these objects from one peer; returns (objects, bytes) stored. Objects the
        peer lacks or sends damaged are left missing for the next peer."""
        if not wanted:
            return 0, 0
        todo = iter(wanted)
        done: list[PendingObject] = []
        stored = [0, 0]

        async def commit(batch: list[PendingObject]) -> None:
            try:
                await asyncio.to_thread(self.objects.commit, batch)
            except IntegrityError as exc:
                log.warning("host %s sent damaged objects, refused: %s", conn.name, exc.message)
            absent = set(await asyncio.to_thread(self.objects.missing, [p.oid for p in batch]))
            good = [p for p in batch if p.oid not in absent]
            self.gc.protect_objects(p.oid for p in good)
            stored[0] += len(good)
            stored[1] += sum(p.size for p in good)

        async def worker() -> None:
            for oid, size in todo:
                pending = await self._download(conn, oid, size)
                if pending is not None:
                    done.append(pending)
                if len(done) >= COMMIT_BATCH:
                    batch = done[:]
                    done.clear()
                    await commit(batch)

        workers = [asyncio.create_task(worker()) for _ in range(min(PARALLEL_OBJECTS,
                                                                     len(wanted)))]
        try:
            await asyncio.gather(*workers)
        finally:
            await cancel_and_wait(*workers)
            if done:
                batch = done[:]
                done.clear()
                await commit(batch)
        return stored[0], stored[1]

    async def _download(self, conn: PeerConnection, oid: str, size: int
                        ) -> PendingObject | None:
        """One object into a pending upload, or None when the peer cannot provide it."""
        pending = await asyncio.to_thread(self.objects.begin, oid, size)
        try:
            async with conn.stream(ops.CAS_GET.name, {"oid": oid}) as stream:
                async for event, data in stream:
                    if event != "chunk" or not isinstance(data, bytes):
                        raise IntegrityError(f"host {conn.name} sent {event!r} instead of "
                                             f"object data for {oid[:12]}")
                    await asyncio.to_thread(pending.write, data)
            if not pending.complete:
                raise IntegrityError(f"host {conn.name} sent {pending.received} of {size} "
                                     f"bytes of object {oid[:12]}")
            return pending
        except (NotFound, IntegrityError, BadRequest) as exc:
            await asyncio.to_thread(pending.discard)
            if not isinstance(exc, NotFound):
                log.warning("object %s from host %s refused: %s", oid[:12], conn.name,
                            exc.message)
            return None
        except BaseException:
            await asyncio.to_thread(pending.discard)
            raise
