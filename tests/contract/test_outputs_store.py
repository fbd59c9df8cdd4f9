"""``store_outputs``: outputs stored after their attempt ended, on every JobStore."""

from __future__ import annotations

import pytest

from fetchml.daemon.store import JobState, JobStore
from fetchml.errors import Conflict, NotFound
from tests.contract.test_job_store import end, start, submit_one

OUTPUTS = "ab" * 32


async def test_outputs_stored_late_are_recorded_and_the_state_kept(store: JobStore) -> None:
    job = await end(store, await submit_one(store), JobState.FAILED, exit_code=0,
                    reason="outputs not stored: the disk is full",
                    outputs_error="the disk is full", warnings=("left out",))
    assert job.outputs_error == "the disk is full" and job.warnings == ("left out",)
    updated = await store.store_outputs(job.id, 1, OUTPUTS, ["left out"], "stored late")
    assert updated == await store.get(job.id)
    assert updated.state is JobState.FAILED and updated.outputs == OUTPUTS
    assert updated.outputs_error is None and updated.reason == "stored late"
    with pytest.raises(Conflict):  # once only
        await store.store_outputs(job.id, 1, OUTPUTS, [], None)


async def test_outputs_of_a_running_or_stale_attempt_are_refused(store: JobStore) -> None:
    running = await start(store, await submit_one(store))
    with pytest.raises(Conflict):
        await store.store_outputs(running.id, 1, OUTPUTS, [], None)
    with pytest.raises(NotFound):
        await store.store_outputs(running.id + 100, 1, OUTPUTS, [], None)


async def test_a_new_attempt_starts_without_the_last_ones_outputs_news(store: JobStore) -> None:
    job = await submit_one(store, max_attempts=2)
    retried = await end(store, job, JobState.FAILED, exit_code=1, outputs_error="full",
                        warnings=("w",))
    assert retried.state is JobState.QUEUED
    again = await start(store, retried)
    assert again.outputs_error is None and again.warnings == ()
