"""A snapshot described as changes to another one, so a re-sync after one edit sends and checks
one entry instead of the whole tree.

On the wire a change set is ``upsert`` (manifest rows, the same format as inside an encoded
manifest) and ``remove`` (paths). The receiver applies it to a base manifest it stored, and
therefore validated, before; only the changed entries need checking: each on its own, and
against the tree around it (no entry under a file, link or empty-dir entry). Sorting and
canonical encoding come from building the new manifest, so its id is computed, not trusted.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

from fetchml.cas.manifest import (
    ManifestEntry,
    SnapshotManifest,
    _row_entry,
    entry_problem,
    refuse_entry,
)
from fetchml.errors import BadRequest

# Deltas larger than this fraction of the base are sent as whole manifests instead.
MAX_DELTA_FRACTION = 0.25


def entry_row(entry: ManifestEntry) -> list[Any]:
    return [entry.path, entry.kind, entry.executable, entry.size,
            bytes.fromhex(entry.oid) if entry.oid is not None else None, entry.target]


def diff(base: SnapshotManifest, new: SnapshotManifest) -> tuple[list[list[Any]], list[str]]:
    """(rows to upsert, paths to remove) that turn ``base`` into ``new``."""
    old = {entry.path: entry for entry in base.entries}
    upsert = [entry_row(entry) for entry in new.entries if old.get(entry.path) != entry]
    present = {entry.path for entry in new.entries}
    remove = [path for path in old if path not in present]
    return upsert, remove


def worth_sending(base: SnapshotManifest, upsert: Sequence[Any], remove: Sequence[str]) -> bool:
    return len(upsert) + len(remove) <= max(16, MAX_DELTA_FRACTION * len(base.entries))


def apply(base: SnapshotManifest, upsert: Iterable[Any], remove: Iterable[str]
          ) -> SnapshotManifest:
    """``base`` (a stored, validated manifest) with the changes applied; BadRequest naming the
    first bad entry if the result would not be a valid manifest."""
    entries = {entry.path: entry for entry in base.entries}
    base_rows = base._rows if base._rows is not None else [entry_row(e) for e in base.entries]
    rows = {entry.path: row for entry, row in zip(base.entries, base_rows, strict=True)}
    for path in remove:
        rows.pop(path, None)
        if not isinstance(path, str) or entries.pop(path, None) is None:
            raise BadRequest(f"cannot remove {str(path)[:200]!r}: the base snapshot has no such "
                             "entry; send the whole manifest")
    changed: list[ManifestEntry] = []
    added = False
    for index, row in enumerate(upsert):
        entry = _row_entry(index, row)
        problem = entry_problem(entry, check_link=True)
        if problem is not None:
            raise refuse_entry(entry.path, problem)
        added = added or entry.path not in entries
        entries[entry.path] = entry
        rows[entry.path] = entry_row(entry)
        changed.append(entry)
    # The dicts keep the base's sorted order through removals and replacements; only a new
    # path (appended at the end) calls for sorting again.
    paths = sorted(entries, key=lambda p: p.encode("utf-8")) if added else list(entries)
    for entry in changed:
        _check_surroundings(entry, entries, paths)
    manifest = SnapshotManifest.__new__(SnapshotManifest)
    manifest._entries = tuple(entries[p] for p in paths)
    manifest._rows = [rows[p] for p in paths]
    manifest._encoded = None
    return manifest


def _check_surroundings(entry: ManifestEntry, entries: dict[str, ManifestEntry],
                        paths: list[str]) -> None:
    """No ancestor of ``entry`` is a file, link or empty-dir entry, and nothing lies under it."""
    end = entry.path.find("/")
    while end != -1:
        parent = entries.get(entry.path[:end])
        if parent is not None:
            if parent.kind == "dir":
                raise refuse_entry(parent.path, "is listed as an empty directory but has "
                                   "entries under it")
            raise refuse_entry(entry.path, f"is under {parent.path!r}, which is a {parent.kind}")
        end = entry.path.find("/", end + 1)
    prefix = entry.path + "/"
    at = bisect.bisect_left(paths, prefix.encode("utf-8"), key=lambda p: p.encode("utf-8"))
    if at < len(paths) and paths[at].startswith(prefix):
        if entry.kind == "dir":
            raise refuse_entry(entry.path, "is listed as an empty directory but has entries "
                               "under it")
        raise refuse_entry(paths[at], f"is under {entry.path!r}, which is a {entry.kind}")


def load_stored(data: bytes) -> SnapshotManifest:
    """A manifest read back from the store, where it was validated before it was written:
    rebuilt without the per-entry checks (the stored bytes are verified by their digest)."""
    import msgpack

    document = msgpack.unpackb(data, raw=False, use_list=False)
    manifest = SnapshotManifest.__new__(SnapshotManifest)
    manifest._entries = tuple(
        ManifestEntry(path, kind, executable, size,
                      raw_oid.hex() if raw_oid is not None else None, target)
        for path, kind, executable, size, raw_oid, target in document[2])
    manifest._encoded = data
    manifest._rows = document[2]
    return manifest
