"""The scheduler: the pure policy (order, aging, fit, backfill) and the Scheduler's view of the
queue, driven by a real in-memory job store and the event bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetchml.daemon.events import JobEvents
from fetchml.daemon.jobs.scheduler import (
    Capacity,
    Scheduler,
    change_order,
    never_fits,
    order_queue,
    plan,
    queue_key,
)
from fetchml.daemon.store import (
    AttemptResult,
    Job,
    JobSpec,
    JobState,
    MemoryJobStore,
    Resources,
)

SNAPSHOT = "0" * 64
NOW = 1_000_000.0


def job(job_id: int, *, priority: int = 5, queued_at: float = NOW, cpus: int = 1,
        memory: int = 0, gpus: int = 0, **fields: Any) -> Job:
    return Job(id=job_id, name=f"j{job_id}", owner="me", snapshot=SNAPSHOT, argv=("true",),
               priority=priority, resources=Resources(cpus=cpus, memory=memory, gpus=gpus),
               state=fields.pop("state", JobState.QUEUED), created_at=queued_at,
               queued_at=queued_at, **fields)


def ids(picks: list[tuple[Job, tuple[int, ...]]]) -> list[int]:
    return [j.id for j, _ in picks]


# --- order and aging ---------------------------------------------------------------------------


def test_higher_priority_first_then_fifo() -> None:
    queue = [job(1, priority=5), job(2, priority=9), job(3, priority=5, queued_at=NOW + 1),
             job(4, priority=1), job(5, priority=9, queued_at=NOW + 2)]
    assert [j.id for j in order_queue(queue, aging_interval=600)] == [2, 5, 1, 3, 4]
    assert [j.id for j in order_queue(queue, aging_interval=0)] == [2, 5, 1, 3, 4]


def test_same_priority_and_queue_time_goes_by_id() -> None:
    queue = [job(7), job(3), job(5)]
    assert [j.id for j in order_queue(queue, aging_interval=60)] == [3, 5, 7]


def test_aging_one_step_per_interval_waited() -> None:
    old = job(1, priority=1, queued_at=NOW)
    # 9 priority steps apart: a job that waited 8.5 intervals more is still behind...
    fresh = job(2, priority=10, queued_at=NOW + 8.5 * 60)
    assert [j.id for j in order_queue([old, fresh], aging_interval=60)] == [2, 1]
    later = job(3, priority=10, queued_at=NOW + 9.5 * 60)  # ... and one of 9.5 is ahead
    assert [j.id for j in order_queue([later, old], aging_interval=60)] == [1, 3]
    assert [j.id for j in order_queue([later, old], aging_interval=0)] == [3, 1]  # no aging


def test_a_retried_job_queues_from_its_requeue_time() -> None:
    retried = job(1, queued_at=NOW + 10, attempt=1)
    assert queue_key(retried, 60) > queue_key(job(2, queued_at=NOW), 60)


# --- fit, reservations and backfill ------------------------------------------------------------


def test_jobs_start_while_they_fit_and_gpus_are_handed_out_in_order() -> None:
    free = Capacity(cpus=4, memory=100, gpus=(0, 1, 2))
    picks = plan([job(1, gpus=2), job(2, gpus=1, memory=60), job(3, memory=50)], free)
    assert [(j.id, g) for j, g in picks] == [(1, (0, 1)), (2, (2,))]


def test_a_blocked_head_keeps_what_it_needs() -> None:
    # 3 CPUs free; the head needs 4: nothing behind it may take a CPU it will need
    free = Capacity(cpus=3, memory=0, gpus=())
    assert ids(plan([job(1, cpus=4), job(2, cpus=1)], free)) == []


def test_backfill_uses_only_what_stays_free_beyond_the_head() -> None:
    # The head waits for memory; 2 of the 3 free CPUs are beyond its demand of 1.
    free = Capacity(cpus=3, memory=20, gpus=())
    queue = [job(1, memory=50), job(2, cpus=3), job(3, cpus=2), job(4, cpus=1)]
    assert ids(plan(queue, free)) == [3]


def test_backfill_on_gpus_leaves_the_heads_gpu() -> None:
    free = Capacity(cpus=8, memory=0, gpus=(1,))
    queue = [job(1, gpus=2), job(2, gpus=1), job(3)]  # head needs 2 GPUs, only 1 is free
    picks = plan(queue, free)
    assert ids(picks) == [3]  # job 2 would take the GPU the head is waiting for


def test_only_the_first_blocked_job_reserves() -> None:
    free = Capacity(cpus=4, memory=10, gpus=())
    queue = [job(1, memory=20), job(2, memory=30), job(3, cpus=2), job(4, cpus=2)]
    assert ids(plan(queue, free)) == [3]  # beyond job 1: 3 CPUs; job 2 does not reserve more


def test_a_job_that_can_never_fit_does_not_block_the_queue() -> None:
    total = Capacity(cpus=4, memory=100, gpus=())
    queue = [job(1, cpus=8), job(2, cpus=2)]
    assert ids(plan(queue, total, total=total)) == [2]
    assert never_fits(job(1, cpus=8), total) == "it needs 8 CPUs and this host offers 4"
    assert never_fits(job(3, gpus=1), total) == "it needs 1 GPUs and this host has 0"
    assert never_fits(job(4, memory=101), total) is not None
    assert never_fits(job(5, cpus=4, memory=100), total) is None


def test_the_pass_stops_when_no_cpu_is_left_or_the_backfill_depth_is_reached() -> None:
    looked: list[int] = []

    def queue() -> Any:
        for n in range(1, 10_000):
            looked.append(n)
            yield job(n, cpus=2 if n == 2 else 1)

    assert ids(plan(queue(), Capacity(cpus=1, memory=0, gpus=()))) == [1]
    assert looked == [1]  # stopped as soon as no CPU was left
    looked.clear()
    assert ids(plan(queue(), Capacity(cpus=2, memory=0, gpus=()))) == [1]
    assert looked == [1, 2]  # the head's reservation took the last CPU
    # behind a head waiting for memory, jobs that need memory are looked at up to the depth
    looked.clear()

    def hungry() -> Any:
        for n in range(1, 100):
            looked.append(n)
            yield job(n, memory=20 if n == 1 else 5)

    assert ids(plan(hungry(), Capacity(cpus=3, memory=10, gpus=()), backfill_depth=5)) == []
    assert looked == list(range(1, 8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 60), st.integers(0, 2)),
                min_size=1, max_size=12),
       st.integers(1, 6), st.integers(0, 100), st.integers(0, 3))
def test_plan_never_overcommits_nor_delays_the_head(
        shapes: list[tuple[int, int, int]], cpus: int, memory: int, gpu_count: int) -> None:
    queue = [job(i, cpus=c, memory=m, gpus=g) for i, (c, m, g) in enumerate(shapes, start=1)]
    free = Capacity(cpus=cpus, memory=memory, gpus=tuple(range(gpu_count)))
    picks = plan(queue, free)
    assert sum(j.resources.cpus for j, _ in picks) <= cpus
    assert sum(j.resources.memory for j, _ in picks) <= memory
    handed = [g for _, gpus in picks for g in gpus]
    assert len(handed) == len(set(handed)) and set(handed) <= set(free.gpus)
    picked = ids(picks)
    blocked = [j for j in queue if j.id not in picked]
    if not blocked:
        return
    head = blocked[0]  # the first job that did not fit: nothing behind it may delay it
    before = Capacity(cpus, memory, free.gpus)
    for j, gpus in picks:
        if j.id < head.id:
            before = before.minus(j, gpus)
    behind = [(j, gpus) for j, gpus in picks if j.id > head.id]
    need = head.resources
    used_cpus = sum(j.resources.cpus for j, _ in behind)
    used_memory = sum(j.resources.memory for j, _ in behind)
    used_gpus = sum(len(gpus) for _, gpus in behind)
    assert before.cpus - used_cpus >= min(before.cpus, need.cpus)
    assert before.memory - used_memory >= min(before.memory, need.memory)
    assert len(before.gpus) - used_gpus >= min(len(before.gpus), need.gpus)


def test_change_order_follows_a_job_through_its_life() -> None:
    life = [job(1, state=JobState.HELD), job(1), job(1, state=JobState.RUNNING, attempt=1),
            job(1, attempt=1), job(1, state=JobState.RUNNING, attempt=2),
            job(1, state=JobState.FAILED, attempt=2)]
    assert [change_order(j) for j in life] == sorted(change_order(j) for j in life)
    assert len({change_order(j) for j in life}) == len(life)


# --- the Scheduler -----------------------------------------------------------------------------


class Started:
    """The runner's side: records what was started, after the claim came back."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    async def __call__(self, preview: Job, claimed: asyncio.Future[Job | None]) -> None:
        confirmed = await claimed
        if confirmed is not None:
            assert (confirmed.id, confirmed.attempt) == (preview.id, preview.attempt)
            self.jobs.append(confirmed)


def spec(name: str, **fields: Any) -> JobSpec:
    return JobSpec(name=name, owner="me", snapshot=SNAPSHOT, argv=("true",), **fields)


@pytest.fixture
async def store() -> AsyncIterator[MemoryJobStore]:
    async with MemoryJobStore() as memory:
        yield memory


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_dispatch_claims_what_fits_and_publishes_running(store: MemoryJobStore) -> None:
    events, started, seen = JobEvents(), Started(), []
    events.listen(seen.append)
    scheduler = Scheduler(store, "here", Capacity(2, 0, (0,)), 600.0, started, events=events)
    jobs = await store.submit([spec("a", priority=1), spec("b", priority=9),
                               spec("c", priority=1, resources=Resources(gpus=1))],
                              time.time())
    for submitted in jobs:
        events.publish(submitted)
    claimed = await scheduler.dispatch()
    await settle()
    assert [j.name for j in claimed] == ["b", "a"]
    assert [j.name for j in started.jobs] == ["b", "a"]
    assert [(j.name, j.state) for j in seen[3:]] == [("b", JobState.RUNNING),
                                                      ("a", JobState.RUNNING)]
    assert scheduler.free() == Capacity(0, 0, (0,))
    assert [j.name for j in scheduler.queued_jobs()] == ["c"]
    scheduler.ended(claimed[0].id)
    assert [j.name for j in await scheduler.dispatch()] == ["c"]
    await settle()
    assert started.jobs[-1].gpu_ids == (0,)


async def test_a_stale_view_is_corrected_by_the_claim(store: MemoryJobStore) -> None:
    events, started = JobEvents(), Started()
    scheduler = Scheduler(store, "here", Capacity(1, 0, ()), 600.0, started, events=events)
    first, second = await store.submit([spec("first"), spec("second")], time.time())
    await scheduler.dispatch()  # loads the view from the store and starts "first"
    await settle()
    scheduler.ended(first.id)
    await store.cancel(second.id, reason="behind the scheduler's back", now=time.time())
    assert await scheduler.dispatch() == []  # the claim failed: the view is read again
    assert scheduler.queued_jobs() == []


async def test_held_jobs_follow_their_dependencies_through_events(store: MemoryJobStore) -> None:
    events, started, seen = JobEvents(), Started(), []
    events.listen(seen.append)
    scheduler = Scheduler(store, "here", Capacity(4, 0, ()), 600.0, started, events=events)
    [parent] = await store.submit([spec("parent")], time.time())
    [child, other] = await store.submit([spec("child", after=(parent.id,)),
                                         spec("other", after=(parent.id,))], time.time())
    for submitted in (parent, child, other):
        events.publish(submitted)
    [running] = await scheduler.dispatch()
    await settle()
    done = await store.finish(running.id, 1, AttemptResult(JobState.SUCCEEDED, exit_code=0),
                              time.time())
    scheduler.ended(done.id)
    events.publish(done)
    claimed = await scheduler.dispatch()
    assert sorted(j.name for j in claimed) == ["child", "other"]
    states = [(j.name, j.state) for j in seen]
    assert states.index(("child", JobState.QUEUED)) > states.index(("parent", JobState.SUCCEEDED))
    assert ("other", JobState.RUNNING) in states


async def test_dependents_of_a_failure_are_announced_cancelled(store: MemoryJobStore) -> None:
    events, seen = JobEvents(), []
    events.listen(seen.append)
    scheduler = Scheduler(store, "here", Capacity(1, 0, ()), 600.0, Started(), events=events)
    [parent] = await store.submit([spec("parent")], time.time())
    [child] = await store.submit([spec("child", after=(parent.id,))], time.time())
    [grandchild] = await store.submit([spec("grandchild", after=(child.id,))], time.time())
    for submitted in (parent, child, grandchild):
        events.publish(submitted)
    cancelled = await store.cancel(parent.id, reason="no", now=time.time())
    events.publish(cancelled)
    await scheduler.dispatch()
    assert [(j.name, j.state, j.reason) for j in seen[4:]] == [
        ("child", JobState.CANCELLED, f"dependency {parent.id} was cancelled"),
        ("grandchild", JobState.CANCELLED, f"dependency {child.id} was cancelled")]


async def test_late_copies_of_old_changes_are_ignored(store: MemoryJobStore) -> None:
    scheduler = Scheduler(store, "here", Capacity(1, 0, ()), 600.0, Started(),
                          events=JobEvents())
    queued = job(1)
    retried = job(1, attempt=1, queued_at=NOW + 5)
    scheduler.note(retried)
    scheduler.note(queued)  # arrives late: must not replace the retry
    assert scheduler.queued_jobs() == [retried]
    scheduler.note(job(1, state=JobState.CANCELLED, attempt=1))
    assert scheduler.queued_jobs() == []


async def test_without_events_every_pass_reads_the_store(store: MemoryJobStore) -> None:
    started = Started()
    scheduler = Scheduler(store, "here", Capacity(1, 0, ()), 600.0, started)
    await store.submit([spec("x")], time.time())
    assert [j.name for j in await scheduler.dispatch()] == ["x"]


async def test_the_loop_wakes_on_submit_and_on_end(store: MemoryJobStore) -> None:
    events, started = JobEvents(), Started()
    scheduler = Scheduler(store, "here", Capacity(1, 0, ()), 600.0, started, events=events)
    await scheduler.start()
    try:
        jobs = await store.submit([spec("one"), spec("two")], time.time())
        for submitted in jobs:
            events.publish(submitted)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if started.jobs:
                break
        assert [j.name for j in started.jobs] == ["one"]
        scheduler.ended(started.jobs[0].id)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(started.jobs) == 2:
                break
        assert [j.name for j in started.jobs] == ["one", "two"]
    finally:
        await scheduler.stop()
