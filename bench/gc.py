"""Garbage collection of a store with 1,000,000 small objects: time and peak memory.

Builds the store directly in its on-disk layout and syncs it to disk (a daemon's objects are
durable), makes half of the objects live through pinned snapshots, back-dates everything past
the grace period, then runs the daemon's own GarbageCollector (mark from roots, sweep in
batches under the sweep gate). Goal: under 60 s and under 500 MB RSS.

The peer, in the same run and on the same filesystem: `rm -rf` of a tree with as many small
files as the collection deletes, in the same 256 fan-out directories. Deleting files costs
what the filesystem makes it cost; the ratio shows what the collector adds on top.
Usage: python bench/gc.py [--objects 1000000] [--dir /tmp/...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import machine_line

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.daemon.jobs.gc import GarbageCollector, SweepGate
from fetchml.daemon.jobs.retention import Pins
from fetchml.daemon.store.memory import MemoryJobStore

PER_SNAPSHOT = 50_000  # files per live snapshot


def build(root: Path, count: int) -> tuple[ObjectStore, ObjectStore, list[str], float]:
    objects, snapshots = ObjectStore(root / "objects"), ObjectStore(root / "snapshots")
    started = time.perf_counter()
    live: list[str] = []
    old = time.time() - 7 * 86400
    for fanout in range(256):
        (objects.root / f"{fanout:02x}").mkdir(exist_ok=True)
    for i in range(count):
        data = b"object %d" % i
        oid = hash_bytes(data)
        path = objects.root / oid[:2] / oid[2:]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        os.write(fd, data)
        os.close(fd)
        os.utime(path, (old, old))
        if i % 2 == 0:
            live.append(oid)
    roots = []
    for start in range(0, len(live), PER_SNAPSHOT):
        entries = [ManifestEntry.file(f"f{n:08d}", oid, len(b"object %d" % ((start + n) * 2)))
                   for n, oid in enumerate(live[start:start + PER_SNAPSHOT])]
        roots.append(snapshots.put_bytes(SnapshotManifest(entries).encode()))
    os.sync()
    return objects, snapshots, roots, time.perf_counter() - started


def rm_rf(root: Path, count: int) -> float:
    """Seconds `rm -rf` takes to delete ``count`` small files laid out like the store."""
    for fanout in range(256):
        (root / f"{fanout:02x}").mkdir(parents=True)
    for i in range(count):
        fd = os.open(root / f"{i % 256:02x}" / f"{i:062x}", os.O_WRONLY | os.O_CREAT, 0o444)
        os.write(fd, b"object %d" % i)
        os.close(fd)
    os.sync()
    started = time.perf_counter()
    subprocess.run(["rm", "-rf", str(root)], check=True)
    return time.perf_counter() - started


async def collect(root: Path, objects: ObjectStore, snapshots: ObjectStore,
                  roots: list[str]) -> tuple[int, int, float]:
    pins = Pins(root)
    for snapshot in roots:
        pins.pin(snapshot, "bench")
    store = MemoryJobStore()
    await store.open()
    collector = GarbageCollector(objects, snapshots, store, pins, SweepGate())
    started = time.perf_counter()
    count, size, _ = await collector.collect(grace_s=3600)
    return count, size, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fml-gc-", dir=args.dir))
    try:
        objects, snapshots, roots, build_s = build(root, args.objects)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        deleted, size, gc_s = asyncio.run(collect(root, objects, snapshots, roots))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        survivors = sum(1 for _ in objects.iter_oids())
        shutil.rmtree(root / "objects", ignore_errors=True)
        expected = args.objects - (args.objects + 1) // 2
        peer_s = rm_rf(root / "peer", expected)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(machine_line(root.parent))
    print(f"built {args.objects} objects in {build_s:.0f} s (RSS {rss_before / 1024:.0f} MB)")
    print(f"gc deleted {deleted} objects ({size} bytes), kept {survivors}; expected to delete "
          f"{expected}")
    print(f"gc time {gc_s:.1f} s (goal < 60 s), peak RSS {peak_mb:.0f} MB (goal < 500 MB)")
    print(f"rm -rf of {expected} files on the same filesystem: {peer_s:.1f} s; "
          f"gc / rm -rf = {gc_s / peer_s:.2f}x")
    if deleted != expected or survivors != args.objects - expected:
        raise SystemExit("gc deleted the wrong objects")


if __name__ == "__main__":
    main()
