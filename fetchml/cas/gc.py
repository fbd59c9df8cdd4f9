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

import msgpack

from fetchml.cas._layout import FANOUT_LEN, TEMP_PREFIX
from fetchml.cas.manifest import FORMAT_TAG, FORMAT_VERSION
from fetchml.cas.objects import ObjectStore
from fetchml.errors import FetchmlError, IntegrityError, NotFound

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
    # Root manifests that exist but cannot be read: their objects are unknown, so a sweep must
    # not run. (A missing root has nothing here to keep: in a cluster a job queued on another
    # host names a snapshot this host may never have fetched.)
    unreadable: list[str] = field(default_factory=list)


def mark(snapshots: ObjectStore, roots: Iterable[str]) -> MarkResult:
    """Every object the root snapshots name; a root whose manifest is unreadable is reported."""
    result = MarkResult()
    for snapshot in set(roots):
        try:
            result.live.update(stored_digests(snapshot, snapshots.read_bytes(snapshot)))
        except NotFound:
            log.debug("live snapshot %s is not stored here", snapshot[:12])
        except FetchmlError as exc:
            log.warning("live snapshot %s cannot be read for gc: %s", snapshot[:12], exc)
            result.unreadable.append(snapshot)
    return result


def stored_digests(snapshot: str, data: bytes) -> list[bytes]:
    """The raw digests a stored manifest names. It was validated before it was stored and
    ``read_bytes`` verified its digest, so only the format is checked here (a full decode
    would cost a million entry checks on a big store)."""
    try:
        tag, version, rows = msgpack.unpackb(data, raw=False, use_list=False)
        if (tag, version) != (FORMAT_TAG, FORMAT_VERSION):
            raise ValueError(f"format {tag!r} version {version!r}")
        return [row[4] for row in rows if row[4] is not None]
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"snapshot {snapshot[:12]} is not a manifest this version reads "
                             f"({exc})") from exc


def young_entries(store: ObjectStore, *, newer_than: float) -> list[str]:
    """Ids of entries modified after ``newer_than`` (epoch seconds)."""
    return [g.oid for g in _scan(store, lambda oid: True, lambda mtime: mtime > newer_than)]


def find_garbage(store: ObjectStore, live: MarkResult, *, older_than: float,
                 batch: int = SWEEP_BATCH) -> Iterator[list[Garbage]]:
    """Batches of unmarked entries last modified before ``older_than`` (epoch seconds)."""
    pending: list[Garbage] = []
    for item in _scan(store, lambda oid: bytes.fromhex(oid) not in live.live,
                      lambda mtime: mtime < older_than):
        pending.append(item)
        if len(pending) >= batch:
            yield pending
            pending = []
    if pending:
        yield pending


def _scan(store: ObjectStore, wanted: Callable[[str], bool],
          old_enough: Callable[[float], bool]) -> Iterator[Garbage]:
    """Entries that are ``wanted`` by id and then by mtime: an unwanted id costs no stat."""
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
            if len(oid) != 64 or not _HEX.issuperset(entry.name) or not wanted(oid):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if old_enough(info.st_mtime):
                yield Garbage(oid, info.st_size)


def delete(store: ObjectStore, garbage: Iterable[Garbage]) -> tuple[int, int]:
    """Delete these entries; returns (count, bytes) actually removed.

    Unlinks by name relative to an open fan-out directory: resolving a full path per object
    costs more than the unlink itself on a fast filesystem."""
    by_fanout: dict[str, list[Garbage]] = {}
    for item in garbage:
        by_fanout.setdefault(item.oid[:FANOUT_LEN], []).append(item)
    count = size = 0
    for fanout, items in by_fanout.items():
        try:
            directory = os.open(store.root / fanout, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            for item in items:
                try:
                    os.unlink(item.oid[FANOUT_LEN:], dir_fd=directory)
                except FileNotFoundError:
                    continue
                count += 1
                size += item.size
        finally:
            os.close(directory)
    return count, size


def touch(store: ObjectStore, oid: str) -> None:
    """Mark an entry as just used, so that a collection spares it for one more grace period."""
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        os.utime(store.path(oid), (now, now), follow_symlinks=False)
