"""In-process fan-out of job state changes to streams (jobs.events, jobs.wait, logs -f)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from fetchml.daemon.store.base import Job

log = logging.getLogger(__name__)

# A subscriber this far behind is dropped rather than letting the daemon's memory grow.
MAX_BACKLOG = 10_000


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Job] = asyncio.Queue(MAX_BACKLOG)
        self.overflowed = False

    async def next(self) -> Job:
        return await self.queue.get()


class JobEvents:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def publish(self, job: Job) -> None:
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(job)
            except asyncio.QueueFull:
                log.warning("dropping a job-event subscriber that fell too far behind")
                sub.overflowed = True
                self._subscribers.discard(sub)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        sub = Subscription()
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
