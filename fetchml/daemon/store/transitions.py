"""The job state machine, written once for every store.

Each write of ``JobStore`` is a function here that runs inside one atomic step of a store,
through the small ``JobTransaction`` interface the store implements. The functions check
everything (existence, fencing) before their first write, so a store that cannot roll back
(the in-memory one) stays consistent when they raise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import fields, replace

from fetchml.daemon.jobs.model import TERMINAL_STATES, AttemptResult, Claim, Job, JobSpec, JobState
from fetchml.errors import Conflict, NotFound

# How a dependent's reason names the way its dependency ended.
_DEPENDENCY_ENDINGS = {
    JobState.FAILED: "failed",
    JobState.CANCELLED: "was cancelled",
    JobState.LOST: "was lost",
}


class JobTransaction(ABC):
    """Reads and writes inside one atomic step of a store; reads see the step's own writes.

    Besides jobs, a store keeps "waits": (job, after) pairs for each ``after`` job that has not
    yet succeeded, so releasing or cancelling a held job's dependents is an indexed lookup.
    """

    @abstractmethod
    async def get(self, job_id: int) -> Job | None: ...

    @abstractmethod
    async def get_many(self, job_ids: Collection[int]) -> dict[int, Job]:
        """The stored jobs among ``job_ids``, by id."""

    @abstractmethod
    async def next_id(self) -> int:
        """The id the next inserted job gets: above every id ever stored, deleted ones too."""

    @abstractmethod
    async def insert(self, jobs: Sequence[Job]) -> None: ...

    @abstractmethod
    async def update(self, job: Job) -> None:
        """Replace the stored job that has ``job.id``."""

    @abstractmethod
    async def delete(self, job_ids: Collection[int]) -> None: ...

    @abstractmethod
    async def add_waits(self, waits: Collection[tuple[int, int]]) -> None:
        """Record (job id, after id) pairs."""

    @abstractmethod
    async def take_waiters(self, after_id: int) -> list[int]:
        """Remove every wait on ``after_id`` and return the ids of the jobs that waited."""

    @abstractmethod
    async def is_waiting(self, job_id: int) -> bool:
        """Whether ``job_id`` still waits on any job."""

    @abstractmethod
    async def clear_waits(self, job_id: int) -> None:
        """Remove every wait of ``job_id``."""


def dependency_reason(dependency: Job) -> str:
    return f"dependency {dependency.id} {_DEPENDENCY_ENDINGS[dependency.state]}"


async def submit(tx: JobTransaction, specs: Sequence[JobSpec], now: float) -> list[Job]:
    after_ids = {after for spec in specs for after in spec.after}
    dependencies = await tx.get_many(after_ids)
    missing = sorted(after_ids - dependencies.keys())
    if missing:
        raise NotFound(
            f"job {missing[0]} named in --after does not exist; run `fetchml status --all` "
            "to see the job ids"
        )
    first_id = await tx.next_id()
    jobs: list[Job] = []
    waits: set[tuple[int, int]] = set()
    for job_id, spec in enumerate(specs, start=first_id):
        ended = [
            dependencies[a] for a in spec.after if dependencies[a].state in _DEPENDENCY_ENDINGS
        ]
        pending = {a for a in spec.after if dependencies[a].state is not JobState.SUCCEEDED}
        chosen = {f.name: getattr(spec, f.name) for f in fields(JobSpec)}
        job = Job(**chosen, id=job_id, state=JobState.QUEUED, created_at=now, queued_at=now)
        if ended:
            job = replace(
                job,
                state=JobState.CANCELLED,
                reason=dependency_reason(ended[0]),
                queued_at=None,
                finished_at=now,
            )
        elif pending:
            job = replace(job, state=JobState.HELD, queued_at=None)
            waits.update((job_id, after) for after in pending)
        jobs.append(job)
    await tx.insert(jobs)
    await tx.add_waits(waits)
    return jobs


async def claim(tx: JobTransaction, claims: Sequence[Claim], now: float) -> list[Job]:
    started: list[Job] = []
    for request in claims:
        job = await tx.get(request.job_id)
        if job is None or job.state is not JobState.QUEUED or job.attempt != request.attempt:
            continue
        job = replace(
            job,
            state=JobState.RUNNING,
            attempt=job.attempt + 1,
            started_at=now,
            finished_at=None,
            host=request.host,
            gpu_ids=request.gpu_ids,
            cancel_requested=False,
            # the previous attempt's figures would read as this attempt's
            exit_code=None,
            signal=None,
            peak_rss=None,
            cpu_time=None,
            outputs=None,
            outputs_error=None,
            warnings=(),
        )
        await tx.update(job)
        started.append(job)
    return started


async def finish(
    tx: JobTransaction, job_id: int, attempt: int, result: AttemptResult, now: float
) -> Job:
    job = await _require(tx, job_id)
    if job.state is not JobState.RUNNING or job.attempt != attempt:
        raise Conflict(
            f"attempt {attempt} of job {job_id} is stale (the job is {job.state} at attempt "
            f"{job.attempt}); its result was discarded"
        )
    job = _after_attempt(job, result, now)
    await tx.update(job)
    await _settle_dependents(tx, job, now)
    return job


async def store_outputs(
    tx: JobTransaction, job_id: int, attempt: int, outputs: str, warnings: Sequence[str],
    reason: str | None,
) -> Job:
    job = await _require(tx, job_id)
    if job.state not in TERMINAL_STATES or job.attempt != attempt or job.outputs is not None:
        raise Conflict(
            f"the outputs of attempt {attempt} of job {job_id} are no longer awaited (the job "
            f"is {job.state} at attempt {job.attempt}); they were not recorded"
        )
    job = replace(job, outputs=outputs, outputs_error=None, warnings=tuple(warnings),
                  reason=reason)
    await tx.update(job)
    return job


async def cancel(tx: JobTransaction, job_id: int, reason: str, now: float) -> Job:
    job = await _require(tx, job_id)
    if job.state in TERMINAL_STATES:
        return job
    if job.state is JobState.RUNNING:
        if job.cancel_requested:
            return job
        job = replace(job, cancel_requested=True, reason=reason)
        await tx.update(job)
        return job
    if job.state is JobState.HELD:
        await tx.clear_waits(job_id)
    job = replace(job, state=JobState.CANCELLED, reason=reason, finished_at=now)
    await tx.update(job)
    await _settle_dependents(tx, job, now)
    return job


async def delete(tx: JobTransaction, job_ids: Sequence[int]) -> int:
    jobs = await tx.get_many(set(job_ids))
    ended = [job_id for job_id, job in jobs.items() if job.state in TERMINAL_STATES]
    await tx.delete(ended)
    return len(ended)


async def _require(tx: JobTransaction, job_id: int) -> Job:
    job = await tx.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}; run `fetchml status --all` to see the job ids")
    return job


def _after_attempt(job: Job, result: AttemptResult, now: float) -> Job:
    """The job once ``result`` ended its current attempt."""
    recorded = replace(
        job,
        exit_code=result.exit_code,
        signal=result.signal,
        peak_rss=result.peak_rss,
        cpu_time=result.cpu_time,
        outputs=result.outputs,
        outputs_error=result.outputs_error,
        warnings=result.warnings,
        finished_at=now,
    )
    if result.state is JobState.SUCCEEDED:
        return replace(recorded, state=JobState.SUCCEEDED, reason=result.reason)
    if result.state is JobState.CANCELLED or (
        job.cancel_requested and result.state is JobState.FAILED
    ):
        reason = (job.reason if job.cancel_requested else None) or result.reason or "cancelled"
        return replace(recorded, state=JobState.CANCELLED, reason=reason)
    reason = result.reason or _failure_reason(job.attempt, result)
    if job.cancel_requested or job.attempt >= job.max_attempts:
        return replace(recorded, state=result.state, reason=reason)
    return replace(
        recorded,
        state=JobState.QUEUED,
        reason=reason,
        queued_at=now,
        started_at=None,
        finished_at=None,
        host=None,
        gpu_ids=(),
    )


def _failure_reason(attempt: int, result: AttemptResult) -> str:
    if result.state is JobState.LOST:
        return f"attempt {attempt} was lost"
    if result.signal is not None:
        return f"attempt {attempt} failed: killed by signal {result.signal}"
    if result.exit_code is not None:
        return f"attempt {attempt} failed: exit {result.exit_code}"
    return f"attempt {attempt} failed"


async def _settle_dependents(tx: JobTransaction, job: Job, now: float) -> None:
    """Queue or cancel the held jobs waiting on ``job``, which may just have ended."""
    if job.state is JobState.SUCCEEDED:
        for waiter_id in await tx.take_waiters(job.id):
            waiter = await tx.get(waiter_id)
            if waiter and waiter.state is JobState.HELD and not await tx.is_waiting(waiter_id):
                await tx.update(replace(waiter, state=JobState.QUEUED, queued_at=now))
        return
    if job.state not in TERMINAL_STATES:
        return
    ended = [job]  # jobs whose waiters are cancelled; grows as the cancel spreads
    while ended:
        dependency = ended.pop()
        for waiter_id in await tx.take_waiters(dependency.id):
            waiter = await tx.get(waiter_id)
            if waiter is None or waiter.state is not JobState.HELD:
                continue
            await tx.clear_waits(waiter_id)
            waiter = replace(
                waiter,
                state=JobState.CANCELLED,
                reason=dependency_reason(dependency),
                finished_at=now,
            )
            await tx.update(waiter)
            ended.append(waiter)
