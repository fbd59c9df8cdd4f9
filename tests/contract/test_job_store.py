"""The JobStore contract, run against every implementation (see conftest.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from fetchml.daemon.store import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    AttemptResult,
    Claim,
    Job,
    JobSpec,
    JobState,
    JobStore,
    Resources,
)
from fetchml.errors import BadRequest, Conflict, NotFound, Unavailable
from tests.contract.conftest import StoreFactory

SNAPSHOT = "0123456789abcdef" * 4
HOST = "gpu-box-1"


def spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "name": "train",
        "owner": "alice",
        "snapshot": SNAPSHOT,
        "argv": ("python", "train.py"),
    }
    return JobSpec(**(fields | overrides))


async def submit_one(store: JobStore, now: float = 100.0, **overrides: Any) -> Job:
    (job,) = await store.submit([spec(**overrides)], now)
    return job


async def start(store: JobStore, job: Job, now: float = 200.0, **claim: Any) -> Job:
    started = await store.claim([Claim(job.id, job.attempt, claim.get("host", HOST))], now)
    assert len(started) == 1
    return started[0]


async def end(store: JobStore, job: Job, state: JobState, now: float = 300.0, **kw: Any) -> Job:
    """Run ``job`` (queued) through one attempt that ends in ``state``."""
    running = await start(store, job, now - 1)
    return await store.finish(running.id, running.attempt, AttemptResult(state, **kw), now)


# --- submit, get, list --------------------------------------------------------------------


async def test_submit_stores_queued_jobs_with_increasing_ids(store: JobStore) -> None:
    specs = [
        spec(name="a", env={"SEED": "1"}, labels={"watch": "w1"}),
        spec(
            name="b",
            priority=9,
            resources=Resources(cpus=4, memory=2**30, gpus=2),
            timeout=3600.0,
            max_attempts=3,
            workdir="src",
        ),
    ]
    jobs = await store.submit(specs, now=1000.5)
    assert [job.name for job in jobs] == ["a", "b"]
    assert jobs[0].id < jobs[1].id
    for job, submitted in zip(jobs, specs, strict=True):
        assert job.spec == submitted
        assert job.state is JobState.QUEUED
        assert (job.attempt, job.created_at, job.queued_at) == (0, 1000.5, 1000.5)
        assert (job.started_at, job.finished_at, job.host, job.reason) == (None,) * 4
        assert not job.cancel_requested
        assert await store.get(job.id) == job
    (later,) = await store.submit([spec()], now=1001.0)
    assert later.id > jobs[1].id


async def test_submit_of_nothing_stores_nothing(store: JobStore) -> None:
    assert await store.submit([], now=1.0) == []
    assert await store.list() == []


async def test_get_of_an_unknown_id_is_none(store: JobStore) -> None:
    assert await store.get(1) is None
    job = await submit_one(store)
    assert await store.get(job.id + 1) is None


async def test_ids_are_never_reused_after_a_delete(store: JobStore) -> None:
    first = await submit_one(store)
    newest = await end(store, await submit_one(store), JobState.SUCCEEDED)
    assert await store.delete([newest.id]) == 1
    again = await submit_one(store)
    assert again.id > newest.id > first.id


async def test_list_is_newest_first_and_pages_with_before_id(store: JobStore) -> None:
    ids = [job.id for job in await store.submit([spec(name=str(i)) for i in range(7)], 1.0)]
    assert [job.id for job in await store.list()] == ids[::-1]
    page1 = await store.list(limit=3)
    page2 = await store.list(limit=3, before_id=page1[-1].id)
    page3 = await store.list(limit=3, before_id=page2[-1].id)
    assert [job.id for job in page1 + page2 + page3] == ids[::-1]
    assert len(page3) == 1
    assert await store.list(before_id=ids[0]) == []
    assert await store.list(limit=0) == []


async def test_list_filters_by_state_and_owner(store: JobStore) -> None:
    queued = await submit_one(store, owner="alice")
    running = await start(store, await submit_one(store, owner="bob"))
    failed = await end(store, await submit_one(store, owner="alice"), JobState.FAILED)
    held = await submit_one(store, owner="bob", after=(running.id,))

    async def ids(**filters: Any) -> list[int]:
        return [job.id for job in await store.list(**filters)]

    assert await ids(states=ACTIVE_STATES) == [held.id, running.id, queued.id]
    assert await ids(states={JobState.FAILED}) == [failed.id]
    assert await ids(states=TERMINAL_STATES, owner="bob") == []
    assert await ids(owner="alice") == [failed.id, queued.id]
    assert await ids(owner="bob", states=[JobState.HELD, JobState.QUEUED]) == [held.id]
    assert await ids(owner="carol") == []
    assert await ids(states=[]) == []
    assert await ids(states=ACTIVE_STATES, before_id=held.id, limit=1) == [running.id]


async def test_list_refuses_a_negative_limit(store: JobStore) -> None:
    with pytest.raises(BadRequest, match="limit"):
        await store.list(limit=-1)


async def test_queued_and_running_are_id_ascending(store: JobStore) -> None:
    jobs = await store.submit([spec(name=str(i)) for i in range(4)], 1.0)
    await start(store, jobs[1], host="a")
    await start(store, jobs[3], host="b")
    assert [job.id for job in await store.queued()] == [jobs[0].id, jobs[2].id]
    assert [job.id for job in await store.running()] == [jobs[1].id, jobs[3].id]
    assert [job.id for job in await store.running("b")] == [jobs[3].id]
    assert await store.running("elsewhere") == []


async def test_counts_every_state(store: JobStore) -> None:
    assert await store.counts() == dict.fromkeys(JobState, 0)
    await store.submit([spec(), spec()], 1.0)
    running = await start(store, await submit_one(store))
    await submit_one(store, after=(running.id,))
    await end(store, await submit_one(store), JobState.LOST)
    counts = await store.counts()
    assert counts == {
        **dict.fromkeys(JobState, 0),
        JobState.QUEUED: 2,
        JobState.RUNNING: 1,
        JobState.HELD: 1,
        JobState.LOST: 1,
    }


async def test_delete_removes_only_jobs_that_ended(store: JobStore) -> None:
    queued = await submit_one(store)
    running = await start(store, await submit_one(store))
    done = await end(store, await submit_one(store), JobState.SUCCEEDED)
    cancelled = await store.cancel((await submit_one(store)).id, reason="no", now=5.0)
    removed = await store.delete([queued.id, running.id, done.id, cancelled.id, 9999])
    assert removed == 2
    assert await store.get(done.id) is None
    assert await store.get(cancelled.id) is None
    assert await store.get(queued.id) == queued
    assert await store.get(running.id) == running
    assert await store.delete([]) == 0


async def test_resolve_accepts_only_the_id_of_a_stored_job(store: JobStore) -> None:
    job = await submit_one(store)
    assert await store.resolve(str(job.id)) == job.id
    assert await store.resolve(f" {job.id}\n") == job.id
    for text in ("", "abc", "-1", "0", "1.0", "+1", "1_0", "#1", str(job.id + 1), "9" * 30):
        with pytest.raises(NotFound):
            await store.resolve(text)


# --- dependencies -------------------------------------------------------------------------


async def test_after_decides_the_initial_state(store: JobStore) -> None:
    succeeded = await end(store, await submit_one(store), JobState.SUCCEEDED)
    failed = await end(store, await submit_one(store), JobState.FAILED)
    cancelled = await store.cancel((await submit_one(store)).id, reason="no", now=1.0)
    lost = await end(store, await submit_one(store), JobState.LOST)
    queued = await submit_one(store)

    jobs = await store.submit(
        [
            spec(after=(succeeded.id,)),
            spec(after=(succeeded.id, queued.id)),
            spec(after=(succeeded.id, failed.id)),
            spec(after=(cancelled.id,)),
            spec(after=(lost.id, queued.id)),
        ],
        now=400.0,
    )
    assert [job.state for job in jobs] == [
        JobState.QUEUED,
        JobState.HELD,
        JobState.CANCELLED,
        JobState.CANCELLED,
        JobState.CANCELLED,
    ]
    assert jobs[0].queued_at == 400.0
    assert jobs[1].queued_at is None
    assert jobs[2].reason == f"dependency {failed.id} failed"
    assert jobs[3].reason == f"dependency {cancelled.id} was cancelled"
    assert jobs[4].reason == f"dependency {lost.id} was lost"
    assert jobs[2].finished_at == 400.0


async def test_an_unknown_after_id_stores_nothing(store: JobStore) -> None:
    existing = await submit_one(store)
    with pytest.raises(NotFound, match=str(existing.id + 50)):
        await store.submit(
            [spec(name="ok"), spec(after=(existing.id, existing.id + 50)), spec()], now=2.0
        )
    assert [job.id for job in await store.list()] == [existing.id]


async def test_a_held_job_is_queued_when_all_its_dependencies_succeeded(store: JobStore) -> None:
    first, second = await store.submit([spec(), spec()], 1.0)
    held = await submit_one(store, after=(first.id, second.id, first.id))
    assert held.state is JobState.HELD
    await end(store, first, JobState.SUCCEEDED, now=10.0)
    assert (await store.get(held.id)) == held
    await end(store, second, JobState.SUCCEEDED, now=20.0)
    released = await store.get(held.id)
    assert released is not None
    assert (released.state, released.queued_at) == (JobState.QUEUED, 20.0)
    assert [job.id for job in await store.queued()] == [held.id]


async def test_a_dependency_that_is_retried_keeps_its_dependents_held(store: JobStore) -> None:
    flaky = await submit_one(store, max_attempts=2)
    held = await submit_one(store, after=(flaky.id,))
    await end(store, flaky, JobState.FAILED, exit_code=1)
    assert (await store.get(held.id)) == held


async def test_a_failure_cancels_held_dependents_transitively(store: JobStore) -> None:
    root, other = await store.submit([spec(name="root"), spec(name="other")], 1.0)
    child = await submit_one(store, after=(root.id,))
    grandchild = await submit_one(store, after=(child.id, other.id))
    sibling = await submit_one(store, after=(other.id,))
    await end(store, root, JobState.FAILED, now=50.0, exit_code=2)

    child_now = await store.get(child.id)
    grandchild_now = await store.get(grandchild.id)
    assert child_now is not None
    assert grandchild_now is not None
    assert (child_now.state, child_now.reason) == (
        JobState.CANCELLED,
        f"dependency {root.id} failed",
    )
    assert (grandchild_now.state, grandchild_now.reason) == (
        JobState.CANCELLED,
        f"dependency {child.id} was cancelled",
    )
    assert child_now.finished_at == grandchild_now.finished_at == 50.0
    # the jobs cancelled with it no longer wait: ``other`` succeeding releases only ``sibling``
    await end(store, other, JobState.SUCCEEDED, now=60.0)
    assert (await store.get(grandchild.id)) == grandchild_now
    released = await store.get(sibling.id)
    assert released is not None
    assert released.state is JobState.QUEUED


async def test_cancelling_a_held_job_cascades_and_it_is_never_released(store: JobStore) -> None:
    root = await submit_one(store)
    held = await submit_one(store, after=(root.id,))
    dependent = await submit_one(store, after=(held.id,))
    cancelled = await store.cancel(held.id, reason="cancelled by alice", now=7.0)
    assert (cancelled.state, cancelled.reason, cancelled.finished_at) == (
        JobState.CANCELLED,
        "cancelled by alice",
        7.0,
    )
    dependent_now = await store.get(dependent.id)
    assert dependent_now is not None
    assert dependent_now.reason == f"dependency {held.id} was cancelled"
    await end(store, root, JobState.SUCCEEDED)
    assert await store.get(held.id) == cancelled


async def test_a_lost_dependency_cancels_its_dependents(store: JobStore) -> None:
    root = await submit_one(store)
    held = await submit_one(store, after=(root.id,))
    running = await start(store, root)
    await store.mark_lost_or_retry(root.id, running.attempt, "host gone", now=9.0)
    held_now = await store.get(held.id)
    assert held_now is not None
    assert held_now.reason == f"dependency {root.id} was lost"


# --- claim --------------------------------------------------------------------------------


async def test_claim_starts_a_queued_job_once(store: JobStore) -> None:
    job = await submit_one(store)
    (running,) = await store.claim([Claim(job.id, 0, HOST, (0, 3))], now=42.0)
    assert running.state is JobState.RUNNING
    assert (running.attempt, running.started_at, running.host, running.gpu_ids) == (
        1,
        42.0,
        HOST,
        (0, 3),
    )
    assert await store.get(job.id) == running
    assert await store.claim([Claim(job.id, 0, "other-host")], now=43.0) == []
    assert await store.get(job.id) == running


async def test_claim_skips_what_it_may_not_start(store: JobStore) -> None:
    queued = await submit_one(store)
    cancelled = await store.cancel((await submit_one(store)).id, reason="no", now=1.0)
    held = await submit_one(store, after=(queued.id,))
    claims = [
        Claim(queued.id, 1, HOST),  # an attempt number the job is not at
        Claim(cancelled.id, 0, HOST),
        Claim(held.id, 0, HOST),
        Claim(held.id + 100, 0, HOST),
    ]
    assert await store.claim(claims, now=2.0) == []
    assert await store.get(queued.id) == queued


async def test_claim_of_a_batch_starts_each_job_at_most_once(store: JobStore) -> None:
    a, b = await store.submit([spec(), spec()], 1.0)
    started = await store.claim(
        [Claim(a.id, 0, "x"), Claim(b.id, 0, "x"), Claim(a.id, 0, "y")], now=2.0
    )
    assert [(job.id, job.host) for job in started] == [(a.id, "x"), (b.id, "x")]


async def test_concurrent_claims_of_one_job_start_it_once(store: JobStore) -> None:
    job = await submit_one(store)
    results = await asyncio.gather(
        *(store.claim([Claim(job.id, 0, f"host-{i}")], now=3.0) for i in range(10))
    )
    assert sum(len(started) for started in results) == 1


# --- finish -------------------------------------------------------------------------------


async def test_finish_records_a_success(store: JobStore) -> None:
    running = await start(store, await submit_one(store), now=10.0)
    result = AttemptResult(
        JobState.SUCCEEDED, exit_code=0, peak_rss=123456, cpu_time=9.5, outputs="f" * 64
    )
    done = await store.finish(running.id, 1, result, now=20.0)
    assert done.state is JobState.SUCCEEDED
    assert (done.exit_code, done.signal, done.peak_rss, done.cpu_time, done.outputs) == (
        0,
        None,
        123456,
        9.5,
        "f" * 64,
    )
    assert (done.started_at, done.finished_at, done.host) == (10.0, 20.0, HOST)
    assert await store.get(running.id) == done


async def test_finish_is_fenced_by_the_attempt(store: JobStore) -> None:
    queued = await submit_one(store, max_attempts=2)
    with pytest.raises(Conflict, match=f"attempt 0 of job {queued.id} is stale"):
        await store.finish(queued.id, 0, AttemptResult(JobState.SUCCEEDED), now=1.0)
    running = await start(store, queued)
    with pytest.raises(Conflict, match=f"attempt 2 of job {queued.id} is stale"):
        await store.finish(queued.id, 2, AttemptResult(JobState.SUCCEEDED), now=1.0)
    requeued = await store.finish(queued.id, 1, AttemptResult(JobState.FAILED), now=2.0)
    assert requeued.state is JobState.QUEUED
    # the first attempt reports again (a duplicate): the job is queued, so it is stale
    with pytest.raises(Conflict, match=f"attempt 1 of job {queued.id} is stale"):
        await store.finish(queued.id, running.attempt, AttemptResult(JobState.FAILED), now=3.0)
    second = await start(store, requeued)
    done = await store.finish(queued.id, 2, AttemptResult(JobState.SUCCEEDED), now=4.0)
    with pytest.raises(Conflict):
        await store.finish(queued.id, second.attempt, AttemptResult(JobState.FAILED), now=5.0)
    assert await store.get(queued.id) == done
    with pytest.raises(NotFound):
        await store.finish(queued.id + 1, 1, AttemptResult(JobState.FAILED), now=5.0)


async def test_a_failure_with_attempts_left_is_queued_again(store: JobStore) -> None:
    job = await submit_one(store, max_attempts=3)
    first = await start(store, job, now=10.0, host="a")
    retry = await store.finish(
        job.id, 1, AttemptResult(JobState.FAILED, exit_code=3, cpu_time=1.0), now=11.0
    )
    assert retry.state is JobState.QUEUED
    assert (retry.attempt, retry.queued_at, retry.reason) == (1, 11.0, "attempt 1 failed: exit 3")
    assert (retry.host, retry.gpu_ids, retry.started_at, retry.finished_at) == (
        None,
        (),
        None,
        None,
    )
    assert retry.exit_code == 3
    assert first.created_at == retry.created_at

    second = await start(store, retry, now=12.0, host="b")
    assert (second.attempt, second.host, second.exit_code) == (2, "b", None)
    retry = await store.mark_lost_or_retry(job.id, 2, "host b stopped answering", now=13.0)
    assert (retry.state, retry.reason, retry.queued_at) == (
        JobState.QUEUED,
        "host b stopped answering",
        13.0,
    )

    third = await start(store, retry, now=14.0)
    assert third.attempt == 3
    failed = await store.finish(job.id, 3, AttemptResult(JobState.FAILED, signal=9), now=15.0)
    assert failed.state is JobState.FAILED
    assert (failed.reason, failed.signal, failed.finished_at) == (
        "attempt 3 failed: killed by signal 9",
        9,
        15.0,
    )
    assert await store.claim([Claim(job.id, 3, HOST)], now=16.0) == []


async def test_the_runner_reason_is_kept_and_lost_without_retries_is_lost(
    store: JobStore,
) -> None:
    timed_out = await end(store, await submit_one(store), JobState.FAILED, reason="timeout")
    assert (timed_out.state, timed_out.reason) == (JobState.FAILED, "timeout")
    running = await start(store, await submit_one(store))
    lost = await store.mark_lost_or_retry(running.id, 1, "supervisor vanished", now=9.0)
    assert (lost.state, lost.reason, lost.finished_at) == (
        JobState.LOST,
        "supervisor vanished",
        9.0,
    )


async def test_a_conflict_does_not_undo_concurrent_writes(store: JobStore) -> None:
    jobs = [await start(store, job) for job in await store.submit([spec()] * 5, 1.0)]
    results = await asyncio.gather(
        *(
            store.finish(job.id, job.attempt + (i == 2), AttemptResult(JobState.SUCCEEDED), 9.0)
            for i, job in enumerate(jobs)
        ),
        return_exceptions=True,
    )
    assert isinstance(results[2], Conflict)
    for i, job in enumerate(jobs):
        stored = await store.get(job.id)
        assert stored is not None
        assert stored.state is (JobState.RUNNING if i == 2 else JobState.SUCCEEDED)


# --- cancel -------------------------------------------------------------------------------


async def test_cancel_of_a_queued_job_is_immediate(store: JobStore) -> None:
    job = await submit_one(store)
    cancelled = await store.cancel(job.id, reason="cancelled by alice", now=5.0)
    assert (cancelled.state, cancelled.reason, cancelled.finished_at) == (
        JobState.CANCELLED,
        "cancelled by alice",
        5.0,
    )
    assert await store.get(job.id) == cancelled
    assert await store.queued() == []


async def test_cancel_of_a_job_that_ended_changes_nothing(store: JobStore) -> None:
    done = await end(store, await submit_one(store), JobState.SUCCEEDED)
    assert await store.cancel(done.id, reason="late", now=999.0) == done
    cancelled = await store.cancel((await submit_one(store)).id, reason="first", now=1.0)
    assert await store.cancel(cancelled.id, reason="second", now=2.0) == cancelled
    with pytest.raises(NotFound):
        await store.cancel(done.id + 100, reason="x", now=1.0)


async def test_cancel_of_a_running_job_asks_its_runner(store: JobStore) -> None:
    running = await start(store, await submit_one(store, max_attempts=3))
    asked = await store.cancel(running.id, reason="cancelled by alice", now=5.0)
    assert asked.state is JobState.RUNNING
    assert (asked.cancel_requested, asked.reason, asked.finished_at) == (
        True,
        "cancelled by alice",
        None,
    )
    assert await store.cancel(running.id, reason="cancelled by bob", now=6.0) == asked
    result = AttemptResult(JobState.CANCELLED, signal=15, reason="stopped")
    cancelled = await store.finish(running.id, 1, result, now=7.0)
    assert (cancelled.state, cancelled.reason, cancelled.signal, cancelled.finished_at) == (
        JobState.CANCELLED,
        "cancelled by alice",
        15,
        7.0,
    )


async def test_a_job_asked_to_cancel_that_fails_ends_cancelled(store: JobStore) -> None:
    running = await start(store, await submit_one(store, max_attempts=5))
    dependent = await submit_one(store, after=(running.id,))
    await store.cancel(running.id, reason="cancelled by alice", now=5.0)
    result = AttemptResult(JobState.FAILED, exit_code=143)
    ended = await store.finish(running.id, 1, result, now=6.0)
    assert (ended.state, ended.reason, ended.exit_code) == (
        JobState.CANCELLED,
        "cancelled by alice",
        143,
    )
    dependent_now = await store.get(dependent.id)
    assert dependent_now is not None
    assert dependent_now.reason == f"dependency {running.id} was cancelled"


async def test_a_job_asked_to_cancel_keeps_a_success_or_a_loss(store: JobStore) -> None:
    finishing = await start(store, await submit_one(store))
    vanishing = await start(store, await submit_one(store, max_attempts=3))
    for job in (finishing, vanishing):
        await store.cancel(job.id, reason="cancelled by alice", now=5.0)
    done = await store.finish(finishing.id, 1, AttemptResult(JobState.SUCCEEDED), now=6.0)
    assert done.state is JobState.SUCCEEDED
    lost = await store.mark_lost_or_retry(vanishing.id, 1, "host gone", now=6.0)
    assert (lost.state, lost.reason) == (JobState.LOST, "host gone")  # and not retried


async def test_a_new_attempt_starts_without_a_cancel_request(store: JobStore) -> None:
    job = await submit_one(store, max_attempts=2)
    await end(store, job, JobState.FAILED)
    retried = await store.get(job.id)
    assert retried is not None
    running = await start(store, retried)
    assert not running.cancel_requested


# --- values, concurrency, durability ------------------------------------------------------


async def test_a_stored_job_survives_to_dict_and_from_dict(store: JobStore) -> None:
    root = await submit_one(store, env={"A": "1"}, labels={"sweep": "lr"}, timeout=60.0)
    await start(store, root)
    result = AttemptResult(JobState.SUCCEEDED, exit_code=0, peak_rss=1, cpu_time=0.25)
    done = await store.finish(root.id, 1, result, now=9.0)
    held = await submit_one(store, after=(root.id,), max_attempts=2)
    for job in (done, held, await store.get(root.id)):
        assert job is not None
        wire = json.loads(json.dumps(job.to_dict()))
        assert Job.from_dict(wire) == job


async def test_fifty_concurrent_submits_get_distinct_ids_and_are_kept(
    store: JobStore, make_store: Callable[[], JobStore], persistent: bool
) -> None:
    results = await asyncio.gather(
        *(store.submit([spec(name=f"job-{i}")], now=float(i)) for i in range(50))
    )
    jobs = [job for batch in results for job in batch]
    assert len({job.id for job in jobs}) == 50
    if persistent:
        await store.close()
        store = make_store()
        await store.open()
    try:
        for job in jobs:
            assert await store.get(job.id) == job
    finally:
        if persistent:
            await store.close()


async def test_reopening_keeps_everything(durable_factory: StoreFactory) -> None:
    assert durable_factory.persistent
    store, make_store = durable_factory.make(), durable_factory.make
    await store.open()
    root = await submit_one(store, max_attempts=2)
    held = await submit_one(store, after=(root.id,))
    asked = await store.cancel(
        (await start(store, await submit_one(store))).id, reason="r", now=1.0
    )
    newest = await end(store, await submit_one(store), JobState.FAILED, exit_code=1)
    assert await store.delete([newest.id]) == 1
    before = await store.list()
    await store.close()

    reopened = make_store()
    await reopened.open()
    try:
        assert await reopened.list() == before
        assert await reopened.counts() == _counts(before)
        # what the store tracks beside the jobs survived too: waits, the fencing, the next id
        with pytest.raises(Conflict):
            await reopened.finish(asked.id, 2, AttemptResult(JobState.FAILED), now=2.0)
        await end(reopened, root, JobState.SUCCEEDED)
        released = await reopened.get(held.id)
        assert released is not None
        assert released.state is JobState.QUEUED
        assert (await submit_one(reopened)).id > newest.id
    finally:
        await reopened.close()


def _counts(jobs: list[Job]) -> dict[JobState, int]:
    counts = dict.fromkeys(JobState, 0)
    for job in jobs:
        counts[job.state] += 1
    return counts


async def test_a_closed_store_is_unavailable(store: JobStore) -> None:
    await store.close()
    with pytest.raises(Unavailable):
        await store.submit([spec()], now=1.0)
    with pytest.raises(Unavailable):
        await store.get(1)
    await store.close()  # a second close does nothing
