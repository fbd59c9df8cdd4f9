"""``MemoryJobStore``: the JobStore contract in plain dicts, for fast tests; nothing persists."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

from fetchml.daemon.jobs.model import AttemptResult, Claim, Job, JobSpec, JobState
from fetchml.daemon.store import transitions
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.store.transitions import JobTransaction
from fetchml.errors import BadRequest, Unavailable


class _MemoryTransaction(JobTransaction):
    """Works on the store's dicts directly: the transitions check before they write."""

    def __init__(self, store: MemoryJobStore) -> None:
        self._store = store

    async def get(self, job_id: int) -> Job | None:
        return self._store._jobs.get(job_id)

    async def get_many(self, job_ids: Collection[int]) -> dict[int, Job]:
        jobs = self._store._jobs
        return {job_id: jobs[job_id] for job_id in job_ids if job_id in jobs}

    async def next_id(self) -> int:
        return self._store._last_id + 1

    async def insert(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._store._jobs[job.id] = job
            self._store._last_id = max(self._store._last_id, job.id)

    async def update(self, job: Job) -> None:
        self._store._jobs[job.id] = job

    async def delete(self, job_ids: Collection[int]) -> None:
        for job_id in job_ids:
            del self._store._jobs[job_id]

    async def add_waits(self, waits: Collection[tuple[int, int]]) -> None:
        for job_id, after_id in waits:
            self._store._waits.setdefault(job_id, set()).add(after_id)
            self._store._waiters.setdefault(after_id, set()).add(job_id)

    async def take_waiters(self, after_id: int) -> list[int]:
        waiters = sorted(self._store._waiters.pop(after_id, ()))
        for job_id in waiters:
            afters = self._store._waits[job_id]
            afters.discard(after_id)
            if not afters:
                del self._store._waits[job_id]
        return waiters

    async def is_waiting(self, job_id: int) -> bool:
        return job_id in self._store._waits

    async def clear_waits(self, job_id: int) -> None:
        for after_id in self._store._waits.pop(job_id, ()):
            self._store._waiters[after_id].discard(job_id)


class MemoryJobStore(JobStore):
    """Jobs in dicts; writes are serialised by one lock, so each is atomic."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}  # insertion order is id order
        self._last_id = 0
        self._waits: dict[int, set[int]] = {}  # job id -> after ids not yet succeeded
        self._waiters: dict[int, set[int]] = {}  # after id -> job ids waiting on it
        self._lock = asyncio.Lock()
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise Unavailable("the job store is closed; open it before using it")

    async def submit(self, specs: Sequence[JobSpec], now: float) -> list[Job]:
        self._check_open()
        async with self._lock:
            return await transitions.submit(_MemoryTransaction(self), specs, now)

    async def get(self, job_id: int) -> Job | None:
        self._check_open()
        return self._jobs.get(job_id)

    async def queued(self) -> list[Job]:
        self._check_open()
        return [job for job in self._jobs.values() if job.state is JobState.QUEUED]

    async def running(self, host: str | None = None) -> list[Job]:
        self._check_open()
        return [
            job
            for job in self._jobs.values()
            if job.state is JobState.RUNNING and (host is None or job.host == host)
        ]

    async def claim(self, claims: Sequence[Claim], now: float) -> list[Job]:
        self._check_open()
        async with self._lock:
            return await transitions.claim(_MemoryTransaction(self), claims, now)

    async def finish(self, job_id: int, attempt: int, result: AttemptResult, now: float) -> Job:
        self._check_open()
        async with self._lock:
            return await transitions.finish(_MemoryTransaction(self), job_id, attempt, result, now)

    async def store_outputs(self, job_id: int, attempt: int, outputs: str,
                            warnings: Sequence[str], reason: str | None) -> Job:
        self._check_open()
        async with self._lock:
            return await transitions.store_outputs(_MemoryTransaction(self), job_id, attempt,
                                                   outputs, warnings, reason)

    async def cancel(self, job_id: int, *, reason: str, now: float) -> Job:
        self._check_open()
        async with self._lock:
            return await transitions.cancel(_MemoryTransaction(self), job_id, reason, now)

    async def delete(self, job_ids: Sequence[int]) -> int:
        self._check_open()
        async with self._lock:
            return await transitions.delete(_MemoryTransaction(self), job_ids)

    async def counts(self) -> dict[JobState, int]:
        self._check_open()
        counts = dict.fromkeys(JobState, 0)
        for job in self._jobs.values():
            counts[job.state] += 1
        return counts

    async def list(
        self,
        *,
        states: Collection[JobState] | None = None,
        owner: str | None = None,
        limit: int | None = None,
        before_id: int | None = None,
    ) -> list[Job]:
        self._check_open()
        if limit is not None and limit < 0:
            raise BadRequest(f"limit must be zero or more, not {limit}")
        wanted = None if states is None else frozenset(states)
        found: list[Job] = []
        for job_id in reversed(self._jobs):
            if limit is not None and len(found) >= limit:
                break
            job = self._jobs[job_id]
            if (
                (before_id is None or job_id < before_id)
                and (wanted is None or job.state in wanted)
                and (owner is None or job.owner == owner)
            ):
                found.append(job)
        return found
