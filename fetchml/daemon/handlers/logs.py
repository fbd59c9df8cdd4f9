"""jobs.logs: a job's output from a byte offset, and with follow, as it is written.

In a cluster an attempt's log lives on the host that ran it: the daemon asked serves it from
its own disk when it has the attempt, and otherwise relays the stream of the host the store
names for that attempt. Requests from other daemons are always served locally, so a request
never bounces between hosts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetchml.daemon.cluster.membership import is_peer
from fetchml.daemon.handlers import Call, handles
from fetchml.daemon.handlers.jobs import visible_job
from fetchml.daemon.jobs.model import TERMINAL_STATES, Job, JobState
from fetchml.daemon.supervise.rundir import RunDir
from fetchml.errors import NotFound, Unavailable
from fetchml.protocol import ops

# Largest piece of log in one event; well under the frame limit.
LOG_CHUNK = 1 << 20
# How often a follower looks for new output: new lines reach the user within ~this long.
FOLLOW_POLL_S = 0.05
# A follower also re-reads its job from the store this often, should an event be missed.
REFRESH_S = 1.0


@dataclass
class _Position:
    job: Job
    attempt: int
    offset: int


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(LOG_CHUNK)
    except FileNotFoundError:
        return b""


def _attempt_over(job: Job, attempt: int, *, fixed: bool) -> bool:
    """Whether no more output can come: the job ended (or, for a fixed attempt, moved on)."""
    if job.state in TERMINAL_STATES and job.attempt == attempt:
        return True
    return fixed and (job.attempt > attempt or job.state is not JobState.RUNNING)


async def _remote_host(call: Call[Any], job: Job, attempt: int) -> str | None:
    """The other host whose disk holds ``attempt``'s log, or None to read this one's."""
    core = call.core
    if (core.cluster is None or not attempt or is_peer(call.identity)
            or core.runner.run_dir(job.id, attempt).exists()):
        return None
    host = job.host if job.attempt == attempt else None
    if host is None:  # a cluster's store is Redis, which records each attempt's host
        host = await core.cluster.store.attempt_host(job.id, attempt)
    return host if host and host != core.cluster.name else None


async def _relay(call: Call[Any], host: str, pos: _Position, follow: bool) -> None:
    """Stream one attempt's log from ``host``, which ran it."""
    assert call.core.cluster is not None
    conn = await call.core.cluster.peer(host)
    args = {"job": str(pos.job.id), "attempt": pos.attempt, "offset": pos.offset,
            "follow": follow}
    async with conn.stream(ops.JOBS_LOGS.name, args) as stream:
        async for event, data in stream:
            if event == "log" and isinstance(data, bytes):
                await call.emit("log", data)
                pos.offset += len(data)


async def _follow_local(call: Call[Any], pos: _Position, follow: bool, fixed: bool) -> bool:
    """Stream the attempt's log from this host's disk; True when a newer attempt began."""
    runner = call.core.runner
    refresh_at = time.monotonic() + REFRESH_S
    with call.core.events.subscribe() as sub:
        while True:
            path = RunDir(runner.run_dir(pos.job.id, pos.attempt)).log
            data = _read_from(path, pos.offset) if pos.attempt else b""
            if data:
                await call.emit("log", data)
                pos.offset += len(data)
                continue
            if not follow:
                return False
            for changed in sub.drain():
                if changed.id == pos.job.id:
                    pos.job = changed
            if sub.overflowed or time.monotonic() >= refresh_at:
                pos.job = await call.core.jobs.get(pos.job.id) or pos.job
                refresh_at = time.monotonic() + REFRESH_S
            if not fixed and pos.job.attempt > pos.attempt:
                return True
            if _attempt_over(pos.job, pos.attempt, fixed=fixed):
                if not _read_from(path, pos.offset):  # the last words, written before it ended
                    return False
                continue
            await asyncio.sleep(FOLLOW_POLL_S)


async def _follow_remote(call: Call[Any], host: str, pos: _Position, follow: bool,
                         fixed: bool) -> bool:
    """Relay the attempt's log from ``host``; True when a newer attempt began."""
    assert call.core.cluster is not None
    if await call.core.cluster.address_of(host) is None:
        raise Unavailable(f"attempt {pos.attempt} of job {pos.job.id} ran on host {host}, "
                          "which has no address this daemon can reach; ask the daemon there")
    while True:
        try:
            await _relay(call, host, pos, follow)
        except Unavailable as exc:
            if not follow:
                raise Unavailable(f"attempt {pos.attempt} of job {pos.job.id} ran on host "
                                  f"{host}, which cannot be reached ({exc.message}); try "
                                  "again once it is back") from exc
            await asyncio.sleep(REFRESH_S)  # it may come back, or the job move elsewhere
        pos.job = await call.core.jobs.get(pos.job.id) or pos.job
        if not follow:
            return False
        if not fixed and pos.job.attempt > pos.attempt:
            return True
        if _attempt_over(pos.job, pos.attempt, fixed=fixed):
            return False
        await asyncio.sleep(REFRESH_S / 4)  # e.g. waiting to be retried: nothing to relay


@handles(ops.JOBS_LOGS)
async def jobs_logs(call: Call[ops.JobsLogsArgs]) -> dict[str, Any]:
    job: Job = await visible_job(call, call.args["job"])
    fixed_attempt: int | None = call.args["attempt"]
    if fixed_attempt is not None and not 1 <= fixed_attempt <= max(job.attempt, 1):
        raise NotFound(f"job {job.id} has no attempt {fixed_attempt}; it is at attempt "
                       f"{job.attempt}")
    pos = _Position(job, fixed_attempt or job.attempt, call.args["offset"])
    follow, fixed = call.args["follow"], fixed_attempt is not None
    while True:
        host = await _remote_host(call, pos.job, pos.attempt)
        if host is None:
            moved = await _follow_local(call, pos, follow, fixed)
        else:
            moved = await _follow_remote(call, host, pos, follow, fixed)
        if not moved:
            break
        if pos.attempt:  # a retry began: say so, then follow the new attempt
            await call.emit("attempt", pos.job.attempt)
        pos.attempt, pos.offset = pos.job.attempt, 0
    return {"offset": pos.offset, "state": pos.job.state.value, "attempt": pos.attempt}
