"""Each dataset version materialised once per host, read-only, and shared by every job.

``<state>/datasets/cache/<snapshot>/`` holds the tree: files 0444 (0555 when executable),
directories 0555. Files are copies made with ``copy_file_range``, which clones (reflinks) on
filesystems that can (btrfs, XFS) and copies elsewhere; never hard links, so nothing done to the
cache reaches a stored object. A version is written into a temporary directory, flushed, and
renamed into place, so a crash never leaves a half cache; leftovers are removed on start.

Each cache has a seal (``<state>/datasets/seals/<snapshot>``): a digest of the tree's metadata,
change times included. Any write, chmod, rename or deletion changes a change time that no
process can set back, so before a cache is reused its seal is checked, and a cache found
altered (possible without isolation, where jobs run as the daemon's user) is replaced with a
fresh copy: every job starts on the exact bytes of its version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from pathlib import Path

from fetchml.cas._fs import fsync_directory, sync_filesystem, translate_os_error
from fetchml.cas.hashing import Hasher
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.materialize import materialize
from fetchml.cas.objects import ObjectStore
from fetchml.errors import NotFound

log = logging.getLogger(__name__)

FILE_MODE, EXEC_MODE, DIR_MODE = 0o444, 0o555, 0o555
TEMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"


def fingerprint(root: Path) -> str:
    """A digest of every entry's path, type, mode, size, inode and change time under root."""
    hasher = Hasher()
    pending = [""]
    while pending:
        rel = pending.pop()
        st = os.lstat(root / rel) if rel else os.lstat(root)
        hasher.update(f"{rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_ino}\0{st.st_ctime_ns}\0"
                      f"{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(root / rel) as entries:
                names = sorted(entry.name for entry in entries)
            pending.extend(f"{rel}/{name}" if rel else name for name in reversed(names))
    return hasher.hexdigest()


def _make_read_only(root: Path) -> None:
    for top, dirs, files in os.walk(root, topdown=False):
        for name in files:  # symlinks (to files or dirs) have no mode of their own
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, EXEC_MODE if st.st_mode & 0o100 else FILE_MODE)
        for name in dirs:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, DIR_MODE)
    os.chmod(root, DIR_MODE)


def remove_tree(path: Path) -> None:
    """Delete a read-only tree (its directories are made writable first)."""
    with contextlib.suppress(FileNotFoundError):
        if not path.is_symlink() and path.is_dir():
            os.chmod(path, 0o700)
            for top, dirs, _files in os.walk(path):
                for name in dirs:
                    child = os.path.join(top, name)
                    if not os.path.islink(child):
                        os.chmod(child, 0o700)
        shutil.rmtree(path)


class DatasetCache:
    """The per-host cache; blocking methods, safe to call from several threads at once."""

    def __init__(self, root: Path, objects: ObjectStore) -> None:
        self.root, self.objects = root, objects
        self.cache_dir, self.seal_dir = root / "cache", root / "seals"
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self.materialisations = 0  # trees written since start, for logs and tests

    def open(self) -> None:
        """Create the directories and remove what a crash left half done."""
        for path in (self.root, self.cache_dir, self.seal_dir):
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        for entry in self.cache_dir.iterdir():
            if entry.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
                log.info("removing the unfinished dataset cache %s", entry.name)
                remove_tree(entry)

    def path(self, snapshot: str) -> Path:
        return self.cache_dir / snapshot

    def _lock(self, snapshot: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(snapshot, threading.Lock())

    def _seal_matches(self, snapshot: str) -> bool:
        try:
            sealed = (self.seal_dir / snapshot).read_text().strip()
            return sealed == fingerprint(self.path(snapshot))
        except (OSError, UnicodeDecodeError):
            return False

    def is_cached(self, snapshot: str) -> bool:
        return (self.seal_dir / snapshot).is_file() and self.path(snapshot).is_dir()

    def ensure(self, snapshot: str, manifest: SnapshotManifest, what: str) -> Path:
        """The cache of ``snapshot``, written now unless an intact one exists already."""
        with self._lock(snapshot):
            final = self.path(snapshot)
            if self._seal_matches(snapshot):
                return final
            if os.path.lexists(final):
                log.warning("the cache of dataset %s was altered; replacing it", what)
                self._discard(snapshot)
            missing = self.objects.missing(sorted(manifest.oids()))
            if missing:
                raise NotFound(f"{len(missing)} objects of dataset {what} are not stored on "
                               "this host; push the dataset to this daemon again")
            try:
                return self._write(snapshot, manifest, what)
            except OSError as exc:
                raise translate_os_error(exc, f"materialising dataset {what}") from exc

    def _write(self, snapshot: str, manifest: SnapshotManifest, what: str) -> Path:
        started = time.monotonic()
        temp = self.cache_dir / f"{TEMP_PREFIX}{snapshot[:16]}-{secrets.token_hex(4)}"
        try:
            materialize(manifest, self.objects, temp)
            _make_read_only(temp)
            fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sync_filesystem(fd)  # the tree is on disk before its name says it is complete
            finally:
                os.close(fd)
            os.rename(temp, self.path(snapshot))
        except BaseException:
            remove_tree(temp)
            raise
        fsync_directory(self.cache_dir)
        seal = self.seal_dir / snapshot
        partial = seal.with_name(f"{TEMP_PREFIX}{snapshot}")
        partial.write_text(fingerprint(self.path(snapshot)) + "\n")
        os.replace(partial, seal)
        fsync_directory(self.seal_dir)
        self.materialisations += 1
        log.info("materialised dataset %s (%d files, %d bytes) in %.2f s", what,
                 manifest.file_count, manifest.total_bytes, time.monotonic() - started)
        return self.path(snapshot)

    def _discard(self, snapshot: str) -> None:
        """Unname the cache at once (jobs still reading keep their open files), then delete."""
        (self.seal_dir / snapshot).unlink(missing_ok=True)
        final = self.path(snapshot)
        trash = self.cache_dir / f"{TRASH_PREFIX}{snapshot[:16]}-{secrets.token_hex(4)}"
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            return
        remove_tree(trash)

    def remove(self, snapshot: str) -> None:
        with self._lock(snapshot):
            self._discard(snapshot)

    def snapshots(self) -> list[str]:
        """Snapshots with a cache here (complete or not)."""
        try:
            return sorted(e.name for e in self.cache_dir.iterdir()
                          if not e.name.startswith("."))
        except FileNotFoundError:
            return []

    def sweep(self, keep: set[str]) -> list[str]:
        """Remove the caches of every snapshot not in ``keep``; returns those removed."""
        removed = []
        for snapshot in self.snapshots():
            if snapshot not in keep:
                try:
                    self.remove(snapshot)
                except OSError as exc:
                    log.warning("could not remove the dataset cache %s: %s", snapshot[:12], exc)
                    continue
                removed.append(snapshot)
        for seal in self.seal_dir.iterdir():
            if not seal.name.startswith(".") and not self.path(seal.name).exists():
                seal.unlink(missing_ok=True)
        return removed
