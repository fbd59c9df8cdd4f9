"""Admission and dispatch: which queued jobs start now, on which GPUs. No I/O details here.

Policy:
- order: effective priority, highest first, then FIFO (job id). A job's effective priority is
  its priority plus one step per ``aging_interval`` seconds it has waited, so nothing starves;
- a job starts when its CPUs, memory and GPUs fit in what is free;
- the first job that does not fit is the *head*: it keeps its place. A later, smaller job may
  backfill only with resources the head will not need (what is free beyond the head's demand,
  dimension by dimension), so starting it can never delay the head. Running jobs' timeouts are
  upper bounds, not estimates, so they are not used to squeeze in more (unlike Slurm's EASY).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fetchml.daemon.store.base import Claim, Job, JobSpec, JobStore

log = logging.getLogger(__name__)

# Without events, the loop still looks at the queue this often (aging changes order slowly).
IDLE_TICK_S = 5.0


@dataclass(frozen=True)
class Capacity:
    """Resources on one host: CPU slots, memory bytes, and GPU indices."""

    cpus: int
    memory: int
    gpus: tuple[int, ...]

    def minus(self, job: Job, gpu_ids: Sequence[int]) -> Capacity:
        return Capacity(self.cpus - job.resources.cpus, self.memory - job.resources.memory,
                        tuple(g for g in self.gpus if g not in gpu_ids))

    def fits(self, job: Job) -> bool:
        r = job.resources
        return r.cpus <= self.cpus and r.memory <= self.memory and r.gpus <= len(self.gpus)

    def beyond(self, job: Job) -> Capacity:
        """What stays free if ``job`` took its share first (never negative)."""
        r = job.resources
        keep = max(0, len(self.gpus) - r.gpus)
        return Capacity(max(0, self.cpus - r.cpus), max(0, self.memory - r.memory),
                        self.gpus[len(self.gpus) - keep:] if keep else ())


def effective_priority(job: Job, now: float, aging_interval: float) -> int:
    waited = max(0.0, now - (job.queued_at or job.created_at))
    return job.priority + int(waited // aging_interval) if aging_interval > 0 else job.priority


def order_queue(queued: Sequence[Job], now: float, aging_interval: float) -> list[Job]:
    return sorted(queued, key=lambda j: (-effective_priority(j, now, aging_interval), j.id))


def free_capacity(total: Capacity, running: Sequence[Job]) -> Capacity:
    free = total
    for job in running:
        free = free.minus(job, job.gpu_ids)
    return free


def plan(ordered: Sequence[Job], free: Capacity) -> list[tuple[Job, tuple[int, ...]]]:
    """The jobs to start now, in order, each with the GPU indices it gets."""
    picks: list[tuple[Job, tuple[int, ...]]] = []
    head_blocked = False
    for job in ordered:
        if not free.fits(job):
            if not head_blocked:
                head_blocked = True
                free = free.beyond(job)  # reserve the head's share: later jobs use the rest
            continue
        gpu_ids = free.gpus[: job.resources.gpus]
        picks.append((job, gpu_ids))
        free = free.minus(job, gpu_ids)
    return picks


def never_fits(job: JobSpec, total: Capacity) -> str | None:
    """Why a job can never start on this host, or None."""
    r = job.resources
    if r.gpus > len(total.gpus):
        return f"it needs {r.gpus} GPUs and this host has {len(total.gpus)}"
    if r.cpus > total.cpus:
        return f"it needs {r.cpus} CPUs and this host offers {total.cpus}"
    if r.memory > total.memory:
        return f"it needs {r.memory} bytes of memory and this host offers {total.memory}"
    return None


Start = Callable[[Job], Awaitable[None]]


class Scheduler:
    """Wakes on events (submit, job end, cancel), claims what fits, hands it to ``start``."""

    def __init__(self, store: JobStore, host: str, total: Capacity, aging_interval: float,
                 start: Start) -> None:
        self.store, self.host, self.total = store, host, total
        self.aging_interval = aging_interval
        self._start = start
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.running: dict[int, Job] = {}  # what this host runs now, by job id

    def wake(self) -> None:
        self._wakeup.set()

    def free(self) -> Capacity:
        return free_capacity(self.total, list(self.running.values()))

    def started(self, job: Job) -> None:
        self.running[job.id] = job

    def ended(self, job_id: int) -> None:
        self.running.pop(job_id, None)
        self.wake()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), IDLE_TICK_S)
            self._wakeup.clear()
            try:
                await self.dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduling pass failed; retrying shortly")
                await asyncio.sleep(1.0)
                self.wake()

    async def dispatch(self) -> list[Job]:
        """One scheduling pass: claim and start every job that may start now."""
        queued = await self.store.queued()
        if not queued:
            return []
        now = time.time()
        picks = plan(order_queue(queued, now, self.aging_interval), self.free())
        if not picks:
            return []
        claims = [Claim(job.id, job.attempt, self.host, gpu_ids) for job, gpu_ids in picks]
        claimed = await self.store.claim(claims, now)
        for job in claimed:
            self.started(job)
        for job in claimed:
            await self._start(job)
        return claimed
