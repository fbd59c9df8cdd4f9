"""The collector on real stores: what a sweep deletes, and when it must delete nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fetchml.cas import gc
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.daemon.jobs.gc import GarbageCollector, SweepGate
from fetchml.daemon.jobs.retention import Pins
from fetchml.daemon.store import MemoryJobStore
from fetchml.errors import IntegrityError

DAY = 86400.0


def back_date(store: ObjectStore, oid: str, age_s: float = 2 * DAY) -> None:
    then = time.time() - age_s
    os.utime(store.path(oid), (then, then))


def put_old(store: ObjectStore, data: bytes) -> str:
    oid = store.put_bytes(data)
    back_date(store, oid)
    return oid


def snapshot_of(snapshots: ObjectStore, objects: dict[str, bytes]) -> str:
    manifest = SnapshotManifest(
        ManifestEntry.file(name, oid, len(data)) for name, (oid, data) in
        ((f"f{i}", item) for i, item in enumerate(objects.items())))
    return put_old(snapshots, manifest.encode())


async def collector(root: Path, objects: ObjectStore, snapshots: ObjectStore
                    ) -> tuple[GarbageCollector, Pins]:
    store = MemoryJobStore()
    await store.open()
    pins = Pins(root)
    return GarbageCollector(objects, snapshots, store, pins, SweepGate()), pins


async def test_a_sweep_deletes_old_unreferenced_objects_only(
        tmp_path: Path, store: ObjectStore, snapshots: ObjectStore) -> None:
    live = {put_old(store, b"live %d" % i): b"live %d" % i for i in range(300)}
    dead = [put_old(store, b"dead %d" % i) for i in range(600)]  # more than two batches
    young = store.put_bytes(b"just uploaded")
    collect, pins = await collector(tmp_path, store, snapshots)
    pins.pin(snapshot_of(snapshots, live), "test")

    count, size, manifests = await collect.collect(grace_s=DAY)

    assert (count, manifests) == (600, 0)
    assert size == sum(len(b"dead %d" % i) for i in range(600))
    assert store.missing(dead) == dead
    assert store.missing([*live, young]) == []
    assert await collect.collect(grace_s=DAY) == (0, 0, 0)


async def test_a_corrupt_live_manifest_stops_the_sweep_before_anything_is_deleted(
        tmp_path: Path, store: ObjectStore, snapshots: ObjectStore) -> None:
    kept = put_old(store, b"named by the damaged manifest")
    unreferenced = put_old(store, b"garbage")
    collect, pins = await collector(tmp_path, store, snapshots)
    snapshot = snapshot_of(snapshots, {kept: b"named by the damaged manifest"})
    pins.pin(snapshot, "test")
    path = snapshots.path(snapshot)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    back_date(snapshots, snapshot)

    with pytest.raises(IntegrityError, match=f"gc deleted nothing: live snapshot {snapshot[:12]}"):
        await collect.collect(grace_s=DAY)
    assert store.missing([kept, unreferenced]) == []


async def test_a_live_root_stored_elsewhere_does_not_stop_the_sweep(
        tmp_path: Path, store: ObjectStore, snapshots: ObjectStore) -> None:
    # In a cluster, a job queued on another host names a snapshot this host never fetched.
    unreferenced = put_old(store, b"garbage")
    collect, pins = await collector(tmp_path, store, snapshots)
    pins.pin("ab" * 32, "test")

    assert (await collect.collect(grace_s=DAY))[0] == 1
    assert store.missing([unreferenced]) == [unreferenced]


def test_delete_counts_only_what_it_removed(store: ObjectStore) -> None:
    garbage = [gc.Garbage(store.put_bytes(b"x" * n), n) for n in range(1, 4)]
    assert gc.delete(store, garbage) == (3, 6)
    assert gc.delete(store, garbage) == (0, 0)


def test_a_stored_manifest_of_another_format_is_refused(snapshots: ObjectStore) -> None:
    with pytest.raises(IntegrityError, match="not a manifest this version reads"):
        gc.stored_digests("cd" * 32, b"\x93\xa3abc\x01\x90")
