"""Moving trees between a project and the daemon: sync (scan, upload what is missing, record
the snapshot) and download (materialise a stored snapshot locally, verified)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetchml.cas._fs import translate_os_error
from fetchml.cas.gc_pause import gc_paused
from fetchml.cas.hashing import Hasher
from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.scan import ScanResult, StatCache, scan_tree
from fetchml.client.connection import Connection, Pending
from fetchml.errors import BadRequest, IntegrityError
from fetchml.protocol import CHUNK_BYTES, ops

# cas.missing batch size: well under the protocol's array limit.
MISSING_BATCH = 50_000
# cas.put requests in flight: enough to keep the daemon's disk busy, bounded memory (32 MiB).
UPLOAD_WINDOW = 8

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SyncReport:
    snapshot: str
    files: int
    bytes: int
    sent_files: int
    sent_bytes: int
    hashed_files: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "files": self.files, "bytes": self.bytes,
                "sent_files": self.sent_files, "sent_bytes": self.sent_bytes}


def scan_project(root: Path, *, max_file_size: int, extra_ignores: tuple[str, ...] = ()
                 ) -> tuple[ScanResult, bool]:
    """Scan with the project's ignore rules and stat cache (saved afterwards).

    Returns the result and whether the project was scanned before (its cache had entries).
    """
    with gc_paused():
        rules = IgnoreRules.load(root, extra_ignores)
        cache = StatCache.load(root)
        scanned_before = len(cache) > 0
        result = scan_tree(root, rules=rules, cache=cache, max_file_size=max_file_size)
        cache.save()
        rules.save_cache()
    return result, scanned_before


def find_missing(conn: Connection, oids: list[str]) -> list[str]:
    pending = [conn.send(ops.CAS_MISSING.name, {"oids": oids[i:i + MISSING_BATCH]})
               for i in range(0, len(oids), MISSING_BATCH)]
    return [oid for p in pending for oid in p.result()["missing"]]


def offer_snapshot(conn: Connection, encoded: bytes, sizes: Mapping[str, int]
                   ) -> tuple[dict[str, Any] | None, list[str] | None]:
    """snapshot.put before any upload: (its result, None) when the daemon has every object,
    else (None, the objects it lacks), or (None, None) when it did not list them all."""
    try:
        return conn.call(ops.SNAPSHOT_PUT.name, {"manifest": encoded}), None
    except IntegrityError as exc:
        listed, count = exc.details.get("missing"), exc.details.get("missing_count")
        if (isinstance(listed, list) and count == len(listed)
                and all(isinstance(oid, str) and oid in sizes for oid in listed)):
            return None, listed
        return None, None


def _chunks(path: Path, size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pieces of a file; refuses a file whose size changed since the scan, and
    turns a read failure into a fetchml error."""
    try:
        with open(path, "rb") as handle:
            if size == 0:
                yield 0, b""
            offset = 0
            while offset < size:
                data = handle.read(min(CHUNK_BYTES, size - offset))
                if not data:
                    break
                yield offset, data
                offset += len(data)
            if offset != size or handle.read(1):
                raise BadRequest(f"{path} changed while it was being synced; run the sync again")
    except FileNotFoundError as exc:
        raise BadRequest(f"{path} was removed while it was being synced; run the sync "
                         "again") from exc
    except OSError as exc:
        raise translate_os_error(exc, f"reading {path}") from exc


def upload(conn: Connection, missing: list[str], sources: Mapping[str, Path],
           sizes: dict[str, int], progress: Progress | None = None) -> int:
    """Send the missing objects in pipelined cas.put batches; returns bytes sent."""
    total = sum(sizes[oid] for oid in missing)
    window: deque[Pending] = deque()
    batch: list[dict[str, Any]] = []
    batch_bytes = sent = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if batch:
            window.append(conn.send(ops.CAS_PUT.name, {"blobs": batch}))
            batch, batch_bytes = [], 0
        while len(window) > UPLOAD_WINDOW:
            _settle(window.popleft())

    for oid in missing:
        size = sizes[oid]
        for offset, data in _chunks(sources[oid], size):
            if batch and batch_bytes + len(data) > CHUNK_BYTES:
                flush()
            batch.append({"oid": oid, "size": size, "offset": offset, "data": data})
            batch_bytes += len(data)
            sent += len(data)
            if progress is not None:
                progress(sent, total)
    flush()
    while window:
        _settle(window.popleft())
    return sent


def _settle(pending: Pending) -> None:
    try:
        pending.result()
    except IntegrityError as exc:
        raise IntegrityError(f"a file changed while it was being synced ({exc.message}); "
                             "run the sync again") from exc


def sync_tree(conn: Connection, root: Path, *, max_file_size: int, dry_run: bool = False,
              progress: Progress | None = None) -> SyncReport:
    """Snapshot ``root``, upload only what the daemon lacks, and record the snapshot.

    A project synced before usually changed little, so its manifest is offered first: the
    daemon either stores it at once or names the objects it lacks, which saves asking about
    every object. The daemon checks every object before it stores a manifest, so nothing it
    needs is ever skipped.
    """
    scan, scanned_before = scan_project(root, max_file_size=max_file_size)
    manifest = scan.manifest
    sizes = {e.oid: e.size for e in manifest.entries if e.oid is not None}
    if dry_run:
        missing = find_missing(conn, sorted(sizes))
        return SyncReport(manifest.snapshot_id, manifest.file_count, manifest.total_bytes,
                          len(missing), sum(sizes[o] for o in missing), scan.hashed_files)
    encoded = manifest.encode()
    listed: list[str] | None = None
    if scanned_before:
        result, listed = offer_snapshot(conn, encoded, sizes)
        if result is not None:
            return SyncReport(result["snapshot"], manifest.file_count, manifest.total_bytes,
                              0, 0, scan.hashed_files)
    missing = listed if listed is not None else find_missing(conn, sorted(sizes))
    sent = upload(conn, missing, scan.sources, sizes, progress)
    result = conn.call(ops.SNAPSHOT_PUT.name, {"manifest": encoded})
    return SyncReport(result["snapshot"], manifest.file_count, manifest.total_bytes,
                      len(missing), sent, scan.hashed_files)


class RemoteObjects:
    """The part of ObjectStore that materialise needs, served by a daemon over cas.get."""

    def __init__(self, conn: Connection, sizes: dict[str, int]) -> None:
        self.conn, self.sizes = conn, sizes

    def size(self, oid: str) -> int:
        return self.sizes[oid]

    def copy_to(self, oid: str, dir_fd: int, name: str, mode: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        hasher = Hasher()
        try:
            stream = self.conn.stream(ops.CAS_GET.name, {"oid": oid})
            for event in stream.events():
                data = event.data
                hasher.update(data)
                os.write(fd, data)
            if hasher.hexdigest() != oid:
                raise IntegrityError(f"object {oid[:12]} arrived damaged; pull again")
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=dir_fd)
            raise
        os.close(fd)


def download_snapshot(conn: Connection, snapshot: str, dest: Path) -> SnapshotManifest:
    """Materialise a stored snapshot into ``dest`` (which must not exist or be empty)."""
    from fetchml.cas.materialize import materialize  # only pulls need it: keeps sync start-up light

    reply = conn.call(ops.SNAPSHOT_GET.name, {"snapshot": snapshot})
    manifest = SnapshotManifest.decode(reply["manifest"])
    sizes = {e.oid: e.size for e in manifest.entries if e.oid is not None}
    materialize(manifest, RemoteObjects(conn, sizes), dest)  # type: ignore[arg-type]
    return manifest
