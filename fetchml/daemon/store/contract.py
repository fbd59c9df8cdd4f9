"""``JobStore``: the contract every job store (memory, SQLite, Redis) fulfils."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Self

from fetchml.daemon.jobs.model import _JOB_ID_TEXT, AttemptResult, Claim, Job, JobSpec, JobState
from fetchml.errors import NotFound


class JobStore(ABC):
    """Persists jobs and applies their state transitions atomically.

    Every method may be called concurrently from many asyncio tasks. Write methods are atomic:
    they happen entirely or not at all, and are durable when they return. A store is used as
    ``async with store:`` or between ``open()`` and ``close()``.
    """

    shared = False  # whether other daemons use it too (then this daemon joins their cluster)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def open(self) -> None:
        """Connect, create or migrate the storage; call once before anything else."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release the storage; calling it again does nothing."""

    @abstractmethod
    async def submit(self, specs: Sequence[JobSpec], now: float) -> list[Job]:
        """Store ``specs`` as new jobs in one atomic, durable step and return them.

        Ids increase in the order given. A job is ``queued`` (``queued_at = now``) when all its
        ``after`` jobs have succeeded, ``cancelled`` with reason "dependency N failed" (or "was
        cancelled" / "was lost") when one of them already ended without success, and ``held``
        otherwise. ``after`` may name only jobs already stored; an unknown id raises NotFound and
        nothing is stored.
        """

    @abstractmethod
    async def get(self, job_id: int) -> Job | None:
        """The job with this id, or None."""

    @abstractmethod
    async def queued(self) -> list[Job]:
        """Every queued job, id ascending; the scheduler orders them by its own policy."""

    @abstractmethod
    async def running(self, host: str | None = None) -> list[Job]:
        """Running jobs (on ``host`` when given), id ascending."""

    @abstractmethod
    async def claim(self, claims: Sequence[Claim], now: float) -> list[Job]:
        """Start the claimed jobs in one atomic step and return those actually started.

        For each claim, compare and set: a job still queued at ``claim.attempt`` becomes running
        with ``attempt + 1``, ``started_at = now``, the claim's host and GPU ids, and
        ``cancel_requested`` False. A claim whose job is gone, no longer queued or queued at
        another attempt is skipped, not an error.
        """

    @abstractmethod
    async def finish(self, job_id: int, attempt: int, result: AttemptResult, now: float) -> Job:
        """Record how ``attempt`` of a running job ended and return the job afterwards.

        Fenced: the job must be running at exactly ``attempt``, else Conflict (the result of a
        stale attempt is discarded); an unknown job is NotFound. A ``failed`` or ``lost`` result
        with attempts left (``attempt < max_attempts``) queues the job again (``queued_at = now``,
        the result's reason kept) unless a cancel was requested; otherwise the job ends in the
        result's state. A job asked to cancel that then reports ``failed`` or ``cancelled`` ends
        ``cancelled`` with the cancel's reason (the failure is most likely the stop itself); one
        that reports ``succeeded`` or ``lost`` keeps that state. Without a reason from the
        runner, a failure gets one such as "attempt 1 failed: exit 3".

        In the same step, dependents follow: when the job succeeds, every held job whose
        ``after`` jobs have now all succeeded is queued (``queued_at = now``); when it ends for
        good without success, every held job depending on it, transitively, is cancelled with
        reason "dependency N failed" / "dependency N was cancelled" / "dependency N was lost".
        """

    @abstractmethod
    async def store_outputs(self, job_id: int, attempt: int, outputs: str,
                            warnings: Sequence[str], reason: str | None) -> Job:
        """Record outputs stored after ``attempt`` ended without them; return the job.

        Fenced: the job must have ended at exactly ``attempt`` with no outputs, else Conflict;
        an unknown job is NotFound. Sets ``outputs``, ``warnings`` and ``reason``, and clears
        ``outputs_error``; the state stays what it is.
        """

    @abstractmethod
    async def cancel(self, job_id: int, *, reason: str, now: float) -> Job:
        """Cancel a job and return it afterwards; NotFound when it does not exist.

        A held or queued job is cancelled at once (``finished_at = now``, dependents cancelled
        as in ``finish``). A running job gets ``cancel_requested`` and ``reason`` stored; its
        runner stops it and reports ``finish(..., cancelled)``. A second cancel of a running job
        keeps the first reason. A job that already ended is returned unchanged.
        """

    async def mark_lost_or_retry(self, job_id: int, attempt: int, reason: str, now: float) -> Job:
        """``finish`` with a ``lost`` result: for a job whose supervisor vanished."""
        return await self.finish(job_id, attempt, AttemptResult(JobState.LOST, reason=reason), now)

    @abstractmethod
    async def delete(self, job_ids: Sequence[int]) -> int:
        """Remove the listed jobs that have ended and return how many were removed.

        Active jobs and unknown ids are skipped. Ids are never reused after a delete.
        """

    @abstractmethod
    async def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state is a key)."""

    async def resolve(self, text: str) -> int:
        """The id of the job ``text`` names ("42"); NotFound when it names no stored job.

        The single place where a user's job reference is parsed.
        """
        stripped = text.strip()
        if not _JOB_ID_TEXT.fullmatch(stripped) or await self.get(int(stripped)) is None:
            raise NotFound(f"no job {text!r}; run `fetchml status --all` to see the job ids")
        return int(stripped)

    @abstractmethod
    async def list(
        self,
        *,
        states: Collection[JobState] | None = None,
        owner: str | None = None,
        limit: int | None = None,
        before_id: int | None = None,
    ) -> list[Job]:
        """Jobs newest first (id descending), filtered by state and owner.

        ``before_id`` pages: only jobs with a smaller id are returned. ``limit`` caps the count
        (None: no cap; a negative limit is a BadRequest).
        """
