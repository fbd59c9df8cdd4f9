"""Scanning a project tree into a snapshot manifest, re-reading only the files that changed."""

from __future__ import annotations

import itertools
import logging
import os
import stat
import time
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fetchml.cas.hashing import hash_fd
from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.cas.paths import link_target_problem, path_problem
from fetchml.cas.statcache import StatCache
from fetchml.errors import BadRequest, NotFound, TooLarge
from fetchml.units import human_bytes

__all__ = ["DEFAULT_MAX_FILE_SIZE", "ScanResult", "StatCache", "scan_tree"]

logger = logging.getLogger(__name__)

# Bigger files are usually data or checkpoints that belong on the box, not in a snapshot.
DEFAULT_MAX_FILE_SIZE = 1 << 30
# How many of the oversized files the TooLarge message names.
TOO_LARGE_NAMED = 5
_HASH_ATTEMPTS = 2


class _Sources(Mapping[str, Path]):
    """oid -> one local file holding those bytes; paths kept as strings until asked for."""

    __slots__ = ("_paths",)

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = paths

    def __getitem__(self, oid: str) -> Path:
        return Path(self._paths[oid])

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, oid: object) -> bool:
        return oid in self._paths


@dataclass
class ScanResult:
    manifest: SnapshotManifest
    sources: Mapping[str, Path]  # oid -> one local file holding those bytes
    hashed_files: int = 0
    hashed_bytes: int = 0


def _unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    return (
        before.st_size == after.st_size
        and before.st_mtime_ns == after.st_mtime_ns
        and before.st_ctime_ns == after.st_ctime_ns
    )


def _keep_all(_rel_path: str) -> bool:
    return False


@dataclass
class _Walk:
    root: Path
    rules: IgnoreRules | None  # None: nothing is ignored
    cache: StatCache | None
    max_file_size: int
    owner: int | None = None  # the uid every file read must belong to, when set
    # When a list: what a snapshot cannot hold is left out and said here, instead of failing.
    dropped: list[str] | None = None
    entries: list[ManifestEntry] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    # Directories with a file or link directly in them (the others may be empty).
    holders: set[str] = field(default_factory=set)
    sources: dict[str, str] = field(default_factory=dict)
    too_large: list[tuple[int, str]] = field(default_factory=list)
    hashed_files: int = 0
    hashed_bytes: int = 0

    def run(self) -> None:
        # (path in the manifest, path on disk relative to the root, absolute path on disk)
        pending: list[tuple[str, str, str]] = [("", "", os.fspath(self.root))]
        while pending:
            rel_dir, raw_dir, dir_path = pending.pop()
            try:
                children = list(os.scandir(dir_path))
            except (FileNotFoundError, NotADirectoryError):
                if not rel_dir:
                    raise
                continue  # removed or replaced while scanning: it is simply not there now
            except OSError as exc:
                if rel_dir and self.dropped is not None:
                    self._drop(f"directory {rel_dir!r} cannot be read ({exc.strerror})")
                    continue
                raise BadRequest(
                    f"cannot read directory {rel_dir or '.'!r} ({exc.strerror}); "
                    "fix its permissions or add it to .fetchmlignore",
                    details={"path": rel_dir or "."},
                ) from exc
            self._visit_dir(rel_dir, raw_dir, children, pending)

    def _visit_dir(
        self,
        rel_dir: str,
        raw_dir: str,
        children: list[os.DirEntry[str]],
        pending: list[tuple[str, str, str]],
    ) -> None:
        # Rules see the on-disk name: nested .gitignore and pyvenv.cfg are looked up by it.
        rules = self.rules
        file_ignored = rules.file_matcher(raw_dir) if rules is not None else _keep_all
        raw_prefix = f"{raw_dir}/" if raw_dir else ""
        prefix = f"{rel_dir}/" if rel_dir else ""
        names: dict[str, str] = {}
        for child in children:
            raw_rel = raw_prefix + child.name
            try:
                is_link = child.is_symlink()
                is_dir = not is_link and child.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if is_dir:
                if rules is not None and rules.is_ignored(raw_rel, True):
                    continue
            elif file_ignored(raw_rel):
                continue
            if self.dropped is None:
                rel = prefix + self._checked_name(rel_dir, child.name, names)
            else:
                try:
                    rel = prefix + self._checked_name(rel_dir, child.name, names)
                except BadRequest as exc:
                    self._drop(exc.message.split("; ")[0])
                    continue
                problem = path_problem(rel)
                if problem is not None:
                    self._drop(f"the path {rel!r} {problem}")
                    continue
            if is_link:
                self._add_link(rel, rel_dir, child.path)
            elif is_dir:
                self.dirs.append(rel)
                pending.append((rel, raw_rel, child.path))
            else:
                self._add_file(rel, rel_dir, child)

    @staticmethod
    def _checked_name(rel_dir: str, raw_name: str, names: dict[str, str]) -> str:
        """The NFC form of one directory entry's name; refuses names that cannot be stored."""
        if raw_name.isascii():
            name = raw_name  # ASCII is valid UTF-8 and already NFC
        else:
            try:
                raw_name.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(raw_name)
                where = f" in {rel_dir!r}" if rel_dir else ""
                printable = shown.decode("utf-8", "backslashreplace")
                raise BadRequest(
                    f"the file name {shown!r}{where} is not valid UTF-8; rename it or ignore it "
                    "in .fetchmlignore",
                    details={"path": f"{rel_dir}/{printable}" if rel_dir else printable},
                ) from None
            name = unicodedata.normalize("NFC", raw_name)
        # Even an ASCII name can be the NFC form of another (K is that of the Kelvin sign).
        other = names.setdefault(name, raw_name)
        if other != raw_name:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            raise BadRequest(
                f"{rel!r} exists twice under different Unicode normalisations; rename one of them",
                details={"path": rel},
            )
        # Everything else about the path (backslashes, long names) is refused by the manifest.
        return name

    def _add_link(self, rel: str, rel_dir: str, os_path: str) -> None:
        try:
            target = os.readlink(os_path)
        except FileNotFoundError:
            return
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            if self.dropped is not None:
                self._drop(f"the target of symlink {rel!r} is not valid UTF-8")
                return
            raise BadRequest(
                f"the target of symlink {rel!r} is not valid UTF-8; change it or ignore the "
                "link in .fetchmlignore",
                details={"path": rel},
            ) from None
        # Names are stored NFC, so a link must name them the same way to still resolve.
        target = unicodedata.normalize("NFC", target)
        if self.dropped is not None:
            problem = link_target_problem(rel, target)
            if problem is not None:
                self._drop(f"symlink {rel!r} {problem}")
                return
        self.entries.append(ManifestEntry.link(rel, target))
        self.holders.add(rel_dir)

    def _add_file(self, rel: str, rel_dir: str, child: os.DirEntry[str]) -> None:
        try:
            st = child.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            logger.warning("skipping %r: not a regular file, directory or symlink", rel)
            if self.dropped is not None:
                self._drop(f"{rel!r} is not a regular file, directory or symlink")
            return
        if st.st_size > self.max_file_size:
            self.too_large.append((st.st_size, rel))
            return
        executable = bool(st.st_mode & stat.S_IXUSR)
        oid = self.cache.lookup(rel, st, executable) if self.cache is not None else None
        if oid is None:
            try:
                hashed = self._hash(rel, child.path)
            except BadRequest as exc:
                if self.dropped is None:
                    raise
                self._drop(exc.message.split("; ")[0])
                return
            if hashed is None:
                return
            oid, st, hashed_at_ns = hashed
            executable = bool(st.st_mode & stat.S_IXUSR)
            if self.cache is not None:
                self.cache.record(rel, st, executable, oid, hashed_at_ns=hashed_at_ns)
        self.sources.setdefault(oid, child.path)
        self.entries.append(ManifestEntry.file(rel, oid, st.st_size, executable=executable))
        self.holders.add(rel_dir)

    def _hash(self, rel: str, os_path: str) -> tuple[str, os.stat_result, int] | None:
        """(oid, stat, time before reading) of a file that held still while read; None if gone."""
        for _ in range(_HASH_ATTEMPTS):
            started_ns = time.time_ns()
            try:
                # O_NONBLOCK: a file swapped for a FIFO since the stat must not hang the scan
                fd = os.open(os_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise BadRequest(
                    f"cannot read {rel!r} ({exc.strerror}); fix its permissions or add it "
                    "to .fetchmlignore",
                    details={"path": rel},
                ) from exc
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    continue
                if self.owner is not None and before.st_uid != self.owner:
                    raise BadRequest(f"{rel!r} does not belong to uid {self.owner}, who wrote "
                                     "this tree; it is not stored", details={"path": rel})
                oid, size = hash_fd(fd, before.st_size)
                after = os.fstat(fd)
            except OSError as exc:
                raise BadRequest(
                    f"cannot read {rel!r} ({exc.strerror}); fix it or add it to .fetchmlignore",
                    details={"path": rel},
                ) from exc
            finally:
                os.close(fd)
            self.hashed_files += 1
            self.hashed_bytes += size
            if _unchanged(before, after) and size == after.st_size:
                return oid, after, started_ns
        raise BadRequest(
            f"{rel!r} kept changing while it was being read; stop whatever writes to it or add "
            "it to .fetchmlignore",
            details={"path": rel},
        )

    def _drop(self, why: str) -> None:
        """Say why an entry is left out of the snapshot (only with ``dropped``)."""
        assert self.dropped is not None
        self.dropped.append(f"{why}: left out")

    def check_sizes(self) -> None:
        if not self.too_large:
            return
        largest = sorted(self.too_large, reverse=True)[:TOO_LARGE_NAMED]
        named = ", ".join(f"{rel!r} ({human_bytes(size)})" for size, rel in largest)
        more = len(self.too_large) - len(largest)
        raise TooLarge(
            f"{len(self.too_large)} file(s) exceed max_file_size "
            f"({human_bytes(self.max_file_size)}): {named}{f' and {more} more' if more else ''}; "
            "add them to .fetchmlignore or raise max_file_size",
            details={"paths": [rel for _, rel in largest]},
        )

    def empty_dirs(self) -> list[str]:
        """Directories with nothing kept under them: the only ones a manifest lists."""
        holders: set[str] = set()
        parents = (d.rpartition("/")[0] for d in self.dirs)
        for directory in itertools.chain(self.holders, parents):
            # A directory holding something makes every ancestor a holder too.
            while directory and directory not in holders:
                holders.add(directory)
                directory = directory.rpartition("/")[0]
        return [d for d in self.dirs if d not in holders]


def scan_tree(
    root: Path,
    *,
    rules: IgnoreRules | None,
    cache: StatCache | None,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    owner: int | None = None,
    dropped: list[str] | None = None,
) -> ScanResult:
    """Snapshot the tree at ``root``: never follows symlinks, skips ignored paths.

    With ``rules`` None nothing is ignored (a job's outputs are kept as written). With a
    ``dropped`` list, what a snapshot cannot hold faithfully (a symlink whose target is
    absolute or leaves the tree, a name that is not UTF-8 or not a valid snapshot path, a
    file that is not regular, or that cannot be read, or that belongs to another uid than
    ``owner``) is left out and described there, one sentence each, instead of failing the
    scan; links that stay inside are kept as links.
    With a cache, only files whose stat changed are read; call ``cache.save()`` afterwards.
    With ``owner``, every file read must belong to that uid (BadRequest otherwise): a tree
    written by another user's process may swap a directory for a link to what only the
    reader could read, or hold a hard link to it.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFound(f"{root} is not a directory; run fetchml from your project directory")
    walk = _Walk(root, rules, cache, max_file_size, owner=owner, dropped=dropped)
    walk.run()
    walk.check_sizes()
    walk.entries.extend(ManifestEntry.dir(path) for path in walk.empty_dirs())
    manifest = SnapshotManifest(walk.entries)
    if cache is not None:
        cache.retain({entry.path for entry in walk.entries if entry.kind == "file"})
    return ScanResult(manifest, _Sources(walk.sources), walk.hashed_files, walk.hashed_bytes)
