"""What only the SQLite job store has: durability settings, migrations, group commit, locking."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sqlite3
import stat
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from fetchml.daemon.store import (
    ACTIVE_STATES,
    AttemptResult,
    Claim,
    Job,
    JobSpec,
    JobState,
    SqliteJobStore,
    sqlite_schema,
)
from fetchml.errors import IntegrityError, Unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = "5e" * 32


def spec(**overrides: Any) -> JobSpec:
    return JobSpec(
        **({"name": "t", "owner": "alice", "snapshot": SNAPSHOT, "argv": ("true",)} | overrides)
    )


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


async def pragma(db: Any, name: str) -> Any:
    rows = list(await db.execute_fetchall(f"PRAGMA {name}"))
    return rows[0][0]


async def test_the_database_is_durable_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "jobs.db"  # the directory does not exist yet
    async with SqliteJobStore(path, busy_timeout=2.5) as store:
        writer, reader = store._writer_db, store._reader_db
        assert writer is not None and store._writer_thread is not None
        loop = asyncio.get_running_loop()

        async def writer_pragma(name: str) -> Any:
            run = functools.partial(lambda n: writer.execute(f"PRAGMA {n}").fetchone()[0], name)
            return await loop.run_in_executor(store._writer_thread, run)

        assert await writer_pragma("synchronous") == 2  # FULL: a commit is fsynced
        assert await writer_pragma("busy_timeout") == 2500
        assert await writer_pragma("foreign_keys") == 1
        assert await pragma(reader, "synchronous") == 2
        assert await pragma(reader, "busy_timeout") == 2500
        assert await pragma(reader, "query_only") == 1
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_an_empty_database_is_migrated_to_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.touch()
    assert user_version(path) == 0
    async with SqliteJobStore(path) as store:
        job = (await store.submit([spec()], now=1.0))[0]
    assert user_version(path) == sqlite_schema.SCHEMA_VERSION
    async with SqliteJobStore(path) as store:  # opening a current database changes nothing
        assert await store.get(job.id) == job
    assert user_version(path) == sqlite_schema.SCHEMA_VERSION


async def test_migrations_run_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jobs.db"
    async with SqliteJobStore(path) as store:
        (job,) = await store.submit([spec()], now=1.0)
    # a later fetchml adds a migration: it runs on the next open, and only then
    migrations = [*sqlite_schema.MIGRATIONS, "ALTER TABLE jobs ADD COLUMN note TEXT"]
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", migrations)
    monkeypatch.setattr(sqlite_schema, "SCHEMA_VERSION", len(migrations))
    for _ in range(2):  # a second run of the ALTER would fail with "duplicate column"
        async with SqliteJobStore(path) as store:
            assert await store.get(job.id) == job
        assert user_version(path) == len(migrations)
    with sqlite3.connect(path) as db:
        assert "note" in [row[1] for row in db.execute("PRAGMA table_info(jobs)")]


async def test_a_database_from_a_newer_fetchml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with SqliteJobStore(path):
        pass
    newer = sqlite_schema.SCHEMA_VERSION + 1
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {newer}")
    store = SqliteJobStore(path)
    with pytest.raises(Unavailable, match=f"schema version {newer}.*upgrade fetchml"):
        await store.open()
    assert user_version(path) == newer
    await store.close()


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(b"this is not a database, it is a text file " * 100)
    with pytest.raises(IntegrityError, match=r"not a database.*move it aside"):
        await SqliteJobStore(path).open()


async def test_an_unwritable_directory_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Unavailable, match="cannot create the job database"):
        await SqliteJobStore(blocker / "jobs.db").open()


async def test_a_damaged_row_is_an_integrity_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with SqliteJobStore(path) as store:
        (job,) = await store.submit([spec()], now=1.0)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET data = '{not json' WHERE id = ?", (job.id,))
    async with SqliteJobStore(path) as store:
        with pytest.raises(IntegrityError, match=f"job {job.id} .* damaged"):
            await store.get(job.id)


async def test_a_database_locked_by_another_process_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with SqliteJobStore(path, busy_timeout=0.2) as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(Unavailable, match="locked by another process") as caught:
                await store.submit([spec()], now=1.0)
            assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        finally:
            other.execute("ROLLBACK")
            other.close()
        (job,) = await store.submit([spec()], now=2.0)  # the writer carries on
        assert await store.get(job.id) == job


async def test_two_stores_on_one_file_take_turns(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with SqliteJobStore(path) as first, SqliteJobStore(path) as second:
        batches = await asyncio.gather(
            *(store.submit([spec()], now=1.0) for _ in range(20) for store in (first, second))
        )
        ids = [batch[0].id for batch in batches]
        assert sorted(ids) == list(range(1, 41))
        assert len(await first.list()) == 40


async def test_concurrent_finishes_share_a_few_transactions(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        jobs = await store.submit([spec() for _ in range(100)], now=1.0)
        running = await store.claim([Claim(job.id, 0, "h") for job in jobs], now=2.0)
        before = store.transactions_committed
        done = await asyncio.gather(
            *(
                store.finish(job.id, job.attempt, AttemptResult(JobState.SUCCEEDED), now=3.0)
                for job in running
            )
        )
        transactions = store.transactions_committed - before
        assert all(job.state is JobState.SUCCEEDED for job in done)
        assert 1 <= transactions <= 5, f"100 finishes took {transactions} transactions"
        counts = await store.counts()
        assert counts[JobState.SUCCEEDED] == 100


_SUBMITTER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from fetchml.daemon.store import JobSpec, SqliteJobStore

    async def main():
        spec = JobSpec(name="k", owner="o", snapshot="5e" * 32, argv=("true",))
        async with SqliteJobStore(Path(sys.argv[1])) as store:
            async def one():
                (job,) = await store.submit([spec], now=1.0)
                print(job.id, flush=True)
            while True:
                await asyncio.gather(*(one() for _ in range(4)))

    asyncio.run(main())
    """
)


async def test_sigkill_never_loses_an_acknowledged_submit(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SUBMITTER,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.stdout is not None
    acknowledged: list[int] = []
    try:
        while len(acknowledged) < 60:
            line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
            assert line, "the submitting process ended early"
            acknowledged.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    acknowledged += [int(line) for line in (await child.stdout.read()).split()]
    async with SqliteJobStore(path) as store:
        missing = [job_id for job_id in acknowledged if await store.get(job_id) is None]
        assert missing == []
        assert len(await store.list()) >= len(acknowledged)


async def test_listing_stays_fast_with_100k_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with SqliteJobStore(path):
        pass
    finished = Job(**vars(spec()), id=1, state=JobState.SUCCEEDED, created_at=1.0, finished_at=2.0)
    row = sqlite_schema.job_to_row(finished)
    with sqlite3.connect(path) as db:  # bulk insert: 100k finished jobs in one transaction
        db.executemany(sqlite_schema.INSERT_JOB, ((i, *row[1:]) for i in range(1, 100_001)))
    async with SqliteJobStore(path) as store:
        active = await store.submit([spec() for _ in range(30)], now=3.0)
        await store.claim([Claim(active[0].id, 0, "h")], now=4.0)
        timings: dict[str, float] = {}
        queries: dict[str, dict[str, Any]] = {
            "limit=50": {"limit": 50},
            "states=ACTIVE": {"states": ACTIVE_STATES},
            "owner, limit=50": {"owner": "alice", "limit": 50},
        }
        for name, filters in queries.items():
            started = time.perf_counter()
            jobs = await store.list(**filters)
            timings[name] = time.perf_counter() - started
            assert jobs
        assert max(timings.values()) < 1.0, timings
        assert len(await store.list(states=ACTIVE_STATES)) == 30
    with sqlite3.connect(path) as db:  # the state filter is an index search, not a scan
        query = f"{sqlite_schema.SELECT_JOB} WHERE state IN (?, ?, ?) ORDER BY id DESC"
        sql = f"EXPLAIN QUERY PLAN {query}"
        plan = " ".join(str(row[-1]) for row in db.execute(sql, ("held", "queued", "running")))
        assert "USING INDEX jobs_by_state" in plan, plan
