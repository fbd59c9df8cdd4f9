"""Who may read which snapshot, and which objects a connection may download.

A snapshot belongs to the users who uploaded it (``snapshot.put``) and, for a job's outputs,
to the job's owner. A user who may not read every job (``jobs:read:all``) resolves and reads
only what belongs to them, the snapshots of jobs they may see (granted to the connection that
looked the job up) and datasets they may read; everything else looks as if it were not stored.
An object is downloadable by a connection once it read a manifest naming it or uploaded it.

Owners are kept in ``<state>/snapshot-owners.jsonl``, one ``{"snapshot", "user"}`` line each,
appended as they come (a lost last line after a crash costs its owner a re-sync, nothing more).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

OWNERS_NAME = "snapshot-owners.jsonl"
# Kept per connection (session.state): what it may read beyond its user's own snapshots.
READABLE_SNAPSHOTS_KEY = "readable_snapshots"
READABLE_OBJECTS_KEY = "readable_objects"


class SnapshotOwners:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / OWNERS_NAME
        self._lock = threading.Lock()
        self._by_user: dict[str, set[str]] = {}
        self._pairs: set[tuple[str, str]] = set()

    def open(self) -> None:
        try:
            with self.path.open("rb") as lines:
                for raw in lines:
                    try:
                        entry = json.loads(raw)
                        self._add(str(entry["snapshot"]), str(entry["user"]))
                    except (ValueError, KeyError, TypeError):
                        log.warning("skipping a damaged line of %s", self.path)
        except FileNotFoundError:
            pass

    def _add(self, snapshot: str, user: str) -> bool:
        if (snapshot, user) in self._pairs:
            return False
        self._pairs.add((snapshot, user))
        self._by_user.setdefault(user, set()).add(snapshot)
        return True

    def record(self, snapshot: str, user: str) -> None:
        """``snapshot`` belongs to ``user`` (too); durable enough when it returns."""
        with self._lock:
            if not self._add(snapshot, user):
                return
            line = json.dumps({"snapshot": snapshot, "user": user}).encode() + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                         0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def owned_by(self, user: str) -> set[str]:
        return self._by_user.get(user, set())

    def readable(self, user: str, extra: Iterable[str]) -> set[str]:
        """The snapshots ``user`` may read: theirs and ``extra`` (grants, datasets)."""
        return self.owned_by(user) | set(extra)
