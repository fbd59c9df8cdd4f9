"""In-process fan-out of job state changes: to listeners (the scheduler's view of the queue)
and to streams (jobs.events, jobs.wait, logs -f).

Every change of a job's state in this daemon is published here once it is durable. Listeners
are plain functions called synchronously, in order, before any stream sees the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from fetchml.daemon.jobs.model import Job
from fetchml.errors import Unavailable

log = logging.getLogger(__name__)

# A subscriber this far behind is dropped rather than letting the daemon's memory grow.
MAX_BACKLOG = 10_000

Listener = Callable[[Job], None]


class Subscription:
    """One stream's queue of changes. Once it overflowed it gets nothing more."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Job] = asyncio.Queue(MAX_BACKLOG)
        self.overflowed = False
        self._overflow = asyncio.Event()

    def _drop(self) -> None:
        self.overflowed = True
        self._overflow.set()

    async def next(self) -> Job:
        """The next change; Unavailable once this subscriber fell too far behind."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        if self.overflowed:
            raise Unavailable("this stream fell too far behind the job changes; "
                              "open it again")
        getter = asyncio.ensure_future(self.queue.get())
        dropped = asyncio.ensure_future(self._overflow.wait())
        try:
            await asyncio.wait({getter, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        raise Unavailable("this stream fell too far behind the job changes; open it again")

    def drain(self) -> list[Job]:
        """Every change queued so far, without waiting."""
        jobs = []
        while not self.queue.empty():
            jobs.append(self.queue.get_nowait())
        return jobs


class JobEvents:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call ``listener(job)`` for every change from now on."""
        self._listeners.append(listener)

    def publish(self, job: Job) -> None:
        for listener in self._listeners:
            try:
                listener(job)
            except Exception:  # one broken listener must not hide the change from the rest
                log.exception("a job-event listener failed on job %d", job.id)
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(job)
            except asyncio.QueueFull:
                log.warning("dropping a job-event subscriber that fell too far behind")
                sub._drop()
                self._subscribers.discard(sub)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        sub = Subscription()
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
