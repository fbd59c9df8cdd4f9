"""Mark-and-sweep garbage collection of an object store.

Mark: every object named by a live snapshot manifest. Sweep: every other object older than the
grace period, found by one pass over the store's directories (``os.scandir``, one ``stat`` per
entry) and handed out in small batches, so that the caller can delete each batch under a lock
that uploads also take and never hold it for long. Marks are kept as 32-byte digests, so a
million live objects cost about 100 MB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from fetchml.cas._layout import FANOUT_LEN, TEMP_PREFIX
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.errors import FetchmlError

log = logging.getLogger(__name__)

SWEEP_BATCH = 256  # objects handed out per batch: deleting them takes a few milliseconds
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Garbage:
    oid: str
    size: int


@dataclass
class MarkResult:
    live: set[bytes] = field(default_factory=set)  # raw digests of live objects
    unreadable: list[str] = field(default_factory=list)  # root manifests that are missing/bad

    def __contains__(self, oid: object) -> bool:
        return isinstance(oid, str) and bytes.fromhex(oid) in self.live

    def add(self, oids: Iterable[str]) -> None:
        self.live.update(bytes.fromhex(oid) for oid in oids)


def mark(snapshots: ObjectStore, roots: Iterable[str]) -> MarkResult:
    """Every object the root snapshots name; a root whose manifest is gone is reported."""
    result = MarkResult()
    for snapshot in set(roots):
        try:
            manifest = SnapshotManifest.decode(snapshots.read_bytes(snapshot))
        except FetchmlError as exc:
            log.warning("live snapshot %s cannot be read for gc: %s", snapshot[:12], exc)
            result.unreadable.append(snapshot)
            continue
        result.add(manifest.oids())
    return result


def young_entries(store: ObjectStore, *, newer_than: float) -> list[str]:
    """Ids of entries modified after ``newer_than`` (epoch seconds)."""
    return [g.oid for g in _scan(store, lambda oid, mtime: mtime > newer_than)]


def find_garbage(store: ObjectStore, live: MarkResult, *, older_than: float,
                 batch: int = SWEEP_BATCH) -> Iterator[list[Garbage]]:
    """Batches of unmarked entries last modified before ``older_than`` (epoch seconds)."""
    pending: list[Garbage] = []
    for item in _scan(store, lambda oid, mtime: mtime < older_than
                      and bytes.fromhex(oid) not in live.live):
        pending.append(item)
        if len(pending) >= batch:
            yield pending
            pending = []
    if pending:
        yield pending


def _scan(store: ObjectStore, keep: Callable[[str, float], bool]) -> Iterator[Garbage]:
    try:
        fanouts = [e for e in os.scandir(store.root)
                   if len(e.name) == FANOUT_LEN and _HEX.issuperset(e.name)
                   and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for fanout in sorted(fanouts, key=lambda e: e.name):
        try:
            entries = list(os.scandir(fanout.path))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            oid = fanout.name + entry.name
            if len(oid) != 64 or not _HEX.issuperset(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if keep(oid, info.st_mtime):
                yield Garbage(oid, info.st_size)


def delete(store: ObjectStore, garbage: Iterable[Garbage]) -> tuple[int, int]:
    """Delete these entries; returns (count, bytes) actually removed."""
    count = size = 0
    for item in garbage:
        path = store.path(item.oid)
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        count += 1
        size += item.size
    return count, size


def touch(store: ObjectStore, oid: str) -> None:
    """Mark an entry as just used, so that a collection spares it for one more grace period."""
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        os.utime(store.path(oid), (now, now), follow_symlinks=False)
