"""Where dataset versions are recorded: a SQLite file in the state dir, or Redis for a cluster.

The registry is not part of the JobStore contract: with the embedded store it is its own file
(``<state>/datasets.db``, outside ``<state>/datasets/`` which jobs may see); with a ``redis://``
store every daemon shares it under ``fetchml:datasets:``.

A version is ``ready``, ``removing`` (a removal is checking that no job uses it; new jobs may
not take it) or ``removed`` (kept as a tombstone, so that a number is never reused and jobs
that ran on it still resolve to their snapshot). Version numbers grow per name: the next one is
one more than the highest ever recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiosqlite

from fetchml.errors import Conflict, FetchmlError, NotFound, Unavailable

log = logging.getLogger(__name__)

READY, REMOVING, REMOVED = "ready", "removing", "removed"
STATES = (READY, REMOVING, REMOVED)
REGISTRY_FILE = "datasets.db"


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: int
    snapshot: str
    files: int
    bytes: int
    pushed_by: str
    pushed_at: float
    description: str = ""
    state: str = READY

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, text: str) -> DatasetVersion:
        return cls(**json.loads(text))


def owner_of(versions: Collection[DatasetVersion]) -> str | None:
    """Who owns a dataset: the pusher of its oldest version still present."""
    present = [v for v in versions if v.state != REMOVED]
    return min(present, key=lambda v: v.version).pushed_by if present else None


def next_version(versions: Collection[DatasetVersion], draft: DatasetVersion
                 ) -> tuple[DatasetVersion, bool]:
    """(the version ``draft`` becomes, whether it is new): an unchanged latest is reused."""
    present = [v for v in versions if v.state == READY]
    latest = max(present, key=lambda v: v.version, default=None)
    if latest is not None and latest.snapshot == draft.snapshot:
        return latest, False
    number = max((v.version for v in versions), default=0) + 1
    return replace(draft, version=number, state=READY), True


def change_state(current: DatasetVersion | None, name: str, version: int, state: str,
                 expect: Collection[str]) -> DatasetVersion:
    if current is None:
        raise NotFound(f"dataset {name}@{version} does not exist; `fetchml dataset info "
                       f"{name}` lists its versions")
    if current.state not in expect:
        raise Conflict(f"dataset {name}@{version} is {current.state}, not "
                       f"{' or '.join(expect)}; run `fetchml dataset info {name}` and retry")
    return replace(current, state=state)


# A change of one dataset's versions: (versions to store, result for the caller).
Change = Callable[[list[DatasetVersion]], tuple[list[DatasetVersion], Any]]


class DatasetRegistry(ABC):
    """Every daemon that shares a job store sees the same registry."""

    shared = False  # whether other daemons change it too (then it is re-read periodically)

    @abstractmethod
    async def open(self) -> None:
        """Connect or create; idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def versions(self, name: str) -> list[DatasetVersion]:
        """Every version of ``name`` (removed ones too), oldest first; [] for an unknown name."""

    @abstractmethod
    async def all_versions(self) -> list[DatasetVersion]:
        """Every version of every dataset, removed ones too."""

    @abstractmethod
    async def _write(self, name: str, change: Change) -> Any:
        """Atomically: read ``name``'s versions, apply ``change`` (which returns the versions to
        store and a result), store them; returns the result."""

    async def record(self, draft: DatasetVersion) -> tuple[DatasetVersion, bool]:
        """Store ``draft`` as the next version of its name (atomically); see next_version."""
        def change(versions: list[DatasetVersion]) -> tuple[list[DatasetVersion], Any]:
            version, created = next_version(versions, draft)
            return ([version] if created else []), (version, created)

        result: tuple[DatasetVersion, bool] = await self._write(draft.name, change)
        return result

    async def set_state(self, name: str, version: int, state: str, *,
                        expect: Collection[str]) -> DatasetVersion:
        """Compare-and-set a version's state; Conflict when it is not in ``expect``."""
        def change(versions: list[DatasetVersion]) -> tuple[list[DatasetVersion], Any]:
            current = next((v for v in versions if v.version == version), None)
            updated = change_state(current, name, version, state, expect)
            return [updated], updated

        result: DatasetVersion = await self._write(name, change)
        return result

    async def generation(self) -> int:
        """A number that changes whenever the registry does (for shared registries)."""
        return 0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS dataset_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
"""


class SqliteDatasetRegistry(DatasetRegistry):
    """The embedded registry: one table in its own database file, WAL, synchronous=FULL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        # One connection: a transaction must not interleave with another request's statements.
        self._lock = asyncio.Lock()

    def _fail(self, exc: sqlite3.Error) -> FetchmlError:
        return Unavailable(f"the dataset registry {self.path} cannot be used ({exc}); check the "
                           "disk and that no other daemon uses this state directory")

    async def open(self) -> None:
        if self._db is not None:
            return
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.execute("PRAGMA busy_timeout=10000")
            await self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise Unavailable("the dataset registry is closed; the daemon is stopping")
        return self._db

    async def _select(self, where: str, params: tuple[Any, ...]) -> list[DatasetVersion]:
        async with self._lock:
            return await self._select_unlocked(where, params)

    async def _select_unlocked(self, where: str, params: tuple[Any, ...]
                               ) -> list[DatasetVersion]:
        # ``where`` is one of this class's constant clauses, never input
        query = "SELECT data FROM dataset_versions" + where + " ORDER BY name, version"  # noqa: S608
        try:
            async with self.db.execute(query, params) as cursor:
                rows = await cursor.fetchall()
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc
        return [DatasetVersion.from_json(row[0]) for row in rows]

    async def versions(self, name: str) -> list[DatasetVersion]:
        return await self._select(" WHERE name = ?", (name,))

    async def all_versions(self) -> list[DatasetVersion]:
        return await self._select("", ())

    async def _write(self, name: str, change: Change) -> Any:
        """Run ``change(versions) -> (rows to upsert, result)`` in one IMMEDIATE transaction."""
        async with self._lock:
            return await self._write_unlocked(name, change)

    async def _write_unlocked(self, name: str, change: Any) -> Any:
        try:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                rows, result = change(await self._select_unlocked(" WHERE name = ?", (name,)))
                await self.db.executemany(
                    "INSERT OR REPLACE INTO dataset_versions (name, version, state, data) "
                    "VALUES (?, ?, ?, ?)",
                    [(v.name, v.version, v.state, json.dumps(v.to_wire())) for v in rows])
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc
        return result
