"""``SqliteJobStore``: the embedded, durable JobStore (aiosqlite, WAL, ``synchronous=FULL``).

Writes are group-committed: every write call is queued for one writer task, which drains the
queue into a single ``BEGIN IMMEDIATE`` transaction, runs each write inside its own SAVEPOINT
(so one write's Conflict does not undo the others) and ends the batch with one COMMIT, that is
one fsync for many writes. A caller's result is delivered only after that COMMIT, so a write
that returned is on disk. Reads use a second connection and see only committed data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Collection, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite

from fetchml.daemon.jobs.model import AttemptResult, Claim, Job, JobSpec, JobState
from fetchml.daemon.store import transitions
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.store.sqlite_schema import (
    INSERT_JOB,
    SELECT_JOB,
    UPDATE_JOB,
    job_to_row,
    migrate,
    row_to_job,
    update_params,
)
from fetchml.daemon.store.transitions import JobTransaction
from fetchml.errors import (
    BadRequest,
    FetchmlError,
    IntegrityError,
    InternalError,
    Unavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a connection waits for another process's write lock before giving up.
DEFAULT_BUSY_TIMEOUT = 10.0
# Writes per transaction: bounds how long one batch holds the write lock and delays replies.
MAX_WRITES_PER_TRANSACTION = 512
# Ids per "IN (...)" query, well under SQLite's limit on bound parameters.
_IDS_PER_QUERY = 500
# SQLite primary result codes (the low byte of an extended code) that get their own advice.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL = 5, 6, 10, 11, 13
_SQLITE_NOTADB = 26


def _translate(exc: sqlite3.Error, path: Path) -> FetchmlError:
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return Unavailable(
            f"the job database {path} is locked by another process; stop the other fetchml "
            "daemon that uses it or try again"
        )
    if code in (_SQLITE_IOERR, _SQLITE_FULL):
        return Unavailable(
            f"the job database {path} cannot be written ({exc}); free disk space or check the "
            "disk and try again"
        )
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return IntegrityError(
            f"the job database {path} is damaged or not a database ({exc}); restore it from a "
            "backup or move it aside to start with an empty one"
        )
    return InternalError(f"the job database {path} failed ({exc}); see the daemon's log")


def _as_fetchml_error(exc: Exception, path: Path) -> Exception:
    """``exc`` translated when it comes from SQLite, to deliver through a future."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    translated = _translate(exc, path)
    translated.__cause__ = exc  # what ``raise ... from exc`` records
    return translated


@contextlib.contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise _translate(exc, path) from exc


def _chunks(ids: Collection[int]) -> Iterator[list[int]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), _IDS_PER_QUERY):
        yield ordered[start : start + _IDS_PER_QUERY]


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


class _SqliteTransaction(JobTransaction):
    """The writer connection, inside the batch's transaction and one write's SAVEPOINT.

    Its methods are coroutines only to fit the shared state machine: they run plain
    ``sqlite3`` calls in the writer thread and never suspend (see ``_drive``)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def get(self, job_id: int) -> Job | None:
        row = self._db.execute(f"{SELECT_JOB} WHERE id = ?", (job_id,)).fetchone()
        return row_to_job(row) if row else None

    async def get_many(self, job_ids: Collection[int]) -> dict[int, Job]:
        found: dict[int, Job] = {}
        for chunk in _chunks(job_ids):
            sql = f"{SELECT_JOB} WHERE id IN ({_placeholders(len(chunk))})"
            found.update((row[0], row_to_job(row)) for row in self._db.execute(sql, chunk))
        return found

    async def next_id(self) -> int:
        sql = "SELECT seq FROM sqlite_sequence WHERE name = 'jobs'"
        row = self._db.execute(sql).fetchone()
        return (int(row[0]) if row else 0) + 1

    async def insert(self, jobs: Sequence[Job]) -> None:
        if jobs:
            self._db.executemany(INSERT_JOB, [job_to_row(job) for job in jobs])

    async def update(self, job: Job) -> None:
        self._db.execute(UPDATE_JOB, update_params(job))

    async def delete(self, job_ids: Collection[int]) -> None:
        if job_ids:
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])

    async def add_waits(self, waits: Collection[tuple[int, int]]) -> None:
        if waits:
            sql = "INSERT INTO job_waits (job_id, after_id) VALUES (?, ?)"
            self._db.executemany(sql, sorted(waits))

    async def take_waiters(self, after_id: int) -> list[int]:
        sql = "DELETE FROM job_waits WHERE after_id = ? RETURNING job_id"
        return sorted(row[0] for row in self._db.execute(sql, (after_id,)).fetchall())

    async def is_waiting(self, job_id: int) -> bool:
        sql = "SELECT 1 FROM job_waits WHERE job_id = ? LIMIT 1"
        return self._db.execute(sql, (job_id,)).fetchone() is not None

    async def clear_waits(self, job_id: int) -> None:
        self._db.execute("DELETE FROM job_waits WHERE job_id = ?", (job_id,))


def _drive(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a transition over ``_SqliteTransaction``) to its
    result, synchronously, in the calling thread."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise InternalError("a job store transition waited on something; it must not")


@dataclass
class _PendingWrite(Generic[T]):
    work: Callable[[JobTransaction], Coroutine[Any, Any, T]]
    future: asyncio.Future[T]


class SqliteJobStore(JobStore):
    """Jobs in the SQLite database at ``path`` (created 0600 with its directory if missing)."""

    def __init__(self, path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        self._busy_timeout_ms = int(busy_timeout * 1000)
        # The writer is a plain sqlite3 connection owned by one thread: a whole batch of
        # writes (BEGIN .. COMMIT) runs there in one hop, instead of a hop per statement.
        self._writer_db: sqlite3.Connection | None = None
        self._writer_thread: ThreadPoolExecutor | None = None
        self._reader_db: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_PendingWrite[Any] | None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        # Committed write transactions since open: each is one fsync, however many writes.
        self.transactions_committed = 0

    async def open(self) -> None:
        if self._writer_task is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # the database holds jobs' environments, which may carry secrets
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise Unavailable(
                f"cannot create the job database {self.path} ({exc.strerror}); check the "
                "state directory's permissions"
            ) from exc
        with _sqlite_errors(self.path):
            writer = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                await self._configure(writer)
                async with writer.execute("PRAGMA journal_mode = WAL") as cursor:
                    mode = await cursor.fetchone()
                if not mode or mode[0] != "wal":
                    log.warning(
                        "the job database %s cannot use WAL; writes will be slower", self.path
                    )
                await migrate(writer, self.path)
            finally:
                await writer.close()
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                await self._configure(reader)
                await reader.execute("PRAGMA query_only = ON")
            except BaseException:
                await reader.close()
                raise
        thread = ThreadPoolExecutor(1, thread_name_prefix="fetchml-job-store")
        try:
            self._writer_db = await asyncio.get_running_loop().run_in_executor(
                thread, self._connect_writer)
        except BaseException as exc:
            thread.shutdown()
            await reader.close()
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, self.path) from exc
            raise
        self._writer_thread, self._reader_db = thread, reader
        self.transactions_committed = 0
        self._queue = queue = asyncio.Queue[_PendingWrite[Any] | None]()
        self._writer_task = asyncio.create_task(
            self._run_writer(self._writer_db, queue), name="job store writer"
        )

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        db.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
        db.execute("PRAGMA foreign_keys = ON")
        return db

    async def _configure(self, db: aiosqlite.Connection) -> None:
        await db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        await db.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns

    async def close(self) -> None:
        task, self._writer_task = self._writer_task, None
        if task is not None and self._queue is not None:
            self._queue.put_nowait(None)  # the writer finishes what is queued, then stops
            try:
                await task
            except Exception:
                log.exception("the job store's writer failed")
        writer, thread = self._writer_db, self._writer_thread
        if writer is not None and thread is not None:
            with _sqlite_errors(self.path):
                await asyncio.get_running_loop().run_in_executor(thread, writer.close)
            thread.shutdown()
        if self._reader_db is not None:
            with _sqlite_errors(self.path):
                await self._reader_db.close()
        self._reader_db = self._writer_db = self._writer_thread = None

    # --- writes ------------------------------------------------------------------------------

    async def _write(self, work: Callable[[JobTransaction], Coroutine[Any, Any, T]]) -> T:
        if self._writer_task is None or self._queue is None:
            raise Unavailable("the job store is closed; open it before using it")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_PendingWrite(work, future))
        return await future

    async def _run_writer(
        self, db: sqlite3.Connection, queue: asyncio.Queue[_PendingWrite[Any] | None]
    ) -> None:
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_WRITES_PER_TRANSACTION and not queue.empty():
                pending = queue.get_nowait()
                if pending is None:
                    stopping = True
                    break
                batch.append(pending)
            await self._commit(db, [w for w in batch if not w.future.done()])

    async def _commit(self, db: sqlite3.Connection, batch: list[_PendingWrite[Any]]) -> None:
        """Run ``batch`` in one transaction (in the writer thread), then deliver outcomes."""
        if not batch:
            return
        assert self._writer_thread is not None
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._writer_thread, self._commit_batch, db,
                                                  [write.work for write in batch])
        except Exception as exc:
            failure = _as_fetchml_error(exc, self.path)
            log.warning("a job store transaction of %d writes failed: %s", len(batch), failure)
            for write in batch:
                if not write.future.done():
                    write.future.set_exception(failure)
            return
        self.transactions_committed += 1
        for write, (value, error) in zip(batch, outcomes, strict=True):
            if write.future.done():
                continue
            if error is None:
                write.future.set_result(value)
            else:
                write.future.set_exception(_as_fetchml_error(error, self.path))

    @staticmethod
    def _commit_batch(db: sqlite3.Connection,
                      works: list[Callable[[JobTransaction], Coroutine[Any, Any, Any]]]
                      ) -> list[tuple[Any, Exception | None]]:
        """BEGIN IMMEDIATE, each write in its own SAVEPOINT, COMMIT (runs in the thread)."""
        tx = _SqliteTransaction(db)
        outcomes: list[tuple[Any, Exception | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for work in works:
                db.execute("SAVEPOINT write")
                try:
                    value = _drive(work(tx))
                except Exception as exc:
                    db.execute("ROLLBACK TO write")
                    db.execute("RELEASE write")
                    outcomes.append((None, exc))
                else:
                    db.execute("RELEASE write")
                    outcomes.append((value, None))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return outcomes

    async def submit(self, specs: Sequence[JobSpec], now: float) -> list[Job]:
        specs = list(specs)
        return await self._write(lambda tx: transitions.submit(tx, specs, now))

    async def claim(self, claims: Sequence[Claim], now: float) -> list[Job]:
        claims = list(claims)
        return await self._write(lambda tx: transitions.claim(tx, claims, now))

    async def finish(self, job_id: int, attempt: int, result: AttemptResult, now: float) -> Job:
        return await self._write(lambda tx: transitions.finish(tx, job_id, attempt, result, now))

    async def store_outputs(self, job_id: int, attempt: int, outputs: str,
                            warnings: Sequence[str], reason: str | None) -> Job:
        warnings = list(warnings)
        return await self._write(lambda tx: transitions.store_outputs(
            tx, job_id, attempt, outputs, warnings, reason))

    async def cancel(self, job_id: int, *, reason: str, now: float) -> Job:
        return await self._write(lambda tx: transitions.cancel(tx, job_id, reason, now))

    async def delete(self, job_ids: Sequence[int]) -> int:
        job_ids = list(job_ids)
        return await self._write(lambda tx: transitions.delete(tx, job_ids))

    # --- reads -------------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._reader_db is None:
            raise Unavailable("the job store is closed; open it before using it")
        with _sqlite_errors(self.path):
            return list(await self._reader_db.execute_fetchall(sql, params))

    async def get(self, job_id: int) -> Job | None:
        rows = await self._fetch(f"{SELECT_JOB} WHERE id = ?", (job_id,))
        return row_to_job(rows[0]) if rows else None

    async def queued(self) -> list[Job]:
        rows = await self._fetch(f"{SELECT_JOB} WHERE state = 'queued' ORDER BY id")
        return [row_to_job(row) for row in rows]

    async def running(self, host: str | None = None) -> list[Job]:
        sql, params = f"{SELECT_JOB} WHERE state = 'running'", []
        if host is not None:
            sql, params = f"{sql} AND host = ?", [host]
        return [row_to_job(row) for row in await self._fetch(f"{sql} ORDER BY id", params)]

    async def counts(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        for state, count in await self._fetch("SELECT state, count(*) FROM jobs GROUP BY state"):
            counts[JobState(state)] = count
        return counts

    async def list(
        self,
        *,
        states: Collection[JobState] | None = None,
        owner: str | None = None,
        limit: int | None = None,
        before_id: int | None = None,
    ) -> list[Job]:
        if limit is not None and limit < 0:
            raise BadRequest(f"limit must be zero or more, not {limit}")
        clauses: list[str] = []
        params: list[Any] = []
        if states is not None:
            wanted = sorted({JobState(state).value for state in states})
            if not wanted:
                return []
            clauses.append(f"state IN ({_placeholders(len(wanted))})")
            params.extend(wanted)
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if before_id is not None:
            clauses.append("id < ?")
            params.append(before_id)
        sql = SELECT_JOB + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [row_to_job(row) for row in await self._fetch(sql, params)]
