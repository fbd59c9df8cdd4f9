"""The stat cache: remembers each file's stat and digest so unchanged files are not re-read.

Racily-clean files (git's term): a file modified within the timestamp granularity of the
moment it was hashed could change again without its mtime moving. Such entries are never
trusted; the file is hashed again on the next scan, by which time its mtime is old enough.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

import msgpack

logger = logging.getLogger(__name__)

CACHE_DIR = ".fetchml"
CACHE_FILE = "statcache"
CACHE_VERSION = 1
# Coarsest file timestamp granularity we guard against (FAT and some network filesystems
# have 2 s; ext4/xfs/btrfs use a kernel tick of a few ms, which this covers too).
TIMESTAMP_GRANULARITY_NS = 2_000_000_000


class CachedStat(NamedTuple):
    """What a file looked like when it was hashed. A tuple: cheap to build by the thousand."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    executable: bool
    oid: str

    def matches(self, st: os.stat_result, executable: bool) -> bool:
        return (
            self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns
            and self.inode == st.st_ino
            and self.executable == executable
        )


class StatCache:
    """Per-path (size, mtime_ns, ctime_ns, inode, executable, oid), kept in a project's .fetchml/.

    One scan at a time uses a cache; call ``save()`` after the scan to persist it.
    """

    def __init__(self, path: Path, entries: dict[str, CachedStat] | None = None) -> None:
        self.path = Path(path)
        self._entries: dict[str, CachedStat] = dict(entries or {})
        # Whether the entries differ from the file: an unchanged cache is not rewritten.
        self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, root: Path) -> StatCache:
        """The cache of the project at ``root``; empty if missing or unreadable."""
        path = Path(root) / CACHE_DIR / CACHE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            logger.warning("ignoring the stat cache %s: %s", path, exc.strerror)
            return cls(path)
        try:
            entries = _decode(data)
        except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            logger.warning("ignoring the corrupt stat cache %s: %s", path, exc)
            return cls(path)
        cache = cls(path, entries)
        # Rows distrusted as racily clean are left out of ``entries``; keeping the file as it
        # is only keeps distrusting them, which is safe.
        cache._dirty = False
        return cache

    def lookup(self, rel_path: str, st: os.stat_result, executable: bool) -> str | None:
        """The cached oid if the file's stat is exactly as recorded, else None."""
        cached = self._entries.get(rel_path)
        if cached is not None and cached.matches(st, executable):
            return cached.oid
        return None

    def record(
        self,
        rel_path: str,
        st: os.stat_result,
        executable: bool,
        oid: str,
        *,
        hashed_at_ns: int,
    ) -> None:
        """Remember a digest read at or after ``hashed_at_ns``; racily-clean ones are dropped."""
        if st.st_mtime_ns >= hashed_at_ns - TIMESTAMP_GRANULARITY_NS:
            if self._entries.pop(rel_path, None) is not None:
                self._dirty = True
            return
        entry = CachedStat(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, executable, oid)
        if self._entries.get(rel_path) != entry:
            self._entries[rel_path] = entry
            self._dirty = True

    def retain(self, rel_paths: set[str]) -> None:
        """Forget every path not in ``rel_paths`` (files deleted or newly ignored)."""
        stale = self._entries.keys() - rel_paths
        if stale:
            for rel_path in stale:
                del self._entries[rel_path]
            self._dirty = True

    def save(self) -> None:
        """Write the cache atomically (temp file + rename); failures only cost a re-hash later.

        Does nothing when no entry changed since the cache was loaded or last saved.
        """
        if not self._dirty:
            return
        written_ns = time.time_ns()
        rows = [
            [p, e.size, e.mtime_ns, e.ctime_ns, e.inode, e.executable, bytes.fromhex(e.oid)]
            for p, e in self._entries.items()
        ]
        data = msgpack.packb([CACHE_VERSION, written_ns, rows], use_bin_type=True)
        temp = self.path.with_name(f"{CACHE_FILE}.tmp-{secrets.token_hex(6)}")
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            with open(temp, "wb") as stream:
                stream.write(data)
                stream.flush()
                # A torn cache must not survive a crash with wrong digests in it.
                os.fdatasync(stream.fileno())
            os.replace(temp, self.path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            logger.warning("could not save the stat cache %s: %s", self.path, exc.strerror)
            return
        self._dirty = False


def _decode(data: bytes) -> dict[str, CachedStat]:
    version, written_ns, rows = msgpack.unpackb(data, raw=False, use_list=False)
    if version != CACHE_VERSION or not isinstance(written_ns, int):
        raise ValueError(f"unknown stat cache version {version!r}")
    # Anything modified within the granularity of the save is racily clean: distrust it.
    trusted_before = written_ns - TIMESTAMP_GRANULARITY_NS
    entries: dict[str, CachedStat] = {}
    for path, size, mtime_ns, ctime_ns, inode, executable, digest in rows:
        if not isinstance(path, str) or not isinstance(digest, bytes) or len(digest) != 32:
            raise ValueError(f"bad stat cache row for {path!r}")
        if mtime_ns < trusted_before:
            entries[path] = CachedStat(
                size, mtime_ns, ctime_ns, inode, bool(executable), digest.hex()
            )
    return entries
