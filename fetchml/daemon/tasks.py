"""Background tasks of the daemon: work repeated at an interval, and stopping tasks cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel the tasks and wait until they have stopped; what they raised, their
    CancelledError included, is swallowed (None entries are skipped)."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)


async def every(interval: float, work: Callable[[], Awaitable[object]], *, name: str,
                at_once: bool = False) -> None:
    """``await work()`` every ``interval`` seconds, forever: first after one interval, or at
    once with ``at_once``. A failure is logged and the work runs again at the next turn."""
    if not at_once:
        await asyncio.sleep(interval)
    while True:
        try:
            await work()
        except Exception:
            log.exception("%s failed; it runs again in %g s", name, interval)
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def periodic(interval: float, work: Callable[[], Awaitable[object]], *, name: str,
                   at_once: bool = False) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``every(interval, work)`` in a task named ``name`` while the context is open."""
    task = asyncio.create_task(every(interval, work, name=name, at_once=at_once), name=name)
    try:
        yield task
    finally:
        await cancel_and_wait(task)
