"""periodic() and cancel_and_wait(): the daemon's background loops."""

from __future__ import annotations

import asyncio

import pytest

from fetchml.daemon.tasks import cancel_and_wait, every, periodic


async def test_periodic_work_goes_on_after_a_failure_and_stops_with_the_context(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []

    async def work() -> None:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) == 1:
            raise RuntimeError("boom")

    async with periodic(0.01, work, name="test-loop") as task:
        while len(calls) < 3:
            await asyncio.sleep(0.01)
    assert task.done() and task.cancelled()
    count = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == count  # stopped
    assert "test-loop failed; it runs again in 0.01 s" in caplog.text


async def test_every_waits_one_interval_first_unless_told_to_start_at_once() -> None:
    calls: list[str] = []

    async def work() -> None:
        calls.append("ran")

    later = asyncio.create_task(every(60, work, name="later"))
    now = asyncio.create_task(every(60, work, name="now", at_once=True))
    await asyncio.sleep(0.05)
    assert calls == ["ran"]  # only the one started at once
    await cancel_and_wait(later, now)
    assert later.cancelled() and now.cancelled()


async def test_cancel_and_wait_swallows_what_the_tasks_raise_and_skips_none() -> None:
    async def fails() -> None:
        raise ValueError("ignored")

    async def sleeps() -> None:
        await asyncio.sleep(60)

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    sleeping = asyncio.create_task(sleeps())
    await cancel_and_wait(failed, None, sleeping)
    assert sleeping.cancelled()
    assert isinstance(failed.exception(), ValueError)
    await cancel_and_wait()  # nothing to stop
