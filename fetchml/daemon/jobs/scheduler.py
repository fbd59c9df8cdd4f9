"""Admission and dispatch: which queued jobs start now, on which GPUs. No I/O details here.

Policy:
- order: highest priority first, FIFO within a priority (by the time a job entered the queue,
  then id). With aging, waiting counts as priority: one step per ``aging_interval`` seconds
  waited, so nothing starves. Aging is continuous, which makes the order a fixed sort key
  (``queued_at - priority * aging_interval``) rather than one that changes with the clock;
  a priority-10 job submitted now thus runs after a priority-5 job queued more than
  5 * aging_interval seconds ago;
- a job starts when its CPUs, memory and GPUs fit in what is free;
- the first job that does not fit is the *head*: it keeps its place. A later, smaller job may
  backfill only with resources the head will not need (what is free beyond the head's demand,
  dimension by dimension), so starting it can never delay the head. Running jobs' timeouts are
  upper bounds, not estimates, so they are not used to squeeze in more (unlike Slurm's EASY).

The ``Scheduler`` keeps its own view of the queued and held jobs, fed by the job-event bus, so
a pass costs what it starts rather than the length of the queue; the store's compare-and-set
claim keeps that view honest, and it is reloaded from the store now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fetchml.daemon.events import JobEvents
from fetchml.daemon.jobs.model import TERMINAL_STATES, Claim, Job, JobSpec, JobState
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.tasks import cancel_and_wait
from fetchml.errors import Unavailable

log = logging.getLogger(__name__)

# Without events, the loop still looks at the queue this often.
IDLE_TICK_S = 5.0
# The view of the queue is reloaded from the store this often, in case another writer (an
# admin tool, another host sharing the store) changed jobs without telling this daemon.
RESYNC_INTERVAL_S = 60.0
# Jobs looked at behind a blocked head for backfill in one pass, as Slurm's bf_max_job_test.
BACKFILL_DEPTH = 1000
# After a failed pass, wait this long before the next one.
RETRY_AFTER_FAILURE_S = 1.0

SortKey = tuple[float, float, int]


@dataclass(frozen=True)
class Capacity:
    """Resources on one host: CPU slots, memory bytes, and GPU indices."""

    cpus: int
    memory: int
    gpus: tuple[int, ...]

    def minus(self, job: JobSpec, gpu_ids: Sequence[int]) -> Capacity:
        return Capacity(self.cpus - job.resources.cpus, self.memory - job.resources.memory,
                        tuple(g for g in self.gpus if g not in gpu_ids))

    def fits(self, job: JobSpec) -> bool:
        r = job.resources
        return r.cpus <= self.cpus and r.memory <= self.memory and r.gpus <= len(self.gpus)

    def beyond(self, job: JobSpec) -> Capacity:
        """What stays free if ``job`` took its share first (never negative)."""
        r = job.resources
        keep = max(0, len(self.gpus) - r.gpus)
        return Capacity(max(0, self.cpus - r.cpus), max(0, self.memory - r.memory),
                        self.gpus[len(self.gpus) - keep:] if keep else ())


def queue_key(job: Job, aging_interval: float) -> SortKey:
    """The job's place in the queue: smaller runs first."""
    queued = job.queued_at if job.queued_at is not None else job.created_at
    if aging_interval > 0:
        return (queued - job.priority * aging_interval, queued, job.id)
    return (-job.priority, queued, job.id)


def order_queue(queued: Iterable[Job], aging_interval: float) -> list[Job]:
    return sorted(queued, key=lambda j: queue_key(j, aging_interval))


def free_capacity(total: Capacity, running: Iterable[Job]) -> Capacity:
    free = total
    for job in running:
        free = free.minus(job, job.gpu_ids)
    return free


def plan(ordered: Iterable[Job], free: Capacity, *, total: Capacity | None = None,
         backfill_depth: int = BACKFILL_DEPTH) -> list[tuple[Job, tuple[int, ...]]]:
    """The jobs to start now, in order, each with the GPU indices it gets.

    A job that could never fit ``total`` is passed over rather than made the head, so it does
    not block the queue (``jobs.submit`` refuses such jobs; this covers a host that shrank).
    """
    picks: list[tuple[Job, tuple[int, ...]]] = []
    head_blocked = False
    behind_head = 0
    for job in ordered:
        if head_blocked:
            behind_head += 1
            if behind_head > backfill_depth:
                break
        if free.fits(job):
            gpu_ids = free.gpus[: job.resources.gpus]
            picks.append((job, gpu_ids))
            free = free.minus(job, gpu_ids)
        elif not head_blocked and (total is None or total.fits(job)):
            head_blocked = True
            free = free.beyond(job)  # reserve the head's share: later jobs use the rest
        if free.cpus < 1:
            break  # every job needs a CPU slot: nothing more can start
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


def change_order(job: Job) -> int:
    """Orders the changes of one job: a later change never has a smaller number.

    held, then queued at attempt 0, running attempt 1, queued again at attempt 1 (a retry),
    running attempt 2, ...; every ending comes last.
    """
    if job.state in TERMINAL_STATES:
        return 1 << 62
    if job.state is JobState.HELD:
        return 0
    if job.state is JobState.RUNNING:
        return 2 * job.attempt
    return 2 * job.attempt + 1


# start(job as it will be once claimed, the claimed job or None once the claim committed)
Start = Callable[[Job, "asyncio.Future[Job | None]"], Coroutine[Any, Any, None]]


class Scheduler:
    """Wakes on events (submit, job end, cancel), claims what fits, hands it to ``start``.

    With ``events``, it follows every published change to keep its view of the queue, and
    publishes what it changes itself (claims) or finds changed (held jobs released or
    cancelled by their dependencies). Without, it reloads the queue on every pass.
    """

    def __init__(self, store: JobStore, host: str, total: Capacity, aging_interval: float,
                 start: Start, *, events: JobEvents | None = None) -> None:
        self.store, self.host, self.total = store, host, total
        self.aging_interval = aging_interval
        self._start = start
        self._events = events
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.running: dict[int, Job] = {}  # what this host runs now, by job id
        self._queued: dict[int, Job] = {}
        self._held: dict[int, Job] = {}
        self._waiters: dict[int, set[int]] = {}  # job id -> held jobs waiting on it
        self._order: list[tuple[SortKey, int]] = []  # sorted; may hold stale entries
        self._order_dirty = False
        self._recheck: set[int] = set()  # held jobs whose dependencies changed
        # Jobs queued again while an attempt of theirs still runs here (another host gave up
        # on this one): they are schedulable once that attempt is over.
        self._deferred: dict[int, Job] = {}
        self._store_down = False  # whether the last pass found the store unavailable
        self._resync_at = 0.0  # monotonic time of the next reload from the store
        self._tasks: set[asyncio.Task[Any]] = set()  # claims and starts in progress
        if events is not None:
            events.listen(self.note)

    def wake(self) -> None:
        self._wakeup.set()

    def free(self) -> Capacity:
        return free_capacity(self.total, self.running.values())

    def started(self, job: Job) -> None:
        self.running[job.id] = job
        self._forget(job.id)

    def ended(self, job_id: int) -> None:
        """The attempt running ``job_id`` here is over: its resources are free."""
        self.running.pop(job_id, None)
        deferred = self._deferred.pop(job_id, None)
        if deferred is not None:
            self.note(deferred)
        self.wake()

    def request_resync(self) -> None:
        """Reload the queue from the store at the next pass (changes may have been missed)."""
        self._resync_at = 0.0
        self.wake()

    def queued_jobs(self) -> list[Job]:
        """The queued jobs in the order they would start."""
        return list(self._ordered())

    # -- the view of the queue ------------------------------------------------------------
    def note(self, job: Job) -> None:
        """Follow one published change."""
        known = self._queued.get(job.id) or self._held.get(job.id)
        if known is not None and change_order(known) > change_order(job):
            return  # a late copy of an older change
        running = self.running.get(job.id)
        if running is not None and job.state is not JobState.RUNNING and (
                change_order(running) > change_order(job)):
            return
        if running is not None and job.state is JobState.RUNNING and job.attempt == running.attempt:
            self.running[job.id] = job  # e.g. a cancel was requested
        if running is not None and job.state in (JobState.QUEUED, JobState.HELD):
            self._deferred[job.id] = job
            return
        deferred = self._deferred.get(job.id)
        if deferred is not None and change_order(job) > change_order(deferred):
            del self._deferred[job.id]  # it moved on meanwhile (another host claimed it)
        self._forget(job.id)
        if job.state is JobState.QUEUED:
            self._queued[job.id] = job
            self._order_dirty = True
            self.wake()
        elif job.state is JobState.HELD:
            self._held[job.id] = job
            for after in job.after:
                self._waiters.setdefault(after, set()).add(job.id)
        if job.state in TERMINAL_STATES and job.id in self._waiters:
            self._recheck.update(self._waiters.pop(job.id))
            self.wake()

    def _forget(self, job_id: int) -> None:
        self._queued.pop(job_id, None)
        held = self._held.pop(job_id, None)
        if held is not None:
            for after in held.after:
                waiting = self._waiters.get(after)
                if waiting is not None:
                    waiting.discard(job_id)
                    if not waiting:
                        del self._waiters[after]

    def _ordered(self) -> Iterator[Job]:
        if self._order_dirty or len(self._order) > 2 * len(self._queued) + 64:
            self._order = sorted((queue_key(job, self.aging_interval), job.id)
                                 for job in self._queued.values())
            self._order_dirty = False
        for key, job_id in self._order:
            job = self._queued.get(job_id)
            if job is not None and queue_key(job, self.aging_interval) == key:
                yield job

    async def resync(self) -> None:
        """Reload the queued and held jobs from the store."""
        queued = await self.store.queued()
        held = await self.store.list(states={JobState.HELD})
        # held jobs that the store released or cancelled behind our back: announce them
        self._recheck.update(set(self._held) - {job.id for job in held})
        self._queued.clear()
        self._held.clear()
        self._waiters.clear()
        for job in (*queued, *held):
            if job.id not in self.running:
                self.note(job)
        self._order_dirty = True
        self._resync_at = time.monotonic() + RESYNC_INTERVAL_S

    async def _refresh(self, job_ids: Iterable[int], *, announce: bool) -> None:
        """Read these jobs again; with ``announce``, publish the ones that changed."""
        for job_id in sorted(job_ids):
            before = self._queued.get(job_id) or self._held.get(job_id)
            job = await self.store.get(job_id)
            if job is None:
                self._forget(job_id)
                continue
            if announce and self._events is not None and (
                    before is None or before.state is not job.state):
                self._events.publish(job)  # calls note()
            else:
                self.note(job)

    # -- the loop -------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    def alive(self) -> bool:
        """Whether the scheduling loop runs (for /ready)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop scheduling; launches in progress are abandoned (adoption resumes them)."""
        await cancel_and_wait(self._task, *self._tasks)

    async def _loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: no extra task, so a wake() is served on the very
            # next turn of the loop (the runner counts on that to get claims committed first)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_TICK_S):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                claiming = await self._reserve()
                if self._store_down:
                    log.info("the job store is back; scheduling resumes")
                    self._store_down = False
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:
                if not self._store_down:
                    log.warning("cannot schedule: %s", exc)
                self._store_down = True
                self._resync_at = 0.0
                await asyncio.sleep(RETRY_AFTER_FAILURE_S)
                self.wake()
                continue
            except Exception:
                log.exception("scheduling pass failed; retrying shortly")
                self._resync_at = 0.0
                await asyncio.sleep(RETRY_AFTER_FAILURE_S)
                self.wake()
                continue
            if claiming is not None:  # the next pass need not wait for this commit
                self._track(asyncio.create_task(claiming, name="claim"))

    async def dispatch(self) -> list[Job]:
        """One scheduling pass: claim and start every job that may start now."""
        claiming = await self._reserve()
        return [] if claiming is None else await claiming

    async def _reserve(self) -> Coroutine[Any, Any, list[Job]] | None:
        """Plan a pass and reserve what it picks; returns the claim to await, if any."""
        if self._events is None or time.monotonic() >= self._resync_at:
            await self.resync()
        while self._recheck:
            held, self._recheck = self._recheck, set()
            await self._refresh(held, announce=True)
        picks = plan(self._ordered(), self.free(), total=self.total)
        if not picks:
            return None
        now = time.time()
        for job, gpu_ids in picks:  # held here until the claim says otherwise
            self.running[job.id] = replace(job, state=JobState.RUNNING, attempt=job.attempt + 1,
                                           host=self.host, gpu_ids=gpu_ids, started_at=now)
            self._forget(job.id)
        return self._claim(picks, now)

    async def _claim(self, picks: list[tuple[Job, tuple[int, ...]]], now: float) -> list[Job]:
        claims = [Claim(job.id, job.attempt, self.host, gpu_ids) for job, gpu_ids in picks]
        loop = asyncio.get_running_loop()
        outcomes: dict[int, asyncio.Future[Job | None]] = {}
        for job, _ in picks:
            # The runner prepares the workspace while the claim is being committed, and
            # launches only once it is durable.
            outcomes[job.id] = outcome = loop.create_future()
            self._track(asyncio.create_task(self._start(self.running[job.id], outcome),
                                            name=f"start-{job.id}"))
        try:
            claimed = await self.store.claim(claims, now)
        except BaseException:
            for job, _ in picks:  # what was not claimed is not started
                self.running.pop(job.id, None)
                outcomes[job.id].set_result(None)
            self._resync_at = 0.0  # our view of those jobs is gone: read it again
            self.wake()
            raise
        taken = {job.id: job for job in claimed}
        for job, _ in picks:
            if job.id in taken:
                self.started(taken[job.id])
                if self._events is not None:
                    self._events.publish(taken[job.id])
            else:
                self.running.pop(job.id, None)
        for job_id, outcome in outcomes.items():
            outcome.set_result(taken.get(job_id))
        missed = [job.id for job, _ in picks if job.id not in taken]
        if missed:  # our view was stale: someone cancelled or claimed them first
            await self._refresh(missed, announce=False)
            self.wake()
        return claimed

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), Unavailable):  # the store is away; retried by the loop
            log.warning("%s: %s", task.get_name(), task.exception())
        else:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())
