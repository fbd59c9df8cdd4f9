"""Other hosts' job changes, from Redis pub/sub into this daemon's ``JobEvents``.

Every step a RedisJobStore commits is published as ``{"origin", "jobs"}``; changes this
daemon made itself were already published locally when made, so their echoes are skipped.
Pub/sub forgets what it published while a subscriber was away, so after each (re)connection
the bridge reads again every job it knew to be active and republishes those that changed:
a ``wait`` or ``logs -f`` never hangs on an ending it missed during a Redis outage.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from fetchml.daemon.events import JobEvents
from fetchml.daemon.jobs.model import TERMINAL_STATES, Job
from fetchml.daemon.store.redis import RedisJobStore, event_message
from fetchml.daemon.store.redis_client import REDIS_ERRORS
from fetchml.errors import FetchmlError

log = logging.getLogger(__name__)

# Seconds between reconnection attempts while Redis is away; short, since an outage should
# cost no more than this once Redis is back.
RECONNECT_S = 0.5
POLL_S = 1.0  # how long one read of the subscription waits for a message
# Redis away, or the store refusing while it is: the bridge reconnects
_OUTAGE: tuple[type[Exception], ...] = (*REDIS_ERRORS, FetchmlError)


class EventBridge:
    """Subscribes to the store's channel and republishes other writers' changes locally."""

    def __init__(self, store: RedisJobStore, events: JobEvents, origin: str, *,
                 on_remote: Callable[[Job], None], on_gap: Callable[[], None]) -> None:
        self.store, self.events, self.origin = store, events, origin
        self.on_remote, self.on_gap = on_remote, on_gap
        self.active: dict[int, Job] = {}  # the last version seen of each active job
        self._own = event_message(origin, [])[:-len('"jobs": []}')]  # how our messages begin
        self.connected = asyncio.Event()
        events.listen(self._track)

    def _track(self, job: Job) -> None:
        if job.state in TERMINAL_STATES:
            self.active.pop(job.id, None)
        else:
            self.active[job.id] = job

    def deliver(self, raw: str | bytes) -> None:
        """One published message; malformed ones are logged and dropped."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text.startswith(self._own):
            return  # our own change, published here when it was made
        try:
            message = json.loads(text)
            jobs = [Job.from_dict(data) for data in message["jobs"]]
        except (ValueError, KeyError, TypeError, AttributeError, FetchmlError) as exc:
            log.warning("ignoring a malformed job event: %s", exc)
            return
        for job in jobs:
            self.events.publish(job)
            self.on_remote(job)

    async def run(self) -> None:
        """Follow the channel until cancelled, reconnecting whenever Redis goes away."""
        outage = False
        while True:
            pubsub: Any = None
            try:
                pubsub = self.store.redis.pubsub()
                await pubsub.subscribe(self.store.channel)
                if outage:
                    log.info("job events from other hosts resumed")
                    await self._fill_gap()
                outage = False
                self.connected.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=POLL_S)
                    if message is not None and message.get("type") == "message":
                        self.deliver(message["data"])
            except _OUTAGE as exc:
                self.connected.clear()
                if not outage:
                    log.warning("lost the job events of other hosts (%s); reconnecting", exc)
                outage = True
                await asyncio.sleep(RECONNECT_S)
            finally:
                if pubsub is not None:
                    await asyncio.shield(_close(pubsub))

    async def _fill_gap(self) -> None:
        """Republish what changed, among the jobs known to be active, while disconnected."""
        known = dict(self.active)
        current = {job.id: job for job in await self.store.get_many(sorted(known))}
        changed = 0
        for job_id, before in known.items():
            job = current.get(job_id)
            if job is None:
                self.active.pop(job_id, None)
            elif job != before:
                changed += 1
                self.events.publish(job)
                self.on_remote(job)
        log.info("caught up with %d job changes missed while Redis was away", changed)
        self.on_gap()


async def _close(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except REDIS_ERRORS as exc:
        log.debug("closing the subscription: %s", exc)
