"""Helpers for the content-addressed store tests: building, scanning and listing real trees."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Mapping
from pathlib import Path

import msgpack

from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.manifest import FORMAT_TAG, FORMAT_VERSION, ManifestEntry, SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.cas.scan import DEFAULT_MAX_FILE_SIZE, ScanResult, StatCache, scan_tree

# A tree spec: path -> bytes (file), ("exec", bytes) (executable file), ("link", target),
# or None (empty directory).
TreeSpec = Mapping[str, bytes | tuple[str, bytes | str] | None]

# An hour in the past: files this old are never "racily clean" for the stat cache.
OLD_NS = 3600 * 10**9


def make_tree(root: Path, spec: TreeSpec) -> Path:
    """Create the files, links and empty directories of ``spec`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, value in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.mkdir(exist_ok=True)
        elif isinstance(value, bytes):
            path.write_bytes(value)
            path.chmod(0o644)
        elif value[0] == "exec":
            assert isinstance(value[1], bytes)
            path.write_bytes(value[1])
            path.chmod(0o755)
        else:
            assert value[0] == "link" and isinstance(value[1], str)
            os.symlink(value[1], path)
    return root


def age_tree(root: Path, age_ns: int = OLD_NS) -> None:
    """Move every mtime into the past so the stat cache trusts what it records."""
    when = os.stat(root).st_mtime_ns - age_ns
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(when, when), follow_symlinks=False)


def scan(
    root: Path, cache: StatCache | None = None, max_file_size: int = DEFAULT_MAX_FILE_SIZE
) -> ScanResult:
    return scan_tree(root, rules=IgnoreRules.load(root), cache=cache, max_file_size=max_file_size)


def snapshot_id(root: Path) -> str:
    return scan(root).manifest.snapshot_id


def ingest(store: ObjectStore, result: ScanResult) -> None:
    store.put_files(list(result.sources.values()))


def listing(root: Path, skip_dirs: Collection[str] = ()) -> dict[str, tuple[str, object, bool]]:
    """Everything under ``root`` as path -> (kind, contents or target, executable).

    Directories whose relative path is in ``skip_dirs`` are left out entirely.
    """
    found: dict[str, tuple[str, object, bool]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [
            name
            for name in dirnames
            if os.path.normpath(os.path.join(rel_dir, name)) not in skip_dirs
        ]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path), False)
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", None, False)
            else:
                found[rel] = ("file", Path(path).read_bytes(), bool(info.st_mode & stat.S_IXUSR))
    return found


def unchecked_manifest(entries: list[ManifestEntry]) -> SnapshotManifest:
    """A manifest built without its constructor's checks, as a hostile client could."""
    manifest = SnapshotManifest.__new__(SnapshotManifest)
    manifest._entries = tuple(entries)
    manifest._encoded = None
    return manifest


def encode_rows(rows: list[list[object]]) -> bytes:
    """A hand-made manifest encoding, for feeding decode things the encoder never writes."""
    return msgpack.packb([FORMAT_TAG, FORMAT_VERSION, rows], use_bin_type=True)  # type: ignore[no-any-return]
