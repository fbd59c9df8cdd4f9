"""An in-memory copy of a project's snapshot, patched path by path as files change.

A full scan (stat-cached) is the source of truth. Between scans, a regular file that was
written is read again on its own and its entry replaced, and a deleted file's entry dropped:
that is what makes a sync after one edit cheap on a big tree. Whatever a patch cannot decide
exactly as the scan would (directories, links, ignore files, non-ASCII names whose
normalisation the scan checks) asks for a full scan instead.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from fetchml.cas.hashing import hash_fd
from fetchml.cas.ignore import GITIGNORE_FILE, IGNORE_FILE, VENV_MARKER, IgnoreRules
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.cas.scan import StatCache, scan_tree
from fetchml.errors import BadRequest

logger = logging.getLogger(__name__)

# Files whose appearance or change alters what the scan keeps: they always cost a full scan.
RULE_FILES = frozenset({GITIGNORE_FILE, IGNORE_FILE, VENV_MARKER})
# How many times a file that changes while it is read is read again before giving up.
READ_ATTEMPTS = 2


class TreeMirror:
    """The entries of the project's next snapshot, kept current by ``apply`` and ``rescan``.

    ``changed_paths`` are the entries that differ from the snapshot last marked synced.
    """

    def __init__(self, root: Path, *, max_file_size: int) -> None:
        self.root = Path(root).resolve()
        self._root_text = str(self.root)
        self.max_file_size = max_file_size
        self.rules = IgnoreRules.load(self.root)
        self.cache = StatCache.load(self.root)
        self.needs_full_scan = True
        self.hashed_files = 0  # files read since the last mark_synced()
        self._entries: dict[str, ManifestEntry] = {}
        self._synced: dict[str, ManifestEntry] = {}
        self._touched: set[str] = set()
        self._dirs: set[str] = {""}  # kept directories, relative, as named on disk
        self._under: dict[str, int] = {}  # directory -> how many entries lie below it
        self._scan_sources: Mapping[str, Path] = {}
        self._fresh_sources: dict[str, Path] = {}
        self._manifest: SnapshotManifest | None = None

    # -- what the watcher asks ----------------------------------------------------------------
    def relative(self, path: str) -> str | None:
        """``path`` (absolute, from an event) relative to the root; None if outside it."""
        if path == self._root_text:
            return ""
        prefix = self._root_text + "/"
        return path[len(prefix):] if path.startswith(prefix) else None

    def watch_dirs(self) -> list[str]:
        """Every directory the scan would enter (absolute paths, root first); ignored ones,
        virtualenvs included, are pruned without being listed."""
        found, self._dirs = [self._root_text], {""}
        pending: list[tuple[str, str]] = [("", self._root_text)]
        while pending:
            rel_dir, dir_path = pending.pop()
            try:
                children = list(os.scandir(dir_path))
            except OSError:
                continue  # gone, or unreadable: the scan names it if it matters
            for child in children:
                try:
                    if not child.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
                if not _is_utf8(rel) or self.rules.is_ignored(rel, True):
                    continue
                found.append(child.path)
                self._dirs.add(rel)
                pending.append((rel, child.path))
        return found

    def reload_rules(self) -> None:
        """Read the ignore files again (their verdicts on directories are cached)."""
        self.rules = IgnoreRules.load(self.root)

    # -- keeping current ----------------------------------------------------------------------
    def apply(self, paths: Iterable[str]) -> None:
        """Patch the entries for these changed absolute paths, or note that a full scan is due."""
        for path in paths:
            if self.needs_full_scan:
                return
            rel = self.relative(path)
            if rel is None:
                continue
            if not rel or not self._patch(rel):
                self.needs_full_scan = True

    def rescan(self) -> None:
        """Scan the whole tree (reading only files whose stat changed) and replace the entries."""
        result = scan_tree(self.root, rules=self.rules, cache=self.cache,
                           max_file_size=self.max_file_size)
        entries = {entry.path: entry for entry in result.manifest.entries}
        old = self._entries
        self._touched.update(p for p in old.keys() | entries.keys() if old.get(p) != entries.get(p))
        self._entries, self._manifest = entries, result.manifest
        self._under = {}
        for path in entries:
            self._count_under(path, 1)
        self._scan_sources, self._fresh_sources = result.sources, {}
        self.hashed_files += result.hashed_files
        self.needs_full_scan = False
        self.cache.save()

    @property
    def manifest(self) -> SnapshotManifest:
        if self._manifest is None:
            self._manifest = SnapshotManifest(self._entries.values())
        return self._manifest

    def changed_paths(self) -> list[str]:
        """Paths whose entry differs from the last snapshot marked synced."""
        synced, entries = self._synced, self._entries
        return sorted(p for p in self._touched if synced.get(p) != entries.get(p))

    def changed_objects(self, known: Collection[str]) -> dict[str, int]:
        """Objects (oid -> size) of changed entries that are not in ``known``."""
        entries = (self._entries.get(p) for p in self._touched)
        return {e.oid: e.size for e in entries
                if e is not None and e.oid is not None and e.oid not in known}

    def mark_synced(self) -> None:
        self._synced = dict(self._entries)
        self._touched.clear()
        self.hashed_files = 0

    def source(self, oid: str) -> Path:
        """A local file holding the bytes of ``oid``."""
        found = self._fresh_sources.get(oid)
        return found if found is not None else self._scan_sources[oid]

    # -- patches ------------------------------------------------------------------------------
    def _patch(self, rel: str) -> bool:
        """Bring one path's entry up to date; False when only a full scan can."""
        # The scan checks the Unicode normalisation of names; ASCII needs none.
        if not rel.isascii() or rel.rpartition("/")[2] in RULE_FILES:
            return False
        try:
            st = os.lstat(os.path.join(self._root_text, rel))
        except (FileNotFoundError, NotADirectoryError):
            return self._patch_removed(rel)
        except OSError:
            return False
        if stat.S_ISDIR(st.st_mode):
            # A directory already kept only had its own metadata changed; a new one needs
            # watching and scanning.
            return rel in self._dirs or self.rules.is_ignored(rel, True)
        parent = rel.rpartition("/")[0]
        if parent not in self._dirs:
            return parent != "" and self.rules.is_ignored(parent, True)
        if self.rules.is_ignored(rel, False):
            return True
        if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_file_size:
            return False  # links, specials and oversized files: the scan's rules and messages
        previous = self._entries.get(rel)
        if previous is not None and previous.kind != "file":
            return False
        executable = bool(st.st_mode & stat.S_IXUSR)
        oid = self.cache.lookup(rel, st, executable)
        if oid is not None:  # an event without a change (the stat is as when last read)
            entry: ManifestEntry | None = ManifestEntry.file(rel, oid, st.st_size,
                                                             executable=executable)
            self._fresh_sources[oid] = self.root / rel
        else:
            entry = self._read(rel)
        if entry is None:
            return self._patch_removed(rel)
        self._set(rel, entry)
        listed = self._entries.get(parent) if parent else None
        if listed is not None and listed.kind == "dir":
            self._set(parent, None)  # an empty directory is listed only while it is empty
        return True

    def _patch_removed(self, rel: str) -> bool:
        previous = self._entries.get(rel)
        if previous is None:
            # Never kept (a temp file of an atomic save, an ignored file) unless it was a
            # directory, whose contents only a scan can account for.
            return rel not in self._dirs and not self._under.get(rel)
        if previous.kind == "dir":
            return False
        self._set(rel, None)
        parent = rel.rpartition("/")[0]
        if parent and not self._under.get(parent):
            self._set(parent, ManifestEntry.dir(parent))
        return True

    def _set(self, rel: str, entry: ManifestEntry | None) -> None:
        if entry is None:
            if self._entries.pop(rel, None) is not None:
                self._count_under(rel, -1)
        elif self._entries.setdefault(rel, entry) is entry:
            self._count_under(rel, 1)
        else:
            self._entries[rel] = entry
        self._touched.add(rel)
        self._manifest = None

    def _count_under(self, rel: str, step: int) -> None:
        end = rel.rfind("/")
        while end != -1:
            parent = rel[:end]
            self._under[parent] = self._under.get(parent, 0) + step
            end = rel.rfind("/", 0, end)

    def _read(self, rel: str) -> ManifestEntry | None:
        """The entry of a regular file read while it held still; None if it is gone."""
        path = os.path.join(self._root_text, rel)
        for _ in range(READ_ATTEMPTS):
            started_ns = time.time_ns()
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise BadRequest(f"cannot read {rel!r} ({exc.strerror}); fix its permissions "
                                 "or add it to .fetchmlignore", details={"path": rel}) from exc
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    return None
                oid, size = hash_fd(fd, before.st_size)
                after = os.fstat(fd)
            except OSError as exc:
                raise BadRequest(f"cannot read {rel!r} ({exc.strerror}); fix it or add it to "
                                 ".fetchmlignore", details={"path": rel}) from exc
            finally:
                os.close(fd)
            self.hashed_files += 1
            if size == after.st_size and _same_stat(before, after):
                executable = bool(after.st_mode & stat.S_IXUSR)
                self.cache.record(rel, after, executable, oid, hashed_at_ns=started_ns)
                self._fresh_sources[oid] = Path(path)
                return ManifestEntry.file(rel, oid, size, executable=executable)
        raise BadRequest(f"{rel!r} kept changing while it was being read; stop whatever writes "
                         "to it or add it to .fetchmlignore", details={"path": rel})


def _same_stat(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size, after.st_mtime_ns, after.st_ctime_ns)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
