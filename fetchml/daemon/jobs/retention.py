"""Pruning finished jobs, and pins: snapshots kept from garbage collection (see gc.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetchml.daemon.jobs.model import TERMINAL_STATES, Job, JobState
from fetchml.daemon.store.contract import JobStore
from fetchml.errors import InternalError, NotFound

PINS_NAME = "pins.json"


@dataclass(frozen=True)
class PruneReport:
    jobs: int = 0
    runs: int = 0
    objects: int = 0
    bytes: int = 0
    snapshots: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "runs": self.runs, "objects": self.objects,
                "bytes": self.bytes, "snapshots": self.snapshots, "dry_run": self.dry_run}


class Pins:
    """Snapshots kept from garbage collection, each with the users who pinned it, in
    ``<state>/pins.json``. A pin belongs to its user: each user lists and removes their own."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PINS_NAME
        self._lock = threading.Lock()
        try:
            raw = dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as exc:
            raise InternalError(f"{self.path} is unreadable ({exc}); fix or remove it") from exc
        # older files map a snapshot to the one name that pinned it
        self.by: dict[str, set[str]] = {
            snapshot: {users} if isinstance(users, str) else set(users)
            for snapshot, users in raw.items()}

    @property
    def ids(self) -> set[str]:
        """Every pinned snapshot, whoever pinned it (the roots garbage collection keeps)."""
        return set(self.by)

    def _save(self) -> None:
        tmp = self.path.with_name(f".{PINS_NAME}.tmp")
        data = {snapshot: sorted(users) for snapshot, users in self.by.items()}
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def pin(self, snapshot: str, by: str) -> None:
        with self._lock:
            self.by.setdefault(snapshot, set()).add(by)
            self._save()

    def unpin(self, snapshot: str, by: str | None) -> list[str]:
        """Remove ``by``'s pin of ``snapshot`` (every pin of it when ``by`` is None); returns
        the users whose pins were removed."""
        with self._lock:
            users = self.by.get(snapshot, set())
            gone = set(users) if by is None else users & {by}
            if not gone:
                mine = "" if by is None else " by you"
                raise NotFound(f"snapshot {snapshot[:12]} is not pinned{mine}; `fetchml pin "
                               "--list` shows the pins")
            users -= gone
            if not users:
                del self.by[snapshot]
            self._save()
        return sorted(gone)

    def listing(self, owner: str | None) -> list[dict[str, str]]:
        """``{"snapshot", "by"}`` per pin, of ``owner`` only unless it is None."""
        return [{"snapshot": snapshot, "by": user} for snapshot in sorted(self.by)
                for user in sorted(self.by[snapshot]) if owner is None or user == owner]


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def select_for_prune(jobs: list[Job], *, older_than: float | None, keep: int | None,
                     now: float) -> list[Job]:
    """Finished jobs older than ``older_than``, minus the ``keep`` newest of the selection."""
    chosen = [j for j in jobs if j.state in TERMINAL_STATES and
              (older_than is None or (j.finished_at or j.created_at) <= now - older_than)]
    chosen.sort(key=lambda j: (j.finished_at or j.created_at, j.id), reverse=True)
    return chosen[keep:] if keep else chosen


async def prune_jobs(store: JobStore, runs_dir: Path, *, owner: str | None,
                     states: set[JobState] | None, older_than: float | None,
                     keep: int | None, dry_run: bool) -> tuple[list[int], int, int]:
    """Delete finished jobs' run directories and records: (job ids, runs, bytes)."""
    wanted = (states or set(TERMINAL_STATES)) & set(TERMINAL_STATES)
    jobs = await store.list(states=wanted, owner=owner)
    doomed = select_for_prune(jobs, older_than=older_than, keep=keep, now=time.time())
    runs = size = 0
    for job in doomed:
        job_dir = runs_dir / str(job.id)
        if not job_dir.is_dir():
            continue
        attempts = [p for p in job_dir.iterdir() if p.is_dir()]
        runs += len(attempts)
        size += await asyncio.to_thread(_tree_size, job_dir)
        if not dry_run:
            await asyncio.to_thread(shutil.rmtree, job_dir, True)
    ids = [j.id for j in doomed]
    if not dry_run:
        await store.delete(ids)
    return ids, runs, size
