"""``RedisJobStore``: the JobStore contract on Redis, so several daemons share one queue.

Every write runs the shared state machine (``transitions``) inside one optimistic Redis
transaction: the keys it reads are WATCHed, its writes are queued and applied by MULTI/EXEC,
and a conflicting write by another daemon makes EXEC fail, so the step is retried from fresh
reads. A claim, the one write every host races for, is a single Lua script instead: for
every claimed job it compares the stored JSON with the one the claim was computed from and,
only if all still match, sets the running jobs, moves them between the state indexes, records
which host runs which attempt, renews the claiming host's lease (``host_seen``) and publishes
the changes, all in one atomic step. Of two hosts claiming one job, exactly one wins.

Each committed step PUBLISHes the jobs it changed on ``<prefix>events``, as one message
``{"origin", "jobs": [job, ...]}`` (``origin``: the ``RedisJobStore.origin`` of the writer, so
a daemon can skip its own echoes), so every daemon can serve job events, ``logs -f`` and
``wait`` for every job.

Layout, under a key prefix (default ``fetchml:``): ``job:<id>`` JSON of the job; ``next_id``;
``ids`` (zset of every id); ``state:<state>`` (zset of ids by state); ``owner:<name>`` (zset);
``waits:<id>`` (set of ``after`` ids not yet succeeded) and ``waiters:<id>`` (the reverse);
``attempt_hosts:<id>`` (hash: attempt number -> host that ran it); ``host_seen`` (hash: host
-> Redis time of its last heartbeat or claim, "seconds.micros").

Durability follows Redis's persistence: with ``appendonly yes`` and ``appendfsync always`` an
acknowledged submit is on disk before the reply; with ``appendfsync everysec`` (Redis's
default for AOF) up to a second of acknowledged writes can be lost if the Redis host loses
power; without AOF, everything since the last RDB snapshot. ``open`` warns when the server is
not configured for ``always``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from fetchml.daemon.jobs.model import AttemptResult, Claim, Job, JobSpec, JobState
from fetchml.daemon.store import transitions
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.store.redis_client import redis_client, redis_errors
from fetchml.daemon.store.transitions import JobTransaction
from fetchml.errors import BadRequest, InternalError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_RETRIES = 100  # optimistic transactions retried under contention before giving up
HOST_SEEN = "host_seen"

# KEYS: n job keys, state:queued, state:running, host_seen, then n attempt_hosts keys.
# ARGV: channel, n, the event to publish, then per claim: expected JSON, new JSON, id,
# attempt, host.
_CLAIM_LUA = """
local channel, n = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  if redis.call('GET', KEYS[i]) ~= ARGV[4 + 5 * (i - 1)] then
    return i
  end
end
local t = redis.call('TIME')
local seen = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
for i = 1, n do
  local a = 4 + 5 * (i - 1)
  local id = ARGV[a + 2]
  redis.call('SET', KEYS[i], ARGV[a + 1])
  redis.call('ZREM', KEYS[n + 1], id)
  redis.call('ZADD', KEYS[n + 2], id, id)
  redis.call('HSET', KEYS[n + 3 + i], ARGV[a + 3], ARGV[a + 4])
  redis.call('HSET', KEYS[n + 3], ARGV[a + 4], seen)
end
redis.call('PUBLISH', channel, ARGV[3])
return 0
"""


def event_message(origin: str, jobs_json: Sequence[str]) -> str:
    """What a committed step publishes: its writer and the stored JSON of the jobs it changed."""
    return f'{{"origin": {json.dumps(origin)}, "jobs": [{", ".join(jobs_json)}]}}'


class _RedisTransaction(JobTransaction):
    """Reads WATCH their keys; writes are collected and applied at commit in MULTI/EXEC."""

    def __init__(self, pipe: Any, prefix: str, reserved: range | None, origin: str) -> None:
        self.pipe, self.p = pipe, prefix
        self.first_id = reserved.start if reserved is not None else None
        self.reserved = reserved or range(0)  # ids this submit reserved
        self.origin = origin
        self.originals: dict[int, Job | None] = {}  # as read from Redis
        self.jobs: dict[int, Job | None] = {}  # as this transaction leaves them
        self.waits: dict[int, set[int]] = {}  # job -> after ids, as read and changed
        self.waiters: dict[int, set[int]] = {}  # after -> job ids, as read and changed
        # ("waits" or "waiters", id) -> (members added, members removed) by this transaction
        self.deltas: dict[tuple[str, int], tuple[set[int], set[int]]] = {}

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

    async def _set(self, name: str, job_id: int) -> set[int]:
        """The whole set ``name:job_id`` as this transaction leaves it (read and WATCHed once)."""
        table = self.waits if name == "waits" else self.waiters
        if job_id not in table:
            members: set[int] = set()
            if job_id not in self.reserved:  # a reserved id: nothing names it yet
                key = self.key(name, job_id)
                await self.pipe.watch(key)
                members = {int(v) for v in await self.pipe.smembers(key)}
            added, removed = self.deltas.get((name, job_id), (set(), set()))
            table[job_id] = (members - removed) | added
        return table[job_id]

    def _change(self, name: str, job_id: int, member: int, *, add: bool) -> None:
        """Record one membership change; only changes are written back, never whole sets
        (a job many others wait on would otherwise be read and rewritten at each submit)."""
        table = self.waits if name == "waits" else self.waiters
        added, removed = self.deltas.setdefault((name, job_id), (set(), set()))
        (added if add else removed).add(member)
        (removed if add else added).discard(member)
        if job_id in table:
            if add:
                table[job_id].add(member)
            else:
                table[job_id].discard(member)

    async def add_waits(self, waits: Collection[tuple[int, int]]) -> None:
        # No read needed: the jobs named in ``after`` were read (WATCHed) by the submit, so
        # one of them ending meanwhile aborts this transaction anyway.
        for job_id, after_id in waits:
            self._change("waits", job_id, after_id, add=True)
            self._change("waiters", after_id, job_id, add=True)

    async def take_waiters(self, after_id: int) -> list[int]:
        taken = sorted(await self._set("waiters", after_id))
        for job_id in taken:
            self._change("waiters", after_id, job_id, add=False)
            self._change("waits", job_id, after_id, add=False)
        return taken

    async def is_waiting(self, job_id: int) -> bool:
        return bool(await self._set("waits", job_id))

    async def clear_waits(self, job_id: int) -> None:
        for after_id in sorted(await self._set("waits", job_id)):
            self._change("waiters", after_id, job_id, add=False)
            self._change("waits", job_id, after_id, add=False)

    async def commit(self, channel: str) -> None:
        """Apply the changes in one MULTI/EXEC: a few commands per transaction rather than a
        few per job, so a sweep of thousands stays one short round trip."""
        removals: dict[str, list[int]] = defaultdict(list)  # zset -> members leaving it
        additions: dict[str, dict[str, int]] = defaultdict(dict)  # zset -> members joining
        stored: dict[str, str] = {}
        doomed: list[str] = []
        for job_id, job in self.jobs.items():
            old = self.originals.get(job_id)
            if job == old:
                continue
            if old is not None:
                removals[self.key("state", old.state.value)].append(job_id)
            if job is None:
                doomed += [self.key("job", job_id), self.key("attempt_hosts", job_id)]
                removals[self.key("ids")].append(job_id)
                if old is not None:
                    removals[self.key("owner", old.owner)].append(job_id)
                continue
            stored[self.key("job", job_id)] = json.dumps(job.to_dict())
            additions[self.key("state", job.state.value)][str(job_id)] = job_id
            if old is None:
                additions[self.key("ids")][str(job_id)] = job_id
                additions[self.key("owner", job.owner)][str(job_id)] = job_id
        pipe = self.pipe
        pipe.multi()
        if doomed:
            pipe.delete(*doomed)
        if stored:
            pipe.mset(stored)
        for key, members in removals.items():  # every removal before any addition
            pipe.zrem(key, *members)
        for key, scores in additions.items():
            pipe.zadd(key, scores)
        for (name, job_id), (added, removed) in self.deltas.items():
            if removed:
                pipe.srem(self.key(name, job_id), *removed)
            if added:
                pipe.sadd(self.key(name, job_id), *added)
        if stored:
            pipe.publish(channel, event_message(self.origin, list(stored.values())))
        await pipe.execute()


class _ClaimReadout(JobTransaction):
    """The jobs a claim was computed from: ``transitions.claim`` reads and updates only these."""

    def __init__(self, jobs: dict[int, Job]) -> None:
        self.jobs = jobs

    async def get(self, job_id: int) -> Job | None:
        return self.jobs.get(job_id)

    async def update(self, job: Job) -> None:
        self.jobs[job.id] = job

    async def get_many(self, job_ids: Collection[int]) -> dict[int, Job]:
        raise InternalError("a claim reads jobs one by one")

    async def next_id(self) -> int:
        raise InternalError("a claim creates no job")

    async def insert(self, jobs: Sequence[Job]) -> None:
        raise InternalError("a claim creates no job")

    async def delete(self, job_ids: Collection[int]) -> None:
        raise InternalError("a claim deletes no job")

    async def add_waits(self, waits: Collection[tuple[int, int]]) -> None:
        raise InternalError("a claim changes no dependency")

    async def take_waiters(self, after_id: int) -> list[int]:
        raise InternalError("a claim changes no dependency")

    async def is_waiting(self, job_id: int) -> bool:
        raise InternalError("a claim changes no dependency")

    async def clear_waits(self, job_id: int) -> None:
        raise InternalError("a claim changes no dependency")


class RedisJobStore(JobStore):
    shared = True

    def __init__(self, url: str, *, prefix: str = "fetchml:", origin: str = "") -> None:
        self.url, self.prefix = url, prefix
        self.channel = prefix + "events"
        self.origin = origin  # named in every change this store publishes
        self._redis: aioredis.Redis | None = None
        self._claim_script: Any = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise Unavailable("the job store is closed; open it before using it")
        return self._redis

    async def open(self) -> None:
        with redis_errors(f"cannot reach Redis at {self.url}", "start it or fix --store",
                          connecting=True):
            self._redis = redis_client(self.url)
            self._claim_script = self._redis.register_script(_CLAIM_LUA)
            config = await self._redis.config_get("append*")
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

    async def call(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` (Redis commands), translating Redis and socket errors to Unavailable."""
        with redis_errors(f"Redis at {self.url} did not answer", "try again once it is back"):
            return await work()

    async def _transact(self, step: Callable[[JobTransaction], Awaitable[T]],
                        reserved: range | None = None) -> T:
        async def attempt() -> T:
            for _ in range(MAX_RETRIES):
                async with self.redis.pipeline(transaction=True) as pipe:
                    tx = _RedisTransaction(pipe, self.prefix, reserved, self.origin)
                    try:
                        result = await step(tx)
                        await tx.commit(self.channel)
                        return result
                    except WatchError:
                        continue
            raise Unavailable("the job store is too busy to apply this change; try again")

        return await self.call(attempt)

    async def _ids(self, index: str, top: str = "+inf") -> list[Any]:
        """Ids in a zset index, highest first, from ``top`` down."""
        return list(await self.call(lambda: self.redis.zrevrangebyscore(index, top, "-inf")))

    async def _jobs(self, ids: Sequence[Any]) -> list[Job]:
        if not ids:
            return []
        values = await self.call(lambda: self.redis.mget([self.key("job", i) for i in ids]))
        return [Job.from_dict(json.loads(raw)) for raw in values if raw is not None]

    # -- the contract -------------------------------------------------------------------------
    async def submit(self, specs: Sequence[JobSpec], now: float) -> list[Job]:
        if not specs:
            return []
        last = await self.call(lambda: self.redis.incrby(self.key("next_id"), len(specs)))
        first = int(last) - len(specs) + 1
        return await self._transact(lambda tx: transitions.submit(tx, specs, now),
                                    reserved=range(first, first + len(specs)))

    async def get(self, job_id: int) -> Job | None:
        found = await self._jobs([job_id])
        return found[0] if found else None

    async def get_many(self, job_ids: Sequence[int]) -> list[Job]:
        """The stored jobs among ``job_ids``, in their order; unknown ids are left out."""
        found: list[Job] = []
        for start in range(0, len(job_ids), 500):
            found += await self._jobs(job_ids[start:start + 500])
        return found

    async def queued(self) -> list[Job]:
        return sorted(await self._jobs(await self._ids(self.key("state", "queued"))),
                      key=lambda job: job.id)

    async def running(self, host: str | None = None) -> list[Job]:
        jobs = await self._jobs(await self._ids(self.key("state", "running")))
        return sorted((job for job in jobs if host is None or job.host == host),
                      key=lambda job: job.id)

    async def claim(self, claims: Sequence[Claim], now: float) -> list[Job]:
        if not claims:
            return []
        return await self.call(lambda: self._claim(claims, now))

    async def _claim(self, claims: Sequence[Claim], now: float) -> list[Job]:
        ids = list(dict.fromkeys(claim.job_id for claim in claims))
        for _ in range(MAX_RETRIES):
            raws = await self.redis.mget([self.key("job", i) for i in ids])
            read = {i: raw for i, raw in zip(ids, raws, strict=True) if raw is not None}
            readout = _ClaimReadout({i: Job.from_dict(json.loads(raw))
                                     for i, raw in read.items()})
            started = await transitions.claim(readout, claims, now)
            if not started:
                return []
            keys = [self.key("job", job.id) for job in started]
            keys += [self.key("state", "queued"), self.key("state", "running"),
                     self.key(HOST_SEEN)]
            keys += [self.key("attempt_hosts", job.id) for job in started]
            stored = [json.dumps(job.to_dict()) for job in started]
            args: list[Any] = [self.channel, len(started), event_message(self.origin, stored)]
            for job, text in zip(started, stored, strict=True):
                args += [read[job.id], text, job.id, job.attempt, job.host]
            if int(await self._claim_script(keys=keys, args=args)) == 0:
                return started
            # a job changed since it was read (another host claimed or cancelled it): read again
        raise Unavailable("the job store is too busy to start jobs; try again")

    async def attempt_host(self, job_id: int, attempt: int) -> str | None:
        """The host that ran ``attempt`` of ``job_id``, when the store recorded it."""
        found = await self.call(lambda: self.redis.hget(self.key("attempt_hosts", job_id),
                                                         str(attempt)))
        return str(found) if found is not None else None

    async def finish(self, job_id: int, attempt: int, result: AttemptResult, now: float) -> Job:
        return await self._transact(
            lambda tx: transitions.finish(tx, job_id, attempt, result, now))

    async def store_outputs(self, job_id: int, attempt: int, outputs: str,
                            warnings: Sequence[str], reason: str | None) -> Job:
        return await self._transact(lambda tx: transitions.store_outputs(
            tx, job_id, attempt, outputs, warnings, reason))

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

        return await self.call(count)

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

