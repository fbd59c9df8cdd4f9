"""The SQLite job database's schema, its migrations and how a Job maps onto a row.

Only what is queried has a real column (id, state, owner, host, ...); the rest of a job is one
JSON document in ``data``. The schema version lives in ``PRAGMA user_version``; ``MIGRATIONS``
is ordered and migration N (1-based) takes a database from version N-1 to N.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiosqlite

from fetchml.daemon.jobs.model import Job
from fetchml.errors import BadRequest, IntegrityError, Unavailable

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 1: jobs, with indexes for the listings the daemon serves, and the waits of held jobs.
    # AUTOINCREMENT so that an id is never reused, even after the newest job is deleted.
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        state TEXT NOT NULL,
        owner TEXT NOT NULL,
        priority INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        host TEXT,
        created_at REAL NOT NULL,
        finished_at REAL,
        data TEXT NOT NULL
    );
    CREATE INDEX jobs_by_state ON jobs (state, id);
    CREATE INDEX jobs_by_owner ON jobs (owner, id);
    CREATE INDEX jobs_by_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE job_waits (
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        after_id INTEGER NOT NULL REFERENCES jobs (id),
        PRIMARY KEY (job_id, after_id)
    ) WITHOUT ROWID;
    CREATE INDEX job_waits_by_after ON job_waits (after_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Fields with a column of their own, in column order after ``id``. The statements below are
# built from these constant names only, never from input.
COLUMNS = ("state", "owner", "priority", "attempt", "host", "created_at", "finished_at")
_NAMES = ", ".join(COLUMNS)
_MARKS = ", ".join("?" * (len(COLUMNS) + 2))
_ASSIGNMENTS = ", ".join(f"{name} = ?" for name in COLUMNS)
SELECT_JOB = f"SELECT id, {_NAMES}, data FROM jobs"  # noqa: S608
INSERT_JOB = f"INSERT INTO jobs (id, {_NAMES}, data) VALUES ({_MARKS})"  # noqa: S608
UPDATE_JOB = f"UPDATE jobs SET {_ASSIGNMENTS}, data = ? WHERE id = ?"  # noqa: S608


def job_to_row(job: Job) -> tuple[Any, ...]:
    """``(id, *COLUMNS, data)`` for ``INSERT_JOB``."""
    fields = job.to_dict()
    del fields["id"]
    columns = tuple(fields.pop(name) for name in COLUMNS)
    return (job.id, *columns, json.dumps(fields, separators=(",", ":")))


def update_params(job: Job) -> tuple[Any, ...]:
    """The parameters of ``UPDATE_JOB`` for ``job``."""
    job_id, *rest = job_to_row(job)
    return (*rest, job_id)


def row_to_job(row: Any) -> Job:
    """The Job a ``SELECT_JOB`` row stores."""
    try:
        fields = json.loads(row[-1])
        fields["id"] = row[0]
        fields.update(zip(COLUMNS, row[1:-1], strict=True))
        return Job.from_dict(fields)
    except (ValueError, TypeError, BadRequest) as exc:
        raise IntegrityError(
            f"job {row[0]} in the job database is damaged ({exc}); restore the database from a "
            "backup or delete that job"
        ) from exc


async def migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the database to ``SCHEMA_VERSION``, one migration per transaction."""
    while True:
        await db.execute("BEGIN IMMEDIATE")  # read the version under the write lock
        try:
            version = await _user_version(db)
            if version > SCHEMA_VERSION:
                raise Unavailable(
                    f"the job database {path} has schema version {version} but this fetchml "
                    f"knows only up to {SCHEMA_VERSION}; upgrade fetchml to open it"
                )
            if version == SCHEMA_VERSION:
                await db.execute("COMMIT")
                return
            log.info("migrating the job database %s to schema version %d", path, version + 1)
            for statement in _statements(MIGRATIONS[version]):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {version + 1}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise


async def _user_version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


def _statements(script: str) -> list[str]:
    """The statements of a migration (executescript would commit the open transaction)."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]
