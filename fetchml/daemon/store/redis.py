"""``RedisJobStore``: the JobStore contract on Redis, so several daemons share one queue.

Every write runs the shared state machine (``transitions``) inside one optimistic Redis
transaction: the keys it reads are WATCHed, its writes are queued and applied by MULTI/EXEC,
and a conflicting write by another daemon makes EXEC fail, so the step is retried from fresh
reads. A claim is therefore a compare-and-set: of two hosts claiming one job, one wins. Each
committed change is also PUBLISHed (inside the same MULTI) on ``<prefix>events``, so every
daemon can serve job events, ``logs -f`` and ``wait`` for every job.

Layout, under a key prefix (default ``fetchml:``): ``job:<id>`` JSON of the job; ``next_id``;
``ids`` (zset of every id); ``state:<state>`` (zset of ids by state); ``owner:<name>`` (zset);
``waits:<id>`` (set of ``after`` ids not yet succeeded) and ``waiters:<id>`` (the reverse).

Durability follows Redis's persistence: with ``appendonly yes`` and ``appendfsync always`` an
acknowledged submit is on disk before the reply; with ``appendfsync everysec`` (Redis's
default for AOF) up to a second of acknowledged writes can be lost if the Redis host loses
power; without AOF, everything since the last RDB snapshot. ``open`` warns when the server is
not configured for ``always``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from fetchml.daemon.store import transitions
from fetchml.daemon.store.base import AttemptResult, Claim, Job, JobSpec, JobState, JobStore
from fetchml.daemon.store.transitions import JobTransaction
from fetchml.errors import BadRequest, InternalError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_RETRIES = 100  # optimistic transactions retried under contention before giving up
# A Redis that does not answer within this many seconds is treated as unreachable, so that
# submits fail fast with `unavailable` rather than hang.
SOCKET_TIMEOUT_S = 5.0


class _RedisTransaction(JobTransaction):
    """Reads WATCH their keys; writes are collected and applied at commit in MULTI/EXEC."""

    def __init__(self, pipe: Any, prefix: str, first_id: int | None) -> None:
        self.pipe, self.p = pipe, prefix
        self.first_id = first_id
        self.originals: dict[int, Job | None] = {}  # as read from Redis
        self.jobs: dict[int, Job | None] = {}  # as this transaction leaves them
        self.waits: dict[int, set[int]] = {}  # job -> after ids, loaded or changed
        self.waiters: dict[int, set[int]] = {}  # after -> job ids, loaded or changed

    def key(self, *parts: object) -> str:
        return self.p + ":".join(str(part) for part in parts)

    async def _load(self, job_ids: Collection[int]) -> None:
        todo = [i for i in job_ids if i not in self.jobs]
        if not todo:
            return
        keys = [self.key("job", i) for i in todo]
        await self.pipe.watch(*keys)
        values = await self.pipe.mget(keys)
        for job_id, raw in zip(todo, values, strict=True):
            job = Job.from_dict(json.loads(raw)) if raw is not None else None
            self.originals[job_id] = self.jobs[job_id] = job

    async def get(self, job_id: int) -> Job | None:
        await self._load([job_id])
        return self.jobs[job_id]

    async def get_many(self, job_ids: Collection[int]) -> dict[int, Job]:
        await self._load(job_ids)
        return {i: job for i in job_ids if (job := self.jobs[i]) is not None}

    async def next_id(self) -> int:
        if self.first_id is None:
            raise InternalError("ids were not reserved for this submit")
        return self.first_id

    async def insert(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.originals.setdefault(job.id, None)
            self.jobs[job.id] = job

    async def update(self, job: Job) -> None:
        self.jobs[job.id] = job

    async def delete(self, job_ids: Collection[int]) -> None:
        for job_id in job_ids:
            self.jobs[job_id] = None
            await self.clear_waits(job_id)

    async def _set(self, table: dict[int, set[int]], name: str, job_id: int) -> set[int]:
        if job_id not in table:
            key = self.key(name, job_id)
            await self.pipe.watch(key)
            table[job_id] = {int(v) for v in await self.pipe.smembers(key)}
        return table[job_id]

    async def add_waits(self, waits: Collection[tuple[int, int]]) -> None:
        for job_id, after_id in waits:
            (await self._set(self.waits, "waits", job_id)).add(after_id)
            (await self._set(self.waiters, "waiters", after_id)).add(job_id)

    async def take_waiters(self, after_id: int) -> list[int]:
        waiters = await self._set(self.waiters, "waiters", after_id)
        taken = sorted(waiters)
        waiters.clear()
        for job_id in taken:
            (await self._set(self.waits, "waits", job_id)).discard(after_id)
        return taken

    async def is_waiting(self, job_id: int) -> bool:
        return bool(await self._set(self.waits, "waits", job_id))

    async def clear_waits(self, job_id: int) -> None:
        afters = await self._set(self.waits, "waits", job_id)
        for after_id in list(afters):
            (await self._set(self.waiters, "waiters", after_id)).discard(job_id)
        afters.clear()

    def changed(self) -> list[Job]:
        return [job for i, job in self.jobs.items()
                if job is not None and job != self.originals.get(i)]

    async def commit(self, channel: str) -> None:
        pipe = self.pipe
        pipe.multi()
        for job_id, job in self.jobs.items():
            old = self.originals.get(job_id)
            if job == old:
                continue
            if old is not None:
                pipe.zrem(self.key("state", old.state.value), job_id)
            if job is None:
                pipe.delete(self.key("job", job_id))
                pipe.zrem(self.key("ids"), job_id)
                if old is not None:
                    pipe.zrem(self.key("owner", old.owner), job_id)
                continue
            pipe.set(self.key("job", job_id), json.dumps(job.to_dict()))
            pipe.zadd(self.key("state", job.state.value), {str(job_id): job_id})
            if old is None:
                pipe.zadd(self.key("ids"), {str(job_id): job_id})
                pipe.zadd(self.key("owner", job.owner), {str(job_id): job_id})
            pipe.publish(channel, json.dumps(job.to_dict()))
        for name, table in (("waits", self.waits), ("waiters", self.waiters)):
            for job_id, members in table.items():
                key = self.key(name, job_id)
                pipe.delete(key)
                if members:
                    pipe.sadd(key, *members)
        await pipe.execute()


class RedisJobStore(JobStore):
    def __init__(self, url: str, *, prefix: str = "fetchml:") -> None:
        self.url, self.prefix = url, prefix
        self.channel = prefix + "events"
        self._redis: aioredis.Redis | None = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise Unavailable("the job store is closed; open it before using it")
        return self._redis

    async def open(self) -> None:
        try:
            self._redis = aioredis.Redis.from_url(
                self.url, socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S, decode_responses=True)
            config = await self._redis.config_get("append*")
        except (RedisError, OSError, ValueError) as exc:
            raise Unavailable(f"cannot reach Redis at {self.url} ({exc}); start it or fix "
                              "--store") from exc
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            log.warning("Redis at %s runs with appendonly=%s appendfsync=%s: acknowledged "
                        "jobs can be lost if its host crashes; set appendonly yes and "
                        "appendfsync always", self.url, config.get("appendonly"),
                        config.get("appendfsync"))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(part) for part in parts)

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis at {self.url} did not answer ({exc}); try again once it "
                              "is back") from exc

    async def _transact(self, step: Callable[[JobTransaction], Awaitable[T]],
                        first_id: int | None = None) -> T:
        async def attempt() -> T:
            for _ in range(MAX_RETRIES):
                async with self.redis.pipeline(transaction=True) as pipe:
                    tx = _RedisTransaction(pipe, self.prefix, first_id)
                    try:
                        result = await step(tx)
                        await tx.commit(self.channel)
                        return result
                    except WatchError:
                        continue
            raise Unavailable("the job store is too busy to apply this change; try again")

        return await self._call(attempt)

    async def _ids(self, index: str, top: str = "+inf") -> list[Any]:
        """Ids in a zset index, highest first, from ``top`` down."""
        return list(await self._call(lambda: self.redis.zrevrangebyscore(index, top, "-inf")))

    async def _jobs(self, ids: Sequence[Any]) -> list[Job]:
        if not ids:
            return []
        values = await self._call(lambda: self.redis.mget([self.key("job", i) for i in ids]))
        return [Job.from_dict(json.loads(raw)) for raw in values if raw is not None]

    # -- the contract -------------------------------------------------------------------------
    async def submit(self, specs: Sequence[JobSpec], now: float) -> list[Job]:
        if not specs:
            return []
        last = await self._call(lambda: self.redis.incrby(self.key("next_id"), len(specs)))
        return await self._transact(lambda tx: transitions.submit(tx, specs, now),
                                    first_id=int(last) - len(specs) + 1)

    async def get(self, job_id: int) -> Job | None:
        found = await self._jobs([job_id])
        return found[0] if found else None

    async def queued(self) -> list[Job]:
        return sorted(await self._jobs(await self._ids(self.key("state", "queued"))),
                      key=lambda job: job.id)

    async def running(self, host: str | None = None) -> list[Job]:
        jobs = await self._jobs(await self._ids(self.key("state", "running")))
        return sorted((job for job in jobs if host is None or job.host == host),
                      key=lambda job: job.id)

    async def claim(self, claims: Sequence[Claim], now: float) -> list[Job]:
        return await self._transact(lambda tx: transitions.claim(tx, claims, now))

    async def finish(self, job_id: int, attempt: int, result: AttemptResult, now: float) -> Job:
        return await self._transact(
            lambda tx: transitions.finish(tx, job_id, attempt, result, now))

    async def cancel(self, job_id: int, *, reason: str, now: float) -> Job:
        return await self._transact(lambda tx: transitions.cancel(tx, job_id, reason, now))

    async def delete(self, job_ids: Sequence[int]) -> int:
        return await self._transact(lambda tx: transitions.delete(tx, job_ids))

    async def counts(self) -> dict[JobState, int]:
        async def count() -> dict[JobState, int]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for state in JobState:
                    pipe.zcard(self.key("state", state.value))
                values = await pipe.execute()
            return {state: int(n) for state, n in zip(JobState, values, strict=True)}

        return await self._call(count)

    async def list(self, *, states: Collection[JobState] | None = None,
                   owner: str | None = None, limit: int | None = None,
                   before_id: int | None = None) -> list[Job]:
        if limit is not None and limit < 0:
            raise BadRequest(f"limit must be zero or more, not {limit}")
        indexes = ([self.key("state", JobState(s).value) for s in states] if states is not None
                   else [self.key("owner", owner)] if owner is not None else [self.key("ids")])
        top = f"({before_id}" if before_id is not None else "+inf"
        found: list[Job] = []
        for index in indexes:
            ids = await self._ids(index, top)
            for start in range(0, len(ids), 500):
                for job in await self._jobs(ids[start:start + 500]):
                    if owner is None or job.owner == owner:
                        found.append(job)
                if limit is not None and len(indexes) == 1 and len(found) >= limit:
                    break
        found.sort(key=lambda job: -job.id)
        return found[:limit] if limit is not None else found

