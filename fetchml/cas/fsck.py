"""Consistency check of an object store and the snapshots that reference it."""

from __future__ import annotations

import stat
from dataclasses import dataclass

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.objects import ObjectStore, iter_store_files
from fetchml.errors import BadRequest, IntegrityError, NotFound

_EMPTY_OID = hash_bytes(b"")


@dataclass(frozen=True, slots=True)
class FsckProblem:
    """One thing wrong; ``oid`` is the object or snapshot concerned ("" for stray files)."""

    kind: str
    oid: str
    message: str


def _check_store(
    store: ObjectStore, label: str, *, read_data: bool, problems: list[FsckProblem]
) -> dict[str, int]:
    """Check names, modes and (with read_data) digests; returns every object's size."""
    sizes: dict[str, int] = {}
    for item in iter_store_files(store.root):
        if item.kind == "temp":
            problems.append(
                FsckProblem(
                    "temp_file",
                    "",
                    f"{item.path} is left over from an interrupted write; restarting the daemon "
                    "removes it",
                )
            )
            continue
        if item.kind == "stray" or item.oid is None:
            problems.append(
                FsckProblem(
                    "stray_file",
                    "",
                    f"{item.path} does not belong in the {label} store; move it elsewhere",
                )
            )
            continue
        oid = item.oid
        try:
            info = item.path.lstat()
        except FileNotFoundError:
            continue
        sizes[oid] = info.st_size
        if stat.S_IMODE(info.st_mode) & 0o222:
            problems.append(
                FsckProblem(
                    "writable_object",
                    oid,
                    f"{label} {oid} is writable; run chmod 0444 {item.path}",
                )
            )
        corrupt = (info.st_size == 0 and oid != _EMPTY_OID) or (read_data and not store.verify(oid))
        if corrupt:
            problems.append(
                FsckProblem(
                    f"corrupt_{label}",
                    oid,
                    f"{label} {oid} does not hash to its name; delete {item.path} and upload it "
                    "again",
                )
            )
    return sizes


def fsck(objects: ObjectStore, snapshots: ObjectStore, *, read_data: bool) -> list[FsckProblem]:
    """Every problem found: corrupt or stray files, undecodable snapshots, missing objects.

    Without ``read_data`` only names, modes, sizes and temp files are checked (fast); with it
    every object is re-hashed. Snapshots are always read in full (they are small).
    """
    problems: list[FsckProblem] = []
    sizes = _check_store(objects, "object", read_data=read_data, problems=problems)
    _check_store(snapshots, "snapshot", read_data=False, problems=problems)
    for snapshot_id in snapshots.iter_oids():
        try:
            manifest = SnapshotManifest.decode(snapshots.read_bytes(snapshot_id))
        except NotFound:
            continue  # deleted while we looked
        except IntegrityError:
            problems.append(
                FsckProblem(
                    "corrupt_snapshot",
                    snapshot_id,
                    f"snapshot {snapshot_id} does not hash to its name; push it again",
                )
            )
            continue
        except BadRequest as exc:
            problems.append(
                FsckProblem(
                    "bad_snapshot",
                    snapshot_id,
                    f"snapshot {snapshot_id} cannot be decoded ({exc.message.rstrip('.')}); "
                    "delete it and push again",
                )
            )
            continue
        reported: set[str] = set()
        for entry in manifest.entries:
            if entry.oid is None or entry.oid in reported:
                continue
            size = sizes.get(entry.oid)
            if size is None:
                reported.add(entry.oid)
                problems.append(
                    FsckProblem(
                        "missing_object",
                        entry.oid,
                        f"object {entry.oid} ({entry.path!r} in snapshot {snapshot_id[:12]}) "
                        "is missing; push that snapshot again",
                    )
                )
            elif size != entry.size:
                reported.add(entry.oid)
                problems.append(
                    FsckProblem(
                        "size_mismatch",
                        entry.oid,
                        f"object {entry.oid} has {size} bytes but snapshot {snapshot_id[:12]} "
                        f"lists {entry.size} for {entry.path!r}; delete it and push again",
                    )
                )
    return problems


__all__ = ["FsckProblem", "fsck"]
