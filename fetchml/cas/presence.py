"""Which objects of a set are missing from a store, re-checking as little as possible.

Checking a 10,000-file snapshot costs 10,000 ``stat`` calls. Removing, adding or renaming an
entry changes its directory's mtime, so an object seen in a fan-out directory that has not
changed since is still there. The checker remembers, per fan-out directory, its (inode, mtime)
and the objects seen in it; the next check stats every directory once, but only the objects
it has not seen, or those in directories that changed.

Racily-clean directories (git's term): a change within the timestamp granularity of the
recorded mtime might not move it, so directories modified that recently are not remembered.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Sequence

from fetchml.cas._layout import FANOUT_LEN

# Coarsest directory timestamp granularity guarded against (as for the stat cache).
TIMESTAMP_GRANULARITY_NS = 2_000_000_000
# Objects remembered at most (~130 bytes each); past this everything is forgotten at once.
MAX_REMEMBERED = 200_000

_DirStamp = tuple[int, int]  # (inode, mtime_ns)


def _dir_stamp(path: str) -> _DirStamp | None:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_ino, info.st_mtime_ns


class PresenceChecker:
    """``missing()`` for one store directory; thread-safe."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._lock = threading.Lock()
        # fan-out directory -> (its stamp when last checked, objects seen in it since)
        self._seen: dict[str, tuple[_DirStamp, set[str]]] = {}
        self._remembered = 0

    def missing(self, oids: Sequence[str]) -> list[str]:
        """The oids (well-formed, distinct) with no object in the store, in the order given."""
        checked_at = time.time_ns()
        by_dir: dict[str, list[str]] = {}
        for oid in oids:
            by_dir.setdefault(oid[:FANOUT_LEN], []).append(oid)
        # Stamped before the objects are looked at, so a later change moves the stamp.
        stamps = {name: _dir_stamp(f"{self.root}/{name}") for name in by_dir}
        to_stat: list[str] = []
        with self._lock:
            for name, group in by_dir.items():
                known = self._seen.get(name)
                if known is not None and known[0] == stamps[name]:
                    to_stat.extend(oid for oid in group if oid not in known[1])
                else:
                    to_stat.extend(group)
        absent = self._absent(to_stat)
        self._remember(by_dir, stamps, absent, checked_at - TIMESTAMP_GRANULARITY_NS)
        return [oid for oid in oids if oid in absent]

    def _absent(self, oids: Sequence[str]) -> set[str]:
        """The oids with no regular file in the store: one stat each."""
        absent = set()
        for oid in oids:
            path = f"{self.root}/{oid[:FANOUT_LEN]}/{oid[FANOUT_LEN:]}"
            try:
                present = stat.S_ISREG(os.stat(path).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                present = False
            if not present:
                absent.add(oid)
        return absent

    def _remember(self, by_dir: dict[str, list[str]], stamps: dict[str, _DirStamp | None],
                  absent: set[str], trusted_before: int) -> None:
        with self._lock:
            for name, group in by_dir.items():
                stamp = stamps[name]
                known = self._seen.pop(name, None)
                if known is not None:
                    self._remembered -= len(known[1])
                if stamp is None or stamp[1] >= trusted_before:
                    continue  # gone, or changed too recently to vouch for
                present = {oid for oid in group if oid not in absent}
                if known is not None and known[0] == stamp:
                    present |= known[1]
                self._seen[name] = (stamp, present)
                self._remembered += len(present)
            if self._remembered > MAX_REMEMBERED:
                self._seen.clear()
                self._remembered = 0
