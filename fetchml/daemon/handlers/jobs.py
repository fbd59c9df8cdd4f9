"""jobs.*: submit, list, get, cancel, wait and events.

A user sees their own jobs unless their role has jobs:read:all; a job they may not see gets the
same not_found answer as a job that does not exist, so ids leak nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Sequence
from typing import Any

from fetchml.cas.paths import validate_path
from fetchml.daemon.handlers import Call, grant_snapshots, handles, resolve_snapshot
from fetchml.daemon.isolation.service import job_isolation
from fetchml.daemon.jobs.model import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Job,
    JobSpec,
    JobState,
    Resources,
)
from fetchml.errors import BadRequest, Conflict, NotFound, Unavailable
from fetchml.protocol import ops
from fetchml.protocol.job import LAST_V1_PROTOCOL, SUBMIT_FIELDS, WireJob, job_v1

JOB_KEYS = frozenset(SUBMIT_FIELDS)
MAX_JOBS_PER_SUBMIT = 10_000
ACTIVE_PAGE = 500  # active jobs read per query when listing one user's


def job_to_wire(job: Job) -> WireJob:
    """A job as the protocol carries it (times as epoch seconds)."""
    return {
        "id": job.id, "name": job.name, "owner": job.owner, "state": job.state.value,
        "priority": job.priority, "snapshot": job.snapshot, "argv": list(job.argv),
        "env": dict(job.env), "workdir": job.workdir, "cpus": job.resources.cpus,
        "memory": job.resources.memory, "gpus": job.resources.gpus,
        "timeout": job.timeout, "retries": job.max_attempts - 1, "after": list(job.after),
        "labels": dict(job.labels), "datasets": list(job.datasets),
        "isolation": job.isolation, "network": job.network,
        "attempt": job.attempt, "reason": job.reason,
        "created_at": job.created_at, "queued_at": job.queued_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "host": job.host,
        "gpu_ids": list(job.gpu_ids), "exit_code": job.exit_code, "signal": job.signal,
        "peak_rss": job.peak_rss, "cpu_time": job.cpu_time, "outputs": job.outputs,
        "outputs_error": job.outputs_error, "warnings": list(job.warnings),
    }


def job_for(call: Call[Any], job: Job) -> WireJob | dict[str, Any]:
    """``job`` as the caller's session spells it: protocol 1 sessions get ``job_v1``'s form.
    A job the caller is shown is one it may see: so may it read its snapshot and outputs."""
    grant_snapshots(call, job.snapshot, job.outputs)
    wire = job_to_wire(job)
    return job_v1(wire) if call.session.protocol <= LAST_V1_PROTOCOL else wire


def may_see(call: Call[Any], job: Job) -> bool:
    return job.owner == call.identity.user or call.identity.allows("jobs:read:all")


async def visible_job(call: Call[Any], text: str) -> Job:
    """The job named by ``text`` if the caller may see it; the same NotFound otherwise."""
    missing = NotFound(f"no job {text} that you can see; `fetchml status` lists your jobs")
    try:
        job = await call.core.jobs.get(await call.core.jobs.resolve(str(text)))
    except NotFound:
        raise missing from None
    if job is None or not may_see(call, job):
        raise missing
    return job


async def visible_jobs(call: Call[Any], texts: Sequence[str]) -> list[Job]:
    """``visible_job`` for many references at once: plain ids are read in one query."""
    ids = [int(t) for t in (text.strip() for text in texts) if t.isdigit() and len(t) <= 18]
    if len(ids) < len(texts) or len(ids) <= 8:
        return [await visible_job(call, text) for text in texts]
    found = {job.id: job for job in await get_many(call, ids)}
    for job_id, text in zip(ids, texts, strict=True):
        job = found.get(job_id)
        if job is None or not may_see(call, job):
            raise NotFound(f"no job {text} that you can see; `fetchml status` lists your jobs")
    return [found[job_id] for job_id in ids]


def _number(value: Any, name: str, kind: type, default: Any) -> Any:
    if value is None:
        return default
    if kind is float and type(value) in (int, float):
        return float(value)
    if type(value) is not kind:
        expected = "a number" if kind is float else "an integer"
        raise BadRequest(f"job field {name!r} must be {expected}")
    return value


async def _datasets(call: Call[Any], raw: Any, resolved: dict[tuple[str, ...], tuple[str, ...]]
                    ) -> tuple[str, ...]:
    """The job's datasets as stored, ``NAME@V[:MOUNT]``; a sweep resolves them once."""
    if not raw:
        return ()
    if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
        raise BadRequest("datasets must be a list of NAME[@VERSION][:MOUNT] strings")
    key = tuple(raw)
    if key not in resolved:
        call.require("datasets:read")
        resolved[key] = await call.core.datasets.resolve(key)
    return resolved[key]


async def _spec(call: Call[Any], raw: dict[str, Any], snapshot: str,
                resolved: dict[tuple[str, ...], tuple[str, ...]]) -> JobSpec:
    unknown = sorted(set(raw) - JOB_KEYS)
    if unknown:
        raise BadRequest(f"unknown job field {unknown[0]!r}; "
                         f"fields are {', '.join(sorted(JOB_KEYS))}")
    argv = raw.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequest("a job needs argv, a non-empty list of strings (the command to run)")
    workdir = raw.get("workdir") or ""
    if not isinstance(workdir, str) or workdir.startswith("/"):
        raise BadRequest(f"workdir {str(workdir)[:80]!r} must be a path relative to the "
                         "project root, like src/train")
    workdir = validate_path(workdir.strip("/")) if workdir not in ("", ".") else ""
    retries = _number(raw.get("retries"), "retries", int, 0)
    if retries < 0:
        raise BadRequest("retries must not be negative")
    refs = raw.get("after") or []
    if not isinstance(refs, list) or not all(isinstance(r, str | int) for r in refs):
        raise BadRequest("after must be a list of job ids")
    after = []
    for ref in refs:
        before = await visible_job(call, str(ref))
        if before.state in (JobState.FAILED, JobState.CANCELLED, JobState.LOST):
            # it can never succeed, so this job could never start
            raise Conflict(f"job {before.id} already ended {before.state.value}; requeue it, "
                           "then queue this one --after the new job")
        after.append(before.id)
    name = raw.get("name") or " ".join(argv)[:80]
    isolation = job_isolation(call.core.settings, raw.get("isolation"))
    network = raw.get("network", False)
    if network is True and not call.core.settings.job_network and \
            (isolation or call.core.settings.isolation) != "none":
        raise BadRequest("this daemon gives sandboxed jobs no network (job_network: false); "
                         "queue without --network, or ask an admin to allow it")
    return JobSpec(
        name=name, owner=call.identity.user, snapshot=snapshot, argv=tuple(argv),
        env=raw.get("env") or {}, workdir=workdir,
        priority=_number(raw.get("priority"), "priority", int, 5),
        resources=Resources(cpus=_number(raw.get("cpus"), "cpus", int, 1),
                            memory=_number(raw.get("memory"), "memory", int, 0),
                            gpus=_number(raw.get("gpus"), "gpus", int, 0)),
        timeout=_number(raw.get("timeout"), "timeout", float, None),
        max_attempts=retries + 1, after=tuple(after), labels=raw.get("labels") or {},
        datasets=await _datasets(call, raw.get("datasets"), resolved),
        isolation=isolation, network=network,
    )


async def _supersede(call: Call[Any], labels: dict[str, str]) -> None:
    """Cancel the caller's queued or held jobs carrying all these labels."""
    core = call.core
    for job in await core.jobs.list(states={JobState.QUEUED, JobState.HELD},
                                     owner=call.identity.user):
        if all(job.labels.get(k) == v for k, v in labels.items()):
            core.publish(await core.jobs.cancel(job.id, reason="superseded", now=time.time()))


@handles(ops.JOBS_SUBMIT)
async def jobs_submit(call: Call[ops.JobsSubmitArgs]) -> dict[str, Any]:
    core = call.core
    raw_jobs: list[dict[str, Any]] = call.args["jobs"]
    if not raw_jobs or len(raw_jobs) > MAX_JOBS_PER_SUBMIT:
        raise BadRequest(f"submit between 1 and {MAX_JOBS_PER_SUBMIT} jobs at once")
    # Shared with syncs, exclusive to a garbage-collection batch: once the snapshot is
    # resolved here, a collection running now keeps it and everything it names.
    async with core.gc_guard():
        snapshot = await resolve_snapshot(call, call.args["snapshot"])
        resolved: dict[tuple[str, ...], tuple[str, ...]] = {}
        specs = [await _spec(call, raw, snapshot, resolved) for raw in raw_jobs]
        for spec in specs:
            why = core.never_fits(spec)  # in a cluster: on no host
            if why:
                raise BadRequest(f"job {spec.name!r} can never start: {why}; ask for less")
        if call.args["supersede"]:
            await _supersede(call, call.args["supersede"])
        jobs = await core.jobs.submit(specs, time.time())
    if resolved:
        await _withdraw_if_removed(call, jobs, {d for refs in resolved.values() for d in refs})
    for job in jobs:
        core.publish(job)
    core.scheduler.wake()
    return {"jobs": [job_for(call, job) for job in jobs]}


async def _withdraw_if_removed(call: Call[Any], jobs: Sequence[Job], refs: set[str]) -> None:
    """A dataset removal that began while these jobs were being stored may not have seen
    them: look again, and cancel them rather than leave jobs naming a removed version."""
    gone = await call.core.datasets.withdrawn(refs)
    if not gone:
        return
    for job in jobs:
        await cancel_job(call, job, f"dataset {gone[0]} was removed")
    raise Conflict(f"dataset {gone[0]} was removed while the jobs were being queued; queue them "
                   "again with another version")


async def _active(call: Call[Any], states: Collection[JobState], owner: str | None, limit: int,
                  before: int | None) -> list[Job]:
    """Jobs in these active states (of ``owner``), newest first.

    Read through the state index and filtered by owner here: asked for both, the store walks
    the owner's whole history, every finished job included.
    """
    found: list[Job] = []
    while len(found) < limit:
        page = await call.core.jobs.list(states=states, limit=ACTIVE_PAGE, before_id=before)
        found.extend(job for job in page if owner is None or job.owner == owner)
        if len(page) < ACTIVE_PAGE:
            break
        before = page[-1].id
    return found[:limit]


@handles(ops.JOBS_LIST)
async def jobs_list(call: Call[ops.JobsListArgs]) -> dict[str, Any]:
    args, jobs = call.args, call.core.jobs
    owner = args["owner"]
    if args["all_users"] or (owner and owner != call.identity.user):
        call.require("jobs:read:all")
    elif not owner:
        owner = call.identity.user
    owner = None if args["all_users"] and not args["owner"] else owner
    if args["states"]:
        try:
            states = {JobState(s) for s in args["states"]}
        except ValueError:
            raise BadRequest(f"states must be among {', '.join(JobState)}") from None
        if states <= ACTIVE_STATES:
            found = await _active(call, states, owner, args["limit"], args["before"])
        else:
            found = await jobs.list(states=states, owner=owner, limit=args["limit"],
                                    before_id=args["before"])
    else:
        active = await _active(call, ACTIVE_STATES, owner, args["limit"], args["before"])
        recent = await jobs.list(owner=owner, limit=args["limit"], before_id=args["before"])
        merged = {job.id: job for job in (*active, *recent)}
        found = sorted(merged.values(), key=lambda j: -j.id)[: max(args["limit"], len(active))]
    return {"jobs": [job_for(call, job) for job in found]}


@handles(ops.JOBS_GET)
async def jobs_get(call: Call[ops.JobArgs]) -> WireJob | dict[str, Any]:
    return job_for(call, await visible_job(call, call.args["job"]))


async def cancel_job(call: Call[Any], job: Job, reason: str) -> Job:
    if job.owner != call.identity.user:
        call.require("jobs:cancel:all")
    if job.state in TERMINAL_STATES:
        return job
    updated = await call.core.jobs.cancel(job.id, reason=reason, now=time.time())
    call.core.publish(updated)
    if updated.state == JobState.RUNNING:
        call.core.runner.cancel(job.id)
    call.core.scheduler.wake()
    return updated


@handles(ops.JOBS_CANCEL)
async def jobs_cancel(call: Call[ops.JobsCancelArgs]) -> dict[str, Any]:
    who = call.identity.user
    reason = f"cancelled by {who}" + (f": {call.args['reason']}" if call.args["reason"] else "")
    jobs = await visible_jobs(call, call.args["jobs"])
    return {"jobs": [job_for(call, await cancel_job(call, job, reason)) for job in jobs]}


async def get_many(call: Call[Any], ids: Sequence[int]) -> list[Job]:
    """The stored jobs among ``ids``; one query when they are mostly one range (a sweep)."""
    if not ids:
        return []
    low, high = min(ids), max(ids)
    if len(ids) > 8 and high - low < 2 * len(ids):
        wanted = set(ids)
        found = await call.core.jobs.list(before_id=high + 1, limit=high - low + 1)
        return [job for job in found if job.id in wanted]
    jobs = [await call.core.jobs.get(job_id) for job_id in ids]
    return [job for job in jobs if job is not None]


async def _wait_until(call: Call[Any], ids: Sequence[int],
                      deadline: float | None) -> tuple[dict[int, Job], bool]:
    done: dict[int, Job] = {}
    wanted = set(ids)

    async def ended(job: Job) -> None:
        if job.id in wanted and job.id not in done and job.state in TERMINAL_STATES:
            done[job.id] = job
            await call.emit("job", job_for(call, job))

    while len(done) < len(wanted):
        # Subscribe first, then read: no ending can slip between the two. A subscriber that
        # falls behind (a huge sweep ending at once) subscribes again and reads again.
        with call.core.events.subscribe() as sub:
            for job in await get_many(call, [i for i in ids if i not in done]):
                await ended(job)
            while len(done) < len(wanted) and not sub.overflowed:
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    return done, True
                try:
                    job = await asyncio.wait_for(sub.next(), timeout)
                except TimeoutError:
                    return done, True
                except Unavailable:
                    break
                await ended(job)
    return done, False


@handles(ops.JOBS_WAIT)
async def jobs_wait(call: Call[ops.JobsWaitArgs]) -> dict[str, Any]:
    jobs = await visible_jobs(call, call.args["jobs"])
    ids = list(dict.fromkeys(job.id for job in jobs))
    timeout = call.args["timeout"]
    deadline = None if timeout is None else time.monotonic() + timeout
    done, timed_out = await _wait_until(call, ids, deadline)
    rest = {job.id: job for job in await get_many(call, [i for i in ids if i not in done])}
    final = [done.get(i) or rest.get(i) for i in ids]
    return {"jobs": [job_for(call, j) for j in final if j is not None], "timed_out": timed_out}


@handles(ops.JOBS_EVENTS)
async def jobs_events(call: Call[ops.JobsEventsArgs]) -> dict[str, Any]:
    wanted = None
    if call.args["jobs"] is not None:
        wanted = {job.id for job in await visible_jobs(call, call.args["jobs"])}
    with call.core.events.subscribe() as sub:
        while True:
            job = await sub.next()
            if (wanted is None or job.id in wanted) and may_see(call, job):
                await call.emit("job", job_for(call, job))
